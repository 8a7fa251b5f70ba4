//! Telemetry frame parsing and validation (spec §6, §7.2): bytes in, points and per-entry reject reasons out.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, NaiveDateTime};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// Max datapoints per frame accepted by WebMACS.
pub const MAX_FRAME_DATAPOINTS: usize = 500;
/// Default byte limit of one frame (a 500-point frame is ~40 KiB; this leaves room for long ids).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 4 << 20;
/// Client timestamps further ahead than this are rejected: a wrong device clock must not poison "latest".
pub const MAX_FUTURE_US: i64 = 5 * 60 * 1_000_000;
/// The earliest client timestamp accepted: the Unix epoch. Older times are device clocks that were never
/// set (or hostile input); every reader (Python's datetime, time arithmetic, exports) handles this range.
pub const MIN_TIME_US: i64 = 0;

/// Why one entry of a frame was not accepted. Every rejection has exactly one reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    NotObject,
    MissingValue,
    InvalidValue,
    NonFinite,
    MissingEvent,
    UnknownEvent,
    InactiveEvent,
    BadTimestamp,
    FarFutureTimestamp,
    /// Before 1970-01-01T00:00:00Z.
    TimestampTooOld,
    /// The database refused the row itself (a constraint, a range, a trigger) when it was written.
    DatabaseRefused,
    /// The sender's token is bound to a plugin instance the event is not mapped to.
    NotPermitted,
    /// A line-protocol string field (only numbers and booleans become values).
    StringField,
}

impl Reject {
    pub const ALL: [Reject; 13] = [
        Reject::NotObject,
        Reject::MissingValue,
        Reject::InvalidValue,
        Reject::NonFinite,
        Reject::MissingEvent,
        Reject::UnknownEvent,
        Reject::InactiveEvent,
        Reject::BadTimestamp,
        Reject::FarFutureTimestamp,
        Reject::TimestampTooOld,
        Reject::DatabaseRefused,
        Reject::NotPermitted,
        Reject::StringField,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Reject::NotObject => "not_object",
            Reject::MissingValue => "missing_value",
            Reject::InvalidValue => "invalid_value",
            Reject::NonFinite => "non_finite",
            Reject::MissingEvent => "missing_event",
            Reject::UnknownEvent => "unknown_event",
            Reject::InactiveEvent => "inactive_event",
            Reject::BadTimestamp => "bad_timestamp",
            Reject::FarFutureTimestamp => "far_future_timestamp",
            Reject::TimestampTooOld => "timestamp_too_old",
            Reject::DatabaseRefused => "database_refused",
            Reject::NotPermitted => "not_permitted",
            Reject::StringField => "string_field",
        }
    }

    /// Shape errors make a strict (REST) request fail as a whole; catalog misses are dropped silently.
    pub fn is_shape_error(self) -> bool {
        !matches!(
            self,
            Reject::UnknownEvent
                | Reject::InactiveEvent
                | Reject::DatabaseRefused
                | Reject::NotPermitted
        )
    }

    /// A sentence for the sender (error frames, REST errors).
    pub fn message(self) -> &'static str {
        match self {
            Reject::NotObject => "entry is not a JSON object",
            Reject::MissingValue => "value is missing",
            Reject::InvalidValue => "value is not a number",
            Reject::NonFinite => "value is not a finite number",
            Reject::MissingEvent => "event_public_id is missing",
            Reject::UnknownEvent => "event not found",
            Reject::InactiveEvent => "event is not linked to an enabled plugin instance",
            Reject::BadTimestamp => "timestamp is not RFC 3339 or epoch milliseconds",
            Reject::FarFutureTimestamp => "timestamp is more than 5 minutes in the future",
            Reject::TimestampTooOld => "timestamp is before 1970-01-01T00:00:00Z",
            Reject::DatabaseRefused => "the database refused the datapoint",
            Reject::NotPermitted => "this token may not write to the event",
            Reject::StringField => "string fields are not stored (numbers and booleans only)",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Why a whole frame was refused (nothing in it is looked at further).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("frame is not a JSON object")]
    NotObject,
    #[error("Batch too large ({0}), max {MAX_FRAME_DATAPOINTS}")]
    TooMany(usize),
    #[error("Frame too large ({0} bytes), max {1}")]
    TooLarge(usize, usize),
}

