//! Pure decoding of a binary COPY stream of datapoints into column buffers (no I/O; layout in `super`).

use super::{PgCopyError, Result};
use crate::pg::{COPY_SIGNATURE, PG_EPOCH_US};

/// The columns a datapoint tuple carries, in order.
pub const FIELDS: i16 = 4;

/// Decoded datapoints: one buffer per column, `rows` values each (see the module docs for the layout).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DatapointColumns {
    pub rows: usize,
    pub time_us: Vec<u8>,
    pub event_id: Vec<u8>,
    pub value: Vec<u8>,
    pub experiment_id: Vec<u8>,
    /// Arrow validity bitmap of `experiment_id` (bit set = not NULL), `ceil(rows / 8)` bytes.
    pub experiment_validity: Vec<u8>,
    pub experiment_nulls: usize,
    /// The stream's trailer (field count −1) was read: the COPY is complete.
    pub finished: bool,
}

impl DatapointColumns {
    /// Append one row; the validity bitmap grows a byte every eighth row.
    pub(super) fn push(
        &mut self,
        time_us: i64,
        event_id: i32,
        value: f64,
        experiment_id: Option<i32>,
    ) {
        let bit = self.rows % 8;
        if bit == 0 {
            self.experiment_validity.push(0);
        }
        self.time_us.extend_from_slice(&time_us.to_ne_bytes());
        self.event_id.extend_from_slice(&event_id.to_ne_bytes());
        self.value.extend_from_slice(&value.to_ne_bytes());
        match experiment_id {
            Some(x) => {
                self.experiment_id.extend_from_slice(&x.to_ne_bytes());
                if let Some(last) = self.experiment_validity.last_mut() {
                    *last |= 1 << bit;
                }
            }
            None => {
                self.experiment_id.extend_from_slice(&0i32.to_ne_bytes());
                self.experiment_nulls += 1;
            }
        }
        self.rows += 1;
    }

    pub(super) fn with_capacity(rows: usize) -> Self {
        DatapointColumns {
            time_us: Vec::with_capacity(rows * 8),
            event_id: Vec::with_capacity(rows * 4),
            value: Vec::with_capacity(rows * 8),
            experiment_id: Vec::with_capacity(rows * 4),
            experiment_validity: Vec::with_capacity(rows.div_ceil(8)),
            ..Default::default()
        }
    }

    /// The times as integers (for tests and callers outside Python).
    pub fn times(&self) -> Vec<i64> {
        self.time_us
            .chunks_exact(8)
            .map(|c| i64::from_ne_bytes(c.try_into().expect("chunks_exact(8) yields 8 bytes")))
            .collect()
    }

    pub fn event_ids(&self) -> Vec<i32> {
        self.event_id
            .chunks_exact(4)
            .map(|c| i32::from_ne_bytes(c.try_into().expect("chunks_exact(4) yields 4 bytes")))
            .collect()
    }

    pub fn values(&self) -> Vec<f64> {
        self.value
            .chunks_exact(8)
            .map(|c| f64::from_ne_bytes(c.try_into().expect("chunks_exact(8) yields 8 bytes")))
            .collect()
    }

    pub fn experiment_ids(&self) -> Vec<Option<i32>> {
        self.experiment_id
            .chunks_exact(4)
            .enumerate()
            .map(|(i, c)| {
                let valid = self.experiment_validity[i / 8] & (1 << (i % 8)) != 0;
                valid.then(|| {
                    i32::from_ne_bytes(c.try_into().expect("chunks_exact(4) yields 4 bytes"))
                })
            })
            .collect()
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(PgCopyError::Truncated { what, at: self.at });
        };
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        // take(N) returned exactly N bytes.
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returns N bytes"))
    }

    fn i16(&mut self, what: &'static str) -> Result<i16> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    /// One field's length word, checked against the column's fixed width; None for NULL if `nullable`.
    fn field(
        &mut self,
        field: &'static str,
        width: i32,
        nullable: bool,
    ) -> Result<Option<&'a [u8]>> {
        let at = self.at;
        let len = self.i32("a field length")?;
        if len == -1 && nullable {
            return Ok(None);
        }
        if len != width {
            return Err(PgCopyError::FieldLength {
                field,
                got: len,
                expected: width,
                at,
            });
        }
        Ok(Some(self.take(width as usize, field)?))
    }
}

/// Skip the header (signature, flags, extension area); `data` must start with it.
fn header(r: &mut Reader<'_>) -> Result<()> {
    let signature = r.take(COPY_SIGNATURE.len(), "the header").map_err(|_| {
        if COPY_SIGNATURE.starts_with(r.data) {
            PgCopyError::Truncated {
                what: "the header",
                at: r.data.len(),
            }
        } else {
            PgCopyError::BadSignature
        }
    })?;
    if signature != COPY_SIGNATURE {
        return Err(PgCopyError::BadSignature);
    }
    let flags = r.i32("the header")? as u32;
    // Bit 16 means OIDs are included; bits 17-31 are reserved critical flags (the format's spec says refuse).
    if flags & 0xffff_0000 != 0 {
        return Err(PgCopyError::BadFlags(flags));
    }
    let extension = r.i32("the header")?;
    let extension = usize::try_from(extension).map_err(|_| PgCopyError::Truncated {
        what: "the header extension",
        at: r.at,
    })?;
    r.take(extension, "the header extension")?;
    Ok(())
}

