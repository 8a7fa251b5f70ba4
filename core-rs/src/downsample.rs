//! Shape-preserving downsamplers for series queries (stride, LTTB, min/max, M4, bucket average).
//!
//! Every function takes one series, `times` (µs since the Unix epoch, non-decreasing) and `values` of equal
//! length, and never returns more than `max_points` points. A series that already fits is returned whole.
//! Selectors return indices into the input (ascending), so the caller keeps whatever else belongs to a point
//! (its experiment, its id); `avg` synthesises new points and returns them.

use thiserror::Error;

/// Why a series could not be downsampled. Bad input is an `Err`, never a panic.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DownsampleError {
    #[error("times and values differ in length ({times} != {values})")]
    LengthMismatch { times: usize, values: usize },
    #[error("max_points must be at least {min} for {mode} (got {got})")]
    TooFewPoints {
        mode: &'static str,
        min: usize,
        got: usize,
    },
    #[error("times must be non-decreasing (index {index} is earlier than its predecessor)")]
    Unsorted { index: usize },
    #[error("a packed array of {width}-byte items cannot be {len} bytes long")]
    BadPacking { width: usize, len: usize },
    #[error("time at index {index} is outside the representable range")]
    TimeOutOfRange { index: usize },
    #[error("{mode:?} cannot downsample from candidates (m4, minmax, lttb can)")]
    NoCandidates { mode: String },
}

impl DownsampleError {
    /// A stable name for the kind of error (the Python exception's `code`).
    pub fn code(&self) -> &'static str {
        match self {
            DownsampleError::LengthMismatch { .. } => "length_mismatch",
            DownsampleError::TooFewPoints { .. } => "too_few_points",
            DownsampleError::Unsorted { .. } => "unsorted",
            DownsampleError::BadPacking { .. } => "bad_packing",
            DownsampleError::TimeOutOfRange { .. } => "time_out_of_range",
            DownsampleError::NoCandidates { .. } => "no_candidates",
        }
    }
}

type Result<T> = std::result::Result<T, DownsampleError>;

fn check_max_points(mode: &'static str, min: usize, max_points: usize) -> Result<()> {
    if max_points < min {
        return Err(DownsampleError::TooFewPoints {
            mode,
            min,
            got: max_points,
        });
    }
    Ok(())
}

fn check_series(times: &[i64], values: &[f64]) -> Result<()> {
    if times.len() != values.len() {
        return Err(DownsampleError::LengthMismatch {
            times: times.len(),
            values: values.len(),
        });
    }
    if let Some(i) = times.windows(2).position(|w| w[1] < w[0]) {
        return Err(DownsampleError::Unsorted { index: i + 1 });
    }
    Ok(())
}

/// The WebMACS reference (spec §4.2): for n > max_points, step = n / max_points, keep ⌊i·step⌋ for
/// i = 0..max_points−2, then the last index — exactly `max_points` indices, first and last kept.
pub fn stride(n: usize, max_points: usize) -> Result<Vec<usize>> {
    check_max_points("stride", 2, max_points)?;
    if n <= max_points {
        return Ok((0..n).collect());
    }
    // Float arithmetic on purpose: it is what the reference computes (`int(i * (n / max_points))`).
    let step = n as f64 / max_points as f64;
    let mut kept: Vec<usize> = (0..max_points - 1)
        .map(|i| (i as f64 * step) as usize)
        .collect();
    kept.push(n - 1);
    Ok(kept)
}