impl FrameError {
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::InvalidJson(_) => "invalid_json",
            FrameError::NotObject => "not_object",
            FrameError::TooMany(_) => "too_many",
            FrameError::TooLarge(..) => "too_large",
        }
    }
}

/// One datapoint that passed validation (the catalog has not been consulted yet). The event id borrows from
/// the frame's bytes when it has no escapes.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedPoint<'a> {
    pub event_public_id: Cow<'a, str>,
    pub value: f64,
    /// Client timestamp, microseconds since the Unix epoch.
    pub time_us: Option<i64>,
}

/// The result of parsing one frame.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedFrame<'a> {
    /// Valid points with their index in the `datapoints` array.
    pub points: Vec<(usize, ParsedPoint<'a>)>,
    /// Invalid entries: index in the array and reason.
    pub rejects: Vec<(usize, Reject)>,
    /// Number of entries in the `datapoints` array (0 when missing).
    pub total: usize,
    /// `datapoints` was present and an array.
    pub has_datapoints: bool,
    /// The client's frame sequence number, echoed in the ack.
    pub seq: Option<u64>,
}

impl ParsedFrame<'_> {
    /// The same frame owning its event ids (for a frame parsed from a temporary buffer).
    pub fn into_owned(self) -> ParsedFrame<'static> {
        ParsedFrame {
            points: self
                .points
                .into_iter()
                .map(|(i, p)| {
                    let p = ParsedPoint {
                        event_public_id: Cow::Owned(p.event_public_id.into_owned()),
                        value: p.value,
                        time_us: p.time_us,
                    };
                    (i, p)
                })
                .collect(),
            rejects: self.rejects,
            total: self.total,
            has_datapoints: self.has_datapoints,
            seq: self.seq,
        }
    }
}

/// One field of an entry, as far as validation needs it (no JSON tree is built; strings borrow from the frame).
#[derive(Debug, Clone, PartialEq)]
enum Field<'a> {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(Cow<'a, str>),
    /// An array or an object.
    Other,
}

impl Field<'_> {
    fn as_f64(&self) -> Option<f64> {
        match *self {
            Field::U64(n) => Some(n as f64),
            Field::I64(n) => Some(n as f64),
            Field::F64(f) => Some(f),
            _ => None,
        }
    }
}

fn value_of(v: Option<&Field<'_>>) -> Result<f64, Reject> {
    let f = match v {
        None | Some(Field::Null) => return Err(Reject::MissingValue),
        Some(Field::Str(s)) => s.trim().parse::<f64>().map_err(|_| Reject::InvalidValue)?,
        // Numeric strings are accepted, as WebMACS does (Python's float()); numbers are numbers.
        Some(n) => n.as_f64().ok_or(Reject::InvalidValue)?,
    };
    if f.is_finite() {
        Ok(f)
    } else {
        Err(Reject::NonFinite)
    }
}

fn event_id_of<'a>(v: Option<Field<'a>>) -> Result<Cow<'a, str>, Reject> {
    // The reference converts the id with str(); numbers and booleans become their Python spelling (numbers as
    // serde_json writes them, which matches Python for integers and most floats).
    match v {
        Some(Field::Str(s)) => Ok(s),
        Some(Field::U64(n)) => Ok(Cow::Owned(n.to_string())),
        Some(Field::I64(n)) => Ok(Cow::Owned(n.to_string())),
        Some(Field::F64(f)) => Ok(Cow::Owned(
            serde_json::Number::from_f64(f).map_or_else(|| f.to_string(), |n| n.to_string()),
        )),
        Some(Field::Bool(b)) => Ok(Cow::Borrowed(if b { "True" } else { "False" })),
        _ => Err(Reject::MissingEvent),
    }
}

/// The one range check of client timestamps, for every ingest path: from the Unix epoch to `MAX_FUTURE_US`
/// after `now_us`. Overflow-checked: any i64 is answered, never wrapped.
pub fn check_time(time_us: i64, now_us: i64) -> Result<i64, Reject> {
    if time_us < MIN_TIME_US {
        return Err(Reject::TimestampTooOld);
    }
    if time_us > now_us.saturating_add(MAX_FUTURE_US) {
        return Err(Reject::FarFutureTimestamp);
    }
    Ok(time_us)
}

