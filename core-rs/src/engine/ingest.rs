//! The ingest pipeline of one frame: catalog lookups, rules, the live view and "latest", then the queue.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::state::{IngestState, Latest, Shared};
use super::{unix_now_us, Firing, LivePoint, Receipt};
use crate::batch::FrameMeta;
use crate::catalog::{Catalog, EventEntry};
use crate::error::CoreError;
use crate::frame::{ParsedFrame, ParsedPoint, Reject};
use crate::rules;
use crate::stats::{Protocol, Stats};
use crate::writer::Row;

/// What every point of one frame shares while it is applied.
struct PointContext<'a> {
    now: Instant,
    now_us: i64,
    experiment_id: Option<i32>,
    experiment_public_id: Option<Arc<str>>,
    config: &'a super::EngineConfig,
    stats: &'a Stats,
    /// This engine's lane of server time.
    lane: i64,
}

impl Shared {
    /// Run one parsed frame through the pipeline: catalog, admission, per-point effects, the queue.
    pub(crate) fn ingest(
        &self,
        parsed: ParsedFrame,
        strict: bool,
        source: u64,
        instance: Option<i32>,
        protocol: Protocol,
    ) -> Result<Receipt, CoreError> {
        let ParsedFrame {
            points,
            mut rejects,
            total,
            has_datapoints,
            seq,
        } = parsed;
        let mut receipt = Receipt {
            total,
            has_datapoints,
            seq,
            ..Default::default()
        };
        if strict && rejects.iter().any(|r| r.1.is_shape_error()) {
            rejects.iter().for_each(|r| self.stats.reject(r.1));
            self.stats.ingested(protocol, 0, rejects.len());
            receipt.rejects = rejects;
            return Ok(receipt);
        }
        let catalog = self.catalog.load();
        let resolved = resolve(&catalog, points, instance, &mut rejects);

        let mut st = self.state();
        if !resolved.is_empty() {
            self.admit(&st.queue, source, resolved.len())?;
        }
        rejects.iter().for_each(|r| self.stats.reject(r.1));
        self.stats.ingested(protocol, resolved.len(), rejects.len());
        receipt.accepted = resolved.len();
        receipt.rejects = rejects;
        if resolved.is_empty() {
            // Nothing of ours to wait for, but acks stay in order behind earlier frames.
            receipt.ticket = st.next_ticket - 1;
            return Ok(receipt);
        }
        receipt.ticket = st.next_ticket;
        st.next_ticket += 1;
        let ctx = PointContext {
            now: Instant::now(),
            now_us: unix_now_us(),
            experiment_id: catalog.running_experiment,
            experiment_public_id: catalog.experiment_public_id(catalog.running_experiment),
            config: &self.config,
            stats: &self.stats,
            lane: self.lane,
        };
        // Row i of the frame's queued rows came from entry indices[i] (None: rows are entries 0, 1, 2, …).
        let identity = resolved.iter().enumerate().all(|(n, r)| r.0 == n);
        let indices = (!identity).then(|| resolved.iter().map(|r| r.0 as u32).collect());
        // Whether each event passes the broadcast throttle is decided once per frame (spec §6 step 7).
        let mut live_pass: HashMap<i32, bool> = HashMap::new();
        let rows: Vec<Row> = resolved
            .into_iter()
            .map(|(_, e, p)| st.apply(e, &p, &ctx, &mut live_pass))
            .collect();
        let meta = Arc::new(FrameMeta {
            ticket: receipt.ticket,
            source,
            indices,
            outcome: receipt.outcome.clone(),
        });
        st.queue.push(meta, rows, ctx.now);
        self.stats
            .accepted
            .fetch_add(receipt.accepted as u64, Ordering::Relaxed);
        self.stats
            .queue_depth
            .store(st.queue.depth() as u64, Ordering::Relaxed);
        self.writer_wake.notify_one();
        Ok(receipt)
    }

    /// Refuse the frame when the queue, or this sender's share of it, has no room.
    fn admit(
        &self,
        queue: &crate::batch::Queue,
        source: u64,
        rows: usize,
    ) -> Result<(), CoreError> {
        queue.admits(source, rows).map_err(|full| {
            self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            if full.share {
                self.stats.queue_full_share.fetch_add(1, Ordering::Relaxed);
            }
            CoreError::QueueFull {
                depth: full.depth,
                capacity: full.capacity,
                share: full.share,
            }
        })
    }
}