/// Largest-Triangle-Three-Buckets (Steinarsson 2013): first and last kept, one point per inner bucket, the
/// one spanning the largest triangle with the previously kept point and the next bucket's average.
pub fn lttb(times: &[i64], values: &[f64], max_points: usize) -> Result<Vec<usize>> {
    check_max_points("lttb", 3, max_points)?;
    check_series(times, values)?;
    let n = times.len();
    if n <= max_points {
        return Ok((0..n).collect());
    }
    // Times relative to the first one keep the triangle areas well inside f64's exact range.
    // i128: the difference of two extreme i64 overflows i64.
    let t0 = i128::from(times[0]);
    let x = |i: usize| (i128::from(times[i]) - t0) as f64;
    let every = (n - 2) as f64 / (max_points - 2) as f64;
    let mut kept = Vec::with_capacity(max_points);
    let mut a = 0usize;
    kept.push(a);
    for i in 0..max_points - 2 {
        let avg_start = ((i + 1) as f64 * every) as usize + 1;
        let avg_end = (((i + 2) as f64 * every) as usize + 1).min(n);
        let avg_len = (avg_end - avg_start) as f64;
        let (mut avg_x, mut avg_y) = (0.0, 0.0);
        for (j, &y) in (avg_start..avg_end).zip(&values[avg_start..avg_end]) {
            avg_x += x(j);
            avg_y += y;
        }
        avg_x /= avg_len;
        avg_y /= avg_len;

        let range_start = (i as f64 * every) as usize + 1;
        let range_end = ((i + 1) as f64 * every) as usize + 1;
        let (ax, ay) = (x(a), values[a]);
        let mut max_area = -1.0;
        let mut next_a = range_start;
        for (j, &y) in (range_start..range_end).zip(&values[range_start..range_end]) {
            let area = ((ax - avg_x) * (y - ay) - (ax - x(j)) * (avg_y - ay)).abs() * 0.5;
            if area > max_area {
                max_area = area;
                next_a = j;
            }
        }
        kept.push(next_a);
        a = next_a;
    }
    kept.push(n - 1);
    Ok(kept)
}

/// Which of `buckets` equal time slices of [t_first, t_last] holds `t` (the last slice is closed).
fn time_bucket(t: i64, t_first: i64, t_last: i64, buckets: usize) -> usize {
    let span = i128::from(t_last) - i128::from(t_first);
    if span <= 0 {
        return 0;
    }
    // i128: (t − t_first)·buckets overflows i64 for spans of centuries and large bucket counts.
    let b = (i128::from(t) - i128::from(t_first)) * buckets as i128 / span;
    (b.max(0) as usize).min(buckets - 1)
}

/// Consecutive runs of indices in `range` that fall into the same time bucket: (bucket, start, end).
fn bucket_runs(
    times: &[i64],
    range: std::ops::Range<usize>,
    buckets: usize,
) -> impl Iterator<Item = (usize, usize)> + '_ {
    let (t_first, t_last) = (times[0], times[times.len() - 1]);
    let mut start = range.start;
    let end = range.end;
    std::iter::from_fn(move || {
        if start >= end {
            return None;
        }
        let b = time_bucket(times[start], t_first, t_last, buckets);
        let mut stop = start + 1;
        while stop < end && time_bucket(times[stop], t_first, t_last, buckets) == b {
            stop += 1;
        }
        let run = (start, stop);
        start = stop;
        Some(run)
    })
}

/// Index of the minimum and of the maximum value in `values[start..end]` (first occurrence of each).
fn min_max(values: &[f64], start: usize, end: usize) -> (usize, usize) {
    let (mut lo, mut hi) = (start, start);
    for j in start + 1..end {
        if values[j] < values[lo] {
            lo = j;
        }
        if values[j] > values[hi] {
            hi = j;
        }
    }
    (lo, hi)
}

fn push_sorted_unique(kept: &mut Vec<usize>, mut picks: Vec<usize>) {
    picks.sort_unstable();
    picks.dedup();
    kept.extend(picks);
}

/// Min/max: first and last kept; the points between fall into ⌊(max_points − 2)/2⌋ equal time slices and
/// each slice keeps its minimum and maximum in time order. The global minimum and maximum always survive.
pub fn minmax(times: &[i64], values: &[f64], max_points: usize) -> Result<Vec<usize>> {
    check_max_points("minmax", 4, max_points)?;
    check_series(times, values)?;
    let n = times.len();
    if n <= max_points {
        return Ok((0..n).collect());
    }
    Ok(minmax_picks(times, values, max_points))
}

fn minmax_picks(times: &[i64], values: &[f64], max_points: usize) -> Vec<usize> {
    let n = times.len();
    let buckets = (max_points - 2) / 2;
    let mut kept = Vec::with_capacity(max_points);
    kept.push(0);
    for (start, end) in bucket_runs(times, 1..n - 1, buckets) {
        let (lo, hi) = min_max(values, start, end);
        push_sorted_unique(&mut kept, vec![lo, hi]);
    }
    if n > 1 {
        kept.push(n - 1);
    }
    kept
}

