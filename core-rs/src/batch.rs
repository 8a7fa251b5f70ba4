//! Batching (no I/O): the ingest queue of frames with fair shares per source, filling one batch from it,
//! and the order in which committed batches make frames durable. One batch = one transaction.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::CoreError;
use crate::writer::{row_bytes, Row};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    pub max_rows: usize,
    pub max_bytes: usize,
    /// How long the first row of a batch may wait for company (see `should_close`).
    pub max_age: Duration,
}

/// How much longer than `max_age` rows wait before a second writer starts a transaction beside a busy one:
/// parallel transactions are for a load one writer cannot keep up with, not for latency.
const PARALLEL_AFTER: u32 = 4;
/// Below this many rows a batch is not worth waiting for: per-transaction costs are irrelevant at a rate that
/// low, latency is not.
const WORTH_WAITING_ROWS: f64 = 64.0;

/// Whether the batch being filled closes now. A batch always closes when full. While another writer is inside
/// a transaction, rows keep accumulating (batches grow with the load) until PARALLEL_AFTER × max_age. With no
/// writer busy, the batch closes when it holds what arrives in max_age at the current rate, or its first row
/// has waited max_age: an idle engine (a rate too low to fill a worthwhile batch) writes each row at once, a
/// busy one writes fewer, larger transactions, which is what costs the database least per row.
pub fn should_close(
    size: &BatchSize,
    policy: &BatchPolicy,
    now: Instant,
    others_writing: bool,
    rate_rows_per_s: f64,
) -> bool {
    let Some(opened) = size.opened_at else {
        return false;
    };
    let age = now.saturating_duration_since(opened);
    if others_writing {
        return age >= policy.max_age * PARALLEL_AFTER;
    }
    let expected = rate_rows_per_s * policy.max_age.as_secs_f64();
    expected < WORTH_WAITING_ROWS
        || size.rows as f64 >= expected.min(policy.max_rows as f64)
        || age >= policy.max_age
}

/// When `should_close` turns true by age alone (None while empty).
pub fn close_due(size: &BatchSize, policy: &BatchPolicy, others_writing: bool) -> Option<Instant> {
    let factor = if others_writing { PARALLEL_AFTER } else { 1 };
    size.opened_at.map(|t| t + policy.max_age * factor)
}

/// The rate rows arrive at, over the last `window` (updated by the writer filling the next batch).
#[derive(Debug)]
pub struct RateMeter {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
}

impl RateMeter {
    pub fn new(window: Duration) -> Self {
        RateMeter {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Record the count of rows queued so far at `now`; returns rows per second over the window.
    pub fn observe(&mut self, now: Instant, total_rows: u64) -> f64 {
        self.samples.push_back((now, total_rows));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|s| now.saturating_duration_since(s.0) >= self.window)
        {
            self.samples.pop_front();
        }
        let Some(&(t0, n0)) = self.samples.front() else {
            return 0.0;
        };
        let dt = now.saturating_duration_since(t0).as_secs_f64();
        if dt <= 0.0 {
            return 0.0;
        }
        total_rows.saturating_sub(n0) as f64 / dt
    }
}

impl Default for BatchPolicy {
    fn default() -> Self {
        // Rows are 42 bytes in binary COPY; 20k rows is ~0.8 MiB per transaction.
        BatchPolicy {
            max_rows: 20_000,
            max_bytes: 4 << 20,
            max_age: Duration::from_millis(5),
        }
    }
}

impl BatchPolicy {
    pub fn new(max_rows: usize, max_bytes: usize, max_age: Duration) -> Result<Self, CoreError> {
        if max_rows == 0 || max_bytes == 0 {
            return Err(CoreError::Config(
                "max_rows and max_bytes must be positive".into(),
            ));
        }
        Ok(BatchPolicy {
            max_rows,
            max_bytes,
            max_age,
        })
    }
}

/// The running size of a batch being filled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchSize {
    pub rows: usize,
    pub bytes: usize,
    /// When the oldest row of the batch was queued.
    pub opened_at: Option<Instant>,
}

