//! Influx line protocol: request bodies → one point per numeric field, keyed by a canonical series name.
//!
//! `measurement[,tag=value…] field=value[,field=value…] [timestamp]`, one line each; `#` starts a comment.
//! Integers (`1i`, `1u`), floats and booleans become values; string fields are rejected per field with a
//! counted reason. A line that does not parse fails the whole body (Influx answers 400 with its number).
//! Every number is parsed and scaled with checked arithmetic: bad input is an `Err` or a reject, never a panic.

use std::collections::HashMap;

use crate::frame::{check_time, Reject};

/// Timestamp unit of a body (`precision=` on the write endpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Ns,
    Us,
    Ms,
    S,
}

impl Precision {
    /// `ns`, `us` (also `u`, `µs`), `ms`, `s`; what Influx's v1 endpoint also accepts (`n`, `u`) is taken too.
    pub fn parse(text: &str) -> Option<Precision> {
        match text {
            "" | "ns" | "n" => Some(Precision::Ns),
            "us" | "u" | "µs" => Some(Precision::Us),
            "ms" => Some(Precision::Ms),
            "s" => Some(Precision::S),
            _ => None,
        }
    }

    /// A timestamp in this unit to Unix microseconds (sub-microsecond digits are truncated towards −∞).
    pub fn to_us(self, t: i64) -> Option<i64> {
        match self {
            Precision::Ns => Some(t.div_euclid(1000)),
            Precision::Us => Some(t),
            Precision::Ms => t.checked_mul(1000),
            Precision::S => t.checked_mul(1_000_000),
        }
    }
}

/// One numeric field of one line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinePoint {
    /// Index into `LineBatch::series`.
    pub series: u32,
    pub value: f64,
    /// Client time in Unix microseconds; None: the server's time.
    pub time_us: Option<i64>,
}

/// A parsed body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LineBatch {
    /// Canonical series names (`measurement,tag=value… field`, tags sorted, Influx escaping), distinct.
    pub series: Vec<String>,
    pub points: Vec<LinePoint>,
    /// Fields not taken, with the 1-based line they came from.
    pub rejects: Vec<(usize, Reject)>,
    /// Lines holding a point (not blank, not comments).
    pub lines: usize,
}

/// Why a body was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error("too many points in one request (more than {0})")]
    TooMany(usize),
}

type Step<T> = Result<T, String>;

/// Parse a whole body. `now_us` bounds client timestamps (as on every path); at most `max_points` fields.
pub fn parse(
    body: &[u8],
    precision: Precision,
    now_us: i64,
    max_points: usize,
) -> Result<LineBatch, LineError> {
    let mut batch = LineBatch::default();
    let mut index: HashMap<String, u32> = HashMap::new();
    for (n, raw) in body.split(|&b| b == b'\n').enumerate() {
        let line_no = n.saturating_add(1);
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = trim_start(line);
        if line.is_empty() || line[0] == b'#' {
            continue;
        }
        batch.lines = batch.lines.saturating_add(1);
        parse_line(line, precision, now_us, line_no, &mut batch, &mut index).map_err(
            |message| LineError::Syntax {
                line: line_no,
                message,
            },
        )?;
        if batch.points.len() > max_points {
            return Err(LineError::TooMany(max_points));
        }
    }
    Ok(batch)
}

fn trim_start(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| **b == b' ' || **b == b'\t').count();
    &s[n..]
}

/// A field's value as the line states it.
enum FieldValue {
    Number(f64),
    Text,
}