/// Epoch milliseconds (a JSON number, possibly fractional) to microseconds, for any finite or huge input.
pub fn epoch_ms_to_us(ms: f64) -> Result<i64, Reject> {
    if !ms.is_finite() {
        return Err(Reject::BadTimestamp);
    }
    let us = (ms * 1000.0).round();
    // Outside i64 (≈ ±292,000 years) the value is certainly out of range: say which side.
    if us < i64::MIN as f64 {
        return Err(Reject::TimestampTooOld);
    }
    if us >= i64::MAX as f64 {
        return Err(Reject::FarFutureTimestamp);
    }
    Ok(us as i64)
}

/// A client timestamp: RFC 3339 (a naive ISO form counts as UTC) or epoch milliseconds; range-checked
/// against `now_us` by `check_time`.
pub fn parse_timestamp(v: &Value, now_us: i64) -> Result<Option<i64>, Reject> {
    let field = match v {
        Value::Null => Field::Null,
        Value::String(s) => Field::Str(Cow::Borrowed(s)),
        Value::Number(n) => n.as_f64().map_or(Field::Other, Field::F64),
        _ => Field::Other,
    };
    timestamp_of(&field, now_us)
}

fn timestamp_text_us(s: &str) -> Result<i64, Reject> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_micros());
    }
    Ok(NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .map_err(|_| Reject::BadTimestamp)?
        .and_utc()
        .timestamp_micros())
}

fn timestamp_of(v: &Field<'_>, now_us: i64) -> Result<Option<i64>, Reject> {
    let us = match v {
        Field::Null => return Ok(None),
        Field::Str(s) => timestamp_text_us(s)?,
        Field::Bool(_) | Field::Other => return Err(Reject::BadTimestamp),
        n => epoch_ms_to_us(n.as_f64().ok_or(Reject::BadTimestamp)?)?,
    };
    check_time(us, now_us).map(Some)
}

/// An entry of `datapoints`: the fields validation looks at (the last of duplicate keys wins, as in a JSON
/// object read into a map), or not an object at all.
enum Entry<'a> {
    NotObject,
    Object {
        value: Option<Field<'a>>,
        event: Option<Field<'a>>,
        timestamp: Option<Field<'a>>,
    },
}

fn point_of<'a>(entry: Entry<'a>, now_us: i64) -> Result<ParsedPoint<'a>, Reject> {
    let Entry::Object {
        value,
        event,
        timestamp,
    } = entry
    else {
        return Err(Reject::NotObject);
    };
    let value = value_of(value.as_ref())?;
    let event_public_id = event_id_of(event)?;
    let time_us = match &timestamp {
        None => None,
        Some(t) => timestamp_of(t, now_us)?,
    };
    Ok(ParsedPoint {
        event_public_id,
        value,
        time_us,
    })
}

// --- the streaming reader: serde visitors over the frame's bytes, no intermediate JSON tree ---------------

/// A value that is read and dropped. Unlike serde's `Skip` (which serde_json skips without a depth
/// limit) it goes through `deserialize_any`, so nesting deeper than serde_json's limit (128) is an error here
/// exactly as it is for a JSON tree.
struct Skip;

impl<'de> de::Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SkipVisitor;
        impl<'de> Visitor<'de> for SkipVisitor {
            type Value = Skip;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_unit<E>(self) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_none<E>(self) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
                while seq.next_element::<Skip>()?.is_some() {}
                Ok(Skip)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
                while map.next_entry::<Skip, Skip>()?.is_some() {}
                Ok(Skip)
            }
        }
        d.deserialize_any(SkipVisitor)
    }
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Field<'de>, E> {
        Ok(Field::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Field<'de>, E> {
        Ok(Field::U64(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Field<'de>, E> {
        Ok(Field::I64(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Field<'de>, E> {
        Ok(Field::F64(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Owned(v)))
    }
    fn visit_unit<E>(self) -> Result<Field<'de>, E> {
        Ok(Field::Null)
    }
    fn visit_none<E>(self) -> Result<Field<'de>, E> {
        Ok(Field::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field<'de>, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Field::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field<'de>, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Field::Other)
    }
}

impl<'de> de::Deserialize<'de> for Field<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor)
    }
}

/// A key, compared after unescaping (borrowed when it has no escapes).
struct Key<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

struct EntryVisitor;