/// M4 (Jugel et al. 2014): ⌊max_points/4⌋ equal time slices, each keeping its first, minimum, maximum and
/// last point — the series' first and last points are the first slice's first and the last slice's last.
pub fn m4(times: &[i64], values: &[f64], max_points: usize) -> Result<Vec<usize>> {
    check_max_points("m4", 4, max_points)?;
    check_series(times, values)?;
    let n = times.len();
    if n <= max_points {
        return Ok((0..n).collect());
    }
    Ok(m4_picks(times, values, max_points))
}

fn m4_picks(times: &[i64], values: &[f64], max_points: usize) -> Vec<usize> {
    let mut kept = Vec::with_capacity(max_points);
    for (start, end) in bucket_runs(times, 0..times.len(), max_points / 4) {
        let (lo, hi) = min_max(values, start, end);
        push_sorted_unique(&mut kept, vec![start, lo, hi, end - 1]);
    }
    kept
}

/// The downsample of a range of `total` datapoints from `candidates` only (times µs since 1970, values;
/// in any order, a datapoint possibly more than once): the points of the range's cell summaries and every
/// row of the cells a slice edge or an end of the range cuts (`services/series.py`). Such candidates hold
/// the first, the last, the earliest minimum and the earliest maximum of every slice m4 and minmax cut,
/// and the downsampler picks only those, so for `total` > `max_points` this is m4's or minmax's answer on
/// every row — although the candidates alone may be fewer than `max_points`.
/// (The cut cells' rows come from their packed copy in the cells: `packed_rows_in`.) lttb runs on the candidates
/// themselves (an approximation, like any pre-selection for it). Returns the kept points in time order.
pub fn from_candidates(
    mode: &str,
    mut candidates: Vec<(i64, f64)>,
    total: u64,
    max_points: usize,
) -> Result<Vec<(i64, f64)>> {
    candidates.sort_by_key(|p| p.0);
    // (event, time) is unique: equal times are the same datapoint, seen twice.
    candidates.dedup_by_key(|p| p.0);
    let (times, values): (Vec<i64>, Vec<f64>) = candidates.iter().copied().unzip();
    let whole = total <= max_points as u64 || times.is_empty();
    let kept = match mode {
        "m4" if !whole => {
            check_max_points("m4", 4, max_points)?;
            m4_picks(&times, &values, max_points)
        }
        "minmax" if !whole => {
            check_max_points("minmax", 4, max_points)?;
            minmax_picks(&times, &values, max_points)
        }
        "m4" => m4(&times, &values, max_points)?,
        "minmax" => minmax(&times, &values, max_points)?,
        "lttb" => lttb(&times, &values, max_points)?,
        other => {
            return Err(DownsampleError::NoCandidates {
                mode: other.to_owned(),
            })
        }
    };
    Ok(kept.into_iter().map(|i| candidates[i]).collect())
}

/// Bucket means: `max_points` equal time slices; each non-empty one becomes one point at its mean time
/// (rounded to the microsecond) with its mean value.
pub fn avg(times: &[i64], values: &[f64], max_points: usize) -> Result<(Vec<i64>, Vec<f64>)> {
    check_max_points("avg", 2, max_points)?;
    check_series(times, values)?;
    let n = times.len();
    if n <= max_points {
        return Ok((times.to_vec(), values.to_vec()));
    }
    let mut out_t = Vec::with_capacity(max_points);
    let mut out_v = Vec::with_capacity(max_points);
    for (start, end) in bucket_runs(times, 0..n, max_points) {
        let len = (end - start) as i128;
        // Offsets from the bucket's first time: the sum of raw epoch microseconds could overflow.
        let base = times[start];
        let offsets: i128 = times[start..end]
            .iter()
            .map(|&t| i128::from(t) - i128::from(base))
            .sum();
        let mean_offset = (2 * offsets + len).div_euclid(2 * len); // round half up
        out_t.push(base + mean_offset as i64);
        out_v.push(values[start..end].iter().sum::<f64>() / len as f64);
    }
    Ok((out_t, out_v))
}

