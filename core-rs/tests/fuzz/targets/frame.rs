//! `frame::parse_frame` and `frame::parse_timestamp`: arbitrary and mutated bytes (invariants only), generated
//! frames whose every entry has a predicted outcome (a model of spec §6/§7.2 written without the parser's code),
//! and timestamps against an independent calendar.

use serde_json::Value;
use webmacs_core::frame::{
    check_time, epoch_ms_to_us, parse_frame, parse_timestamp, FrameError, ParsedFrame, Reject,
    DEFAULT_MAX_FRAME_BYTES, MAX_FRAME_DATAPOINTS, MAX_FUTURE_US, MIN_TIME_US,
};

use super::time::{days_from_civil, days_in_month};
use crate::harness::{mutate, signature, Corpus, Rng, Target, INVALID_UTF8};

/// -2^63 and 2^63 as f64: the ends of i64.
const I64_MIN_F: f64 = i64::MIN as f64;
const I64_END_F: f64 = -(i64::MIN as f64);

/// An accepted entry: value, event id (None: any), client time.
type Point = (f64, Option<String>, Option<i64>);

/// 2025-11-24, the unit tests' clock.
const NOW: i64 = 1_764_000_000_000_000;

fn pick_now(rng: &mut Rng) -> i64 {
    match rng.below(16) {
        0 => rng.pick(&[
            0,
            -1,
            i64::MIN,
            i64::MAX,
            i64::MAX - MAX_FUTURE_US,
            MAX_FUTURE_US,
        ]),
        1 => rng.u64() as i64,
        // Whole milliseconds half the time, so that epoch-ms timestamps can land exactly on the bound.
        2..=8 => NOW + rng.range(-1_000, 1_000) * 1000,
        _ => NOW + rng.range(-1_000_000, 1_000_000),
    }
}

/// A time at, just inside or just outside one of the accepted range's ends, or anywhere near `now`.
fn near_bound(rng: &mut Rng, now: i64) -> i64 {
    match rng.below(3) {
        0 => now
            .saturating_add(MAX_FUTURE_US)
            .saturating_add(rng.range(-1, 1)),
        1 => MIN_TIME_US + rng.range(-1, 1),
        _ => now.saturating_add(rng.range(-600_000_000, 600_000_000)),
    }
}

/// The invariants every answer of `parse_frame` keeps, whatever the input.
fn check_parsed(
    bytes: &[u8],
    now: i64,
    max: usize,
    result: &Result<ParsedFrame, FrameError>,
) -> Result<(), String> {
    let ctx = || format!("(now={now}, max={max})");
    if bytes.len() > max {
        return match result {
            Err(FrameError::TooLarge(n, m)) if *n == bytes.len() && *m == max => Ok(()),
            other => Err(format!("{} bytes > max {max} gave {other:?}", bytes.len())),
        };
    }
    let f = match result {
        Ok(f) => f,
        Err(FrameError::TooMany(n)) if *n > MAX_FRAME_DATAPOINTS => return Ok(()),
        Err(FrameError::InvalidJson(_) | FrameError::NotObject) => return Ok(()),
        Err(e) => return Err(format!("unexpected frame error {e:?} {}", ctx())),
    };
    if f.total > MAX_FRAME_DATAPOINTS {
        return Err(format!("{} entries accepted as a frame {}", f.total, ctx()));
    }
    if !f.has_datapoints && (f.total != 0 || !f.points.is_empty() || !f.rejects.is_empty()) {
        return Err(format!("entries without a datapoints array {}", ctx()));
    }
    // Every entry is answered exactly once: the indices of points and rejects, merged, are 0..total.
    let mut seen = vec![0u8; f.total];
    let indices = f
        .points
        .iter()
        .map(|p| p.0)
        .chain(f.rejects.iter().map(|r| r.0));
    for i in indices {
        match seen.get_mut(i) {
            Some(n) => *n += 1,
            None => return Err(format!("entry index {i} ≥ total {} {}", f.total, ctx())),
        }
    }
    if let Some(i) = seen.iter().position(|&n| n != 1) {
        return Err(format!("entry {i} answered {} times {}", seen[i], ctx()));
    }
    if !f.points.windows(2).all(|w| w[0].0 < w[1].0)
        || !f.rejects.windows(2).all(|w| w[0].0 < w[1].0)
    {
        return Err(format!("entries out of order {}", ctx()));
    }
    let latest = now.saturating_add(MAX_FUTURE_US);
    for (i, p) in &f.points {
        if !p.value.is_finite() {
            return Err(format!(
                "entry {i}: non-finite value {} accepted {}",
                p.value,
                ctx()
            ));
        }
        if let Some(t) = p.time_us {
            if !(MIN_TIME_US..=latest).contains(&t) {
                return Err(format!(
                    "entry {i}: time {t} outside [{MIN_TIME_US}, {latest}] {}",
                    ctx()
                ));
            }
        }
    }
    for (i, r) in &f.rejects {
        // Catalog and database reasons are decided later, never by the parser.
        if !r.is_shape_error() {
            return Err(format!(
                "entry {i}: parser gave the catalog reason {r:?} {}",
                ctx()
            ));
        }
    }
    Ok(())
}

