//! The writer tasks: fill a batch from the queue, write it, release the tickets it completed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::state::Shared;
use crate::batch::{self, Batch, RateMeter};
use crate::frame::Reject;
use crate::writer::{self, Writer};

/// One writer: take the right to fill, fill the next batch from the queue in order, hand the right on, write
/// the batch in one transaction, then release the tickets it completed (in batch order, see `CommitOrder`).
///
/// Batches close adaptively (`batch::should_close`): at once when the engine is idle, larger as the load grows,
/// and a second writer joins only when one cannot keep up.
pub(crate) async fn run_writer(shared: Arc<Shared>) {
    let policy = shared.config.policy;
    let mut writer = Writer::new(
        &shared.config.dsn,
        shared.config.write_timeout,
        shared.writer_status.clone(),
    );
    let (mut retries, mut reconnects) = (0, 0);
    // Shared by whichever writer fills next would be better; per writer it converges within its window.
    let mut meter = RateMeter::new(Duration::from_millis(200));
    loop {
        let mut batch = Batch::default();
        let fill = shared.fill.lock().await;
        loop {
            // Registered before looking, so a writer finishing in between still wakes us.
            let freed = shared.writer_free.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let (full, pushed) = {
                let mut st = shared.state();
                let full = st.queue.fill(&mut batch, &policy);
                shared
                    .stats
                    .queue_depth
                    .store(st.queue.depth() as u64, Ordering::Relaxed);
                (full, st.queue.pushed())
            };
            let now = Instant::now();
            let rate = meter.observe(now, pushed);
            let closing = shared.closing.load(Ordering::Acquire);
            if batch.rows.is_empty() {
                if closing {
                    // Wake the next writer waiting to fill: it sees the same and stops too.
                    shared.writer_wake.notify_one();
                    return;
                }
                shared.writer_wake.notified().await;
                continue;
            }
            let busy = shared.writing.load(Ordering::Acquire) > 0;
            if full || closing || batch::should_close(&batch.size, &policy, now, busy, rate) {
                break;
            }
            let due = batch::close_due(&batch.size, &policy, busy).unwrap_or(now);
            tokio::select! {
                _ = shared.writer_wake.notified() => {}
                _ = &mut freed => {}
                _ = tokio::time::sleep_until(due.into()) => {}
            }
        }
        let seq = shared
            .commit_order
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open(batch.size.opened_at);
        shared.writing.fetch_add(1, Ordering::AcqRel);
        drop(fill);
        // Rows may be left for the next writer, which may be waiting for a wake-up that was consumed here.
        shared.writer_wake.notify_one();
        let started = Instant::now();
        let res = writer
            .write(&batch.rows, || shared.abort.load(Ordering::Acquire))
            .await;
        shared.writing.fetch_sub(1, Ordering::AcqRel);
        shared.writer_free.notify_waiters();
        let stats = &shared.stats;
        stats
            .retries
            .fetch_add(writer.retries - retries, Ordering::Relaxed);
        stats
            .reconnects
            .fetch_add(writer.reconnects - reconnects, Ordering::Relaxed);
        (retries, reconnects) = (writer.retries, writer.reconnects);
        let written = match res {
            Ok(w) => w,
            // Only when closing with a dead database: nothing of this batch was acknowledged.
            Err(_) => return,
        };
        stats.written.fetch_add(written.inserted, Ordering::Relaxed);
        stats
            .duplicates
            .fetch_add(written.duplicates, Ordering::Relaxed);
        stats
            .bisections
            .fetch_add(written.bisections, Ordering::Relaxed);
        stats.flushed(writer::elapsed_us(started));
        if !written.refused.is_empty() {
            refuse_rows(&shared, &batch, &written.refused);
        }
        let released = shared
            .commit_order
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .commit(seq, batch.done_ticket);
        if let Some(t) = released {
            shared.committed.fetch_max(t, Ordering::AcqRel);
        }
        shared.signal_commit();
    }
}

/// Report rows the database refused to their frames (before the frames' tickets are released), count them,
/// and re-read "latest" for their events: the cache took their values when they were accepted.
fn refuse_rows(
    shared: &Arc<Shared>,
    batch: &Batch,
    refused: &[(usize, Arc<crate::batch::Refusal>)],
) {
    let mut events = Vec::with_capacity(refused.len());
    for (row, why) in refused {
        if let Some((meta, index)) = batch.locate(*row) {
            meta.outcome.refuse(index, why.clone());
        }
        shared.stats.reject(Reject::DatabaseRefused);
        events.push(batch.rows[*row].event_id);
    }
    events.sort_unstable();
    events.dedup();
    let s = shared.clone();
    tokio::spawn(async move {
        let _ = s.load_latest(Some(events)).await;
    });
}
