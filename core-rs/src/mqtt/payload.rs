//! MQTT payloads as telemetry frames: the WebSocket frame as it is, or the one-value form of a per-event topic.
//!
//! A payload that is a JSON object with `"datapoints"` is a frame, on any topic. Anything else is one value for
//! the event named by the topic's last level: a bare number (or numeric string), or `{"value":…,"timestamp"?:…}`.
//! The one-value form is rewritten into a frame of one entry, so both go through the one parser and validation.

use std::borrow::Cow;

/// Why a payload is not a frame at all (acknowledged and counted: it can never succeed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Not one JSON value (or not UTF-8).
    InvalidJson,
    /// A one-value payload that is neither a number, a numeric string nor an object.
    NotAValue,
    /// A one-value payload on a topic without an event id as its last level.
    NoEvent,
}

impl Malformed {
    pub fn code(self) -> &'static str {
        match self {
            Malformed::InvalidJson => "invalid_json",
            Malformed::NotAValue => "not_a_value",
            Malformed::NoEvent => "no_event_in_topic",
        }
    }
}

fn mentions_datapoints(payload: &[u8]) -> bool {
    const KEY: &[u8] = b"\"datapoints\"";
    payload.windows(KEY.len()).any(|w| w == KEY)
}

/// The frame for `payload` received on `topic`.
pub fn to_frame<'a>(topic: &str, payload: &'a [u8]) -> Result<Cow<'a, [u8]>, Malformed> {
    let t = payload.trim_ascii();
    if t.first() == Some(&b'{') && mentions_datapoints(t) {
        return Ok(Cow::Borrowed(payload));
    }
    let event = topic.rsplit('/').next().unwrap_or("");
    if event.is_empty() || event.contains(['+', '#']) {
        return Err(Malformed::NoEvent);
    }
    // serde_json escapes every character that needs it: the id cannot break out of its string.
    let event_json = serde_json::to_string(event).map_err(|_| Malformed::NoEvent)?;
    let mut frame = Vec::with_capacity(t.len() + event_json.len() + 48);
    frame.extend_from_slice(b"{\"datapoints\":[{\"event_public_id\":");
    frame.extend_from_slice(event_json.as_bytes());
    if t.first() == Some(&b'{') {
        // Exactly one JSON object (checked without building it), so splicing its members in adds no entries.
        serde_json::from_slice::<serde::de::IgnoredAny>(t).map_err(|_| Malformed::InvalidJson)?;
        let members = t[1..].trim_ascii_start();
        if members.first() != Some(&b'}') {
            frame.push(b',');
        }
        frame.extend_from_slice(members);
        frame.extend_from_slice(b"]}");
        return Ok(Cow::Owned(frame));
    }
    frame.extend_from_slice(b",\"value\":");
    match t {
        // Python's json and many devices print these: a counted non-finite value, not a broken message.
        b"NaN" | b"Infinity" | b"-Infinity" | b"nan" | b"inf" | b"-inf" => {
            frame.push(b'"');
            frame.extend_from_slice(t);
            frame.push(b'"');
        }
        _ => match serde_json::from_slice::<serde_json::Value>(t) {
            Ok(serde_json::Value::Number(_) | serde_json::Value::String(_)) => {
                frame.extend_from_slice(t)
            }
            Ok(_) => return Err(Malformed::NotAValue),
            Err(_) => return Err(Malformed::InvalidJson),
        },
    }
    frame.extend_from_slice(b"}]}");
    Ok(Cow::Owned(frame))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{parse_frame, Reject};

    const NOW: i64 = 1_764_000_000_000_000;

    /// (event, value, client time) of the valid points, and the reasons of the rejected ones.
    type Points = (Vec<(String, f64, Option<i64>)>, Vec<Reject>);

    fn points(topic: &str, payload: &[u8]) -> Result<Points, Malformed> {
        let frame = to_frame(topic, payload)?;
        let parsed = parse_frame(&frame, NOW, 1 << 20).map_err(|_| Malformed::InvalidJson)?;
        Ok((
            parsed
                .points
                .iter()
                .map(|(_, p)| (p.event_public_id.to_string(), p.value, p.time_us))
                .collect(),
            parsed.rejects.iter().map(|r| r.1).collect(),
        ))
    }

    #[test]
    fn frames_pass_unchanged_on_any_topic() {
        let f = br#"{"datapoints":[{"value":1.5,"event_public_id":"a"}]}"#;
        assert!(matches!(
            to_frame("webmacs/telemetry", f),
            Ok(Cow::Borrowed(_))
        ));
        assert_eq!(points("x/y", f).unwrap().0, vec![("a".into(), 1.5, None)]);
    }

    #[test]
    fn one_value_forms_name_the_event_by_topic() {
        assert_eq!(
            points("webmacs/telemetry/ev-1", b" 21.25\n").unwrap().0,
            vec![("ev-1".into(), 21.25, None)]
        );
        assert_eq!(
            points("t/ev", b"\"7\"").unwrap().0,
            vec![("ev".into(), 7.0, None)]
        );
        let (p, _) = points("t/ev", br#"{"value": 3, "timestamp": 1700000000000}"#).unwrap();
        assert_eq!(p, vec![("ev".into(), 3.0, Some(1_700_000_000_000_000))]);
        // An event id that needs escaping stays one string.
        let (p, _) = points("t/a\"b", b"1").unwrap();
        assert_eq!(p[0].0, "a\"b");
    }

    #[test]
    fn hostile_payloads_are_malformed_or_rejected_never_spliced() {
        // Two objects side by side would add a second entry if spliced blindly.
        assert_eq!(
            to_frame("t/ev", br#"{"value":1},{"event_public_id":"x","value":2}"#),
            Err(Malformed::InvalidJson)
        );
        assert_eq!(to_frame("t/ev", b"1,2"), Err(Malformed::InvalidJson));
        assert_eq!(to_frame("t/ev", b"\xff\xfe"), Err(Malformed::InvalidJson));
        assert_eq!(to_frame("t/ev", b"[1]"), Err(Malformed::NotAValue));
        assert_eq!(to_frame("t/ev", b"true"), Err(Malformed::NotAValue));
        assert_eq!(to_frame("t/ev", b""), Err(Malformed::InvalidJson));
        assert_eq!(to_frame("t/", b"1"), Err(Malformed::NoEvent));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(to_frame("t/ev", deep.as_bytes()).is_err());
        let deep_obj = format!(
            "{{\"value\":{}1{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        // Checked shallowly here, refused by the frame parser's depth limit.
        assert!(points("t/ev", deep_obj.as_bytes()).is_err());
        // Non-finite values are entries the validation rejects (counted per point).
        assert_eq!(points("t/ev", b"NaN").unwrap().1, vec![Reject::NonFinite]);
        // Out of f64 range as a bare token: not JSON serde can read, so malformed.
        assert_eq!(to_frame("t/ev", b"1e999"), Err(Malformed::InvalidJson));
        assert_eq!(
            points("t/ev", b"\"1e999\"").unwrap().1,
            vec![Reject::NonFinite]
        );
        assert_eq!(
            points("t/ev", br#"{}"#).unwrap().1,
            vec![Reject::MissingValue]
        );
    }
}