fn frame_signature(result: &Result<ParsedFrame, FrameError>) -> u64 {
    match result {
        Err(e) => signature(&e.code()),
        Ok(f) => {
            let mut reasons: Vec<_> = f.rejects.iter().map(|r| r.1.code()).collect();
            reasons.sort_unstable();
            reasons.dedup();
            let timed = f.points.iter().any(|p| p.1.time_us.is_some());
            signature(&(
                f.has_datapoints,
                f.seq.is_some(),
                f.points.is_empty(),
                timed,
                reasons,
            ))
        }
    }
}

const SEEDS: &[&str] = &[
    r#"{"datapoints":[{"value":1.5,"event_public_id":"a"}],"seq":1}"#,
    r#"{"datapoints":[{"value":"42","event_public_id":7,"timestamp":"2025-11-24T15:00:00.123456Z"}]}"#,
    r#"{"datapoints":[{"value":NaN,"event_public_id":"NaN"},{"value":-Infinity,"event_public_id":"x\"NaN"}]}"#,
    r#"{"datapoints":[{"value":1,"event_public_id":true,"timestamp":1764000000000}],"seq":18446744073709551615}"#,
    r#"{"datapoints":[{"value":1,"event_public_id":"e","timestamp":"2025-11-24T15:00:00"},null,[],{}]}"#,
    r#"{"seq":-1,"datapoints":{"value":1}}"#,
    r#"{"datapoints":[{"value":1e308,"event_public_id":"\u00e9\ud83d\ude00","timestamp":-1e308}]}"#,
    r#"{"datapoints":[{"value":" 1.5 ","event_public_id":"a","timestamp":"1969-12-31T23:59:59+01:00"}]}"#,
    r#"[{"value":1}]"#,
];

const DICT: &[&[u8]] = &[
    b"NaN",
    b"-Infinity",
    b"Infinity",
    b"null",
    b"true",
    b"false",
    b"1e400",
    b"-0",
    b"5e-324",
    b"18446744073709551616",
    b"\"value\":",
    b"\"event_public_id\":",
    b"\"timestamp\":",
    b"\"datapoints\":",
    b"\"seq\":",
    b"{\"value\":1,\"event_public_id\":\"e\"},",
    b"\\u0000",
    b"\\ud800",
    b"\\\"",
    b"\\\\",
    b"\"2025-11-24T15:00:00Z\"",
    b"\"1970-01-01T00:00:00Z\"",
    b"\"9999-12-31T23:59:60.999999999+23:59\"",
    b"[[[[[[[[[[[[[[[[",
    b"]]]]]]]]]]]]]]]]",
    b"{\"a\":{\"a\":{\"a\":",
];

/// Arbitrary bytes and mutations of frames: nothing panics, the invariants hold.
pub struct Bytes {
    corpus: Corpus,
}

impl Target for Bytes {
    type Input = (Vec<u8>, i64, usize);

    fn new(_: &mut Rng) -> Self {
        Bytes {
            corpus: Corpus::new(SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect(), 1024),
        }
    }

    fn generate(&mut self, rng: &mut Rng) -> Self::Input {
        let bytes = match rng.below(20) {
            0 => {
                let n = rng.len(512);
                rng.bytes(n)
            }
            1 => {
                // A soup of JSON tokens.
                let n = rng.len(64);
                (0..n).flat_map(|_| rng.pick(DICT).to_vec()).collect()
            }
            _ => {
                let mut b = self.corpus.sample(rng);
                mutate(rng, &mut b, DICT, &self.corpus.items, 6, 1 << 16);
                b
            }
        };
        let now = pick_now(rng);
        let max = match rng.below(20) {
            0 => rng.below(bytes.len() + 2),
            _ => DEFAULT_MAX_FRAME_BYTES,
        };
        (bytes, now, max)
    }

    fn check(&mut self, (bytes, now, max): &Self::Input) -> Result<u64, String> {
        let result = parse_frame(bytes, *now, *max);
        check_parsed(bytes, *now, *max, &result)?;
        Ok(frame_signature(&result))
    }

    fn keep(&mut self, rng: &mut Rng, sig: u64, input: &Self::Input) {
        self.corpus.offer(rng, sig, &input.0);
    }

