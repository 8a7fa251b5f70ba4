//! MQTT ingest: subscribe to a broker (MQTT 5, shared subscriptions), feed every message through the engine's
//! one pipeline and PUBACK it only after its datapoints committed.
//!
//! The session is persistent (clean start off, a session expiry), so what the broker holds for us while the
//! server is down is delivered when it returns; a message not acknowledged before a restart is delivered again,
//! and the `(event_id, time)` key absorbs it when its points carry client timestamps. Malformed messages can
//! never succeed: they are acknowledged at once and counted. The writer acts as one `wm_` API token, checked
//! again every few seconds; a token scoped to a plugin instance feeds only that instance's events.

pub mod payload;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::auth::{hash_api_token, API_TOKEN_PREFIX};
use crate::engine::{Engine, Receipt};
use crate::error::CoreError;
use crate::frame::Reject;
use crate::pg::{self, PgClient};
// The queue-share source of all MQTT traffic (connections and tokens use small numbers).
use crate::stats::{ProtocolStats, MQTT_SOURCE};
use crate::ws::auth::lookup_api_token;

/// How often the writer's token is checked again (deletion, expiry, role or scope change).
const TOKEN_RECHECK: Duration = Duration::from_secs(5);
/// Log lines kept for Python to drain; at most one is added per `LOG_INTERVAL`.
const LOG_CAPACITY: usize = 64;
const LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Ack requests queued towards the event loop, and messages waiting for their commit.
const REQUEST_CAPACITY: usize = 4096;
/// Receive Maximum at most: well below both channel capacities.
const MAX_IN_FLIGHT: u16 = 1024;
/// Server processes on one host that get distinct default client ids.
const SLOTS: i32 = 64;
/// Advisory-lock namespace of the client-id slots ("MQTT").
const SLOT_LOCK: i32 = 0x4d51_5454;

#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    /// `mqtt://user:pass@host:port` or `mqtts://…`.
    pub url: String,
    pub topics: Vec<String>,
    /// The `wm_` API token the writer acts as.
    pub token: String,
    /// None: `webmacs-<host name>`, with `-<n>` for the n-th further server process on this host.
    pub client_id: Option<String>,
    /// Subscribe as `$share/webmacs/<topic>`, so several server processes share the messages.
    pub shared: bool,
    /// Where a small JSON report of rejected messages and points is published (QoS 0), if anywhere.
    pub error_topic: Option<String>,
    /// How long the broker keeps the session (and queues messages) while the server is away.
    pub session_expiry: Duration,
    pub keep_alive: Duration,
    /// Messages the broker may have in flight to us unacknowledged (MQTT 5 Receive Maximum).
    pub receive_maximum: u16,
}

impl MqttConfig {
    pub fn new(url: &str, token: &str) -> MqttConfig {
        MqttConfig {
            url: url.to_owned(),
            topics: vec!["webmacs/telemetry/#".to_owned()],
            token: token.to_owned(),
            client_id: None,
            shared: true,
            error_topic: None,
            session_expiry: Duration::from_secs(7 * 86_400),
            keep_alive: Duration::from_secs(30),
            receive_maximum: 1000,
        }
    }
}

fn config_error(msg: impl Into<String>) -> CoreError {
    CoreError::Config(msg.into())
}

/// Broker address, transport and credentials from the URL (the client id comes later).
fn options_of(url: &str, max_packet: usize) -> Result<MqttOptions, CoreError> {
    let u = url::Url::parse(url).map_err(|e| config_error(format!("WEBMACS_MQTT_URL: {e}")))?;
    let host = u
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| config_error("WEBMACS_MQTT_URL: no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tls = match u.scheme() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        s => {
            return Err(config_error(format!(
                "WEBMACS_MQTT_URL: scheme {s:?}, expected mqtt:// or mqtts://"
            )))
        }
    };
    let port = u.port().unwrap_or(if tls { 8883 } else { 1883 });
    let mut o = MqttOptions::new("webmacs", host, port);
    if !u.username().is_empty() {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| config_error("WEBMACS_MQTT_URL: credentials are not UTF-8"))
        };
        o.set_credentials(decode(u.username())?, decode(u.password().unwrap_or(""))?);
    }
    if tls {
        o.set_transport(rumqttc::Transport::tls_with_config(tls_config()?));
    }
    // The broker sends nothing larger (MQTT 5 Maximum Packet Size), so no message can break the connection.
    o.set_max_packet_size(Some(u32::try_from(max_packet).unwrap_or(u32::MAX)));
    Ok(o)
}