impl BatchSize {
    /// Whether a row of `row_bytes` may join. The first row always fits, so a batch always progresses.
    pub fn admits(&self, policy: &BatchPolicy, row_bytes: usize) -> bool {
        self.rows == 0
            || (self.rows < policy.max_rows && self.bytes + row_bytes <= policy.max_bytes)
    }

    pub fn add(&mut self, row_bytes: usize, queued_at: Instant) {
        self.rows += 1;
        self.bytes += row_bytes;
        self.opened_at.get_or_insert(queued_at);
    }

    /// When the batch must be written even if not full (`None` while empty).
    pub fn due_at(&self, policy: &BatchPolicy) -> Option<Instant> {
        self.opened_at.map(|t| t + policy.max_age)
    }

    pub fn is_due(&self, policy: &BatchPolicy, now: Instant) -> bool {
        self.due_at(policy).is_some_and(|d| now >= d)
    }
}

/// Why the database refused one row (after the batch holding it was bisected down to that row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub sqlstate: String,
    pub message: String,
}

/// What the writer learns about a frame's rows after it was queued: rows the database refused. Read by the
/// sender once the frame's ticket is committed (every refusal is recorded before that).
#[derive(Debug, Default)]
pub struct Outcome {
    refused: Mutex<Vec<(u32, Arc<Refusal>)>>,
}

impl Outcome {
    pub fn refuse(&self, index: u32, why: Arc<Refusal>) {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((index, why));
    }

    /// Refused entries: (index in the frame, reason), in index order.
    pub fn refused(&self) -> Vec<(u32, Arc<Refusal>)> {
        let mut v = self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        v.sort_by_key(|r| r.0);
        v
    }
}

/// What every row of one queued frame shares.
#[derive(Debug)]
pub struct FrameMeta {
    pub ticket: u64,
    /// Who sent it (a connection, a token): the unit of the queue's fair shares.
    pub source: u64,
    /// Index in the frame of each queued row; `None` when the rows are the frame's entries 0, 1, 2, …
    pub indices: Option<Vec<u32>>,
    pub outcome: Arc<Outcome>,
}

impl FrameMeta {
    fn index_of(&self, row: usize) -> u32 {
        match &self.indices {
            Some(ix) => ix[row],
            // At most MAX_FRAME_DATAPOINTS rows: the cast cannot truncate.
            None => row as u32,
        }
    }
}

#[derive(Debug)]
struct QueuedFrame {
    meta: Arc<FrameMeta>,
    rows: Vec<Row>,
    /// Rows already moved into batches (a frame may straddle two batches).
    taken: usize,
    queued_at: Instant,
}

/// The queue was too full for a frame; nothing of it was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub depth: usize,
    pub capacity: usize,
    /// True when the sender's own share was the limit (the queue as a whole had room).
    pub share: bool,
}

/// Queued frames in arrival order, with the rows each source has waiting.
#[derive(Debug)]
pub struct Queue {
    frames: VecDeque<QueuedFrame>,
    depth: usize,
    /// Rows ever queued (for the arrival rate).
    pushed: u64,
    by_source: HashMap<u64, usize>,
    capacity: usize,
    source_capacity: usize,
}

impl Queue {
    /// `share` is the fraction of `capacity` one source may fill (1.0: no fairness limit).
    pub fn new(capacity: usize, share: f64) -> Result<Queue, CoreError> {
        if capacity == 0 || !(share > 0.0 && share <= 1.0) {
            return Err(CoreError::Config(
                "queue capacity must be positive and the source share in (0, 1]".into(),
            ));
        }
        let source_capacity = ((capacity as f64 * share).ceil() as usize).clamp(1, capacity);
        Ok(Queue {
            frames: VecDeque::new(),
            depth: 0,
            pushed: 0,
            by_source: HashMap::new(),
            capacity,
            source_capacity,
        })
    }