    fn artifact(input: &Self::Input) -> Vec<u8> {
        input.0.clone()
    }

    fn corpus_len(&self) -> usize {
        self.corpus.len()
    }
}

/// A predicted outcome; `Unknown` when the model does not say (the invariants still hold).
#[derive(Debug, Clone, PartialEq)]
pub enum Want<T> {
    Ok(T),
    Err(Reject),
    Unknown,
}

/// A piece of JSON text and the parser's predicted reading of it. `poison`: the text makes the whole frame
/// invalid JSON (a number out of f64's range).
struct Part<T> {
    text: String,
    want: Want<T>,
    poison: bool,
}

fn part<T>(text: impl Into<String>, want: Want<T>) -> Part<T> {
    Part {
        text: text.into(),
        want,
        poison: false,
    }
}

/// A random string: letters, JSON specials, the non-finite words the token rewriter looks for, Unicode
/// (astral, line separators, BOM), NUL and whitespace Rust's `trim` removes.
fn text(rng: &mut Rng, max: usize) -> String {
    let n = rng.len(max);
    let mut s = String::new();
    for _ in 0..n {
        match rng.below(10) {
            0 => s.push_str(rng.pick(&["NaN", "Infinity", "-Infinity", "\\", "\"", "\\\""])),
            1 => s.push(rng.pick(&[
                'é',
                '中',
                '😀',
                '\0',
                '\u{7f}',
                '\u{fffd}',
                '\u{2028}',
                '\u{feff}',
                '\u{10ffff}',
            ])),
            2 => s.push(rng.pick(&[' ', '\t', '\n', '\r', '\u{a0}', '\u{3000}', '\u{85}'])),
            3 => s.push(rng.pick(&['{', '}', '[', ']', ',', ':', '/', '.', '-', '+', 'e'])),
            4 => s.push(char::from(b'0' + rng.below(10) as u8)),
            _ => s.push(char::from(b'a' + rng.below(26) as u8)),
        }
    }
    s
}

