//! Putting decoded datapoints in (time, event) order: ties within one frame, or a whole statement's rows.

use super::decode::DatapointColumns;

impl DatapointColumns {
    /// Reorder the rows: row `i` becomes the old row `order[i]` (`order` is a permutation of `0..rows`).
    fn permute(&mut self, order: &[usize]) {
        fn gather<const W: usize>(buf: &[u8], order: &[usize]) -> Vec<u8> {
            let mut out = Vec::with_capacity(buf.len());
            for &i in order {
                out.extend_from_slice(&buf[i * W..(i + 1) * W]);
            }
            out
        }
        self.time_us = gather::<8>(&self.time_us, order);
        self.event_id = gather::<4>(&self.event_id, order);
        self.value = gather::<8>(&self.value, order);
        self.experiment_id = gather::<4>(&self.experiment_id, order);
        let mut validity = vec![0u8; self.experiment_validity.len()];
        for (to, &from) in order.iter().enumerate() {
            if self.experiment_validity[from / 8] & (1 << (from % 8)) != 0 {
                validity[to / 8] |= 1 << (to % 8);
            }
        }
        self.experiment_validity = validity;
    }
}

/// Order rows of equal time by event id (rows arrive ordered by time only: PostgreSQL sorts on one int8 key
/// about twice as fast as on two). A run of equal times holds at most one row per event.
pub fn order_ties_by_event(cols: &mut DatapointColumns) {
    let times = cols.times();
    let events = cols.event_ids();
    let mut order: Option<Vec<usize>> = None;
    let mut start = 0;
    while start < times.len() {
        let mut end = start + 1;
        while end < times.len() && times[end] == times[start] {
            end += 1;
        }
        if !events[start..end].is_sorted() {
            let order = order.get_or_insert_with(|| (0..times.len()).collect());
            order[start..end].sort_unstable_by_key(|&i| events[i]);
        }
        start = end;
    }
    if let Some(order) = order {
        cols.permute(&order);
    }
}

/// A whole statement's rows, decoded, to be put in (time, event) order before they are handed out.
#[derive(Debug, Default)]
pub(super) struct Collected {
    time_us: Vec<i64>,
    event_id: Vec<i32>,
    value: Vec<f64>,
    experiment_id: Vec<Option<i32>>,
}

impl Collected {
    pub(super) fn extend(&mut self, cols: &DatapointColumns) {
        self.time_us.extend(cols.times());
        self.event_id.extend(cols.event_ids());
        self.value.extend(cols.values());
        self.experiment_id.extend(cols.experiment_ids());
    }

    /// How many rows were collected.
    pub(super) fn rows(&self) -> usize {
        self.time_us.len()
    }

    /// Row indices in (time, event) order; None when the rows are in that order already.
    pub(super) fn order(&self) -> Option<Vec<u32>> {
        let key = |i: usize| (self.time_us[i], self.event_id[i]);
        if (1..self.time_us.len()).all(|i| key(i - 1) <= key(i)) {
            return None;
        }
        // Rows come off the heap nearly in time order (ingest writes them so): the stable merge sort finds
        // the runs and costs little more than a pass.
        let mut order: Vec<u32> = (0..self.time_us.len() as u32).collect();
        order.sort_by_key(|&i| key(i as usize));
        Some(order)
    }