impl<'de> Visitor<'de> for EntryVisitor {
    type Value = Entry<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a datapoint")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entry<'de>, A::Error> {
        let (mut value, mut event, mut timestamp) = (None, None, None);
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match &*k {
                "value" => value = Some(map.next_value::<Field<'de>>()?),
                "event_public_id" => event = Some(map.next_value::<Field<'de>>()?),
                "timestamp" => timestamp = Some(map.next_value::<Field<'de>>()?),
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(Entry::Object {
            value,
            event,
            timestamp,
        })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Entry<'de>, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Entry::NotObject)
    }
    // Scalars: not an object.
    fn visit_bool<E>(self, _: bool) -> Result<Entry<'de>, E> {
        Ok(Entry::NotObject)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Entry<'de>, E> {
        Ok(Entry::NotObject)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Entry<'de>, E> {
        Ok(Entry::NotObject)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Entry<'de>, E> {
        Ok(Entry::NotObject)
    }
    fn visit_str<E>(self, _: &str) -> Result<Entry<'de>, E> {
        Ok(Entry::NotObject)
    }
    fn visit_unit<E>(self) -> Result<Entry<'de>, E> {
        Ok(Entry::NotObject)
    }
    fn visit_none<E>(self) -> Result<Entry<'de>, E> {
        Ok(Entry::NotObject)
    }
}

impl<'de> de::Deserialize<'de> for Entry<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(EntryVisitor)
    }
}

/// What one `datapoints` value held: validated entries (the first MAX_FRAME_DATAPOINTS), and how many there were.
struct Datapoints<'a> {
    is_array: bool,
    total: usize,
    points: Vec<(usize, ParsedPoint<'a>)>,
    rejects: Vec<(usize, Reject)>,
}

struct DatapointsSeed {
    now_us: i64,
}

impl<'de> DeserializeSeed<'de> for DatapointsSeed {
    type Value = Datapoints<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Datapoints<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DatapointsSeed {
    type Value = Datapoints<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("datapoints")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Datapoints<'de>, A::Error> {
        let mut out = Datapoints {
            is_array: true,
            total: 0,
            points: Vec::with_capacity(seq.size_hint().unwrap_or(16).min(MAX_FRAME_DATAPOINTS)),
            rejects: Vec::new(),
        };
        loop {
            if out.total < MAX_FRAME_DATAPOINTS {
                let Some(entry) = seq.next_element::<Entry<'de>>()? else {
                    break;
                };
                match point_of(entry, self.now_us) {
                    Ok(p) => out.points.push((out.total, p)),
                    Err(r) => out.rejects.push((out.total, r)),
                }
            } else if seq.next_element::<Skip>()?.is_none() {
                // Past the limit entries are only counted: the frame is refused with their number.
                break;
            }
            out.total += 1;
        }
        Ok(out)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Datapoints<'de>, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Datapoints::not_array())
    }
    fn visit_bool<E>(self, _: bool) -> Result<Datapoints<'de>, E> {
        Ok(Datapoints::not_array())
    }
    fn visit_u64<E>(self, _: u64) -> Result<Datapoints<'de>, E> {
        Ok(Datapoints::not_array())
    }
    fn visit_i64<E>(self, _: i64) -> Result<Datapoints<'de>, E> {
        Ok(Datapoints::not_array())
    }
    fn visit_f64<E>(self, _: f64) -> Result<Datapoints<'de>, E> {
        Ok(Datapoints::not_array())
    }
    fn visit_str<E>(self, _: &str) -> Result<Datapoints<'de>, E> {
        Ok(Datapoints::not_array())
    }
    fn visit_unit<E>(self) -> Result<Datapoints<'de>, E> {
        Ok(Datapoints::not_array())
    }
    fn visit_none<E>(self) -> Result<Datapoints<'de>, E> {
        Ok(Datapoints::not_array())
    }
}

impl Datapoints<'_> {
    fn not_array() -> Self {
        Datapoints {
            is_array: false,
            total: 0,
            points: Vec::new(),
            rejects: Vec::new(),
        }
    }
}

/// The whole frame: its `seq` and the last `datapoints` (a JSON object read into a map keeps the last of
/// duplicate keys), or not an object at all.
enum Top<'a> {
    NotObject,
    Object {
        seq: Option<u64>,
        datapoints: Option<Datapoints<'a>>,
    },
}

struct TopSeed {
    now_us: i64,
}

