//! The binary COPY decoder (`pgcopy::decode_datapoints`, `message_time`, `order_ties_by_event`): arbitrary and
//! mutated streams keep the column invariants or are an `Err`; generated streams decode to their rows, split
//! anywhere between tuples, and fail at every other cut.

use webmacs_core::pgcopy::{
    decode_datapoints, message_time, order_ties_by_event, DatapointColumns, PgCopyError, FIELDS,
    PG_EPOCH_US, SIGNATURE,
};

use crate::harness::{mutate, signature, Corpus, Rng, Target, INTERESTING_I64};

type Row = (i64, i32, f64, Option<i32>);

fn header(extension: &[u8]) -> Vec<u8> {
    let mut b = SIGNATURE.to_vec();
    b.extend_from_slice(&0i32.to_be_bytes());
    b.extend_from_slice(&(extension.len() as i32).to_be_bytes());
    b.extend_from_slice(extension);
    b
}

/// One tuple as PostgreSQL sends it (time in µs since 2000-01-01).
fn tuple(&(time, event, value, experiment): &Row) -> Vec<u8> {
    let mut b = FIELDS.to_be_bytes().to_vec();
    b.extend_from_slice(&8i32.to_be_bytes());
    b.extend_from_slice(&time.to_be_bytes());
    b.extend_from_slice(&4i32.to_be_bytes());
    b.extend_from_slice(&event.to_be_bytes());
    b.extend_from_slice(&8i32.to_be_bytes());
    b.extend_from_slice(&value.to_be_bytes());
    match experiment {
        Some(x) => {
            b.extend_from_slice(&4i32.to_be_bytes());
            b.extend_from_slice(&x.to_be_bytes());
        }
        None => b.extend_from_slice(&(-1i32).to_be_bytes()),
    }
    b
}

const TRAILER: [u8; 2] = [0xff, 0xff];

fn rows(rng: &mut Rng) -> Vec<Row> {
    let n = if rng.one_in(20) {
        rng.below(300)
    } else {
        rng.len(20)
    };
    let mut time = match rng.below(4) {
        0 => rng.pick(&INTERESTING_I64),
        1 => rng.u64() as i64,
        _ => rng.range(0, 1 << 50),
    };
    (0..n)
        .map(|_| {
            // Runs of equal times (ties for `order_ties_by_event`), else increasing.
            if !rng.one_in(3) {
                time = time.saturating_add(rng.range(0, 3));
            }
            let event = match rng.below(3) {
                0 => rng.pick(&INTERESTING_I64) as i32,
                _ => rng.range(1, 50) as i32,
            };
            let experiment = (!rng.one_in(3)).then(|| rng.u64() as i32);
            (time, event, rng.f64(), experiment)
        })
        .collect()
}

/// The column invariants of any successful decode of `data`.
fn check_columns(data: &[u8], cols: &DatapointColumns) -> Result<(), String> {
    let n = cols.rows;
    let sizes = (
        cols.time_us.len(),
        cols.event_id.len(),
        cols.value.len(),
        cols.experiment_id.len(),
        cols.experiment_validity.len(),
    );
    if sizes != (n * 8, n * 4, n * 8, n * 4, n.div_ceil(8)) {
        return Err(format!("{n} rows with buffers of {sizes:?} bytes"));
    }
    let valid = (0..n)
        .filter(|&i| cols.experiment_validity[i / 8] & (1 << (i % 8)) != 0)
        .count();
    if n - valid != cols.experiment_nulls {
        return Err(format!(
            "{} NULLs counted, {} in the bitmap",
            cols.experiment_nulls,
            n - valid
        ));
    }
    if !n.is_multiple_of(8) && cols.experiment_validity[n / 8] >> (n % 8) != 0 {
        return Err("validity bits set past the last row".into());
    }
    let ids = cols.experiment_ids();
    if ids.iter().filter(|x| x.is_none()).count() != cols.experiment_nulls {
        return Err("experiment_ids disagrees with the NULL count".into());
    }
    if cols.finished && !data.ends_with(&TRAILER) {
        return Err("finished without a trailer".into());
    }
    if !cols.finished && n * 38 > data.len() {
        return Err(format!("{n} rows from {} bytes", data.len()));
    }
    // Reordering ties keeps every row and the order of times; equal times end up ordered by event.
    let before = row_list(cols);
    let mut sorted = cols.clone();
    order_ties_by_event(&mut sorted);
    check_columns_shape(&sorted)?;
    let after = row_list(&sorted);
    let times = |r: &[(i64, i32, u64, Option<i32>)]| r.iter().map(|x| x.0).collect::<Vec<_>>();
    if times(&before) != times(&after) {
        return Err("order_ties_by_event moved times".into());
    }
    if !after
        .windows(2)
        .all(|w| w[0].0 != w[1].0 || w[0].1 <= w[1].1)
    {
        return Err("order_ties_by_event left a tie out of event order".into());
    }
    let (mut a, mut b) = (before, after);
    a.sort_unstable();
    b.sort_unstable();
    if a != b {
        return Err("order_ties_by_event changed the rows".into());
    }
    Ok(())
}