fn parse_line(
    line: &[u8],
    precision: Precision,
    now_us: i64,
    line_no: usize,
    batch: &mut LineBatch,
    index: &mut HashMap<String, u32>,
) -> Step<()> {
    let mut pos = 0;
    let measurement = read_token(line, &mut pos, b",", b", ")?;
    if measurement.is_empty() {
        return Err("missing measurement".into());
    }
    let mut tags: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    while line.get(pos) == Some(&b',') {
        pos += 1;
        let key = read_token(line, &mut pos, b",= ", b",= ")?;
        if line.get(pos) != Some(&b'=') {
            return Err("missing tag value".into());
        }
        pos += 1;
        let value = read_token(line, &mut pos, b",= ", b",= ")?;
        if key.is_empty() || value.is_empty() {
            return Err("missing tag key or value".into());
        }
        tags.push((key, value));
    }
    if line.get(pos) != Some(&b' ') {
        return Err("missing fields".into());
    }
    while line.get(pos) == Some(&b' ') {
        pos += 1;
    }
    let mut fields: Vec<(Vec<u8>, FieldValue)> = Vec::new();
    loop {
        let key = read_token(line, &mut pos, b",= ", b",= ")?;
        if key.is_empty() {
            return Err("missing field key".into());
        }
        if line.get(pos) != Some(&b'=') {
            return Err("missing field value".into());
        }
        pos += 1;
        let value = read_field_value(line, &mut pos)?;
        fields.push((key, value));
        match line.get(pos) {
            Some(b',') => pos += 1,
            Some(b' ') | None => break,
            Some(_) => return Err("invalid field format".into()),
        }
    }
    while line.get(pos) == Some(&b' ') {
        pos += 1;
    }
    let rest = &line[pos..];
    let rest = &rest[..rest.len()
        - rest
            .iter()
            .rev()
            .take_while(|b| b.is_ascii_whitespace())
            .count()];
    let time = if rest.is_empty() {
        Ok(None)
    } else {
        let text = std::str::from_utf8(rest).map_err(|_| "bad timestamp".to_string())?;
        let t: i64 = text.parse().map_err(|_| "bad timestamp".to_string())?;
        match precision.to_us(t) {
            None => Err(Reject::BadTimestamp),
            Some(us) => check_time(us, now_us).map(Some),
        }
    };
    tags.sort_by(|a, b| a.0.cmp(&b.0));
    let mut prefix = Vec::with_capacity(64);
    escape_into(&mut prefix, &measurement, b", ");
    for (k, v) in &tags {
        prefix.push(b',');
        escape_into(&mut prefix, k, b",= ");
        prefix.push(b'=');
        escape_into(&mut prefix, v, b",= ");
    }
    prefix.push(b' ');
    for (key, value) in fields {
        let value = match value {
            FieldValue::Text => {
                batch.rejects.push((line_no, Reject::StringField));
                continue;
            }
            FieldValue::Number(v) if !v.is_finite() => {
                batch.rejects.push((line_no, Reject::NonFinite));
                continue;
            }
            FieldValue::Number(v) => v,
        };
        let time_us = match time {
            Ok(t) => t,
            Err(r) => {
                batch.rejects.push((line_no, r));
                continue;
            }
        };
        let mut name = prefix.clone();
        escape_into(&mut name, &key, b",= ");
        let name = String::from_utf8(name).map_err(|_| "invalid UTF-8".to_string())?;
        let series = match index.get(&name) {
            Some(&i) => i,
            None => {
                let i =
                    u32::try_from(batch.series.len()).map_err(|_| "too many series".to_string())?;
                batch.series.push(name.clone());
                index.insert(name, i);
                i
            }
        };
        batch.points.push(LinePoint {
            series,
            value,
            time_us,
        });
    }
    Ok(())
}

/// Read up to an unescaped byte of `stops` (or the end); a backslash before a byte of `escapable` stands for
/// that byte, any other backslash is itself.
fn read_token(line: &[u8], pos: &mut usize, stops: &[u8], escapable: &[u8]) -> Step<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(&b) = line.get(*pos) {
        if b == b'\\' {
            if let Some(&next) = line.get(*pos + 1) {
                if escapable.contains(&next) || next == b'\\' && stops.contains(&b'=') {
                    out.push(next);
                    *pos += 2;
                    continue;
                }
            }
            out.push(b);
            *pos += 1;
            continue;
        }
        if stops.contains(&b) || b == b' ' {
            break;
        }
        out.push(b);
        *pos += 1;
    }
    if std::str::from_utf8(&out).is_err() {
        return Err("invalid UTF-8".into());
    }
    Ok(out)
}