fn unpack<const W: usize, T>(bytes: &[u8], from: fn([u8; W]) -> T) -> Result<Vec<T>> {
    if !bytes.len().is_multiple_of(W) {
        return Err(DownsampleError::BadPacking {
            width: W,
            len: bytes.len(),
        });
    }
    Ok(bytes
        .chunks_exact(W)
        // chunks_exact yields exactly W bytes, so the conversion cannot fail.
        .map(|c| from(c.try_into().expect("chunk of W bytes")))
        .collect())
}

/// A packed big-endian int8 array, as PostgreSQL's `int8send` produces (`string_agg(int8send(x), '')`).
pub fn unpack_i64_be(bytes: &[u8]) -> Result<Vec<i64>> {
    unpack(bytes, i64::from_be_bytes)
}

/// A packed big-endian float8 array, as PostgreSQL's `float8send` produces.
pub fn unpack_f64_be(bytes: &[u8]) -> Result<Vec<f64>> {
    unpack(bytes, f64::from_be_bytes)
}

/// One event's series as PostgreSQL packs it cheaply — `timestamptz_send` times (µs since 2000-01-01),
/// `float8send` values, `int4send` experiment ids, big-endian, aggregated from an ordered subquery — as the
/// downsamplers take it: times in µs since 1970, in time order. `timestamptz_send` is exact and costs far
/// less than `extract(epoch …)`'s numeric arithmetic. Rows arrive in order from the subquery; should a plan
/// ever deliver them otherwise, they are put in order here (stably) instead of being downsampled wrongly.
pub fn series_from_pg(times: &[u8], values: &[u8], experiments: Option<&[u8]>) -> Result<Packed> {
    let mut micros = unpack_i64_be(times)?;
    let n = micros.len();
    let mismatch = |len: usize| DownsampleError::LengthMismatch {
        times: n,
        values: len,
    };
    if values.len() != n * 8 {
        return Err(mismatch(values.len() / 8));
    }
    if let Some(x) = experiments {
        if x.len() != n * 4 {
            return Err(mismatch(x.len() / 4));
        }
    }
    for (index, t) in micros.iter_mut().enumerate() {
        *t = t
            .checked_add(crate::pg::PG_EPOCH_US)
            .ok_or(DownsampleError::TimeOutOfRange { index })?;
    }
    let order: Option<Vec<usize>> = (!micros.is_sorted()).then(|| {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| micros[i]);
        order
    });
    let gather = |bytes: &[u8], width: usize| -> Vec<u8> {
        match &order {
            None => bytes.to_vec(),
            Some(order) => order
                .iter()
                .flat_map(|&i| &bytes[i * width..(i + 1) * width])
                .copied()
                .collect(),
        }
    };
    let mut out_times = Vec::with_capacity(n * 8);
    match &order {
        None => micros
            .iter()
            .for_each(|t| out_times.extend_from_slice(&t.to_be_bytes())),
        Some(order) => order
            .iter()
            .for_each(|&i| out_times.extend_from_slice(&micros[i].to_be_bytes())),
    }
    Ok(Packed {
        times: out_times,
        values: gather(values, 8),
        experiments: experiments.map(|x| gather(x, 4)),
    })
}

/// Points packed as PostgreSQL sends them (`timestamptz_send` times since 2000, `float8send` values) as
/// (µs since 1970, value) pairs.
pub fn points_from_pg(times: &[u8], values: &[u8]) -> Result<Vec<(i64, f64)>> {
    let times = unpack_i64_be(times)?;
    let values = unpack_f64_be(values)?;
    check_series(&times, &values).or_else(|e| match e {
        DownsampleError::Unsorted { .. } => Ok(()),
        other => Err(other),
    })?;
    times
        .iter()
        .enumerate()
        .map(|(index, t)| {
            t.checked_add(crate::pg::PG_EPOCH_US)
                .ok_or(DownsampleError::TimeOutOfRange { index })
        })
        .zip(values)
        .map(|(t, v)| Ok((t?, v)))
        .collect()
}

