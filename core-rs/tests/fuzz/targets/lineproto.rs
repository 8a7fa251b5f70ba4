//! `lineproto::parse`: mutated bodies (invariants only), and generated bodies whose every series, value and time
//! is predicted by a model written without the parser's code (escaping, tag order, precision scaling).

use webmacs_core::frame::{Reject, MAX_FUTURE_US, MIN_TIME_US};
use webmacs_core::lineproto::{parse, LineBatch, LineError, Precision};

use crate::harness::{mutate, signature, Corpus, Rng, Target, INVALID_UTF8};

/// 2025-11-24, the unit tests' clock.
const NOW: i64 = 1_764_000_000_000_000;
const PRECISIONS: [Precision; 4] = [Precision::Ns, Precision::Us, Precision::Ms, Precision::S];

const SEEDS: &[&str] = &[
    "cpu,host=a,region=eu usage=1.5,count=3i,ok=true,big=7u 1764000000000000000\n",
    "weather,location=us-midwest temperature=82 1465839830100400200\n",
    "m v=1\nm,t=x w=-2.5e3,s=\"a, b = \\\"c\\\"\" 1764000000000000000\r\n# comment\n\n",
    "my\\ meas\\,x,t\\=k=v\\ 1 f\\,k=1i\n",
    "swap,host=telegraf in=0i,out=0i,total=2147479552u\n",
];

const DICT: &[&[u8]] = &[
    b"\\",
    b",",
    b"=",
    b" ",
    b"\"",
    b"\n",
    b"\r\n",
    b"#",
    b"i",
    b"u",
    b"t",
    b"FALSE",
    b"1e308",
    b"1e999",
    b"-",
    b"9223372036854775807",
    b"9223372036854775808",
    b"18446744073709551616",
    b"-9223372036854775808",
    b".",
    b"NaN",
    b"inf",
    b"\t",
];

/// Invariants of every answer, whatever the input.
fn check_batch(
    body: &[u8],
    now: i64,
    max: usize,
    r: &Result<LineBatch, LineError>,
) -> Result<(), String> {
    let lines = body.split(|&b| b == b'\n').count();
    match r {
        Err(LineError::Syntax { line, message }) => {
            if *line == 0 || *line > lines {
                return Err(format!("error line {line} of {lines}: {message}"));
            }
            Ok(())
        }
        Err(LineError::TooMany(m)) if *m == max => Ok(()),
        Err(e) => Err(format!("unexpected error {e:?}")),
        Ok(b) => {
            if b.points.len() > max {
                return Err(format!("{} points > max {max}", b.points.len()));
            }
            for p in &b.points {
                if p.series as usize >= b.series.len() {
                    return Err(format!("series {} of {}", p.series, b.series.len()));
                }
                if !p.value.is_finite() {
                    return Err(format!("non-finite value {}", p.value));
                }
                if let Some(t) = p.time_us {
                    if t < MIN_TIME_US || t > now.saturating_add(MAX_FUTURE_US) {
                        return Err(format!("time {t} out of range (now {now})"));
                    }
                }
            }
            let mut names = b.series.clone();
            names.sort();
            names.dedup();
            if names.len() != b.series.len() {
                return Err("duplicate series names".into());
            }
            if b.rejects.iter().any(|(l, _)| *l == 0 || *l > lines) {
                return Err("reject outside the body's lines".into());
            }
            Ok(())
        }
    }
}

fn batch_signature(r: &Result<LineBatch, LineError>) -> u64 {
    match r {
        Ok(b) => signature(&(
            b.points.len().min(8),
            b.series.len().min(8),
            b.rejects.iter().map(|r| r.1.code()).collect::<Vec<_>>(),
        )),
        Err(LineError::Syntax { message, .. }) => signature(message),
        Err(LineError::TooMany(_)) => 1,
    }
}

/// Mutated bodies: never a panic, every answer within the invariants.
pub struct Mutated {
    corpus: Corpus,
}

impl Target for Mutated {
    type Input = (Vec<u8>, usize, i64, usize);

    fn new(_: &mut Rng) -> Self {
        Mutated {
            corpus: Corpus::new(SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect(), 1024),
        }
    }

    fn generate(&mut self, rng: &mut Rng) -> Self::Input {
        let mut b = match rng.below(20) {
            0 => {
                let n = rng.len(256);
                rng.bytes(n)
            }
            1 => {
                let n = rng.len(64);
                (0..n).flat_map(|_| rng.pick(DICT).to_vec()).collect()
            }
            _ => self.corpus.sample(rng),
        };
        mutate(rng, &mut b, DICT, &self.corpus.items, 6, 1 << 16);
        if rng.one_in(30) {
            let at = rng.below(b.len() + 1);
            b.splice(at..at, rng.pick(&INVALID_UTF8).iter().copied());
        }
        let max = if rng.one_in(10) {
            rng.below(8)
        } else {
            1_000_000
        };
        let now = if rng.one_in(20) {
            rng.pick(&[0, -1, i64::MIN, i64::MAX])
        } else {
            NOW
        };
        (b, rng.below(4), now, max)
    }