/// Decode whole tuples of datapoints from `data`; `with_header` when `data` is the start of the stream.
///
/// `data` must hold whole tuples (COPY sends one tuple per message, so joined messages qualify); the trailer
/// may end it. Timestamps are shifted from PostgreSQL's epoch to the Unix epoch.
pub fn decode_datapoints(data: &[u8], with_header: bool) -> Result<DatapointColumns> {
    let mut r = Reader { data, at: 0 };
    if with_header {
        header(&mut r)?;
    }
    // A tuple is 2 + 4 * 4 + 8 + 4 + 8 + 4 = 42 bytes (fewer with a NULL experiment).
    let mut out = DatapointColumns::with_capacity((data.len() - r.at) / 38);
    while r.at < data.len() {
        let at = r.at;
        let fields = r.i16("a tuple's field count")?;
        if fields == -1 {
            out.finished = true;
            if r.at != data.len() {
                return Err(PgCopyError::AfterTrailer(data.len() - r.at));
            }
            break;
        }
        if fields != FIELDS {
            return Err(PgCopyError::FieldCount { got: fields, at });
        }
        let time = r.field("time", 8, false)?;
        let event = r.field("event_id", 4, false)?;
        let value = r.field("value", 8, false)?;
        let experiment = r.field("experiment_id", 4, true)?;
        // Non-nullable fields are Some (field() returns None only when nullable), of the width asked for.
        let time = i64::from_be_bytes(time.expect("not nullable").try_into().expect("8 bytes"));
        let event = i32::from_be_bytes(event.expect("not nullable").try_into().expect("4 bytes"));
        let value = f64::from_be_bytes(value.expect("not nullable").try_into().expect("8 bytes"));
        let experiment = experiment.map(|x| i32::from_be_bytes(x.try_into().expect("4 bytes")));
        out.push(time.saturating_add(PG_EPOCH_US), event, value, experiment);
    }
    Ok(out)
}

