//! Cell summaries (`datapoint_cells`, sql/0041): per event and 10 minutes, how many rows one transaction
//! inserted, the first, minimum, maximum and last of them, and the rows themselves packed (16 bytes each).
//! Long-range series read these instead of the hypertable (`services/series.py`). Every transaction that inserts datapoints appends the summaries of
//! exactly what it inserted, in the same transaction: from the rows it COPYs, or from what its
//! duplicate-tolerant insert RETURNs — so a row is summarised once, by the transaction that stored it.

use std::collections::HashMap;
use std::pin::pin;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use tokio_postgres::Transaction;

use crate::pg::{COPY_SIGNATURE, PG_EPOCH_US};
use crate::writer::Row;

/// Width of a cell: 10 minutes, aligned to the Unix epoch (`date_bin('10 minutes', time, 'epoch')`).
pub const CELL_US: i64 = 600_000_000;

const COPY_SQL: &str =
    "COPY datapoint_cells (event_id, cell, n, first_time, first_value, min_time, \
    min_value, max_time, max_value, last_time, last_value, packed) FROM STDIN (FORMAT binary)";

/// A point: (µs since the Unix epoch, value).
pub type Point = (i64, f64);

/// The summary of some rows of one event in one cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub event_id: i32,
    /// Start of the cell, µs since the Unix epoch.
    pub cell_us: i64,
    pub n: i64,
    pub first: Point,
    /// The smallest value that is not NaN, the earliest of equal ones (None: every value was NaN). The
    /// downsamplers compare with `<` and keep the earliest, so this is the point they would pick.
    pub min: Option<Point>,
    /// The largest value that is not NaN, the earliest of equal ones.
    pub max: Option<Point>,
    pub last: Point,
    /// The rows, in the order taken: `timestamptz_send(time) || float8send(value)` each (big-endian, µs
    /// since PostgreSQL's epoch), as `refresh_datapoint_cells` packs them.
    pub rows: Vec<u8>,
}

/// Start of the cell holding `time_us`. Every timestamptz PostgreSQL stores is at least its minimum
/// (4714 BC, midnight: a multiple of 10 minutes), so the start is too; the arithmetic saturates anyway.
pub fn cell_of(time_us: i64) -> i64 {
    time_us.saturating_sub(time_us.rem_euclid(CELL_US))
}

impl Cell {
    fn new(event_id: i32, time_us: i64, value: f64) -> Self {
        let point = (time_us, value);
        let extreme = (!value.is_nan()).then_some(point);
        let mut cell = Cell {
            event_id,
            cell_us: cell_of(time_us),
            n: 1,
            first: point,
            min: extreme,
            max: extreme,
            last: point,
            rows: Vec::with_capacity(16),
        };
        cell.pack(time_us, value);
        cell
    }

    fn pack(&mut self, time_us: i64, value: f64) {
        self.rows
            .extend_from_slice(&time_us.saturating_sub(PG_EPOCH_US).to_be_bytes());
        self.rows.extend_from_slice(&value.to_be_bytes());
    }

    /// Take one more row of the same event and cell (in any order: the result does not depend on it).
    fn add(&mut self, time_us: i64, value: f64) {
        self.n += 1;
        self.pack(time_us, value);
        if time_us < self.first.0 {
            self.first = (time_us, value);
        }
        if time_us > self.last.0 {
            self.last = (time_us, value);
        }
        if value.is_nan() {
            return;
        }
        let earlier_or = |p: Option<Point>, better: fn(f64, f64) -> bool| match p {
            None => true,
            Some((t, v)) => better(value, v) || (value == v && time_us < t),
        };
        if earlier_or(self.min, |a, b| a < b) {
            self.min = Some((time_us, value));
        }
        if earlier_or(self.max, |a, b| a > b) {
            self.max = Some((time_us, value));
        }
    }
}

/// The cells of `rows` (event id, µs since the Unix epoch, value), ordered by event and cell.
pub fn summarize(rows: impl IntoIterator<Item = (i32, i64, f64)>) -> Vec<Cell> {
    let mut cells: HashMap<(i32, i64), Cell> = HashMap::new();
    for (event_id, time_us, value) in rows {
        cells
            .entry((event_id, cell_of(time_us)))
            .and_modify(|c| c.add(time_us, value))
            .or_insert_with(|| Cell::new(event_id, time_us, value));
    }
    let mut out: Vec<Cell> = cells.into_values().collect();
    out.sort_unstable_by_key(|c| (c.event_id, c.cell_us));
    out
}

/// The cells of datapoint rows.
pub fn of_rows(rows: &[Row]) -> Vec<Cell> {
    summarize(rows.iter().map(|r| (r.event_id, r.time_us, r.value)))
}

fn put_time(buf: &mut BytesMut, time_us: i64) {
    buf.put_i32(8);
    buf.put_i64(time_us.saturating_sub(PG_EPOCH_US));
}

fn put_point(buf: &mut BytesMut, point: Option<Point>) {
    match point {
        Some((t, v)) => {
            put_time(buf, t);
            buf.put_i32(8);
            buf.put_f64(v);
        }
        None => {
            buf.put_i32(-1);
            buf.put_i32(-1);
        }
    }
}