impl<'de> DeserializeSeed<'de> for TopSeed {
    type Value = Top<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Top<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopSeed {
    type Value = Top<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a telemetry frame")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top<'de>, A::Error> {
        let (mut seq, mut datapoints) = (None, None);
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match &*k {
                "datapoints" => {
                    datapoints = Some(map.next_value_seed(DatapointsSeed {
                        now_us: self.now_us,
                    })?)
                }
                // `as_u64`: only a non-negative integer is a sequence number; anything else is no seq.
                "seq" => {
                    seq = match map.next_value::<Field<'de>>()? {
                        Field::U64(n) => Some(n),
                        _ => None,
                    }
                }
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(Top::Object { seq, datapoints })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Top<'de>, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Top::NotObject)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }
    fn visit_str<E>(self, _: &str) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }
    fn visit_unit<E>(self) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }
    fn visit_none<E>(self) -> Result<Top<'de>, E> {
        Ok(Top::NotObject)
    }
}

fn read_top(bytes: &[u8], now_us: i64) -> Result<Top<'_>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let top = TopSeed { now_us }.deserialize(&mut de)?;
    de.end()?;
    Ok(top)
}

/// Python's `json` (and so the WebMACS controller) writes NaN/Infinity as bare tokens, which strict JSON
/// refuses. Rewrite them (outside strings) into strings so that one bad value is an entry-level
/// `non_finite` reject instead of a dropped connection.
fn quote_non_finite_tokens(bytes: &[u8]) -> Option<Vec<u8>> {
    const TOKENS: [&[u8]; 3] = [b"-Infinity", b"Infinity", b"NaN"];
    let mut out = Vec::with_capacity(bytes.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut changed = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if let Some(t) = TOKENS.iter().find(|t| bytes[i..].starts_with(t)) {
            out.push(b'"');
            out.extend_from_slice(t);
            out.push(b'"');
            i += t.len();
            changed = true;
            continue;
        }
        out.push(b);
        i += 1;
    }
    changed.then_some(out)
}

/// Parse a telemetry frame `{"datapoints":[{"value", "event_public_id", "timestamp"?}, ...], "seq"?}`.
///
/// `now_us` (Unix microseconds) bounds client timestamps; `max_bytes` bounds the frame. The frame is read in
/// one pass without building a JSON tree; event ids borrow from `bytes` when they have no escapes.
pub fn parse_frame(
    bytes: &[u8],
    now_us: i64,
    max_bytes: usize,
) -> Result<ParsedFrame<'_>, FrameError> {
    if bytes.len() > max_bytes {
        return Err(FrameError::TooLarge(bytes.len(), max_bytes));
    }
    let top = match read_top(bytes, now_us) {
        Ok(top) => top,
        Err(e) => {
            // Bare NaN/Infinity tokens (Python's json): quoted, they are entry-level rejects.
            let retry = quote_non_finite_tokens(bytes)
                .ok_or_else(|| FrameError::InvalidJson(e.to_string()))?;
            return match read_top(&retry, now_us) {
                Ok(top) => frame_of(top).map(ParsedFrame::into_owned),
                Err(_) => Err(FrameError::InvalidJson(e.to_string())),
            };
        }
    };
    frame_of(top)
}