    /// Rows `range` of `order` (or of the rows as they are) as one frame.
    pub(super) fn frame(
        &self,
        order: Option<&[u32]>,
        range: std::ops::Range<usize>,
    ) -> DatapointColumns {
        let mut out = DatapointColumns::with_capacity(range.len());
        for k in range {
            let i = order.map_or(k, |o| o[k] as usize);
            out.push(
                self.time_us[i],
                self.event_id[i],
                self.value[i],
                self.experiment_id[i],
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::PG_EPOCH_US;
    use crate::pgcopy::decode::{decode_datapoints, tests::tuple};

    #[test]
    fn collected_rows_come_out_sorted_in_frames_of_any_size() {
        // Rows out of order, ties of time across events, NULL and non-NULL experiments, extreme values.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let rows: Vec<(i64, i32, f64, Option<i32>)> = (0..1000)
            .map(|i| {
                let r = next();
                let t = i64::from((r % 300) as i32) - 150;
                let x = (r % 3 != 0).then_some((r >> 20) as i32);
                let v = [f64::NAN, f64::MAX, -0.0, 1.5][(r >> 8) as usize % 4];
                (t * 1000, i, v, x)
            })
            .collect();
        let data: Vec<u8> = rows
            .iter()
            .flat_map(|&(t, e, v, x)| tuple(t, e, v, x))
            .collect();
        let mut collected = Collected::default();
        collected.extend(&decode_datapoints(&data, false).unwrap());
        let order = collected.order().expect("out of order");
        let mut expected = rows.clone();
        expected.sort_by_key(|r| (r.0, r.1));
        for size in [1, 7, 8, 999, 1000, 5000] {
            let (mut times, mut events, mut values, mut experiments) =
                (vec![], vec![], vec![], vec![]);
            let mut start = 0;
            while start < rows.len() {
                let end = (start + size).min(rows.len());
                let frame = collected.frame(Some(&order), start..end);
                assert_eq!(frame.rows, end - start);
                assert_eq!(
                    frame.experiment_nulls,
                    frame
                        .experiment_ids()
                        .iter()
                        .filter(|x| x.is_none())
                        .count()
                );
                times.extend(frame.times());
                events.extend(frame.event_ids());
                values.extend(frame.values().iter().map(|v| v.to_bits()));
                experiments.extend(frame.experiment_ids());
                start = end;
            }
            assert_eq!(
                times,
                expected
                    .iter()
                    .map(|r| r.0 + PG_EPOCH_US)
                    .collect::<Vec<_>>()
            );
            assert_eq!(events, expected.iter().map(|r| r.1).collect::<Vec<_>>());
            assert_eq!(
                values,
                expected.iter().map(|r| r.2.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(
                experiments,
                expected.iter().map(|r| r.3).collect::<Vec<_>>()
            );
        }
        // Rows in order already need no permutation.
        let mut sorted = Collected::default();
        let data: Vec<u8> = expected
            .iter()
            .flat_map(|&(t, e, v, x)| tuple(t, e, v, x))
            .collect();
        sorted.extend(&decode_datapoints(&data, false).unwrap());
        assert!(sorted.order().is_none());
        assert_eq!(sorted.frame(None, 0..0).rows, 0);
    }

    #[test]
    fn ties_are_ordered_by_event_with_their_columns() {
        let rows: Vec<(i64, i32, f64, Option<i32>)> = vec![
            (1, 5, 0.5, None),
            (2, 9, 0.9, Some(90)),
            (2, 3, 0.3, None),
            (2, 7, 0.7, Some(70)),
            (3, 2, 0.2, None),
            (4, 8, 0.8, Some(80)),
            (4, 1, 0.1, Some(10)),
            (5, 4, 0.4, None),
            (6, 6, 0.6, Some(60)),
        ];
        let data: Vec<u8> = rows
            .iter()
            .flat_map(|&(t, e, v, x)| tuple(t, e, v, x))
            .collect();
        let mut cols = decode_datapoints(&data, false).unwrap();
        order_ties_by_event(&mut cols);
        let mut expected = rows.clone();
        expected.sort_by_key(|r| (r.0, r.1));
        assert_eq!(
            cols.times(),
            expected
                .iter()
                .map(|r| r.0 + PG_EPOCH_US)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            cols.event_ids(),
            expected.iter().map(|r| r.1).collect::<Vec<_>>()
        );
        assert_eq!(
            cols.values(),
            expected.iter().map(|r| r.2).collect::<Vec<_>>()
        );
        assert_eq!(
            cols.experiment_ids(),
            expected.iter().map(|r| r.3).collect::<Vec<_>>()
        );
        assert_eq!(cols.experiment_nulls, 4);
    }
}
