//! Batching policy (no I/O): when a batch is full and when it is due. One batch = one transaction.

use std::time::{Duration, Instant};

use crate::error::CoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    pub max_rows: usize,
    pub max_bytes: usize,
    /// How long the first row of a batch may wait for company before the batch is written anyway.
    pub max_age: Duration,
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

    /// No further row of `row_bytes` can join.
    pub fn is_full(&self, policy: &BatchPolicy, row_bytes: usize) -> bool {
        self.rows > 0 && !self.admits(policy, row_bytes)
    }

    /// When the batch must be written even if not full (`None` while empty).
    pub fn due_at(&self, policy: &BatchPolicy) -> Option<Instant> {
        self.opened_at.map(|t| t + policy.max_age)
    }

    pub fn is_due(&self, policy: &BatchPolicy, now: Instant) -> bool {
        self.due_at(policy).is_some_and(|d| now >= d)
    }
}

/// Batches are filled in queue order (one writer fills at a time) but several writers may commit them out of
/// order. A frame is durable once every batch up to the one holding its last row has committed, so tickets
/// are released in batch order.
#[derive(Debug, Default)]
pub struct CommitOrder {
    next_seq: u64,
    retire_seq: u64,
    finished: std::collections::BTreeMap<u64, Option<u64>>,
}

impl CommitOrder {
    /// Number the next batch (call while holding the right to fill, so numbers follow queue order).
    pub fn open(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// Record batch `seq` as committed; `done_ticket` is the last frame it completed. Returns the highest
    /// ticket that is now durable, if that changed.
    pub fn commit(&mut self, seq: u64, done_ticket: Option<u64>) -> Option<u64> {
        self.finished.insert(seq, done_ticket);
        let mut released = None;
        while let Some(t) = self.finished.remove(&self.retire_seq) {
            self.retire_seq += 1;
            released = t.or(released);
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_release_tickets_in_batch_order() {
        let mut o = CommitOrder::default();
        let (a, b, c) = (o.open(), o.open(), o.open());
        // b and c commit before a: nothing is durable yet (a holds earlier rows).
        assert_eq!(o.commit(b, Some(5)), None);
        assert_eq!(o.commit(c, None), None);
        assert_eq!(o.commit(a, Some(3)), Some(5));
        let d = o.open();
        assert_eq!(o.commit(d, None), None);
        let e = o.open();
        assert_eq!(o.commit(e, Some(9)), Some(9));
    }

    #[test]
    fn first_row_always_fits() {
        let p = BatchPolicy::new(1, 10, Duration::ZERO).unwrap();
        let s = BatchSize::default();
        assert!(s.admits(&p, 1_000));
        assert!(!s.is_full(&p, 1_000));
        assert_eq!(s.due_at(&p), None);
    }

    #[test]
    fn rows_limit() {
        let p = BatchPolicy::new(3, 1 << 20, Duration::from_secs(1)).unwrap();
        let mut s = BatchSize::default();
        let t = Instant::now();
        for _ in 0..3 {
            assert!(s.admits(&p, 42));
            s.add(42, t);
        }
        assert!(!s.admits(&p, 42) && s.is_full(&p, 42));
    }

    #[test]
    fn bytes_limit() {
        let p = BatchPolicy::new(100, 100, Duration::from_secs(1)).unwrap();
        let mut s = BatchSize::default();
        let t = Instant::now();
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
    fn zero_limits_are_refused() {
        assert!(BatchPolicy::new(0, 1, Duration::ZERO).is_err());
        assert!(BatchPolicy::new(1, 0, Duration::ZERO).is_err());
    }
}