/// The time (µs since the PostgreSQL epoch) of the tuple in one COPY message, None for the trailer. A message
/// holds one tuple; the first also the header.
pub fn message_time(message: &[u8]) -> Result<Option<i64>> {
    let mut r = Reader {
        data: message,
        at: 0,
    };
    if message.starts_with(COPY_SIGNATURE) {
        header(&mut r)?;
    }
    let at = r.at;
    match r.i16("a tuple's field count")? {
        -1 => Ok(None),
        FIELDS => {
            let time = r.field("time", 8, false)?.expect("not nullable");
            Ok(Some(i64::from_be_bytes(time.try_into().expect("8 bytes"))))
        }
        got => Err(PgCopyError::FieldCount { got, at }),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn header_bytes() -> Vec<u8> {
        let mut b = COPY_SIGNATURE.to_vec();
        b.extend_from_slice(&0i32.to_be_bytes());
        b.extend_from_slice(&0i32.to_be_bytes());
        b
    }

    pub(in crate::pgcopy) fn tuple(
        time_pg_us: i64,
        event: i32,
        value: f64,
        experiment: Option<i32>,
    ) -> Vec<u8> {
        let mut b = FIELDS.to_be_bytes().to_vec();
        b.extend_from_slice(&8i32.to_be_bytes());
        b.extend_from_slice(&time_pg_us.to_be_bytes());
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

    #[test]
    fn decodes_rows_with_null_experiments_and_the_trailer() {
        let mut data = header_bytes();
        let rows: Vec<(i64, i32, f64, Option<i32>)> = (0..19)
            .map(|i| {
                let x = (i % 3 != 0).then_some(i as i32 * 10);
                (i * 1_000_001 - 5, i as i32 + 1, i as f64 / 7.0, x)
            })
            .collect();
        for &(t, e, v, x) in &rows {
            data.extend(tuple(t, e, v, x));
        }
        data.extend_from_slice(&TRAILER);
        let cols = decode_datapoints(&data, true).unwrap();
        assert_eq!(cols.rows, 19);
        assert!(cols.finished);
        assert_eq!(
            cols.times(),
            rows.iter().map(|r| r.0 + PG_EPOCH_US).collect::<Vec<_>>()
        );
        assert_eq!(
            cols.event_ids(),
            rows.iter().map(|r| r.1).collect::<Vec<_>>()
        );
        assert_eq!(cols.values(), rows.iter().map(|r| r.2).collect::<Vec<_>>());
        assert_eq!(
            cols.experiment_ids(),
            rows.iter().map(|r| r.3).collect::<Vec<_>>()
        );
        assert_eq!(cols.experiment_nulls, 7);
        assert_eq!(cols.experiment_validity.len(), 3);
    }

    #[test]
    fn frames_without_header_and_an_empty_stream() {
        let data = tuple(0, 7, -1.5, None);
        let cols = decode_datapoints(&data, false).unwrap();
        assert_eq!(cols.times(), vec![PG_EPOCH_US]);
        assert_eq!(cols.experiment_ids(), vec![None]);
        assert!(!cols.finished);
        let mut empty = header_bytes();
        empty.extend_from_slice(&TRAILER);
        let cols = decode_datapoints(&empty, true).unwrap();
        assert_eq!((cols.rows, cols.finished), (0, true));
        assert!(cols.experiment_validity.is_empty());
        assert_eq!(decode_datapoints(&[], false).unwrap().rows, 0);
    }

    #[test]
    fn header_extension_is_skipped() {
        let mut data = COPY_SIGNATURE.to_vec();
        data.extend_from_slice(&0i32.to_be_bytes());
        data.extend_from_slice(&3i32.to_be_bytes());
        data.extend_from_slice(b"abc");
        data.extend(tuple(1, 2, 3.0, Some(4)));
        assert_eq!(decode_datapoints(&data, true).unwrap().rows, 1);
    }

    #[test]
    fn bad_headers_are_errors() {
        assert_eq!(
            decode_datapoints(b"PGCOPY\nXXXXXXXXXXXXXXXXX", true),
            Err(PgCopyError::BadSignature)
        );
        assert_eq!(
            decode_datapoints(b"not copy", true),
            Err(PgCopyError::BadSignature)
        );
        assert!(matches!(
            decode_datapoints(b"PGCOPY\n", true),
            Err(PgCopyError::Truncated { .. })
        ));
        let mut oids = COPY_SIGNATURE.to_vec();
        oids.extend_from_slice(&(1i32 << 16).to_be_bytes());
        oids.extend_from_slice(&0i32.to_be_bytes());
        assert_eq!(
            decode_datapoints(&oids, true),
            Err(PgCopyError::BadFlags(1 << 16))
        );
        let mut negative = COPY_SIGNATURE.to_vec();
        negative.extend_from_slice(&0i32.to_be_bytes());
        negative.extend_from_slice(&(-4i32).to_be_bytes());
        assert!(matches!(
            decode_datapoints(&negative, true),
            Err(PgCopyError::Truncated { .. })
        ));
    }

    #[test]
    fn truncated_input_is_an_error_at_every_cut() {
        let mut data = header_bytes();
        data.extend(tuple(5, 6, 7.0, Some(8)));
        data.extend(tuple(9, 10, 11.0, None));
        data.extend_from_slice(&TRAILER);
        let header_len = header_bytes().len();
        let tuple_ends = [
            header_len,
            header_len + 42,
            header_len + 42 + 38,
            data.len(),
        ];
        for cut in 0..data.len() {
            let result = decode_datapoints(&data[..cut], true);
            if tuple_ends.contains(&cut) {
                assert!(result.is_ok(), "cut at {cut}");
            } else {
                assert!(
                    matches!(
                        result,
                        Err(PgCopyError::Truncated { .. } | PgCopyError::BadSignature)
                    ),
                    "cut at {cut}: {result:?}"
                );
            }
        }
    }

    #[test]
    fn wrong_shapes_are_errors() {
        let mut three = 3i16.to_be_bytes().to_vec();
        three.extend_from_slice(&[0; 30]);
        assert!(matches!(
            decode_datapoints(&three, false),
            Err(PgCopyError::FieldCount { got: 3, .. })
        ));
        // A timestamp column sent as int4, a NULL time, a text value.
        let mut bad = tuple(1, 2, 3.0, None);
        bad[2..6].copy_from_slice(&4i32.to_be_bytes());
        assert!(matches!(
            decode_datapoints(&bad, false),
            Err(PgCopyError::FieldLength {
                field: "time",
                got: 4,
                ..
            })
        ));
        let mut null_time = tuple(1, 2, 3.0, None);
        null_time[2..6].copy_from_slice(&(-1i32).to_be_bytes());
        assert!(matches!(
            decode_datapoints(&null_time, false),
            Err(PgCopyError::FieldLength {
                field: "time",
                got: -1,
                ..
            })
        ));
        let mut after = tuple(1, 2, 3.0, None);
        after.extend_from_slice(&TRAILER);
        after.push(0);
        assert_eq!(
            decode_datapoints(&after, false),
            Err(PgCopyError::AfterTrailer(1))
        );
    }

    #[test]
    fn message_times() {
        let mut first = header_bytes();
        first.extend(tuple(42, 1, 1.0, None));
        assert_eq!(message_time(&first), Ok(Some(42)));
        assert_eq!(message_time(&tuple(-7, 1, 1.0, Some(2))), Ok(Some(-7)));
        assert_eq!(message_time(&TRAILER), Ok(None));
        assert!(message_time(&[0, 4, 0]).is_err());
        assert!(matches!(
            message_time(&2i16.to_be_bytes()),
            Err(PgCopyError::FieldCount { got: 2, .. })
        ));
    }

    #[test]
    fn extreme_times_saturate_instead_of_overflowing() {
        let data = tuple(i64::MAX, 1, f64::NAN, None);
        let cols = decode_datapoints(&data, false).unwrap();
        assert_eq!(cols.times(), vec![i64::MAX]);
        assert!(cols.values()[0].is_nan());
    }
}