    fn check(&mut self, (body, p, now, max): &Self::Input) -> Result<u64, String> {
        let r = parse(body, PRECISIONS[*p], *now, *max);
        check_batch(body, *now, *max, &r)?;
        Ok(batch_signature(&r))
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

/// Name characters the model uses (backslashes are left out: their escaping is context-dependent).
const NAME_CHARS: &[&str] = &["a", "b", "Z", "0", "_", "-", " ", ",", "=", "é", "温", "."];

fn name(rng: &mut Rng) -> String {
    let n = 1 + rng.below(6);
    let mut s: String = (0..n).map(|_| rng.pick(NAME_CHARS)).collect();
    if s.starts_with('#') {
        s.insert(0, 'x');
    }
    s
}

fn escape(s: &str, special: &[char]) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if special.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

enum Field {
    Value(String, f64),
    Text,
    NonFinite,
}

fn field(rng: &mut Rng) -> Field {
    match rng.below(8) {
        0 => {
            let v = rng.u64() as i64 >> rng.below(64);
            Field::Value(format!("{v}i"), v as f64)
        }
        1 => {
            let v = rng.u64() >> rng.below(64);
            Field::Value(format!("{v}u"), v as f64)
        }
        2 => {
            let b = rng.one_in(2);
            let text = rng.pick(if b {
                &["t", "T", "true", "True", "TRUE"]
            } else {
                &["f", "F", "false", "False", "FALSE"]
            });
            Field::Value(text.to_string(), if b { 1.0 } else { 0.0 })
        }
        3 => Field::Text,
        4 if rng.one_in(4) => Field::NonFinite,
        _ => {
            let v = rng.f64();
            if v.is_finite() {
                Field::Value(format!("{v:?}"), v)
            } else {
                Field::Value("0.5".into(), 0.5)
            }
        }
    }
}

/// Generated bodies with predicted series, values, times and rejects.
pub struct Structured;

type Expected = Vec<(String, f64, Option<i64>)>;

impl Target for Structured {
    type Input = (Vec<u8>, usize, Expected, Vec<Reject>);

    fn new(_: &mut Rng) -> Self {
        Structured
    }

    fn generate(&mut self, rng: &mut Rng) -> Self::Input {
        let p = rng.below(4);
        let mut body = String::new();
        let mut expected = Vec::new();
        let mut rejects = Vec::new();
        for _ in 0..1 + rng.below(5) {
            let measurement = name(rng);
            let mut tags: Vec<(String, String)> = Vec::new();
            for _ in 0..rng.below(4) {
                let k = name(rng);
                if tags.iter().all(|(t, _)| *t != k) {
                    tags.push((k, name(rng)));
                }
            }
            let fields: Vec<(String, Field)> = (0..1 + rng.below(4))
                .map(|_| (name(rng), field(rng)))
                .collect();
            // A time in range, or none; scaled by the precision in the model.
            let t_us = (!rng.one_in(3)).then(|| NOW - rng.range(0, 1 << 40));
            let (t_text, t_model) = match (t_us, PRECISIONS[p]) {
                (None, _) => (String::new(), None),
                (Some(us), Precision::Ns) => {
                    let ns = us as i128 * 1000 + rng.range(0, 999) as i128;
                    (format!(" {ns}"), Some(us))
                }
                (Some(us), Precision::Us) => (format!(" {us}"), Some(us)),
                (Some(us), Precision::Ms) => (format!(" {}", us / 1000), Some(us / 1000 * 1000)),
                (Some(us), Precision::S) => (
                    format!(" {}", us / 1_000_000),
                    Some(us / 1_000_000 * 1_000_000),
                ),
            };
            body.push_str(&escape(&measurement, &[',', ' ']));
            for (k, v) in &tags {
                body.push_str(&format!(
                    ",{}={}",
                    escape(k, &[',', '=', ' ']),
                    escape(v, &[',', '=', ' '])
                ));
            }
            body.push(' ');
            let rendered: Vec<String> = fields
                .iter()
                .map(|(k, f)| {
                    let v = match f {
                        Field::Value(text, _) => text.clone(),
                        Field::Text => "\"a \\\"quoted\\\", text\"".into(),
                        Field::NonFinite => "1e999".into(),
                    };
                    format!("{}={v}", escape(k, &[',', '=', ' ']))
                })
                .collect();
            body.push_str(&rendered.join(","));
            body.push_str(&t_text);
            body.push_str(if rng.one_in(4) { "\r\n" } else { "\n" });
            let mut sorted = tags.clone();
            sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            let mut prefix = escape(&measurement, &[',', ' ']);
            for (k, v) in &sorted {
                prefix.push_str(&format!(
                    ",{}={}",
                    escape(k, &[',', '=', ' ']),
                    escape(v, &[',', '=', ' '])
                ));
            }
            for (k, f) in &fields {
                match f {
                    Field::Value(_, v) => expected.push((
                        format!("{prefix} {}", escape(k, &[',', '=', ' '])),
                        *v,
                        t_model,
                    )),
                    Field::Text => rejects.push(Reject::StringField),
                    Field::NonFinite => rejects.push(Reject::NonFinite),
                }
            }
        }
        (body.into_bytes(), p, expected, rejects)
    }

    fn check(&mut self, (body, p, expected, rejects): &Self::Input) -> Result<u64, String> {
        let r = parse(body, PRECISIONS[*p], NOW, 1_000_000);
        check_batch(body, NOW, 1_000_000, &r)?;
        let b = r.map_err(|e| format!("generated body refused: {e}"))?;
        let got: Expected = b
            .points
            .iter()
            .map(|pt| (b.series[pt.series as usize].clone(), pt.value, pt.time_us))
            .collect();
        if got.len() != expected.len()
            || got
                .iter()
                .zip(expected)
                .any(|(g, e)| g.0 != e.0 || g.1.to_bits() != e.1.to_bits() || g.2 != e.2)
        {
            return Err(format!("points {got:?}, model {expected:?}"));
        }
        let got_rejects: Vec<Reject> = b.rejects.iter().map(|r| r.1).collect();
        if &got_rejects != rejects {
            return Err(format!("rejects {got_rejects:?}, model {rejects:?}"));
        }
        Ok(signature(&(
            expected.len().min(4),
            rejects.len().min(4),
            *p,
        )))
    }

    fn artifact(input: &Self::Input) -> Vec<u8> {
        input.0.clone()
    }
}
