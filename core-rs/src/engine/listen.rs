//! The catalog's LISTEN task: reload the snapshot when any process changes events, mappings, instances,
//! experiments or rules.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::AsyncMessage;

use super::state::Shared;
use crate::pg;

/// The NOTIFY channel the catalog tables' triggers announce changes on (sql/0004).
pub const CATALOG_CHANNEL: &str = "webmacs_catalog";

/// How often the LISTEN connection proves it is alive: notifications sent to a connection that silently
/// stopped (a partition behind a proxy) would be lost, so a probe that fails in time reconnects it.
const LISTEN_PROBE: Duration = Duration::from_secs(15);

/// LISTEN for catalog changes made by any process; reload on each (coalesced) notification, and after
/// every reconnect, since notifications sent while disconnected are lost.
pub(crate) async fn run_listener(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if shared.closing.load(Ordering::Acquire) {
            return;
        }
        let connected = pg::open(&shared.config.dsn, "webmacs-ingest-listen").await;
        let (client, mut conn) = match connected {
            Ok(c) => c,
            Err(_) => {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shared.shutdown.notified() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(msg)) = messages.next().await {
                if let AsyncMessage::Notification(_) = msg {
                    let _ = tx.send(());
                }
            }
        });
        let listening = pg::deadline(
            pg::QUERY_TIMEOUT,
            "LISTEN",
            client.batch_execute(&format!("LISTEN {CATALOG_CHANNEL}")),
        )
        .await;
        if listening.is_ok() {
            backoff = Duration::from_millis(100);
            let _ = shared.reload_catalog().await;
            let mut probe = tokio::time::interval(LISTEN_PROBE);
            probe.tick().await;
            loop {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Some(()) => {
                            while rx.try_recv().is_ok() {}
                            if shared.reload_catalog().await.is_err() {
                                // Retry once the catalog connection is back; a later NOTIFY may never come.
                                tokio::time::sleep(backoff).await;
                                let _ = shared.reload_catalog().await;
                            }
                        }
                        None => break,
                    },
                    _ = probe.tick() => {
                        if pg::deadline(pg::QUERY_TIMEOUT, "probe", client.simple_query("")).await.is_err() {
                            break;
                        }
                    }
                    _ = shared.shutdown.notified() => { driver.abort(); return; }
                }
            }
        }
        driver.abort();
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shared.shutdown.notified() => return,
        }
    }
}