/// Look each point's event up: unknown and inactive events, and events outside the sender's plugin instance
/// (`instance`: the token is bound to one), become rejects (kept in index order).
fn resolve<'c, 'f>(
    catalog: &'c Catalog,
    points: Vec<(usize, ParsedPoint<'f>)>,
    instance: Option<i32>,
    rejects: &mut Vec<(usize, Reject)>,
) -> Vec<(usize, &'c EventEntry, ParsedPoint<'f>)> {
    let mut resolved = Vec::with_capacity(points.len());
    for (i, p) in points {
        match catalog.events.get(p.event_public_id.as_ref()) {
            None => rejects.push((i, Reject::UnknownEvent)),
            Some(e) if !e.active => rejects.push((i, Reject::InactiveEvent)),
            Some(e) if instance.is_some_and(|id| !e.instances.contains(&id)) => {
                rejects.push((i, Reject::NotPermitted))
            }
            Some(e) => resolved.push((i, e, p)),
        }
    }
    rejects.sort_unstable_by_key(|r| r.0);
    resolved
}

impl IngestState {
    /// One accepted point's effects: its time, rule firings, the `sensor.reading` throttle, the live view and
    /// "latest"; returns the row to queue.
    fn apply(
        &mut self,
        e: &EventEntry,
        p: &ParsedPoint,
        ctx: &PointContext,
        live_pass: &mut HashMap<i32, bool>,
    ) -> Row {
        let (now, cap) = (ctx.now, ctx.config.buffer_capacity);
        let time_us = p.time_us.unwrap_or_else(|| {
            next_server_time_in_lane(
                ctx.lane,
                self.last_server_us.entry(e.id).or_insert(i64::MIN),
                ctx.now_us,
            )
        });
        for rule in &e.rules {
            let state = self.rule_states.entry(rule.id).or_default();
            if rules::evaluate(rule, state, p.value, now) {
                let firing = Firing::Rule {
                    rule: rule.clone(),
                    event_public_id: e.public_id.clone(),
                    value: p.value,
                    time_us,
                };
                push_bounded(&mut self.firings, cap, ctx.stats, firing);
            }
        }
        let reading_due = self
            .reading_at
            .get(&e.id)
            .is_none_or(|t| now.duration_since(*t) >= ctx.config.reading_interval);
        if reading_due {
            self.reading_at.insert(e.id, now);
            let firing = Firing::Reading {
                event_public_id: e.public_id.clone(),
                value: p.value,
                time_us,
            };
            push_bounded(&mut self.firings, cap, ctx.stats, firing);
        }
        let broadcast_at = &mut self.broadcast_at;
        let pass = *live_pass.entry(e.id).or_insert_with(|| {
            let due = broadcast_at
                .get(&e.id)
                .is_none_or(|t| now.duration_since(*t) >= ctx.config.broadcast_interval);
            if due {
                broadcast_at.insert(e.id, now);
            }
            due
        });
        if pass {
            let point = LivePoint {
                event_public_id: e.public_id.clone(),
                value: p.value,
                time_us,
                experiment_public_id: ctx.experiment_public_id.clone(),
            };
            push_bounded(&mut self.live, cap, ctx.stats, point);
        }
        let latest = Latest {
            value: p.value,
            time_us,
            experiment_id: ctx.experiment_id,
        };
        let mut changed = true;
        self.latest
            .entry(e.id)
            .and_modify(|l| {
                if time_us >= l.time_us {
                    *l = latest
                } else {
                    changed = false;
                }
            })
            .or_insert(latest);
        if changed {
            self.dirty_latest.insert(e.id);
        }
        Row {
            time_us,
            event_id: e.id,
            experiment_id: ctx.experiment_id,
            value: p.value,
            server_time: p.time_us.is_none(),
        }
    }
}

/// Lanes of server time: engine k of a database assigns only microseconds ≡ k (mod LANES), so up to LANES
/// server processes never choose the same time for the same event (more share lanes; the writer then moves a
/// colliding row, see `writer::copy_dedup`).
pub const LANES: i64 = 16;

/// Server time for one event: the clock, but strictly after the event's previous server time, so two values
/// of one event in one batch (or a clock step back) never collide on the unique key.
pub fn next_server_time(prev: &mut i64, now_us: i64) -> i64 {
    *prev = now_us.max(prev.saturating_add(1));
    *prev
}

/// `next_server_time` within this engine's lane (`lane` in 0..LANES).
pub fn next_server_time_in_lane(lane: i64, prev: &mut i64, now_us: i64) -> i64 {
    let t = now_us.max(prev.saturating_add(1));
    let t = t.saturating_add((lane - t.rem_euclid(LANES)).rem_euclid(LANES));
    *prev = t;
    t
}

pub(crate) fn push_bounded<T>(buf: &mut VecDeque<T>, cap: usize, stats: &Stats, item: T) {
    if buf.len() >= cap {
        buf.pop_front();
        stats.broadcast_dropped.fetch_add(1, Ordering::Relaxed);
    }
    buf.push_back(item);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_time_is_strictly_increasing_per_event() {
        let mut prev = i64::MIN;
        let t = 1_000_000;
        assert_eq!(next_server_time(&mut prev, t), t);
        assert_eq!(next_server_time(&mut prev, t), t + 1);
        assert_eq!(next_server_time(&mut prev, t), t + 2);
        // The clock stepping back does not reuse a timestamp; a later clock wins again.
        assert_eq!(next_server_time(&mut prev, t - 50), t + 3);
        assert_eq!(next_server_time(&mut prev, t + 100), t + 100);
    }

    #[test]
    fn lanes_keep_engines_apart() {
        // Two engines of two lanes at the same clock never pick the same microsecond.
        let (mut a, mut b) = (i64::MIN, i64::MIN);
        let mut seen = std::collections::HashSet::new();
        for now in [1_000_000, 1_000_000, 1_000_003, 999_000, 1_000_020] {
            let ta = next_server_time_in_lane(3, &mut a, now);
            let tb = next_server_time_in_lane(12, &mut b, now);
            assert_eq!((ta.rem_euclid(LANES), tb.rem_euclid(LANES)), (3, 12));
            assert!(ta >= now && tb >= now);
            assert!(seen.insert(ta) && seen.insert(tb));
        }
        // Strictly increasing per engine; near i64::MAX it saturates instead of wrapping.
        let mut c = i64::MIN;
        let t1 = next_server_time_in_lane(0, &mut c, 5);
        assert!(next_server_time_in_lane(0, &mut c, 5) > t1);
        let mut d = i64::MAX - 3;
        let _ = next_server_time_in_lane(7, &mut d, 0);
    }
}