fn check_columns_shape(cols: &DatapointColumns) -> Result<(), String> {
    let n = cols.rows;
    if (cols.time_us.len(), cols.experiment_validity.len()) != (n * 8, n.div_ceil(8)) {
        return Err("reordered columns have the wrong size".into());
    }
    Ok(())
}

/// Rows as comparable tuples (values as bits: NaN payloads must survive too).
fn row_list(cols: &DatapointColumns) -> Vec<(i64, i32, u64, Option<i32>)> {
    let (t, e, v, x) = (
        cols.times(),
        cols.event_ids(),
        cols.values(),
        cols.experiment_ids(),
    );
    (0..cols.rows)
        .map(|i| (t[i], e[i], v[i].to_bits(), x[i]))
        .collect()
}

fn error_signature(e: &PgCopyError) -> u64 {
    signature(&std::mem::discriminant(e))
}

fn decode_signature(r: &Result<DatapointColumns, PgCopyError>) -> u64 {
    match r {
        Ok(c) => signature(&(c.rows.min(9), c.finished, c.experiment_nulls > 0)),
        Err(e) => error_signature(e),
    }
}

/// Arbitrary and mutated COPY streams.
pub struct Mutated {
    corpus: Corpus,
}

impl Target for Mutated {
    type Input = (Vec<u8>, bool);

    fn new(rng: &mut Rng) -> Self {
        let seeds = (0..8)
            .map(|i| {
                let mut b = if i % 2 == 0 { header(&[]) } else { Vec::new() };
                if i == 3 {
                    b = header(b"ext");
                }
                for r in rows(rng) {
                    b.extend(tuple(&r));
                }
                if i < 6 {
                    b.extend_from_slice(&TRAILER);
                }
                b
            })
            .collect();
        Mutated {
            corpus: Corpus::new(seeds, 512),
        }
    }

    fn generate(&mut self, rng: &mut Rng) -> Self::Input {
        let mut b = if rng.one_in(20) {
            let n = rng.len(200);
            rng.bytes(n)
        } else {
            self.corpus.sample(rng)
        };
        match rng.below(3) {
            0 if !b.is_empty() => {
                // A length word or field count replaced by a boundary value.
                let at = rng.below(b.len());
                let v = rng.pick(&INTERESTING_I64);
                let word: Vec<u8> = if rng.one_in(2) {
                    (v as i32).to_be_bytes().to_vec()
                } else {
                    (v as i16).to_be_bytes().to_vec()
                };
                let end = (at + word.len()).min(b.len());
                b.splice(at..end, word);
            }
            _ => {
                let dict: &[&[u8]] = &[
                    &TRAILER,
                    b"\0\x04",
                    b"\0\0\0\x08",
                    b"\0\0\0\x04",
                    b"\xff\xff\xff\xff",
                    SIGNATURE,
                ];
                mutate(rng, &mut b, dict, &self.corpus.items, 4, 1 << 16);
            }
        }
        let with_header = if rng.one_in(8) {
            !b.starts_with(SIGNATURE)
        } else {
            b.starts_with(SIGNATURE)
        };
        (b, with_header)
    }