fn frame_of(top: Top<'_>) -> Result<ParsedFrame<'_>, FrameError> {
    let Top::Object { seq, datapoints } = top else {
        return Err(FrameError::NotObject);
    };
    let Some(dp) = datapoints.filter(|d| d.is_array) else {
        return Ok(ParsedFrame {
            seq,
            ..Default::default()
        });
    };
    if dp.total > MAX_FRAME_DATAPOINTS {
        return Err(FrameError::TooMany(dp.total));
    }
    Ok(ParsedFrame {
        points: dp.points,
        rejects: dp.rejects,
        total: dp.total,
        has_datapoints: true,
        seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_764_000_000_000_000; // 2025-11-24
    const MAX: usize = DEFAULT_MAX_FRAME_BYTES;

    fn parse(b: &[u8]) -> Result<ParsedFrame<'_>, FrameError> {
        parse_frame(b, NOW, MAX)
    }

    fn reasons(f: &ParsedFrame) -> Vec<Reject> {
        f.rejects.iter().map(|r| r.1).collect()
    }

    #[test]
    fn accepts_numbers_and_numeric_strings() {
        let f = parse(br#"{"datapoints":[{"value":1.5,"event_public_id":"a"},{"value":"42","event_public_id":"b","x":1}]}"#).unwrap();
        assert_eq!(f.points.len(), 2);
        assert_eq!(f.points[1].1.value, 42.0);
        assert!(f.rejects.is_empty());
        assert!(f.has_datapoints);
    }

    #[test]
    fn every_reject_has_its_reason() {
        let f = parse(
            br#"{"datapoints":[1,{"value":null,"event_public_id":"a"},{"value":"x","event_public_id":"a"},
            {"value":1},{"value":"inf","event_public_id":"a"},{"value":1e400,"event_public_id":"a"},
            {"value":1,"event_public_id":"a","timestamp":"yesterday"},{"value":[1],"event_public_id":"a"},
            {"value":1,"event_public_id":{"x":1}}]}"#,
        );
        // 1e400 overflows serde_json's f64 parsing: the whole frame is invalid JSON.
        assert!(matches!(f, Err(FrameError::InvalidJson(_))));
        let f = parse(
            br#"{"datapoints":[1,{"value":null,"event_public_id":"a"},{"value":"x","event_public_id":"a"},
            {"value":1},{"value":"inf","event_public_id":"a"},
            {"value":1,"event_public_id":"a","timestamp":"yesterday"},{"value":[1],"event_public_id":"a"},
            {"value":1,"event_public_id":{"x":1}}]}"#,
        )
        .unwrap();
        use Reject::*;
        assert_eq!(
            reasons(&f),
            vec![
                NotObject,
                MissingValue,
                InvalidValue,
                MissingEvent,
                NonFinite,
                BadTimestamp,
                InvalidValue,
                MissingEvent
            ]
        );
        assert_eq!(f.total, 8);
    }

    #[test]
    fn floats_parse_exactly() {
        // Found by the Python round-trip property: serde_json's default float parser is off by one ulp here.
        let f = parse(br#"{"datapoints":[{"value":9.638763872755865e+45,"event_public_id":"a"}]}"#)
            .unwrap();
        assert_eq!(
            f.points[0].1.value.to_bits(),
            9.638763872755865e45f64.to_bits()
        );
    }

    #[test]
    fn python_non_finite_tokens_are_entry_rejects() {
        let f = parse(br#"{"datapoints":[{"value":NaN,"event_public_id":"a"},{"value":-Infinity,"event_public_id":"NaN"},{"value":2,"event_public_id":"x"}]}"#).unwrap();
        assert_eq!(reasons(&f), vec![Reject::NonFinite, Reject::NonFinite]);
        assert_eq!(f.points[0].1.event_public_id, "x");
    }

    #[test]
    fn timestamps_rfc3339_naive_and_epoch_ms() {
        let f = parse(
            br#"{"datapoints":[{"value":1,"event_public_id":"a","timestamp":"2025-01-01T00:00:00.5Z"},
            {"value":1,"event_public_id":"a","timestamp":"2025-01-01T01:00:00.5+01:00"},
            {"value":1,"event_public_id":"a","timestamp":"2025-01-01T00:00:00.5"},
            {"value":1,"event_public_id":"a","timestamp":1735689600500}]}"#,
        )
        .unwrap();
        let want = 1_735_689_600_500_000;
        assert!(
            f.points.iter().all(|(_, p)| p.time_us == Some(want)),
            "{f:?}"
        );
    }

    #[test]
    fn far_future_is_rejected_near_future_accepted() {
        let near = (NOW / 1000) + 60_000;
        let far = (NOW / 1000) + 6 * 60_000;
        let body = format!(
            r#"{{"datapoints":[{{"value":1,"event_public_id":"a","timestamp":{near}}},{{"value":1,"event_public_id":"a","timestamp":{far}}},{{"value":1,"event_public_id":"a","timestamp":1e300}}]}}"#
        );
        let f = parse(body.as_bytes()).unwrap();
        assert_eq!(f.points.len(), 1);
        assert_eq!(
            reasons(&f),
            vec![Reject::FarFutureTimestamp, Reject::FarFutureTimestamp]
        );
    }

    #[test]
    fn timestamps_outside_the_range_are_rejected_whatever_their_size() {
        use Reject::*;
        let cases: [(&str, Result<Option<i64>, Reject>); 14] = [
            // The issue's poison value: epoch ms before 4713 BC.
            ("-300000000000000", Err(TimestampTooOld)),
            ("-1", Err(TimestampTooOld)),
            ("0", Ok(Some(0))),
            ("-0.0001", Ok(Some(0))),
            ("9223372036854775807", Err(FarFutureTimestamp)),
            ("-9223372036854775808", Err(TimestampTooOld)),
            ("1e308", Err(FarFutureTimestamp)),
            ("-1e308", Err(TimestampTooOld)),
            ("\"0000-01-01T00:00:00Z\"", Err(TimestampTooOld)),
            ("\"1969-12-31T23:59:59.999999Z\"", Err(TimestampTooOld)),
            ("\"1970-01-01T00:00:00Z\"", Ok(Some(0))),
            ("\"9999-12-31T23:59:59Z\"", Err(FarFutureTimestamp)),
            ("\"+10000-01-01T00:00:00Z\"", Err(BadTimestamp)),
            ("true", Err(BadTimestamp)),
        ];
        for (json, want) in cases {
            let v: Value = serde_json::from_str(json).unwrap();
            assert_eq!(parse_timestamp(&v, NOW), want, "{json}");
        }
        assert_eq!(check_time(i64::MAX, i64::MAX), Ok(i64::MAX));
        assert_eq!(check_time(i64::MIN, 0), Err(TimestampTooOld));
        assert_eq!(epoch_ms_to_us(f64::NAN), Err(BadTimestamp));
        assert_eq!(epoch_ms_to_us(f64::INFINITY), Err(BadTimestamp));
    }

    #[test]
    fn frame_level_errors() {
        assert_eq!(parse(b"[1]"), Err(FrameError::NotObject));
        assert!(matches!(parse(b"nope"), Err(FrameError::InvalidJson(_))));
        assert!(matches!(parse(b""), Err(FrameError::InvalidJson(_))));
        let big = format!("{{\"datapoints\":[{}]}}", vec!["{}"; 501].join(","));
        let e = parse(big.as_bytes()).unwrap_err();
        assert_eq!(e, FrameError::TooMany(501));
        assert_eq!(e.to_string(), "Batch too large (501), max 500");
        assert_eq!(parse_frame(b"{}", NOW, 1), Err(FrameError::TooLarge(2, 1)));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(matches!(
            parse(deep.as_bytes()),
            Err(FrameError::InvalidJson(_))
        ));
    }

    #[test]
    fn missing_datapoints_is_empty_and_seq_is_kept() {
        assert_eq!(parse(b"{}").unwrap(), ParsedFrame::default());
        let f = parse(br#"{"seq":7,"datapoints":"x"}"#).unwrap();
        assert_eq!((f.seq, f.has_datapoints, f.total), (Some(7), false, 0));
        assert_eq!(parse(br#"{"seq":-1}"#).unwrap().seq, None);
    }

    proptest! {
        #[test]
        fn any_epoch_ms_is_answered_inside_the_range(ms in any::<f64>(), now in 0i64..4_000_000_000_000_000) {
            if let Ok(us) = epoch_ms_to_us(ms).and_then(|us| check_time(us, now)) {
                prop_assert!((MIN_TIME_US..=now + MAX_FUTURE_US).contains(&us));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn every_entry_is_accepted_or_rejected(
            entries in proptest::collection::vec(
                prop_oneof![
                    Just("1".to_string()),
                    Just("null".to_string()),
                    Just("\"x\"".to_string()),
                    any::<f64>().prop_map(|v| if v.is_finite() { format!("{{\"value\":{v},\"event_public_id\":\"e\"}}") } else { "{}".into() }),
                    (any::<i64>(), "[a-z0-9:+.TZ-]{0,30}").prop_map(|(n, s)| format!("{{\"value\":{n},\"event_public_id\":\"{s}\",\"timestamp\":\"{s}\"}}")),
                    any::<i64>().prop_map(|n| format!("{{\"value\":\"{n}\",\"event_public_id\":{n},\"timestamp\":{n}}}")),
                ],
                0..40,
            )
        ) {
            let body = format!("{{\"datapoints\":[{}]}}", entries.join(","));
            let f = parse(body.as_bytes()).unwrap();
            prop_assert_eq!(f.points.len() + f.rejects.len(), entries.len());
            prop_assert_eq!(f.total, entries.len());
            for (_, p) in &f.points { prop_assert!(p.value.is_finite()); }
        }
    }
}