    /// Rows waiting for a writer.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Rows ever queued.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    pub fn is_empty(&self) -> bool {
        self.depth == 0
    }

    /// When the oldest waiting row was queued.
    pub fn oldest(&self) -> Option<Instant> {
        self.frames.front().map(|f| f.queued_at)
    }

    /// Whether `rows` more rows of `source` fit. A frame always fits into an empty queue (or an empty
    /// share), so a frame larger than the limit still progresses, alone.
    pub fn admits(&self, source: u64, rows: usize) -> Result<(), Full> {
        let mine = self.by_source.get(&source).copied().unwrap_or(0);
        let over_all = self.depth > 0 && self.depth + rows > self.capacity;
        let over_share = mine > 0 && mine + rows > self.source_capacity;
        if over_all || over_share {
            return Err(Full {
                depth: self.depth,
                capacity: self.capacity,
                share: over_share && !over_all,
            });
        }
        Ok(())
    }

    /// Queue a frame's rows (call `admits` first; `push` does not refuse).
    pub fn push(&mut self, meta: Arc<FrameMeta>, rows: Vec<Row>, queued_at: Instant) {
        if rows.is_empty() {
            return;
        }
        self.depth += rows.len();
        self.pushed += rows.len() as u64;
        *self.by_source.entry(meta.source).or_default() += rows.len();
        self.frames.push_back(QueuedFrame {
            meta,
            rows,
            taken: 0,
            queued_at,
        });
    }

    /// Move rows into `batch`, in queue order, until it is full or the queue is empty. Returns whether rows
    /// are left (then the batch is full).
    pub fn fill(&mut self, batch: &mut Batch, policy: &BatchPolicy) -> bool {
        while let Some(front) = self.frames.front_mut() {
            let start = front.taken;
            let mut end = start;
            while end < front.rows.len() {
                let rb = row_bytes(&front.rows[end]);
                if !batch.size.admits(policy, rb) {
                    break;
                }
                batch.size.add(rb, front.queued_at);
                end += 1;
            }
            if end == start {
                return true;
            }
            batch.segments.push(Segment {
                meta: front.meta.clone(),
                start: batch.rows.len(),
                frame_row: start,
            });
            batch.rows.extend_from_slice(&front.rows[start..end]);
            front.taken = end;
            let n = end - start;
            self.depth -= n;
            let source = front.meta.source;
            if let Some(c) = self.by_source.get_mut(&source) {
                *c -= n;
                if *c == 0 {
                    self.by_source.remove(&source);
                }
            }
            if end < front.rows.len() {
                return true;
            }
            batch.done_ticket = Some(front.meta.ticket);
            self.frames.pop_front();
        }
        false
    }
}

/// A run of consecutive batch rows from one frame.
#[derive(Debug, Clone)]
pub struct Segment {
    pub meta: Arc<FrameMeta>,
    /// Index of the run's first row in the batch.
    pub start: usize,
    /// Index of the run's first row among the frame's queued rows.
    pub frame_row: usize,
}

/// One batch being filled or written.
#[derive(Debug, Default)]
pub struct Batch {
    pub rows: Vec<Row>,
    pub segments: Vec<Segment>,
    pub size: BatchSize,
    /// The last frame this batch completes (its final rows are here).
    pub done_ticket: Option<u64>,
}

impl Batch {
    /// The frame a batch row came from and the row's index in that frame.
    pub fn locate(&self, row: usize) -> Option<(&Arc<FrameMeta>, u32)> {
        let seg = match self.segments.binary_search_by(|s| s.start.cmp(&row)) {
            Ok(i) => &self.segments[i],
            Err(0) => return None,
            Err(i) => &self.segments[i - 1],
        };
        (row < self.rows.len()).then(|| {
            (
                &seg.meta,
                seg.meta.index_of(seg.frame_row + row - seg.start),
            )
        })
    }
}