    fn check(&mut self, (data, with_header): &Self::Input) -> Result<u64, String> {
        let decoded = decode_datapoints(data, *with_header);
        let first = message_time(data);
        if let Ok(cols) = &decoded {
            check_columns(data, cols)?;
            if *with_header == data.starts_with(SIGNATURE) {
                let want = cols.times().first().copied();
                let got = first
                    .clone()
                    .map(|t| t.map(|t| t.saturating_add(PG_EPOCH_US)));
                if (cols.rows > 0 || cols.finished) && got != Ok(want) {
                    return Err(format!(
                        "message_time gave {first:?}, the first row is at {want:?}"
                    ));
                }
            }
        }
        Ok(signature(&(decode_signature(&decoded), first.is_ok())))
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

/// Generated streams: decoded rows equal the rows sent, however the stream is split between tuples.
pub struct RoundTrip;

impl Target for RoundTrip {
    type Input = (Vec<Row>, Vec<u8>, bool, usize, usize);

    fn new(_: &mut Rng) -> Self {
        RoundTrip
    }

    fn generate(&mut self, rng: &mut Rng) -> Self::Input {
        let rows = rows(rng);
        let ext_len = if rng.one_in(4) { rng.len(16) } else { 0 };
        let ext = rng.bytes(ext_len);
        let trailer = !rng.one_in(4);
        let split = rng.below(rows.len() + 1);
        let cut = rng.u64() as usize;
        (rows, ext, trailer, split, cut)
    }

    fn check(&mut self, (rows, ext, trailer, split, cut): &Self::Input) -> Result<u64, String> {
        let head = header(ext);
        let tuples: Vec<Vec<u8>> = rows.iter().map(tuple).collect();
        let mut data = head.clone();
        let mut ends = vec![head.len()];
        for t in &tuples {
            data.extend_from_slice(t);
            ends.push(data.len());
        }
        if *trailer {
            data.extend_from_slice(&TRAILER);
            ends.push(data.len());
        }
        let want: Vec<_> = rows
            .iter()
            .map(|&(t, e, v, x)| (t.saturating_add(PG_EPOCH_US), e, v.to_bits(), x))
            .collect();
        let cols = decode_datapoints(&data, true).map_err(|e| format!("whole stream: {e}"))?;
        check_columns(&data, &cols)?;
        if row_list(&cols) != want || cols.finished != *trailer {
            return Err("decoded rows differ from the rows sent".into());
        }
        // Split between tuples: the first part with the header, the rest without.
        let at = ends[*split];
        let a = decode_datapoints(&data[..at], true).map_err(|e| format!("first part: {e}"))?;
        let b = decode_datapoints(&data[at..], false).map_err(|e| format!("second part: {e}"))?;
        let mut joined = row_list(&a);
        joined.extend(row_list(&b));
        if joined != want {
            return Err(format!("split at tuple {split}: rows differ"));
        }
        // One message per tuple, the first with the header, maybe the trailer last.
        for (i, t) in tuples.iter().enumerate() {
            let message = if i == 0 {
                [&head[..], t].concat()
            } else {
                t.clone()
            };
            if message_time(&message) != Ok(Some(rows[i].0)) {
                return Err(format!("message_time of tuple {i}"));
            }
        }
        if message_time(&TRAILER) != Ok(None) {
            return Err("message_time of the trailer".into());
        }
        // Any cut inside the header or a tuple is an error; a cut between them is not.
        let cut = cut % (data.len() + 1);
        let part = decode_datapoints(&data[..cut], true);
        match (ends.contains(&cut), &part) {
            (true, Ok(_)) => {}
            (false, Err(PgCopyError::Truncated { .. } | PgCopyError::BadSignature)) => {}
            _ => return Err(format!("cut at {cut} of {}: {part:?}", data.len())),
        }
        Ok(signature(&(rows.len().min(9), trailer, ext.is_empty())))
    }

    fn artifact(input: &Self::Input) -> Vec<u8> {
        format!("{input:?}").into_bytes()
    }
}