fn escape_into(out: &mut Vec<u8>, s: &[u8], special: &[u8]) {
    for &b in s {
        if special.contains(&b) {
            out.push(b'\\');
        }
        out.push(b);
    }
}

fn read_field_value(line: &[u8], pos: &mut usize) -> Step<FieldValue> {
    if line.get(*pos) == Some(&b'"') {
        *pos += 1;
        while let Some(&b) = line.get(*pos) {
            match b {
                b'\\' => *pos += 2,
                b'"' => {
                    *pos += 1;
                    return Ok(FieldValue::Text);
                }
                _ => *pos += 1,
            }
        }
        return Err("unterminated string field".into());
    }
    let start = *pos;
    while let Some(&b) = line.get(*pos) {
        if b == b',' || b == b' ' {
            break;
        }
        *pos += 1;
    }
    let text = std::str::from_utf8(&line[start..*pos]).map_err(|_| "invalid UTF-8".to_string())?;
    number(text).map(FieldValue::Number)
}

fn number(text: &str) -> Step<f64> {
    let bad = || format!("invalid field value {:?}", truncate(text));
    match text {
        "t" | "T" | "true" | "True" | "TRUE" => return Ok(1.0),
        "f" | "F" | "false" | "False" | "FALSE" => return Ok(0.0),
        "" => return Err("missing field value".into()),
        _ => {}
    }
    if let Some(int) = text.strip_suffix('i') {
        return int.parse::<i64>().map(|v| v as f64).map_err(|_| bad());
    }
    if let Some(uint) = text.strip_suffix('u') {
        return uint.parse::<u64>().map(|v| v as f64).map_err(|_| bad());
    }
    // Rust's float grammar also takes "inf", "NaN" and "infinity"; line protocol does not.
    let plain = text
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'));
    if !plain {
        return Err(bad());
    }
    text.parse::<f64>().map_err(|_| bad())
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000_000;

    fn ok(body: &str) -> LineBatch {
        parse(body.as_bytes(), Precision::Ns, NOW, 1_000_000).unwrap()
    }

    fn err(body: &str) -> LineError {
        parse(body.as_bytes(), Precision::Ns, NOW, 1_000_000).unwrap_err()
    }

    #[test]
    fn fields_become_points_keyed_by_series() {
        let b = ok("cpu,host=a,region=eu usage=1.5,count=3i,ok=true,big=7u 1699999999000000000\n");
        assert_eq!(
            b.series,
            vec![
                "cpu,host=a,region=eu usage",
                "cpu,host=a,region=eu count",
                "cpu,host=a,region=eu ok",
                "cpu,host=a,region=eu big"
            ]
        );
        let values: Vec<f64> = b.points.iter().map(|p| p.value).collect();
        assert_eq!(values, vec![1.5, 3.0, 1.0, 7.0]);
        assert!(b
            .points
            .iter()
            .all(|p| p.time_us == Some(1_699_999_999_000_000)));
        assert_eq!(b.lines, 1);
    }

    #[test]
    fn tags_are_sorted_and_series_shared() {
        let b = ok("m,b=2,a=1 v=1\nm,a=1,b=2 v=2 \n");
        assert_eq!(b.series, vec!["m,a=1,b=2 v"]);
        assert_eq!(b.points.len(), 2);
        assert_eq!(b.points[0].time_us, None);
    }

    #[test]
    fn escapes_round_trip_into_the_canonical_name() {
        let b = ok("my\\ meas\\,x,t\\=k=v\\ 1 f\\,k=1\n");
        assert_eq!(b.series, vec!["my\\ meas\\,x,t\\=k=v\\ 1 f\\,k"]);
    }

    #[test]
    fn strings_are_rejected_per_field_and_the_rest_kept() {
        let b = ok("m s=\"a, b = \\\"c\\\"\",v=2 1\n");
        assert_eq!(b.points.len(), 1);
        assert_eq!(b.rejects, vec![(1, Reject::StringField)]);
    }

    #[test]
    fn comments_blank_lines_and_crlf() {
        let b = ok("# hello\r\n\r\n  m v=1\r\n");
        assert_eq!(b.points.len(), 1);
        assert_eq!(b.lines, 1);
    }

    #[test]
    fn precision_scales_with_checked_arithmetic() {
        let p = |prec, t: &str| parse(format!("m v=1 {t}").as_bytes(), prec, NOW, 10).unwrap();
        assert_eq!(
            p(Precision::S, "1600000000").points[0].time_us,
            Some(1_600_000_000_000_000)
        );
        assert_eq!(
            p(Precision::Ms, "1600000000000").points[0].time_us,
            Some(1_600_000_000_000_000)
        );
        assert_eq!(
            p(Precision::Us, "1600000000000000").points[0].time_us,
            Some(1_600_000_000_000_000)
        );
        // Overflowing scales and out-of-range times are per-point rejects, not errors or panics.
        let b = p(Precision::S, &i64::MAX.to_string());
        assert_eq!(b.rejects, vec![(1, Reject::BadTimestamp)]);
        let b = p(Precision::Ns, "-1");
        assert_eq!(b.rejects, vec![(1, Reject::TimestampTooOld)]);
        let b = p(Precision::S, "99999999999");
        assert_eq!(b.rejects, vec![(1, Reject::FarFutureTimestamp)]);
    }

    #[test]
    fn malformed_lines_give_their_number() {
        for (body, line) in [
            ("m v=1\nm\n", 2),
            ("m v=1\n\nm v=\n", 3),
            ("m, v=1", 1),
            ("m,t v=1", 1),
            ("m v=1x", 1),
            ("m v=NaN", 1),
            ("m v=inf", 1),
            ("m v=1 12a", 1),
            ("m v=\"open", 1),
            ("m v=99999999999999999999i", 1),
            ("m v=-1u", 1),
            (" v=1", 1),
            ("m =1", 1),
            ("m v=1,", 1),
        ] {
            match err(body) {
                LineError::Syntax { line: l, .. } => assert_eq!(l, line, "{body:?}"),
                e => panic!("{body:?}: {e}"),
            }
        }
    }

    #[test]
    fn huge_floats_are_non_finite_rejects() {
        let b = ok("m v=1e999,w=2");
        assert_eq!(b.rejects, vec![(1, Reject::NonFinite)]);
        assert_eq!(b.points.len(), 1);
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        assert!(parse(b"m\xff v=1", Precision::Ns, NOW, 10).is_err());
        assert!(parse(b"m,t=\xc3 v=1", Precision::Ns, NOW, 10).is_err());
    }

    #[test]
    fn point_cap() {
        let body = "m a=1,b=2,c=3\n".repeat(4);
        assert_eq!(
            parse(body.as_bytes(), Precision::Ns, NOW, 10),
            Err(LineError::TooMany(10))
        );
    }

    #[test]
    fn telegraf_documented_bodies() {
        // From Telegraf's and InfluxDB's documentation (line protocol reference, outputs.influxdb examples).
        let body = "weather,location=us-midwest temperature=82 1465839830100400200\n\
            cpu,cpu=cpu0,host=telegraf usage_idle=99.75,usage_user=0.25 1465839830100400200\n\
            mem,host=telegraf available=6498029568i,used_percent=24.37,active=3574267904i 1465839830100400200\n\
            system,host=telegraf uptime_format=\"10 days, 18:33\",load1=0.21 1465839830100400200\n\
            swap,host=telegraf in=0i,out=0i,total=2147479552u 1465839830100400200\n";
        let b = ok(body);
        assert_eq!(b.points.len(), 10);
        assert_eq!(b.rejects, vec![(4, Reject::StringField)]);
    }
}
