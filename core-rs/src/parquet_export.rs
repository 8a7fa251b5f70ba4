//! Parquet encoding of exported datapoints, straight from the decoded binary COPY columns (`crate::pgcopy`).
//!
//! The file has the export's schema — `time` (timestamp µs, UTC), `event_public_id`, `event_name`, `unit`,
//! `value` (double), `experiment_public_id` — all optional columns as pyarrow writes them. The event and
//! experiment attributes come from small lookup tables given up front (a datapoint carries only internal ids);
//! the string columns are dictionary-encoded. Rows are buffered into row groups of a fixed number of rows;
//! each full row group is encoded into an in-memory sink that the caller drains (`take`) as it goes, so memory
//! is bounded by one row group whatever the export's size. Rows of an event missing from the lookup (deleted
//! while the export ran) are left out; an experiment missing from the lookup is written as null.

use std::sync::Arc;

use parquet::basic::{
    Compression, Encoding, LogicalType, Repetition, TimeUnit, Type as PhysicalType,
};
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::errors::ParquetError;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::{ColumnPath, Type};

use crate::pgcopy::{self, DatapointColumns, PgCopyError};

type Result<T> = std::result::Result<T, PgCopyError>;

impl From<ParquetError> for PgCopyError {
    fn from(e: ParquetError) -> Self {
        PgCopyError::Encode(e.to_string())
    }
}

/// The export's columns, in file order.
pub const COLUMNS: [&str; 6] = [
    "time",
    "event_public_id",
    "event_name",
    "unit",
    "value",
    "experiment_public_id",
];

/// An event's attributes by internal id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventAttrs {
    pub id: i32,
    pub public_id: String,
    pub name: String,
    pub unit: Option<String>,
}

fn text(name: &str) -> std::result::Result<Type, ParquetError> {
    Type::primitive_type_builder(name, PhysicalType::BYTE_ARRAY)
        .with_repetition(Repetition::OPTIONAL)
        .with_logical_type(Some(LogicalType::String))
        .build()
}

/// The file's schema (the one `services/export.py: parquet_schema()` describes for readers).
fn schema() -> std::result::Result<Type, ParquetError> {
    let time = Type::primitive_type_builder(COLUMNS[0], PhysicalType::INT64)
        .with_repetition(Repetition::OPTIONAL)
        .with_logical_type(Some(LogicalType::Timestamp {
            is_adjusted_to_u_t_c: true,
            unit: TimeUnit::MICROS(Default::default()),
        }))
        .build()?;
    let value = Type::primitive_type_builder(COLUMNS[4], PhysicalType::DOUBLE)
        .with_repetition(Repetition::OPTIONAL)
        .build()?;
    let fields = vec![
        Arc::new(time),
        Arc::new(text(COLUMNS[1])?),
        Arc::new(text(COLUMNS[2])?),
        Arc::new(text(COLUMNS[3])?),
        Arc::new(value),
        Arc::new(text(COLUMNS[5])?),
    ];
    Type::group_type_builder("schema")
        .with_fields(fields)
        .build()
}

fn properties() -> WriterProperties {
    let time = ColumnPath::from(COLUMNS[0]);
    WriterProperties::builder()
        // Snappy: pure Rust and cheap; the dictionaries and delta-coded times do most of the shrinking.
        .set_compression(Compression::SNAPPY)
        .set_statistics_enabled(EnabledStatistics::Chunk)
        // Times grow by small steps: delta-coded, never a dictionary (nearly every time is distinct).
        .set_column_dictionary_enabled(time.clone(), false)
        .set_column_encoding(time, Encoding::DELTA_BINARY_PACKED)
        .build()
}

/// Rows handed to a string column writer at a time.
const BATCH: usize = 8192;