/// Batches are filled in queue order (one writer fills at a time) but several writers may commit them out of
/// order. A frame is durable once every batch up to the one holding its last row has committed, so tickets
/// are released in batch order.
#[derive(Debug, Default)]
pub struct CommitOrder {
    next_seq: u64,
    retire_seq: u64,
    /// Batches not yet retired: when their oldest row was queued, and (once committed) the ticket they complete.
    pending: BTreeMap<u64, (Option<Instant>, Option<Option<u64>>)>,
}

impl CommitOrder {
    /// Number the next batch (call while holding the right to fill, so numbers follow queue order).
    pub fn open(&mut self, oldest: Option<Instant>) -> u64 {
        self.next_seq += 1;
        self.pending.insert(self.next_seq - 1, (oldest, None));
        self.next_seq - 1
    }

    /// Record batch `seq` as committed; `done_ticket` is the last frame it completed. Returns the highest
    /// ticket that is now durable, if that changed.
    pub fn commit(&mut self, seq: u64, done_ticket: Option<u64>) -> Option<u64> {
        if let Some(p) = self.pending.get_mut(&seq) {
            p.1 = Some(done_ticket);
        }
        let mut released = None;
        while let Some(&(_, Some(t))) = self.pending.get(&self.retire_seq) {
            self.pending.remove(&self.retire_seq);
            self.retire_seq += 1;
            released = t.or(released);
        }
        released
    }

    /// When the oldest row of any batch still being written (or waiting for an earlier one) was queued.
    pub fn oldest(&self) -> Option<Instant> {
        self.pending.values().filter_map(|p| p.0).min()
    }

