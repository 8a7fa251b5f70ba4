//! Telemetry frame parsing and validation (spec §6, §7.2).

use crate::error::CoreError;
use serde_json::Value;

/// Max datapoints per frame accepted by WebMACS.
pub const MAX_FRAME_DATAPOINTS: usize = 500;

/// One datapoint that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedPoint {
    pub event_public_id: String,
    pub value: f64,
}

/// The result of parsing one frame.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedFrame {
    pub points: Vec<ParsedPoint>,
    /// Entries skipped as invalid (non-object, missing/invalid value or event id).
    pub invalid: usize,
    /// Number of entries in the `datapoints` array (0 when missing).
    pub total: usize,
}

fn value_of(v: &Value) -> Option<f64> {
    let f = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    f.is_finite().then_some(f)
}

fn event_id_of(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(if *b { "True".into() } else { "False".into() }),
        _ => None,
    }
}

/// Parse a telemetry frame `{"datapoints":[{"value", "event_public_id"}, ...]}`.
pub fn parse_frame(bytes: &[u8]) -> Result<ParsedFrame, CoreError> {
    let doc: Value =
        serde_json::from_slice(bytes).map_err(|e| CoreError::InvalidFrame(e.to_string()))?;
    let obj = doc
        .as_object()
        .ok_or_else(|| CoreError::InvalidFrame("not an object".into()))?;
    let Some(Value::Array(items)) = obj.get("datapoints") else {
        return Ok(ParsedFrame::default());
    };
    if items.len() > MAX_FRAME_DATAPOINTS {
        return Err(CoreError::FrameTooLarge(format!(
            "Batch too large ({}), max {}",
            items.len(),
            MAX_FRAME_DATAPOINTS
        )));
    }
    let mut out = ParsedFrame { total: items.len(), ..Default::default() };
    for item in items {
        let parsed = item.as_object().and_then(|o| {
            Some(ParsedPoint {
                value: value_of(o.get("value")?)?,
                event_public_id: event_id_of(o.get("event_public_id")?)?,
            })
        });
        match parsed {
            Some(p) => out.points.push(p),
            None => out.invalid += 1,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_numbers_and_numeric_strings() {
        let f = parse_frame(br#"{"datapoints":[{"value":1.5,"event_public_id":"a"},{"value":"42","event_public_id":"b","x":1}]}"#).unwrap();
        assert_eq!(f.points.len(), 2);
        assert_eq!(f.points[1].value, 42.0);
        assert_eq!(f.invalid, 0);
    }

    #[test]
    fn skips_invalid_entries() {
        let f = parse_frame(br#"{"datapoints":[1,{"value":null,"event_public_id":"a"},{"value":"x","event_public_id":"a"},{"value":1}]}"#).unwrap();
        assert!(f.points.is_empty());
        assert_eq!(f.invalid, 4);
    }

    #[test]
    fn rejects_non_objects_and_oversize() {
        assert!(matches!(parse_frame(b"[1]"), Err(CoreError::InvalidFrame(_))));
        assert!(matches!(parse_frame(b"nope"), Err(CoreError::InvalidFrame(_))));
        let big = format!("{{\"datapoints\":[{}]}}", vec!["{}"; 501].join(","));
        assert_eq!(
            parse_frame(big.as_bytes()),
            Err(CoreError::FrameTooLarge("Batch too large (501), max 500".into()))
        );
    }

    #[test]
    fn missing_datapoints_is_empty() {
        assert_eq!(parse_frame(b"{}").unwrap(), ParsedFrame::default());
    }
}