/// The rows of cells' `packed` column (`timestamptz_send(time) || float8send(value)` each) whose time (µs
/// since PostgreSQL's epoch) lies in [lo, hi], split into packed times and packed values as PostgreSQL's
/// send functions lay them out; with how many there are.
pub fn packed_rows_in(packed: &[u8], lo: i64, hi: i64) -> Result<(u64, Vec<u8>, Vec<u8>)> {
    if !packed.len().is_multiple_of(16) {
        return Err(DownsampleError::BadPacking {
            width: 16,
            len: packed.len(),
        });
    }
    let mut times = Vec::with_capacity(packed.len() / 2);
    let mut values = Vec::with_capacity(packed.len() / 2);
    let mut n = 0;
    for row in packed.chunks_exact(16) {
        // chunks_exact yields 16 bytes: both halves convert.
        let t = i64::from_be_bytes(row[..8].try_into().expect("8 bytes"));
        if (lo..=hi).contains(&t) {
            times.extend_from_slice(&row[..8]);
            values.extend_from_slice(&row[8..]);
            n += 1;
        }
    }
    Ok((n, times, values))
}

/// A series as packed big-endian arrays: times (µs since 1970), values, experiment ids (0 = none).
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub times: Vec<u8>,
    pub values: Vec<u8>,
    pub experiments: Option<Vec<u8>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic pseudo-random series without a dev-dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn series(&mut self, n: usize) -> (Vec<i64>, Vec<f64>) {
            let mut t = 1_700_000_000_000_000i64 + self.below(1_000_000) as i64;
            let mut times = Vec::with_capacity(n);
            let mut values = Vec::with_capacity(n);
            for _ in 0..n {
                times.push(t);
                // Irregular sampling with occasional equal timestamps and long gaps.
                t += match self.below(10) {
                    0 => 0,
                    1 => self.below(10_000_000_000) as i64,
                    _ => self.below(2_000_000) as i64,
                };
                values.push((self.below(2_000_001) as f64 - 1_000_000.0) / 1000.0);
            }
            (times, values)
        }
    }

    type Selector = fn(&[i64], &[f64], usize) -> Result<Vec<usize>>;
    const SELECTORS: [(&str, Selector, usize); 3] =
        [("lttb", lttb, 3), ("minmax", minmax, 4), ("m4", m4, 4)];

    #[test]
    fn stride_matches_the_spec_formula() {
        assert_eq!(stride(10, 4).unwrap(), vec![0, 2, 5, 9]);
        assert_eq!(stride(3, 10).unwrap(), vec![0, 1, 2]);
        assert_eq!(stride(1000, 500).unwrap().len(), 500);
        let mut rng = Rng(7);
        for _ in 0..500 {
            let n = rng.below(5000) as usize;
            let max_points = 2 + rng.below(600) as usize;
            let kept = stride(n, max_points).unwrap();
            assert_eq!(kept.len(), n.min(max_points));
            if n > 0 {
                assert_eq!((kept[0], *kept.last().unwrap()), (0, n - 1));
            }
            assert!(kept.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn selectors_respect_max_points_and_keep_the_ends() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..400 {
            let n = rng.below(3000) as usize;
            let (times, values) = rng.series(n);
            for (name, select, min) in SELECTORS {
                let max_points = min + rng.below(300) as usize;
                let kept = select(&times, &values, max_points).unwrap();
                assert!(
                    kept.len() <= max_points,
                    "{name}: {} > {max_points}",
                    kept.len()
                );
                assert!(
                    kept.windows(2).all(|w| w[0] < w[1]),
                    "{name}: not strictly ascending"
                );
                if n > 0 {
                    assert_eq!(
                        (kept[0], *kept.last().unwrap()),
                        (0, n - 1),
                        "{name}: ends lost"
                    );
                }
                if n <= max_points {
                    assert_eq!(
                        kept,
                        (0..n).collect::<Vec<_>>(),
                        "{name}: a fitting series changed"
                    );
                }
            }
        }
    }

    #[test]
    fn lttb_keeps_exactly_max_points() {
        let mut rng = Rng(3);
        for _ in 0..200 {
            let n = 3 + rng.below(3000) as usize;
            let (times, values) = rng.series(n);
            let max_points = 3 + rng.below(n as u64) as usize;
            assert_eq!(
                lttb(&times, &values, max_points).unwrap().len(),
                max_points.min(n)
            );
        }
    }

    #[test]
    fn lttb_keeps_a_lone_spike() {
        let times: Vec<i64> = (0..1000).collect();
        let mut values = vec![0.0; 1000];
        values[437] = 50.0;
        assert!(lttb(&times, &values, 20).unwrap().contains(&437));
    }

    #[test]
    fn minmax_and_m4_keep_the_extremes() {
        let mut rng = Rng(11);
        for _ in 0..300 {
            let n = 1 + rng.below(3000) as usize;
            let (times, values) = rng.series(n);
            let lo = values.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            for select in [minmax as Selector, m4] {
                let kept = select(&times, &values, 4 + rng.below(200) as usize).unwrap();
                assert!(kept.iter().any(|&i| values[i] == lo));
                assert!(kept.iter().any(|&i| values[i] == hi));
            }
        }
    }

    #[test]
    fn avg_preserves_the_mean_of_equal_buckets() {
        // 100 points, one per second, 10 buckets of exactly 10 points each (the last is closed).
        let times: Vec<i64> = (0..100).map(|i| i * 1_000_000).collect();
        let values: Vec<f64> = (0..100).map(f64::from).collect();
        let (t, v) = avg(&times, &values, 10).unwrap();
        assert_eq!(v.len(), 10);
        assert!(t.windows(2).all(|w| w[0] < w[1]));
        let overall: f64 = v.iter().sum::<f64>() / 10.0;
        assert!((overall - 49.5).abs() < 1e-9);
        let mut rng = Rng(5);
        for _ in 0..200 {
            let n = rng.below(3000) as usize;
            let (times, values) = rng.series(n);
            let max_points = 2 + rng.below(300) as usize;
            let (t, v) = avg(&times, &values, max_points).unwrap();
            assert!(t.len() == v.len() && t.len() <= max_points);
            assert!(t
                .iter()
                .all(|x| times.first() <= Some(x) && Some(x) <= times.last()));
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        let t = [1, 2, 3];
        assert_eq!(
            lttb(&t, &[1.0, 2.0], 10),
            Err(DownsampleError::LengthMismatch {
                times: 3,
                values: 2
            })
        );
        assert!(matches!(
            lttb(&t, &[1.0; 3], 2),
            Err(DownsampleError::TooFewPoints { min: 3, .. })
        ));
        assert!(matches!(
            stride(5, 1),
            Err(DownsampleError::TooFewPoints { min: 2, .. })
        ));
        assert!(matches!(
            minmax(&t, &[1.0; 3], 3),
            Err(DownsampleError::TooFewPoints { min: 4, .. })
        ));
        assert_eq!(
            m4(&[3, 1, 2], &[1.0; 3], 10),
            Err(DownsampleError::Unsorted { index: 1 })
        );
        assert!(matches!(
            unpack_i64_be(&[0; 9]),
            Err(DownsampleError::BadPacking { width: 8, len: 9 })
        ));
        // Extreme but valid input: no overflow, no panic.
        let t = [i64::MIN, 0, i64::MAX, i64::MAX, i64::MAX];
        let v = [f64::NAN, f64::INFINITY, -1.0, 0.0, 1.0];
        for (_, select, min) in SELECTORS {
            assert!(select(&t, &v, min).is_ok());
        }
        assert!(avg(&t, &v, 2).is_ok());
    }

    #[test]
    fn unpacks_postgres_send_format() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(-2i64).to_be_bytes());
        bytes.extend_from_slice(&(1i64 << 50).to_be_bytes());
        assert_eq!(unpack_i64_be(&bytes).unwrap(), vec![-2, 1 << 50]);
        assert_eq!(unpack_f64_be(&1.5f64.to_be_bytes()).unwrap(), vec![1.5]);
        assert_eq!(unpack_f64_be(&[]).unwrap(), Vec::<f64>::new());
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// Non-decreasing timestamps (irregular steps, repeats allowed) and finite values of equal length.
        fn series() -> impl Strategy<Value = (Vec<i64>, Vec<f64>)> {
            prop::collection::vec((0i64..5_000_000_000, -1e9f64..1e9), 0..800).prop_flat_map(
                |steps| {
                    let mut t = 1_600_000_000_000_000i64;
                    let mut times = Vec::with_capacity(steps.len());
                    let mut values = Vec::with_capacity(steps.len());
                    for (step, value) in steps {
                        times.push(t);
                        values.push(value);
                        t += step;
                    }
                    Just((times, values))
                },
            )
        }

        proptest! {
            #[test]
            fn selectors_bound_and_keep_ends((times, values) in series(), max_points in 4usize..300) {
                for select in [lttb as fn(&[i64], &[f64], usize) -> Result<Vec<usize>>, minmax, m4] {
                    let kept = select(&times, &values, max_points).unwrap();
                    prop_assert!(kept.len() <= max_points);
                    prop_assert!(kept.windows(2).all(|w| w[0] < w[1]));
                    if let (Some(&first), Some(&last)) = (kept.first(), kept.last()) {
                        prop_assert_eq!((first, last), (0, times.len() - 1));
                    }
                }
            }

            #[test]
            fn minmax_keeps_the_extremes((times, values) in series(), max_points in 4usize..300) {
                prop_assume!(!values.is_empty());
                let kept = minmax(&times, &values, max_points).unwrap();
                let lo = values.iter().cloned().fold(f64::INFINITY, f64::min);
                let hi = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                prop_assert!(kept.iter().any(|&i| values[i] == lo));
                prop_assert!(kept.iter().any(|&i| values[i] == hi));
            }

            #[test]
            fn stride_is_exact(n in 0usize..100_000, max_points in 2usize..5_000) {
                let kept = stride(n, max_points).unwrap();
                prop_assert_eq!(kept.len(), n.min(max_points));
            }
        }
    }

    fn be<T: Copy, const W: usize>(items: &[T], to: fn(T) -> [u8; W]) -> Vec<u8> {
        items.iter().flat_map(|&x| to(x)).collect()
    }

    #[test]
    fn series_from_pg_rebases_times_and_keeps_rows_together_in_time_order() {
        let pg_times = [3_000_000i64, -5, 1_000_000];
        let values = [3.0f64, -0.0, 1.0];
        let experiments = [7i32, 0, 9];
        let Packed {
            times: t,
            values: v,
            experiments: x,
        } = series_from_pg(
            &be(&pg_times, i64::to_be_bytes),
            &be(&values, f64::to_be_bytes),
            Some(&be(&experiments, i32::to_be_bytes)),
        )
        .unwrap();
        assert_eq!(
            unpack_i64_be(&t).unwrap(),
            [-5, 1_000_000, 3_000_000].map(|x| x + crate::pg::PG_EPOCH_US)
        );
        let v = unpack_f64_be(&v).unwrap();
        assert_eq!(v[1..], [1.0, 3.0]);
        assert!(v[0] == 0.0 && v[0].is_sign_negative());
        assert_eq!(x.unwrap(), be(&[0i32, 9, 7], i32::to_be_bytes));
        // In order already: the bytes come back unchanged but for the epoch.
        let Packed {
            times: t,
            values: v,
            experiments: x,
        } = series_from_pg(
            &be(&[1i64, 2], i64::to_be_bytes),
            &be(&[1.0f64, 2.0], f64::to_be_bytes),
            None,
        )
        .unwrap();
        assert_eq!(
            unpack_i64_be(&t).unwrap(),
            [1 + crate::pg::PG_EPOCH_US, 2 + crate::pg::PG_EPOCH_US]
        );
        assert_eq!(unpack_f64_be(&v).unwrap(), [1.0, 2.0]);
        assert!(x.is_none());
        assert!(series_from_pg(&[], &[], Some(&[]))
            .unwrap()
            .times
            .is_empty());
    }

    #[test]
    fn series_from_pg_refuses_what_postgresql_cannot_have_sent() {
        let one = be(&[1i64], i64::to_be_bytes);
        assert!(matches!(
            series_from_pg(&one, &[0; 16], None),
            Err(DownsampleError::LengthMismatch { .. })
        ));
        assert!(matches!(
            series_from_pg(&one, &[0; 8], Some(&[0; 3])),
            Err(DownsampleError::LengthMismatch { .. })
        ));
        assert!(matches!(
            series_from_pg(&[0; 7], &[], None),
            Err(DownsampleError::BadPacking { .. })
        ));
        assert!(matches!(
            series_from_pg(&be(&[i64::MAX], i64::to_be_bytes), &[0; 8], None),
            Err(DownsampleError::TimeOutOfRange { index: 0 })
        ));
    }
}