/// Writes datapoint frames as a Parquet file into memory, a row group at a time (see the module docs).
pub struct ParquetEncoder {
    writer: Option<SerializedFileWriter<Vec<u8>>>,
    /// (internal id, index into the attribute tables), sorted by id.
    events: Vec<(i32, u32)>,
    event_public_ids: Vec<ByteArray>,
    event_names: Vec<ByteArray>,
    units: Vec<Option<ByteArray>>,
    /// (internal id, public id), sorted by id.
    experiments: Vec<(i32, ByteArray)>,
    row_group_rows: usize,
    // The row group being filled.
    times: Vec<i64>,
    event_index: Vec<u32>,
    values: Vec<f64>,
    experiment_index: Vec<Option<u32>>,
    rows: u64,
}

impl ParquetEncoder {
    /// An encoder writing row groups of `row_group_rows` rows (at least 1); the file's magic is written.
    pub fn new(
        events: Vec<EventAttrs>,
        experiments: Vec<(i32, String)>,
        row_group_rows: usize,
    ) -> Result<Self> {
        let row_group_rows = row_group_rows.max(1);
        let mut events = events;
        events.sort_by_key(|e| e.id);
        events.dedup_by_key(|e| e.id);
        let mut experiments = experiments;
        experiments.sort_by_key(|x| x.0);
        experiments.dedup_by_key(|x| x.0);
        let index = |i: usize| {
            u32::try_from(i)
                .map_err(|_| PgCopyError::Encode("too many events or experiments".into()))
        };
        let writer =
            SerializedFileWriter::new(Vec::new(), Arc::new(schema()?), Arc::new(properties()))?;
        let capacity = row_group_rows.min(1 << 20);
        Ok(ParquetEncoder {
            writer: Some(writer),
            events: events
                .iter()
                .enumerate()
                .map(|(i, e)| Ok((e.id, index(i)?)))
                .collect::<Result<_>>()?,
            event_public_ids: events
                .iter()
                .map(|e| ByteArray::from(e.public_id.as_str()))
                .collect(),
            event_names: events
                .iter()
                .map(|e| ByteArray::from(e.name.as_str()))
                .collect(),
            units: events
                .iter()
                .map(|e| e.unit.as_deref().map(ByteArray::from))
                .collect(),
            experiments: experiments
                .into_iter()
                .map(|(id, public)| (id, ByteArray::from(public.as_str())))
                .collect(),
            row_group_rows,
            times: Vec::with_capacity(capacity),
            event_index: Vec::with_capacity(capacity),
            values: Vec::with_capacity(capacity),
            experiment_index: Vec::with_capacity(capacity),
            rows: 0,
        })
    }