/// rustls with the platform's roots and the ring provider (the one the crate already links).
fn tls_config() -> Result<rumqttc::TlsConfiguration, CoreError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert); // an unparsable system certificate is skipped, as browsers do
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The writer's token as the database has it now.
#[derive(Debug, Clone, PartialEq)]
struct Writer {
    /// The plugin instance the token is scoped to, if any.
    scope: Option<i32>,
}

async fn lookup_writer(c: &PgClient, token: &str) -> Result<Result<Writer, String>, CoreError> {
    if !token.starts_with(API_TOKEN_PREFIX) {
        return Ok(Err("WEBMACS_MQTT_TOKEN is not a wm_ API token".into()));
    }
    // The same lookup the WebSocket sessions use (expiry, user, role, scope; last_used_at recorded).
    let identity = pg::deadline(
        pg::QUERY_TIMEOUT,
        "MQTT token lookup",
        lookup_api_token(c, &hash_api_token(token)),
    )
    .await?;
    match identity {
        Err(failure) => Ok(Err(format!(
            "the MQTT writer's API token: {}",
            failure.reason()
        ))),
        Ok(id) if !matches!(id.role.as_str(), "operator" | "admin") => Ok(Err(
            "the MQTT writer's API token needs role operator or admin".into(),
        )),
        Ok(id) => Ok(Ok(Writer { scope: id.instance })),
    }
}

/// The lowest free client-id slot on this database, held by an advisory lock for the connection's life.
async fn claim_slot(c: &PgClient) -> Result<i32, CoreError> {
    for slot in 0..SLOTS {
        let row = pg::deadline(
            pg::QUERY_TIMEOUT,
            "MQTT client id slot",
            c.query_one("SELECT pg_try_advisory_lock($1, $2)", &[&SLOT_LOCK, &slot]),
        )
        .await?;
        if row.try_get::<_, bool>(0)? {
            return Ok(slot);
        }
    }
    Err(config_error(format!(
        "more than {SLOTS} MQTT writers share this database: set WEBMACS_MQTT_CLIENT_ID"
    )))
}

/// Log lines for Python, at most one per second; the ones left out are counted and mentioned in the next.
#[derive(Debug, Default)]
pub struct RateLog {
    inner: Mutex<(Option<Instant>, u64, VecDeque<String>)>,
}

impl RateLog {
    pub fn log(&self, stats: &ProtocolStats, line: String) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (last, suppressed, lines) = &mut *g;
        if last.is_some_and(|t| t.elapsed() < LOG_INTERVAL) {
            *suppressed += 1;
            stats.log_suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        let line = match std::mem::take(suppressed) {
            0 => line,
            n => format!("{line} ({n} similar line(s) suppressed)"),
        };
        if lines.len() >= LOG_CAPACITY {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    pub fn drain(&self) -> Vec<String> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.2.drain(..).collect()
    }
}

/// A message waiting for its commit before it is acknowledged.
struct Pending {
    publish: Publish,
    /// The connection it arrived on: after a reconnect the broker sends it again, and that copy is acked.
    generation: u64,
    receipt: Option<Receipt>,
    topic: String,
}

/// What the event loop and the acker share.
struct Context {
    engine: Arc<Engine>,
    client: AsyncClient,
    config: MqttConfig,
    log: Arc<RateLog>,
    generation: AtomicU64,
    /// The client-id slot this process holds (an advisory lock on `db`), when the id is the default.
    slot: Option<i32>,
}

impl Context {
    fn stats(&self) -> &ProtocolStats {
        &self.engine.counters().mqtt
    }