    /// Batches opened and not yet retired.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: f64) -> Row {
        Row {
            time_us: 0,
            event_id: 1,
            experiment_id: None,
            value: v,
            server_time: true,
        }
    }

    fn meta(ticket: u64, source: u64, indices: Option<Vec<u32>>) -> Arc<FrameMeta> {
        Arc::new(FrameMeta {
            ticket,
            source,
            indices,
            outcome: Arc::default(),
        })
    }

    fn frame(q: &mut Queue, ticket: u64, source: u64, n: usize, t: Instant) {
        q.push(
            meta(ticket, source, None),
            (0..n).map(|i| row(i as f64)).collect(),
            t,
        );
    }

    #[test]
    fn commits_release_tickets_in_batch_order() {
        let mut o = CommitOrder::default();
        let (a, b, c) = (o.open(None), o.open(None), o.open(None));
        // b and c commit before a: nothing is durable yet (a holds earlier rows).
        assert_eq!(o.commit(b, Some(5)), None);
        assert_eq!(o.commit(c, None), None);
        assert_eq!(o.commit(a, Some(3)), Some(5));
        let d = o.open(None);
        assert_eq!(o.commit(d, None), None);
        let e = o.open(None);
        assert_eq!(o.commit(e, Some(9)), Some(9));
        assert_eq!(o.in_flight(), 0);
    }

    #[test]
    fn oldest_in_flight_is_the_oldest_unretired_batch() {
        let mut o = CommitOrder::default();
        let t0 = Instant::now();
        let a = o.open(Some(t0));
        let b = o.open(Some(t0 + Duration::from_millis(5)));
        assert_eq!(o.oldest(), Some(t0));
        // b committed but waits for a: still un-acknowledged, still counted.
        o.commit(b, Some(2));
        assert_eq!(o.oldest(), Some(t0));
        o.commit(a, Some(1));
        assert_eq!(o.oldest(), None);
    }

    #[test]
    fn first_row_always_fits() {
        let p = BatchPolicy::new(1, 10, Duration::ZERO).unwrap();
        let s = BatchSize::default();
        assert!(s.admits(&p, 1_000));
        assert_eq!(s.due_at(&p), None);
    }

    #[test]
    fn rows_and_bytes_limits() {
        let p = BatchPolicy::new(3, 1 << 20, Duration::from_secs(1)).unwrap();
        let mut s = BatchSize::default();
        let t = Instant::now();
        for _ in 0..3 {
            assert!(s.admits(&p, 42));
            s.add(42, t);
        }
        assert!(!s.admits(&p, 42));
        let p = BatchPolicy::new(100, 100, Duration::from_secs(1)).unwrap();
        let mut s = BatchSize::default();
        s.add(42, t);
        s.add(42, t);
        assert!(!s.admits(&p, 42));
        assert!(s.admits(&p, 16));
    }

    #[test]
    fn age_counts_from_the_oldest_row() {
        let p = BatchPolicy::new(100, 1 << 20, Duration::from_millis(10)).unwrap();
        let mut s = BatchSize::default();
        let t0 = Instant::now();
        assert!(!s.is_due(&p, t0 + Duration::from_secs(10)));
        s.add(42, t0);
        s.add(42, t0 + Duration::from_millis(9));
        assert_eq!(s.due_at(&p), Some(t0 + Duration::from_millis(10)));
        assert!(!s.is_due(&p, t0 + Duration::from_millis(9)));
        assert!(s.is_due(&p, t0 + Duration::from_millis(10)));
    }

    #[test]
    fn batches_close_at_once_when_idle_and_grow_under_load() {
        let p = BatchPolicy::new(20_000, 1 << 30, Duration::from_millis(10)).unwrap();
        let t0 = Instant::now();
        let mut s = BatchSize::default();
        assert!(!should_close(&s, &p, t0, false, 0.0), "nothing to write");
        s.add(42, t0);
        // Idle (a few frames a second): the row goes out at once.
        assert!(should_close(&s, &p, t0, false, 100.0));
        // 200k rows/s: worth waiting for the ~2,000 rows 10 ms bring, unless they are there or 10 ms passed.
        assert!(!should_close(&s, &p, t0, false, 200_000.0));
        for _ in 0..1_999 {
            s.add(42, t0);
        }
        assert!(should_close(&s, &p, t0, false, 200_000.0));
        let mut one = BatchSize::default();
        one.add(42, t0);
        assert!(should_close(
            &one,
            &p,
            t0 + Duration::from_millis(10),
            false,
            200_000.0
        ));
        assert_eq!(
            close_due(&one, &p, false),
            Some(t0 + Duration::from_millis(10))
        );
        // Beside a busy writer: only after 4 × max_age (a full batch closes anyway, before this is asked).
        assert!(!should_close(
            &one,
            &p,
            t0 + Duration::from_millis(39),
            true,
            1.0
        ));
        assert!(should_close(
            &one,
            &p,
            t0 + Duration::from_millis(40),
            true,
            1.0
        ));
        assert_eq!(
            close_due(&one, &p, true),
            Some(t0 + Duration::from_millis(40))
        );
        // A rate beyond max_rows per max_age waits for max_rows, not more.
        let mut full = BatchSize::default();
        for _ in 0..20_000 {
            full.add(42, t0);
        }
        assert!(should_close(&full, &p, t0, false, 1e9));
    }

    #[test]
    fn rate_meter_measures_over_its_window() {
        let mut m = RateMeter::new(Duration::from_millis(100));
        let t0 = Instant::now();
        assert_eq!(m.observe(t0, 0), 0.0);
        let r = m.observe(t0 + Duration::from_millis(50), 5_000);
        assert!((r - 100_000.0).abs() < 1.0, "{r}");
        m.observe(t0 + Duration::from_millis(150), 10_000);
        // The old samples leave the window: the rate is the recent one.
        let r = m.observe(t0 + Duration::from_millis(300), 10_000);
        assert!(r < 40_000.0, "{r}");
    }

    #[test]
    fn zero_limits_are_refused() {
        assert!(BatchPolicy::new(0, 1, Duration::ZERO).is_err());
        assert!(BatchPolicy::new(1, 0, Duration::ZERO).is_err());
        assert!(Queue::new(0, 1.0).is_err());
        assert!(Queue::new(10, 0.0).is_err());
        assert!(Queue::new(10, 1.5).is_err());
        assert!(Queue::new(10, f64::NAN).is_err());
    }

    #[test]
    fn fill_takes_frames_in_order_and_splits_at_the_limit() {
        let p = BatchPolicy::new(5, 1 << 20, Duration::ZERO).unwrap();
        let mut q = Queue::new(100, 1.0).unwrap();
        let t = Instant::now();
        frame(&mut q, 1, 7, 3, t);
        frame(&mut q, 2, 8, 4, t);
        let mut b = Batch::default();
        assert!(q.fill(&mut b, &p), "rows are left");
        assert_eq!(b.rows.len(), 5);
        // Frame 1 is complete in this batch; frame 2 straddles into the next.
        assert_eq!(b.done_ticket, Some(1));
        assert_eq!(q.depth(), 2);
        assert_eq!(b.locate(0).map(|(m, i)| (m.ticket, i)), Some((1, 0)));
        assert_eq!(b.locate(4).map(|(m, i)| (m.ticket, i)), Some((2, 1)));
        assert!(b.locate(5).is_none());
        let mut b2 = Batch::default();
        assert!(!q.fill(&mut b2, &p));
        assert_eq!(b2.rows.len(), 2);
        assert_eq!(b2.done_ticket, Some(2));
        assert_eq!(b2.locate(0).map(|(m, i)| (m.ticket, i)), Some((2, 2)));
        assert!(q.is_empty() && q.oldest().is_none());
    }

    #[test]
    fn locate_maps_through_frame_indices() {
        let p = BatchPolicy::default();
        let mut q = Queue::new(100, 1.0).unwrap();
        // Entries 1 and 4 of the frame were rejected while parsing: rows are entries 0, 2, 3.
        q.push(
            meta(1, 1, Some(vec![0, 2, 3])),
            vec![row(0.0), row(2.0), row(3.0)],
            Instant::now(),
        );
        let mut b = Batch::default();
        q.fill(&mut b, &p);
        let idx: Vec<u32> = (0..3).map(|r| b.locate(r).unwrap().1).collect();
        assert_eq!(idx, vec![0, 2, 3]);
    }

    #[test]
    fn one_source_cannot_take_the_whole_queue() {
        let mut q = Queue::new(100, 0.25).unwrap();
        let t = Instant::now();
        assert_eq!(
            q.admits(1, 500),
            Ok(()),
            "an empty share takes any one frame"
        );
        frame(&mut q, 1, 1, 20, t);
        let full = q.admits(1, 10).unwrap_err();
        assert!(full.share && full.depth == 20);
        // Another source still gets in, up to the queue's capacity.
        assert_eq!(q.admits(2, 25), Ok(()));
        frame(&mut q, 2, 2, 25, t);
        frame(&mut q, 3, 3, 25, t);
        frame(&mut q, 4, 4, 25, t);
        let full = q.admits(5, 10).unwrap_err();
        assert!(!full.share && full.depth == 95 && full.capacity == 100);
        // Taking rows frees the source's share.
        let mut b = Batch::default();
        q.fill(
            &mut b,
            &BatchPolicy::new(20, 1 << 20, Duration::ZERO).unwrap(),
        );
        assert_eq!(q.admits(1, 10), Ok(()));
    }

    #[test]
    fn outcome_lists_refusals_in_index_order() {
        let o = Outcome::default();
        let why = Arc::new(Refusal {
            sqlstate: "23514".into(),
            message: "check".into(),
        });
        o.refuse(4, why.clone());
        o.refuse(1, why);
        assert_eq!(
            o.refused().iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![1, 4]
        );
    }
}