    /// Rows written or buffered so far (rows of unknown events excluded).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    fn event(&self, id: i32) -> Option<u32> {
        self.events
            .binary_search_by_key(&id, |e| e.0)
            .ok()
            .map(|i| self.events[i].1)
    }

    fn experiment(&self, id: i32) -> Option<u32> {
        // The index is < experiments.len(), which `new` checked fits a u32.
        self.experiments
            .binary_search_by_key(&id, |x| x.0)
            .ok()
            .and_then(|i| u32::try_from(i).ok())
    }

    /// Add a decoded frame; every full row group is encoded as it fills.
    pub fn write(&mut self, cols: &DatapointColumns) -> Result<()> {
        let times = cols.time_us.chunks_exact(8);
        let events = cols.event_id.chunks_exact(4);
        let values = cols.value.chunks_exact(8);
        let experiments = cols.experiment_id.chunks_exact(4);
        let n = cols.rows;
        if times.len() < n || events.len() < n || values.len() < n || experiments.len() < n {
            return Err(PgCopyError::Encode(
                "column buffers shorter than the frame".into(),
            ));
        }
        if cols.experiment_validity.len() < n.div_ceil(8) {
            return Err(PgCopyError::Encode(
                "validity bitmap shorter than the frame".into(),
            ));
        }
        let rows = times.zip(events).zip(values).zip(experiments).take(n);
        for (i, (((t, e), v), x)) in rows.enumerate() {
            let event = i32::from_ne_bytes([e[0], e[1], e[2], e[3]]);
            let Some(event) = self.event(event) else {
                continue;
            };
            let valid = cols.experiment_validity[i / 8] & (1 << (i % 8)) != 0;
            let experiment = if valid {
                self.experiment(i32::from_ne_bytes([x[0], x[1], x[2], x[3]]))
            } else {
                None
            };
            self.times.push(i64::from_ne_bytes([
                t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7],
            ]));
            self.event_index.push(event);
            self.values.push(f64::from_ne_bytes([
                v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7],
            ]));
            self.experiment_index.push(experiment);
            self.rows += 1;
            if self.times.len() >= self.row_group_rows {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Encode the buffered rows (if any) as one row group.
    fn flush(&mut self) -> Result<()> {
        let n = self.times.len();
        if n == 0 {
            return Ok(());
        }
        let writer = self
            .writer
            .as_mut()
            .ok_or_else(|| PgCopyError::Encode("the Parquet file is already finished".into()))?;
        let ones = vec![1i16; n];
        let mut group = writer.next_row_group()?;
        let mut column = 0usize;
        while let Some(mut col) = group.next_column()? {
            match column {
                0 => {
                    col.typed::<Int64Type>()
                        .write_batch(&self.times, Some(&ones), None)?;
                }
                1..=3 => {
                    // A batch at a time: the strings are shared (`Bytes`), but a `ByteArray` per row of the
                    // whole row group would cost 32 B a row.
                    let writer = col.typed::<ByteArrayType>();
                    let mut words = Vec::with_capacity(BATCH);
                    let mut defined = Vec::with_capacity(BATCH);
                    for batch in self.event_index.chunks(BATCH) {
                        words.clear();
                        defined.clear();
                        for &e in batch {
                            let word = match column {
                                1 => Some(&self.event_public_ids[e as usize]),
                                2 => Some(&self.event_names[e as usize]),
                                _ => self.units[e as usize].as_ref(),
                            };
                            defined.push(i16::from(word.is_some()));
                            words.extend(word.cloned());
                        }
                        writer.write_batch(&words, Some(&defined), None)?;
                    }
                }
                4 => {
                    col.typed::<DoubleType>()
                        .write_batch(&self.values, Some(&ones), None)?;
                }
                5 => {
                    let writer = col.typed::<ByteArrayType>();
                    let mut words = Vec::with_capacity(BATCH);
                    let mut defined = Vec::with_capacity(BATCH);
                    for batch in self.experiment_index.chunks(BATCH) {
                        words.clear();
                        defined.clear();
                        for x in batch {
                            defined.push(i16::from(x.is_some()));
                            words.extend(x.map(|x| self.experiments[x as usize].1.clone()));
                        }
                        writer.write_batch(&words, Some(&defined), None)?;
                    }
                }
                _ => return Err(PgCopyError::Encode("unexpected column".into())),
            }
            col.close()?;
            column += 1;
        }
        group.close()?;
        self.times.clear();
        self.event_index.clear();
        self.values.clear();
        self.experiment_index.clear();
        Ok(())
    }

    /// The bytes encoded since the last call.
    pub fn take(&mut self) -> Vec<u8> {
        self.writer
            .as_mut()
            .map(|w| std::mem::take(w.inner_mut()))
            .unwrap_or_default()
    }

    /// Encode the last (partial) row group and the footer; returns every byte not yet taken. Finishing twice
    /// is an `Err`.
    pub fn finish(&mut self) -> Result<Vec<u8>> {
        self.flush()?;
        let mut writer = self
            .writer
            .take()
            .ok_or_else(|| PgCopyError::Encode("the Parquet file is already finished".into()))?;
        writer.finish()?;
        Ok(std::mem::take(writer.inner_mut()))
    }
}

/// A binary COPY reader (`pgcopy::CopyReader`) feeding a `ParquetEncoder`: frames are decoded and encoded
/// without leaving Rust, and the caller only moves the encoded bytes.
pub struct ParquetExport {
    reader: pgcopy::CopyReader,
    encoder: ParquetEncoder,
}

impl ParquetExport {
    pub fn connect(
        dsn: &str,
        events: Vec<EventAttrs>,
        experiments: Vec<(i32, String)>,
        row_group_rows: usize,
    ) -> Result<Self> {
        let encoder = ParquetEncoder::new(events, experiments, row_group_rows)?;
        Ok(ParquetExport {
            reader: pgcopy::CopyReader::connect(dsn)?,
            encoder,
        })
    }