    fn report(&self, topic: &str, error: Option<&str>, receipt: Option<&Receipt>, refused: usize) {
        let rejects: Vec<(usize, Reject)> = receipt.map(|r| r.rejects.clone()).unwrap_or_default();
        let n = rejects.len() + refused;
        if error.is_none() && n == 0 {
            return;
        }
        let reasons: Vec<&str> = {
            let mut v: Vec<&str> = rejects.iter().map(|r| r.1.code()).collect();
            v.extend(std::iter::repeat_n(Reject::DatabaseRefused.code(), refused));
            v.sort_unstable();
            v.dedup();
            v
        };
        let line = match error {
            Some(e) => format!("MQTT message on {topic:?} refused: {e}"),
            None => format!(
                "MQTT message on {topic:?}: {n} of {} datapoint(s) rejected ({})",
                receipt.map_or(0, |r| r.total),
                reasons.join(", ")
            ),
        };
        self.log.log(self.stats(), line);
        if let Some(error_topic) = &self.config.error_topic {
            let entries: Vec<_> = rejects
                .iter()
                .take(20)
                .map(|(i, r)| serde_json::json!({"index": i, "reason": r.code()}))
                .collect();
            let body = serde_json::json!({
                "topic": topic,
                "error": error,
                "accepted": receipt.map_or(0, |r| r.accepted.saturating_sub(refused)),
                "rejected": n,
                "reasons": reasons,
                "entries": entries,
            });
            let sent = self.client.try_publish(
                error_topic.as_str(),
                QoS::AtMostOnce,
                false,
                body.to_string().into_bytes(),
            );
            if sent.is_ok() {
                self.stats()
                    .errors_published
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Acknowledge messages in arrival order, each once its points committed.
async fn acker(ctx: Arc<Context>, mut rx: mpsc::Receiver<Pending>) {
    let far = || tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    while let Some(p) = rx.recv().await {
        if let Some(r) = &p.receipt {
            if !ctx.engine.wait_committed(r.ticket, far()).await {
                return; // the engine closed with the points unwritten: the broker keeps the message
            }
            let refused = r.outcome.refused().len();
            for _ in 0..refused {
                ctx.stats().reject(Reject::DatabaseRefused);
            }
            ctx.stats()
                .accepted
                .fetch_add(r.accepted.saturating_sub(refused) as u64, Ordering::Relaxed);
            ctx.report(&p.topic, None, Some(r), refused);
        }
        if p.generation == ctx.generation.load(Ordering::Acquire)
            && ctx.client.ack(&p.publish).await.is_ok()
        {
            ctx.stats().acked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The running MQTT writer.
pub struct MqttIngest {
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
    engine: Arc<Engine>,
    log: Arc<RateLog>,
    pub client_id: String,
}

impl MqttIngest {
    /// Check the settings and the token, claim a client id, and start consuming (from outside the runtime).
    pub fn start(engine: Arc<Engine>, config: MqttConfig) -> Result<MqttIngest, CoreError> {
        if config.topics.is_empty() || config.topics.iter().any(|t| t.is_empty()) {
            return Err(config_error(
                "WEBMACS_MQTT_TOPICS: no topic, or an empty one",
            ));
        }
        if config.token.is_empty() {
            return Err(config_error(
                "WEBMACS_MQTT_TOKEN is required with WEBMACS_MQTT_URL",
            ));
        }
        let max_packet = engine.config().max_frame_bytes.saturating_add(64 * 1024);
        let mut options = options_of(&config.url, max_packet)?;
        let handle = engine.handle().clone();
        let dsn = engine.config().dsn.clone();
        let (db, writer, slot, client_id) = handle.block_on(async {
            let db = pg::connect(&dsn, "webmacs-mqtt").await?;
            let writer = lookup_writer(&db, &config.token)
                .await?
                .map_err(config_error)?;
            let (slot, client_id) = match &config.client_id {
                Some(id) => (None, id.clone()),
                None => match claim_slot(&db).await? {
                    0 => (Some(0), format!("webmacs-{}", host_name())),
                    n => (Some(n), format!("webmacs-{}-{n}", host_name())),
                },
            };
            Ok::<_, CoreError>((db, writer, slot, client_id))
        })?;
        options.set_client_id(client_id.clone());
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(
            u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX),
        ));
        options.set_keep_alive(config.keep_alive);
        options.set_manual_acks(true);
        // The broker's in-flight messages bound both channels below (so the acker never waits on a full one).
        options.set_receive_maximum(Some(config.receive_maximum.clamp(1, MAX_IN_FLIGHT)));
        let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
        let log = Arc::new(RateLog::default());
        let ctx = Arc::new(Context {
            engine: engine.clone(),
            client,
            config,
            log: log.clone(),
            generation: AtomicU64::new(0),
            slot,
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = handle.spawn(run(ctx, eventloop, db, Some(writer), stop_rx));
        Ok(MqttIngest {
            stop,
            task: Mutex::new(Some(task)),
            engine,
            log,
            client_id,
        })
    }

    /// Log lines since the last call (rate-limited).
    pub fn drain_log(&self) -> Vec<String> {
        self.log.drain()
    }

    /// Stop taking messages, acknowledge those whose points commit within `timeout`, disconnect (from outside
    /// the runtime; before the engine closes, so that its writers are still there to commit).
    pub fn stop(&self, timeout: Duration) {
        let _ = self.stop.send(true);
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut task) = task {
            self.engine.handle().block_on(async {
                if tokio::time::timeout(timeout, &mut task).await.is_err() {
                    task.abort();
                }
            });
        }
    }
}

/// Submit one message's points (waiting while the queue is full); None when the engine closed.
async fn submit(
    ctx: &Context,
    frame: &[u8],
    scope: Option<i32>,
) -> Option<Result<Receipt, CoreError>> {
    loop {
        match ctx.engine.submit_as(frame, false, MQTT_SOURCE, scope) {
            Err(CoreError::QueueFull { .. }) => {
                ctx.engine.next_commit(Duration::from_secs(1)).await
            }
            Err(CoreError::Closed) => return None,
            r => return Some(r),
        }
    }
}

/// Feed one message to the engine and queue it for its ack; false when the engine closed.
async fn handle_publish(
    ctx: &Context,
    publish: Publish,
    scope: Option<i32>,
    acks: &mpsc::Sender<Pending>,
) -> bool {
    let stats = ctx.stats();
    stats.received.fetch_add(1, Ordering::Relaxed);
    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
    let generation = ctx.generation.load(Ordering::Acquire);
    let receipt = match payload::to_frame(&topic, &publish.payload) {
        Err(m) => {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            ctx.report(&topic, Some(m.code()), None, 0);
            None
        }
        Ok(frame) => match submit(ctx, &frame, scope).await {
            None => return false,
            Some(Ok(r)) => {
                stats.points.fetch_add(r.total as u64, Ordering::Relaxed);
                r.rejects.iter().for_each(|x| stats.reject(x.1));
                if !r.has_datapoints {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    ctx.report(&topic, Some("no datapoints array"), None, 0);
                }
                Some(r)
            }
            Some(Err(e)) => {
                // A frame refused as a whole (not JSON, too large, too many entries): it can never succeed.
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                ctx.report(&topic, Some(&e.to_string()), None, 0);
                None
            }
        },
    };
    if publish.qos == QoS::AtMostOnce {
        if let Some(r) = &receipt {
            stats
                .accepted
                .fetch_add(r.accepted as u64, Ordering::Relaxed);
        }
        return true; // nothing to acknowledge
    }
    let pending = Pending {
        publish,
        generation,
        receipt,
        topic,
    };
    acks.send(pending).await.is_ok()
}

async fn run(
    ctx: Arc<Context>,
    mut eventloop: EventLoop,
    mut db: PgClient,
    mut writer: Option<Writer>,
    mut stop: watch::Receiver<bool>,
) {
    let (ack_tx, ack_rx) = mpsc::channel::<Pending>(REQUEST_CAPACITY / 2);
    let mut acker_task = tokio::spawn(acker(ctx.clone(), ack_rx));
    let mut acks = Some(ack_tx);
    let mut recheck = tokio::time::interval(TOKEN_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    recheck.tick().await;
    let mut failures = 0u32;
    let mut connected_once = false;
    let mut stopping = false;
    let stats = || ctx.stats();
    loop {
        // Not authorized (token deleted or expired): stay away from the broker, which keeps the messages.
        if writer.is_none() && !stopping {
            stats().connected.store(0, Ordering::Relaxed);
            tokio::select! {
                _ = recheck.tick() => {}
                _ = stop.changed() => {
                    // Not connected: what was taken before the pause is acked on no later connection.
                    drop(acks.take());
                    let _ = tokio::time::timeout(Duration::from_secs(2), &mut acker_task).await;
                    break;
                }
            }
            writer = recheck_token(&ctx, &mut db).await.unwrap_or(None);
            continue;
        }
        let event = tokio::select! {
            e = eventloop.poll() => e,
            _ = stop.changed(), if !stopping => {
                // Take no more messages; the acker finishes those taken (their commits are near).
                stopping = true;
                acks = None;
                continue;
            }
            _ = &mut acker_task, if stopping => {
                disconnect(&ctx, &mut eventloop).await;
                break;
            }
            _ = recheck.tick(), if !stopping => {
                match recheck_token(&ctx, &mut db).await {
                    Some(None) => {
                        writer = None;
                        // New connection generation: nothing taken so far is acked on a later connection.
                        ctx.generation.fetch_add(1, Ordering::AcqRel);
                        disconnect(&ctx, &mut eventloop).await;
                    }
                    Some(Some(w)) => writer = Some(w),
                    None => {} // the database did not answer: keep the last answer
                }
                continue;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                ctx.generation.fetch_add(1, Ordering::AcqRel);
                stats().connected.store(1, Ordering::Relaxed);
                stats().subscribed.store(0, Ordering::Relaxed);
                if connected_once {
                    stats().reconnects.fetch_add(1, Ordering::Relaxed);
                }
                connected_once = true;
                let _ = ack; // session_present or not, (re)subscribing is idempotent
                for topic in &ctx.config.topics {
                    let filter = if ctx.config.shared {
                        format!("$share/webmacs/{topic}")
                    } else {
                        topic.clone()
                    };
                    let _ = ctx.client.try_subscribe(filter, QoS::AtLeastOnce);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as Code;
                let granted = ack
                    .return_codes
                    .iter()
                    .filter(|c| matches!(c, Code::Success(_)))
                    .count();
                stats()
                    .subscribed
                    .fetch_add(granted as u64, Ordering::Relaxed);
                if granted < ack.return_codes.len() {
                    ctx.log.log(
                        stats(),
                        format!("MQTT broker refused a subscription: {:?}", ack.return_codes),
                    );
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let (Some(tx), Some(w)) = (&acks, &writer) else {
                    continue; // stopping or unauthorized: not acknowledged, the broker sends it again
                };
                if !handle_publish(&ctx, p, w.scope, tx).await {
                    acks = None;
                    stopping = true;
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                stats().connected.store(0, Ordering::Relaxed);
                ctx.log.log(
                    stats(),
                    format!("MQTT broker disconnected us: {:?}", d.reason_code),
                );
            }
            Ok(_) => {}
            Err(e) => {
                stats().connected.store(0, Ordering::Relaxed);
                if stopping {
                    if acker_task.is_finished() {
                        break;
                    }
                    // Unacked messages come again on the next session; let the acker drain.
                    let _ = tokio::time::timeout(Duration::from_secs(2), &mut acker_task).await;
                    break;
                }
                stats().connection_errors.fetch_add(1, Ordering::Relaxed);
                ctx.log.log(stats(), format!("MQTT connection: {e}"));
                failures = failures.saturating_add(1);
                let delay = Duration::from_millis(250)
                    .saturating_mul(1u32 << failures.min(5))
                    .min(Duration::from_secs(5));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => { stopping = true; acks = None; }
                }
            }
        }
    }
    stats().connected.store(0, Ordering::Relaxed);
    acker_task.abort();
}

/// Send the last acks and a DISCONNECT (the session stays with the broker), within two seconds.
async fn disconnect(ctx: &Context, eventloop: &mut EventLoop) {
    let _ = ctx.client.try_disconnect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Ok(e)) = tokio::time::timeout_at(deadline, eventloop.poll()).await {
        if matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
            break;
        }
    }
    ctx.stats().connected.store(0, Ordering::Relaxed);
    ctx.stats().subscribed.store(0, Ordering::Relaxed);
}

/// The token's current standing: Some(None) revoked, Some(Some) valid, None when the database did not answer.
async fn recheck_token(ctx: &Context, db: &mut PgClient) -> Option<Option<Writer>> {
    if db.is_closed() {
        *db = pg::connect(&ctx.engine.config().dsn, "webmacs-mqtt")
            .await
            .ok()?;
        // The lock went with the old connection: take the slot back before another process does.
        if let Some(slot) = ctx.slot {
            let held = pg::deadline(
                pg::QUERY_TIMEOUT,
                "MQTT client id slot",
                db.query_one("SELECT pg_try_advisory_lock($1, $2)", &[&SLOT_LOCK, &slot]),
            )
            .await
            .ok()
            .and_then(|r| r.try_get::<_, bool>(0).ok());
            if held != Some(true) {
                ctx.log.log(
                    ctx.stats(),
                    format!("MQTT client id slot {slot} was taken while the database was away: set WEBMACS_MQTT_CLIENT_ID per process"),
                );
            }
        }
    }
    match lookup_writer(db, &ctx.config.token).await {
        Ok(Ok(w)) => Some(Some(w)),
        Ok(Err(why)) => {
            ctx.log
                .log(ctx.stats(), format!("MQTT ingest paused: {why}"));
            Some(None)
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_transport_and_credentials() {
        let o = options_of("mqtt://dev%40x:p%3Ass@127.0.0.1:1999", 1000).unwrap();
        assert_eq!(o.broker_address(), ("127.0.0.1".to_owned(), 1999));
        assert_eq!(
            o.credentials(),
            Some(rumqttc::v5::mqttbytes::v5::Login {
                username: "dev@x".into(),
                password: "p:ss".into()
            })
        );
        assert_eq!(o.max_packet_size(), Some(1000));
        let o = options_of("mqtts://broker.example", 1000).unwrap();
        assert_eq!(o.broker_address().1, 8883);
        assert!(matches!(o.transport(), rumqttc::Transport::Tls(_)));
        for bad in ["http://x", "mqtt://", "not a url", "mqtt://:1883"] {
            assert!(options_of(bad, 1000).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_log_is_rate_limited_and_counts_what_it_leaves_out() {
        let stats = ProtocolStats::default();
        let log = RateLog::default();
        log.log(&stats, "a".into());
        log.log(&stats, "b".into());
        log.log(&stats, "c".into());
        assert_eq!(log.drain(), vec!["a".to_owned()]);
        assert_eq!(stats.log_suppressed.load(Ordering::Relaxed), 2);
        log.inner.lock().unwrap().0 = Some(Instant::now() - LOG_INTERVAL);
        log.log(&stats, "d".into());
        assert_eq!(
            log.drain(),
            vec!["d (2 similar line(s) suppressed)".to_owned()]
        );
        assert!(log.drain().is_empty());
    }
}