/// `s` as a JSON string literal, each character written raw or escaped at random (surrogate pairs for astral
/// characters).
fn json_string(rng: &mut Rng, s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' if rng.one_in(2) => out.push_str("\\n"),
            '\t' if rng.one_in(2) => out.push_str("\\t"),
            '/' if rng.one_in(2) => out.push_str("\\/"),
            c if (c as u32) < 0x20 || rng.one_in(8) => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A finite f64 in one of JSON's spellings Rust can write.
fn float_text(rng: &mut Rng, v: f64) -> String {
    match rng.below(4) {
        0 => format!("{v}"),
        1 => format!("{v:?}"),
        2 => format!("{v:e}"),
        _ => format!("{v:E}"),
    }
}

fn finite(rng: &mut Rng) -> f64 {
    loop {
        let v = rng.f64();
        if v.is_finite() {
            return v;
        }
    }
}

/// Any JSON value (for unknown keys and decoys), nested up to `depth`.
fn any_json(rng: &mut Rng, depth: usize) -> String {
    match rng.below(if depth == 0 { 5 } else { 7 }) {
        0 => "null".into(),
        1 => rng.pick(&["true", "false", "NaN", "-Infinity"]).to_string(),
        2 => {
            let v = finite(rng);
            float_text(rng, v)
        }
        3 => {
            let s = text(rng, 12);
            json_string(rng, &s)
        }
        4 => rng.range(i64::MIN, i64::MAX).to_string(),
        5 => {
            let n = rng.below(4);
            let items: Vec<_> = (0..n).map(|_| any_json(rng, depth - 1)).collect();
            format!("[{}]", items.join(","))
        }
        _ => {
            let n = rng.below(4);
            let items: Vec<_> = (0..n)
                .map(|_| {
                    let key = text(rng, 6);
                    let key = json_string(rng, &key);
                    format!("{key}:{}", any_json(rng, depth - 1))
                })
                .collect();
            format!("{{{}}}", items.join(","))
        }
    }
}

/// What `value` is read as: Python's float() of numbers and numeric strings, finite only.
fn gen_value(rng: &mut Rng) -> Option<Part<f64>> {
    let finite_or = |v: f64| {
        if v.is_finite() {
            Want::Ok(v)
        } else {
            Want::Err(Reject::NonFinite)
        }
    };
    Some(match rng.below(12) {
        0..=2 => {
            let v = finite(rng);
            part(float_text(rng, v), Want::Ok(v))
        }
        3 => {
            let i = rng.range(i64::MIN, i64::MAX);
            part(i.to_string(), Want::Ok(i as f64))
        }
        4 => {
            // Integers beyond u64 are read as floats; beyond f64 they are out of range (the frame is refused).
            let longest = if rng.one_in(4) { 400 } else { 30 };
            let digits = 1 + rng.below(longest);
            let mut t: String = (0..digits)
                .map(|_| char::from(b'0' + rng.below(10) as u8))
                .collect();
            if t.starts_with('0') {
                t.replace_range(..1, "1");
            }
            let v: f64 = t.parse().expect("digits parse");
            Part {
                poison: !v.is_finite(),
                want: Want::Ok(v),
                text: t,
            }
        }
        5 => {
            let t = rng
                .pick(&["1e400", "-1e400", "1E+999", "-2e308"])
                .to_string();
            Part {
                text: t,
                want: Want::Unknown,
                poison: true,
            }
        }
        6 => {
            let t = rng
                .pick(&["1e-400", "-1e-400", "5e-324", "2.4703282292062328e-324"])
                .to_string();
            let v: f64 = t.parse().expect("tiny float");
            part(t, Want::Ok(v))
        }
        7 => {
            // A numeric string, trimmed then parsed (Rust's grammar: inf/nan words, no underscores or hex).
            let core = match rng.below(4) {
                0 => {
                    let v = finite(rng);
                    float_text(rng, v)
                }
                1 => rng.range(i64::MIN, i64::MAX).to_string(),
                2 => rng
                    .pick(&[
                        "inf",
                        "-Infinity",
                        "NaN",
                        "nan",
                        "+inf",
                        "1e400",
                        "1_000",
                        "0x10",
                        "",
                        ".5",
                        "5.",
                        "1e",
                        "+1.5",
                        "١٢",
                        "1.5.",
                        "--1",
                        "infinityx",
                    ])
                    .to_string(),
                _ => text(rng, 8),
            };
            let pad = |rng: &mut Rng| {
                rng.pick(&["", " ", "\t", "\n", "\u{a0}", "\u{3000}", "x"])
                    .to_string()
            };
            let s = format!("{}{core}{}", pad(rng), pad(rng));
            let want = match s.trim().parse::<f64>() {
                Ok(v) => finite_or(v),
                Err(_) => Want::Err(Reject::InvalidValue),
            };
            part(json_string(rng, &s), want)
        }
        8 => part(
            rng.pick(&["NaN", "Infinity", "-Infinity"]),
            Want::Err(Reject::NonFinite),
        ),
        9 => {
            if rng.one_in(2) {
                return None;
            }
            part("null", Want::Err(Reject::MissingValue))
        }
        _ => part(
            rng.pick(&["true", "false", "[]", "[1]", "{}", "{\"value\":1}", "\"x\""])
                .to_string(),
            Want::Err(Reject::InvalidValue),
        ),
    })
}

/// What `event_public_id` is read as: Python's str() of strings, integers and booleans.
fn gen_event(rng: &mut Rng) -> Option<Part<Option<String>>> {
    Some(match rng.below(10) {
        0..=4 => {
            let s = if rng.one_in(200) {
                text(rng, 8).repeat(1 + rng.below(8_000))
            } else {
                text(rng, 24)
            };
            let t = json_string(rng, &s);
            part(t, Want::Ok(Some(s)))
        }
        5 => {
            let i = rng.range(i64::MIN, i64::MAX);
            part(i.to_string(), Want::Ok(Some(i.to_string())))
        }
        // A float's spelling is serde_json's (Python's str() would differ for some): any string.
        6 => {
            let v = finite(rng);
            part(float_text(rng, v), Want::Ok(None))
        }
        7 => {
            let b = rng.one_in(2);
            part(
                b.to_string(),
                Want::Ok(Some(if b { "True" } else { "False" }.into())),
            )
        }
        8 => {
            if rng.one_in(2) {
                return None;
            }
            part(
                rng.pick(&["null", "[]", "{}", "[\"a\"]"]).to_string(),
                Want::Err(Reject::MissingEvent),
            )
        }
        // The token rewriter turns a bare NaN into the string "NaN".
        _ => part("NaN", Want::Ok(Some("NaN".into()))),
    })
}

/// The model of a client timestamp, written without chrono: RFC 3339 (or the naive form, read as UTC) from
/// its components, or epoch milliseconds; then the range check.
fn expect_time(us: Option<i64>, now: i64) -> Want<Option<i64>> {
    match us {
        None => Want::Err(Reject::BadTimestamp),
        Some(us) if us < MIN_TIME_US => Want::Err(Reject::TimestampTooOld),
        Some(us) if us > now.saturating_add(MAX_FUTURE_US) => Want::Err(Reject::FarFutureTimestamp),
        Some(us) => Want::Ok(Some(us)),
    }
}

fn gen_date_string(rng: &mut Rng, now: i64) -> (String, Want<Option<i64>>) {
    let naive = rng.one_in(4);
    // Mostly near `now` (both sides of the 5-minute bound), else anywhere in 0000..9999.
    let (y, mo, d, h, mi, s, base_frac_us) =
        if rng.one_in(2) && now > 0 && now < 253_402_000_000_000_000 {
            let t = near_bound(rng, now);
            let secs = t.div_euclid(1_000_000);
            let (y, mo, d) = super::time::civil_from_days(secs.div_euclid(86_400));
            let sod = secs.rem_euclid(86_400);
            (
                y,
                mo,
                d,
                sod / 3600,
                sod / 60 % 60,
                sod % 60,
                Some(t.rem_euclid(1_000_000)),
            )
        } else {
            let y = if rng.one_in(3) {
                rng.range(1968, 1971)
            } else {
                rng.range(0, 9999)
            };
            let mo = if rng.one_in(20) {
                rng.range(0, 13)
            } else {
                rng.range(1, 12)
            };
            let dim = days_in_month(y, mo.clamp(1, 12));
            let d = if rng.one_in(20) {
                rng.range(0, dim + 1)
            } else {
                rng.range(1, dim)
            };
            let h = if rng.one_in(30) { 24 } else { rng.range(0, 23) };
            let mi = if rng.one_in(30) { 60 } else { rng.range(0, 59) };
            let s = if rng.one_in(30) { 60 } else { rng.range(0, 59) };
            (y, mo, d, h, mi, s, None)
        };
    let (frac, frac_us) = match (base_frac_us, rng.below(4)) {
        (_, 0) => (String::new(), 0),
        (Some(us), 1) => (format!(".{us:06}"), us),
        _ => {
            let digits: String = (0..1 + rng.below(12))
                .map(|_| char::from(b'0' + rng.below(10) as u8))
                .collect();
            let us: i64 = format!("{:0<6}", &digits[..digits.len().min(6)])
                .parse()
                .expect("digits");
            (format!(".{digits}"), us)
        }
    };
    let (off_text, off_s) = if naive {
        (String::new(), Some(0))
    } else {
        match rng.below(4) {
            0 => ("Z".into(), Some(0)),
            1 => ("z".into(), Some(0)),
            _ => {
                let sign = if rng.one_in(2) { 1 } else { -1 };
                let oh = if rng.one_in(30) { 24 } else { rng.range(0, 23) };
                let om = rng.range(0, 59);
                let valid = oh < 24;
                (
                    format!("{}{oh:02}:{om:02}", if sign > 0 { '+' } else { '-' }),
                    valid.then_some(sign * (oh * 3600 + om * 60)),
                )
            }
        }
    };
    let sep = if naive {
        "T"
    } else {
        rng.pick(&["T", "t", " "])
    };
    let text = format!("{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}:{s:02}{frac}{off_text}");
    let pad = rng.pick(&["", "", " ", "\t", "\n"]);
    let text = format!("{pad}{text}{pad}");
    let valid_date =
        (1..=12).contains(&mo) && d >= 1 && d <= days_in_month(y, mo) && h < 24 && mi < 60;
    let want = if s == 60 && valid_date && off_s.is_some() {
        // Leap seconds: chrono's reading is its own; the range invariants still apply.
        Want::Unknown
    } else {
        let us = off_s.filter(|_| valid_date && s < 60).map(|off| {
            ((days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s - off) * 1_000_000)
                + frac_us
        });
        expect_time(us, now)
    };
    (text, want)
}

fn gen_timestamp(rng: &mut Rng, now: i64) -> Option<Part<Option<i64>>> {
    Some(match rng.below(10) {
        0 => return None,
        1 => part("null", Want::Ok(None)),
        2..=4 => {
            let (s, want) = gen_date_string(rng, now);
            part(json_string(rng, &s), want)
        }
        5 | 6 => {
            // Epoch milliseconds: near now, or anything.
            let t = match rng.below(3) {
                0 => (near_bound(rng, now) / 1000).to_string(),
                1 => {
                    let v =
                        (now / 1000) as f64 + rng.range(-600_000_000, 600_000_000) as f64 / 1000.0;
                    float_text(rng, v)
                }
                _ => match rng.below(2) {
                    0 => rng.range(i64::MIN, i64::MAX).to_string(),
                    _ => {
                        let v = finite(rng);
                        float_text(rng, v)
                    }
                },
            };
            let ms: f64 = t.parse().expect("a number");
            // The spec's reading: round(ms × 1000) µs; beyond i64 the side decides the reason.
            let us = (ms * 1000.0).round();
            let want = if us < I64_MIN_F {
                Want::Err(Reject::TimestampTooOld)
            } else if us >= I64_END_F {
                Want::Err(Reject::FarFutureTimestamp)
            } else {
                expect_time(Some(us as i64), now)
            };
            part(t, want)
        }
        7 => part(
            rng.pick(&[
                "true",
                "[]",
                "{}",
                "\"\"",
                "\"yesterday\"",
                "\"1764000000000\"",
                "NaN",
                "\"2025-11-24\"",
            ])
            .to_string(),
            Want::Err(Reject::BadTimestamp),
        ),
        _ => {
            // A mangled date string: the parser may read it or not.
            let (s, _) = gen_date_string(rng, now);
            let mut b = s.into_bytes();
            mutate(
                rng,
                &mut b,
                &[b"+", b"-", b":", b"T", b"Z", b".", b"60", b"24", b"0"],
                &[],
                2,
                64,
            );
            part(
                json_string(rng, &String::from_utf8_lossy(&b)),
                Want::Unknown,
            )
        }
    })
}

/// The predicted answer for the whole frame.
#[derive(Debug, Clone, PartialEq)]
pub enum FrameWant {
    /// An error of this code (`FrameError::code`).
    Error(&'static str),
    /// The frame may be refused as invalid JSON or parsed (nesting near serde_json's limit).
    Unknown,
    Parsed {
        has_datapoints: bool,
        seq: Option<u64>,
        entries: Vec<Want<Point>>,
    },
}

fn ws(rng: &mut Rng) -> &'static str {
    match rng.below(8) {
        0 => " ",
        1 => "\n",
        2 => "\r\n\t ",
        _ => "",
    }
}

/// One entry of `datapoints`, with its predicted outcome (value first, then the event, then the timestamp).
fn gen_entry(rng: &mut Rng, now: i64, poison: &mut bool) -> (String, Want<Point>) {
    if rng.one_in(12) {
        let t = rng
            .pick(&["1", "null", "\"x\"", "[]", "[{\"value\":1}]", "true", "NaN"])
            .to_string();
        return (t, Want::Err(Reject::NotObject));
    }
    let value = gen_value(rng);
    let event = gen_event(rng);
    let time = gen_timestamp(rng, now);
    let mut fields = Vec::new();
    let want = {
        let v = value
            .as_ref()
            .map_or(Want::Err(Reject::MissingValue), |p| p.want.clone());
        let e = event
            .as_ref()
            .map_or(Want::Err(Reject::MissingEvent), |p| p.want.clone());
        let t = time.as_ref().map_or(Want::Ok(None), |p| p.want.clone());
        match (v, e, t) {
            (Want::Err(r), ..) => Want::Err(r),
            (Want::Unknown, ..) => Want::Unknown,
            (Want::Ok(_), Want::Err(r), _) => Want::Err(r),
            (Want::Ok(_), Want::Unknown, _) => Want::Unknown,
            (Want::Ok(_), Want::Ok(_), Want::Err(r)) => Want::Err(r),
            (Want::Ok(_), Want::Ok(_), Want::Unknown) => Want::Unknown,
            (Want::Ok(v), Want::Ok(e), Want::Ok(t)) => Want::Ok((v, e, t)),
        }
    };
    let mut duplicate = false;
    for (key, p) in [
        ("value", value.map(|p| (p.text, p.poison))),
        ("event_public_id", event.map(|p| (p.text, p.poison))),
        ("timestamp", time.map(|p| (p.text, p.poison))),
    ] {
        if let Some((text, bad)) = p {
            *poison |= bad;
            // A duplicate key before the real one: the last one counts.
            if rng.one_in(16) {
                fields.push(format!("\"{key}\":{}", any_json(rng, 1)));
                duplicate = true;
            }
            fields.push(format!("\"{key}\"{}:{}{text}", ws(rng), ws(rng)));
        }
    }
    for _ in 0..rng.below(3) {
        if rng.one_in(2) {
            let key = text(rng, 8);
            let key = json_string(rng, &key);
            fields.push(format!("{key}:{}", any_json(rng, 2)));
        }
    }
    // Any key order: the duplicate-key rule only holds for the pairs kept in order.
    if rng.one_in(2) && !duplicate {
        for i in (1..fields.len()).rev() {
            let j = rng.below(i + 1);
            fields.swap(i, j);
        }
    }
    let sep = format!(",{}", ws(rng));
    (format!("{{{}{}}}", ws(rng), fields.join(&sep)), want)
}

/// Generated frames with a predicted answer for each entry.
pub struct Structured;

impl Target for Structured {
    type Input = (Vec<u8>, i64, usize, FrameWant);

    fn new(_: &mut Rng) -> Self {
        Structured
    }

    fn generate(&mut self, rng: &mut Rng) -> Self::Input {
        let now = pick_now(rng);
        let mut poison = false;
        let mut keys = Vec::new();
        let mut want_entries = Vec::new();
        let mut has_datapoints = false;
        let mut nesting_unknown = false;
        match rng.below(12) {
            0 => {}
            1 => keys.push(format!(
                "\"datapoints\":{}",
                rng.pick(&["null", "1", "\"x\"", "{}", "{\"a\":[1]}", "true", "NaN"])
            )),
            _ => {
                has_datapoints = true;
                let n = if rng.one_in(40) {
                    rng.range(498, 502) as usize
                } else {
                    rng.len(12)
                };
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let (t, w) = gen_entry(rng, now, &mut poison);
                    items.push(t);
                    want_entries.push(w);
                }
                let sep = format!(",{}", ws(rng));
                keys.push(format!(
                    "\"datapoints\"{}:{}[{}]",
                    ws(rng),
                    ws(rng),
                    items.join(&sep)
                ));
            }
        }
        let seq = match rng.below(6) {
            0 => None,
            1 => {
                let s = rng.u64();
                keys.push(format!("\"seq\":{s}"));
                Some(s)
            }
            2 => {
                let s = rng.below(1000) as u64;
                keys.push(format!("\"seq\":{s}"));
                Some(s)
            }
            _ => {
                keys.push(format!(
                    "\"seq\":{}",
                    rng.pick(&["-1", "1.0", "\"7\"", "null", "18446744073709551616", "[1]"])
                ));
                None
            }
        };
        if rng.one_in(8) {
            // Deep nesting beside the data: serde_json refuses beyond 128 levels.
            let depth = match rng.below(3) {
                0 => rng.range(1, 100),
                1 => rng.range(120, 135),
                _ => rng.range(140, 5000),
            } as usize;
            nesting_unknown = (120..=135).contains(&depth);
            poison |= depth >= 140;
            keys.push(format!(
                "\"deep\":{}{}",
                "[".repeat(depth),
                "]".repeat(depth)
            ));
        }
        if rng.one_in(4) {
            let key = text(rng, 8);
            let key = json_string(rng, &key);
            keys.push(format!("{key}:{}", any_json(rng, 2)));
        }
        for i in (1..keys.len()).rev() {
            let j = rng.below(i + 1);
            keys.swap(i, j);
        }
        let mut body =
            format!("{}{{{}{}}}{}", ws(rng), ws(rng), keys.join(","), ws(rng)).into_bytes();
        let mut want = if poison {
            FrameWant::Error("invalid_json")
        } else if nesting_unknown {
            FrameWant::Unknown
        } else if has_datapoints && want_entries.len() > MAX_FRAME_DATAPOINTS {
            FrameWant::Error("too_many")
        } else {
            FrameWant::Parsed {
                has_datapoints,
                seq,
                entries: want_entries,
            }
        };
        match rng.below(24) {
            0 => {
                // Invalid UTF-8 anywhere (in a string or between tokens) refuses the frame.
                let at = rng.below(body.len() + 1);
                body.splice(at..at, rng.pick(&INVALID_UTF8).iter().copied());
                want = FrameWant::Error("invalid_json");
            }
            1 => {
                body.extend_from_slice(rng.pick(&[&b"x"[..], b"}", b",", b"{}", b"\0"]));
                want = FrameWant::Error("invalid_json");
            }
            2 => {
                body = format!("[{}]", String::from_utf8_lossy(&body)).into_bytes();
                if want != FrameWant::Error("invalid_json") && want != FrameWant::Unknown {
                    want = FrameWant::Error("not_object");
                }
            }
            _ => {}
        }
        let max = match rng.below(20) {
            0 => body.len() - 1,
            1 => body.len(),
            _ => DEFAULT_MAX_FRAME_BYTES,
        };
        if body.len() > max {
            want = FrameWant::Error("too_large");
        }
        (body, now, max, want)
    }

    fn check(&mut self, (bytes, now, max, want): &Self::Input) -> Result<u64, String> {
        let result = parse_frame(bytes, *now, *max);
        check_parsed(bytes, *now, *max, &result)?;
        let sig = frame_signature(&result);
        let (has_datapoints, seq, entries) = match (want, &result) {
            (FrameWant::Unknown, _) => return Ok(sig),
            (FrameWant::Error(code), Err(e)) if e.code() == *code => return Ok(sig),
            (FrameWant::Error(code), _) => {
                return Err(format!("want a {code} error, got {result:?} (now={now})"))
            }
            (
                FrameWant::Parsed {
                    has_datapoints,
                    seq,
                    entries,
                },
                Ok(f),
            ) => {
                if f.has_datapoints != *has_datapoints || f.seq != *seq || f.total != entries.len()
                {
                    return Err(format!(
                        "frame: want has_datapoints={has_datapoints} seq={seq:?} total={}, got {} {:?} {}",
                        entries.len(),
                        f.has_datapoints,
                        f.seq,
                        f.total
                    ));
                }
                (has_datapoints, seq, entries)
            }
            (FrameWant::Parsed { .. }, Err(e)) => {
                return Err(format!("want a parsed frame, got {e:?}"))
            }
        };
        let _ = (has_datapoints, seq);
        let f = result.as_ref().expect("matched Ok above");
        for (i, w) in entries.iter().enumerate() {
            let point = f.points.iter().find(|p| p.0 == i).map(|p| &p.1);
            let reject = f.rejects.iter().find(|r| r.0 == i).map(|r| r.1);
            match (w, point, reject) {
                (Want::Unknown, ..) => {}
                (Want::Err(r), None, Some(got)) if *r == got => {}
                // `==`: a written -0 may come back as 0 (an integer); any other value bit for bit.
                (Want::Ok((v, id, t)), Some(p), None)
                    if p.value == *v
                        && id.as_ref().is_none_or(|id| *id == p.event_public_id)
                        && p.time_us == *t => {}
                _ => {
                    return Err(format!(
                        "entry {i} (now={now}): want {w:?}, got point {point:?} reject {reject:?}"
                    ))
                }
            }
        }
        Ok(sig)
    }

    fn artifact(input: &Self::Input) -> Vec<u8> {
        input.0.clone()
    }
}