    /// Start a COPY statement (see `pgcopy::CopyReader::start`).
    pub fn start(
        &mut self,
        statement: &str,
        max_rows: usize,
        order: pgcopy::Order,
        prefetch: Option<&str>,
    ) -> Result<()> {
        self.reader.start(statement, max_rows, order, prefetch)
    }

    /// Read frames of the running COPY until some encoded bytes are ready (`Some`, non-empty) or the COPY
    /// ends (`None`; rows of an unfinished row group stay buffered for the next statement or `finish`).
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            let Some(cols) = self.reader.next_frame()? else {
                return Ok(None);
            };
            self.encoder.write(&cols)?;
            let out = self.encoder.take();
            if !out.is_empty() {
                return Ok(Some(out));
            }
        }
    }

    pub fn rows(&self) -> u64 {
        self.encoder.rows()
    }

    /// The rest of the file (last row group and footer).
    pub fn finish(&mut self) -> Result<Vec<u8>> {
        self.encoder.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(rows: &[(i64, i32, f64, Option<i32>)]) -> DatapointColumns {
        let mut c = DatapointColumns {
            rows: rows.len(),
            experiment_validity: vec![0; rows.len().div_ceil(8)],
            ..Default::default()
        };
        for (i, &(t, e, v, x)) in rows.iter().enumerate() {
            c.time_us.extend_from_slice(&t.to_ne_bytes());
            c.event_id.extend_from_slice(&e.to_ne_bytes());
            c.value.extend_from_slice(&v.to_ne_bytes());
            c.experiment_id
                .extend_from_slice(&x.unwrap_or(0).to_ne_bytes());
            if x.is_some() {
                c.experiment_validity[i / 8] |= 1 << (i % 8);
            } else {
                c.experiment_nulls += 1;
            }
        }
        c
    }

    fn encoder(rows_per_group: usize) -> ParquetEncoder {
        let events = vec![
            EventAttrs {
                id: 7,
                public_id: "e7".into(),
                name: "Température °C".into(),
                unit: None,
            },
            EventAttrs {
                id: 3,
                public_id: "e3".into(),
                name: "b".into(),
                unit: Some("V".into()),
            },
        ];
        ParquetEncoder::new(events, vec![(1, "x1".into())], rows_per_group).unwrap()
    }

    fn read(bytes: Vec<u8>) -> (usize, usize) {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let reader = SerializedFileReader::new(bytes::Bytes::from(bytes)).unwrap();
        let meta = reader.metadata();
        (
            meta.file_metadata().num_rows() as usize,
            meta.num_row_groups(),
        )
    }

    #[test]
    fn row_groups_fill_and_unknown_events_are_dropped() {
        let mut enc = encoder(4);
        let rows: Vec<_> = (0..10)
            .map(|i| {
                (
                    i,
                    if i == 5 { 99 } else { 3 + 4 * (i as i32 % 2) },
                    i as f64,
                    (i % 3 == 0).then_some(1),
                )
            })
            .collect();
        let mut out = Vec::new();
        enc.write(&frame(&rows[..6])).unwrap();
        out.extend(enc.take());
        enc.write(&frame(&rows[6..])).unwrap();
        out.extend(enc.take());
        assert_eq!(enc.rows(), 9);
        out.extend(enc.finish().unwrap());
        assert_eq!(read(out), (9, 3));
        assert!(enc.finish().is_err());
    }

    #[test]
    fn an_empty_file_has_the_schema_and_no_row_group() {
        let mut enc = encoder(128);
        let mut out = enc.take();
        out.extend(enc.finish().unwrap());
        assert_eq!(read(out), (0, 0));
    }

    #[test]
    fn short_buffers_are_an_error_not_a_panic() {
        let mut enc = encoder(128);
        let mut f = frame(&[(1, 3, 1.0, None)]);
        f.rows = 2;
        assert!(enc.write(&f).is_err());
        let mut f = frame(&[(1, 3, f64::NAN, None)]);
        f.experiment_validity.clear();
        assert!(enc.write(&f).is_err());
    }
}