/// `cells` as a binary COPY stream into `datapoint_cells`.
pub fn encode(cells: &[Cell]) -> Bytes {
    let mut buf =
        BytesMut::with_capacity(21 + cells.iter().map(|c| 150 + c.rows.len()).sum::<usize>());
    buf.put_slice(COPY_SIGNATURE);
    buf.put_i32(0);
    buf.put_i32(0);
    for c in cells {
        buf.put_i16(12);
        buf.put_i32(4);
        buf.put_i32(c.event_id);
        put_time(&mut buf, c.cell_us);
        buf.put_i32(8);
        buf.put_i64(c.n);
        put_point(&mut buf, Some(c.first));
        put_point(&mut buf, c.min);
        put_point(&mut buf, c.max);
        put_point(&mut buf, Some(c.last));
        // A cell's rows fit i32 lengths: a batch is bounded far below 2 GiB (the engine's byte cap).
        buf.put_i32(i32::try_from(c.rows.len()).unwrap_or(i32::MAX));
        buf.put_slice(&c.rows);
    }
    buf.put_i16(-1);
    buf.freeze()
}

/// Append `cells` (encoded by `encode`) inside `tx`.
pub async fn copy(tx: &Transaction<'_>, cells: Bytes) -> Result<(), tokio_postgres::Error> {
    let sink = tx.copy_in(COPY_SQL).await?;
    let mut sink = pin!(sink);
    sink.send(cells).await?;
    sink.finish().await?;
    Ok(())
}

/// µs since the Unix epoch of a timestamptz the driver read (saturating far outside i64's ±292,000 years,
/// which PostgreSQL's range is well inside).
fn micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_micros()).map_or(i64::MIN, |us| -us),
    }
}

/// Run `insert` — an INSERT into datapoints ending in `RETURNING time, event_id, value` — with `params`,
/// append the cells of the rows it inserted, and return how many it inserted.
pub async fn insert_returning(
    tx: &Transaction<'_>,
    insert: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let returned = tx.query(insert, params).await?;
    let mut rows = Vec::with_capacity(returned.len());
    for r in &returned {
        let time: SystemTime = r.try_get(0)?;
        rows.push((
            r.try_get::<_, i32>(1)?,
            micros(time),
            r.try_get::<_, f64>(2)?,
        ));
    }
    if !rows.is_empty() {
        copy(tx, encode(&summarize(rows))).await?;
    }
    Ok(returned.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_aligned_to_ten_minutes_from_the_epoch() {
        assert_eq!(cell_of(0), 0);
        assert_eq!(cell_of(CELL_US - 1), 0);
        assert_eq!(cell_of(CELL_US), CELL_US);
        assert_eq!(cell_of(-1), -CELL_US);
        assert_eq!(cell_of(i64::MIN), i64::MIN);
        // PostgreSQL's first timestamptz (4714-11-24 BC, midnight) starts a cell.
        let pg_min = -210_866_803_200_000_000i64;
        assert_eq!(cell_of(pg_min), pg_min);
    }

    #[test]
    fn summaries_keep_the_earliest_of_equal_extremes_and_ignore_nan_in_any_order() {
        let rows = [
            (1, 50, 2.0),
            (1, 10, f64::NAN),
            (1, 30, -1.0),
            (1, 20, 5.0),
            (1, 40, -1.0),
            (1, 60, 5.0),
            (2, 10, f64::NAN),
        ];
        let expect = |cells: Vec<Cell>| {
            assert_eq!(cells.len(), 2);
            let a = &cells[0];
            assert_eq!((a.event_id, a.n), (1, 6));
            assert_eq!(a.first.0, 10);
            assert!(a.first.1.is_nan());
            assert_eq!(a.min, Some((30, -1.0)));
            assert_eq!(a.max, Some((20, 5.0)));
            assert_eq!(a.last, (60, 5.0));
            let b = &cells[1];
            assert_eq!((b.event_id, b.n, b.min, b.max), (2, 1, None, None));
        };
        expect(summarize(rows));
        expect(summarize(rows.into_iter().rev()));
        // Zeroes of either sign are equal, as for `<`: the earliest stays.
        let z = summarize([(1, 2, 0.0), (1, 1, -0.0)]);
        assert_eq!(z[0].min.map(|p| p.0), Some(1));
    }

    #[test]
    fn rows_in_several_cells_and_events_come_out_ordered() {
        let cells = summarize([
            (2, CELL_US, 1.0),
            (1, CELL_US + 5, 1.0),
            (1, 3, 1.0),
            (1, 4, 0.5),
        ]);
        let keys: Vec<(i32, i64, i64)> =
            cells.iter().map(|c| (c.event_id, c.cell_us, c.n)).collect();
        assert_eq!(keys, [(1, 0, 2), (1, CELL_US, 1), (2, CELL_US, 1)]);
    }

    #[test]
    fn encodes_twelve_fields_with_nulls_for_all_nan_cells_and_the_rows_packed() {
        let cells = summarize([(7, 0, f64::NAN), (7, 5, 1.5)]);
        assert_eq!(cells[0].rows.len(), 32);
        assert_eq!(cells[0].rows[..8], (-PG_EPOCH_US).to_be_bytes());
        assert_eq!(cells[0].rows[24..], 1.5f64.to_be_bytes());
        let b = encode(&summarize([(7, 0, f64::NAN)]));
        assert_eq!(&b[..11], COPY_SIGNATURE);
        assert_eq!(&b[19..21], &12i16.to_be_bytes());
        // event(4+4) cell(4+8) n(4+8) first(4+8+4+8) min and max NULL (4+4 each) last(4+8+4+8) rows(4+16)
        // + trailer
        assert_eq!(b.len(), 21 + 8 + 12 + 12 + 24 + 8 + 8 + 24 + 20 + 2);
        assert_eq!(micros(UNIX_EPOCH - std::time::Duration::from_micros(5)), -5);
    }
}
