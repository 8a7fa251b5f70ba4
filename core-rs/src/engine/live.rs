//! The live view after each commit: this process's live points go to its stream subscribers and, with the
//! fan-out, to the other server processes; theirs come back to ours, and "latest" stays the same everywhere.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};

use super::state::{Latest, Shared};
use super::LivePoint;
use crate::fanout::{Fanout, Message, PUBLISH_INTERVAL};

/// Start the fan-out (as configured) and the live task on the current runtime.
pub(crate) fn start(shared: Arc<Shared>) {
    // A random id per engine: a process recognises (and ignores) its own messages.
    let origin = {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.finish() | 1
    };
    let (inbox_tx, inbox) = mpsc::channel::<Message>(1024);
    // The tasks end with the engine's runtime.
    let fanout = Fanout::start(
        &shared.config.fanout,
        &shared.config.dsn,
        origin,
        inbox_tx,
        Arc::new(Notify::new()),
    );
    *shared.fanout.lock().unwrap_or_else(|p| p.into_inner()) = fanout;
    tokio::spawn(run_live(shared, inbox));
}

async fn run_live(shared: Arc<Shared>, mut inbox: mpsc::Receiver<Message>) {
    let mut pending = Message::default();
    let mut tick = tokio::time::interval(PUBLISH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.commit_notify.notified() => take_local(&shared, &mut pending),
            _ = tick.tick() => {
                take_local(&shared, &mut pending);
                publish(&shared, &mut pending);
            }
            Some(m) = inbox.recv() => apply_remote(&shared, m),
        }
    }
}

/// Hand this process's new live points to its subscribers; remember them and the changed "latest" values for
/// the next publication.
fn take_local(shared: &Shared, pending: &mut Message) {
    let (live, latest): (Vec<LivePoint>, Vec<(i32, Latest)>) = {
        let mut st = shared.state();
        if st.live.is_empty() && st.dirty_latest.is_empty() {
            return;
        }
        let live = st.live.drain(..).collect();
        let dirty: Vec<i32> = st.dirty_latest.drain().collect();
        let latest = dirty
            .into_iter()
            .filter_map(|id| st.latest.get(&id).map(|l| (id, *l)))
            .collect();
        (live, latest)
    };
    let publishing = shared
        .fanout
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some();
    if publishing {
        pending.live.extend(live.iter().map(|p| {
            (
                p.event_public_id.clone(),
                p.value,
                p.time_us,
                p.experiment_public_id.clone(),
            )
        }));
        pending.latest.extend(
            latest
                .iter()
                .map(|(id, l)| (*id, l.value, l.time_us, l.experiment_id)),
        );
    }
    if !live.is_empty() {
        // No receiver (no stream subscribers' server): nothing to do.
        let _ = shared.live_tx.send(Arc::new(live));
    }
}

fn publish(shared: &Shared, pending: &mut Message) {
    if pending.is_empty() {
        return;
    }
    if let Some(f) = shared
        .fanout
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        let mut message = std::mem::take(pending);
        message.origin = f.origin;
        f.publish(message);
    } else {
        *pending = Message::default();
    }
}

/// Another process's message: its live points to our subscribers, its newer "latest" values into our cache,
/// and re-reads of "latest" it asks for (after deletions, or after we missed messages).
fn apply_remote(shared: &Arc<Shared>, m: Message) {
    if !m.latest.is_empty() {
        let mut st = shared.state();
        for (id, value, time_us, experiment_id) in m.latest {
            let latest = Latest {
                value,
                time_us,
                experiment_id,
            };
            st.latest
                .entry(id)
                .and_modify(|l| {
                    if time_us >= l.time_us {
                        *l = latest
                    }
                })
                .or_insert(latest);
        }
    }
    if let Some(ids) = m.reload {
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = shared.load_latest((!ids.is_empty()).then_some(ids)).await;
        });
    }
    if !m.live.is_empty() {
        let points = m
            .live
            .into_iter()
            .map(
                |(event_public_id, value, time_us, experiment_public_id)| LivePoint {
                    event_public_id,
                    value,
                    time_us,
                    experiment_public_id,
                },
            )
            .collect();
        let _ = shared.live_tx.send(Arc::new(points));
    }
}