/// `parse_timestamp`, `epoch_ms_to_us` and `check_time` directly, with any clock.
pub struct Timestamp;

impl Target for Timestamp {
    type Input = (Value, i64, Want<Option<i64>>, f64, i64);

    fn new(_: &mut Rng) -> Self {
        Timestamp
    }

    fn generate(&mut self, rng: &mut Rng) -> Self::Input {
        let now = pick_now(rng);
        let (value, want) = loop {
            let Some(p) = gen_timestamp(rng, now) else {
                continue;
            };
            if let Ok(v) = serde_json::from_str::<Value>(&p.text) {
                break (v, p.want);
            }
            if p.text == "NaN" {
                // Bare tokens are rewritten by the frame parser, not here.
                continue;
            }
        };
        let us = if rng.one_in(2) {
            near_bound(rng, now)
        } else {
            rng.u64() as i64
        };
        (value, now, want, rng.f64(), us)
    }

    fn check(&mut self, (value, now, want, ms, us): &Self::Input) -> Result<u64, String> {
        let latest = now.saturating_add(MAX_FUTURE_US);
        let got = parse_timestamp(value, *now);
        if let Ok(Some(t)) = got {
            if !(MIN_TIME_US..=latest).contains(&t) {
                return Err(format!("{value} at now={now}: {t} out of range"));
            }
        }
        match want {
            Want::Unknown => {}
            Want::Ok(t) if got == Ok(*t) => {}
            Want::Err(r) if got == Err(*r) => {}
            _ => return Err(format!("{value} at now={now}: want {want:?}, got {got:?}")),
        }
        let from_ms = epoch_ms_to_us(*ms);
        match from_ms {
            Ok(t) if !ms.is_finite() => return Err(format!("epoch_ms_to_us({ms}) = {t}")),
            Ok(t) if (t as f64 - (ms * 1000.0).round()).abs() > 1.0 => {
                return Err(format!("epoch_ms_to_us({ms}) = {t}"))
            }
            Err(Reject::BadTimestamp) if ms.is_finite() => {
                return Err(format!("epoch_ms_to_us({ms}) refused"))
            }
            Err(Reject::TimestampTooOld) if (ms * 1000.0).round() >= I64_MIN_F => {
                return Err(format!("epoch_ms_to_us({ms}) too old"))
            }
            Err(Reject::FarFutureTimestamp) if (ms * 1000.0).round() < I64_END_F => {
                return Err(format!("epoch_ms_to_us({ms}) too far ahead"))
            }
            _ => {}
        }
        let checked = check_time(*us, *now);
        let ok = *us >= MIN_TIME_US && *us <= latest;
        if checked.is_ok() != ok || checked.is_ok_and(|t| t != *us) {
            return Err(format!("check_time({us}, {now}) = {checked:?}"));
        }
        Ok(signature(&(
            format!("{got:?}").len() < 12,
            format!("{:?}", got.map(|t| t.is_some())),
            from_ms.is_ok(),
        )))
    }

    fn artifact(input: &Self::Input) -> Vec<u8> {
        format!("{:?}", input).into_bytes()
    }
}
