//! Native WebSocket listener for `GET /ws/controller/telemetry?token=…` (spec §7, §7.2) on the engine's runtime.
//!
//! Same semantics as `webmacs/ws/telemetry.py`: accept the upgrade, authenticate (close 1008 with the spec's
//! reason), then feed every frame through `Engine::submit`; error frames and acks (after the commit) are sent in
//! frame order; a frame that is not a JSON object closes the socket (1007). When the queue is full the
//! connection stops reading until the next commit, so TCP pushes back to the controller. Any other path → 404.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::auth::{self, JwtKey, API_TOKEN_PREFIX};
use crate::engine::Engine;
use crate::error::CoreError;
use crate::frame::{FrameError, Reject};
use crate::writer;

pub const TELEMETRY_PATH: &str = "/ws/controller/telemetry";
/// Close code of every authentication failure (spec §7).
pub const POLICY_VIOLATION: u16 = 1008;
/// Close code for a frame that is not a JSON object (as the Python endpoint).
pub const INVALID_PAYLOAD: u16 = 1007;
const MAX_HEAD_BYTES: usize = 16 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const NO_VALID: &str = r#"{"type":"error","message":"No valid datapoints in batch"}"#;

/// Why a connection was refused after the upgrade; the text is the close reason of spec §7.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Required,
    InvalidJwt,
    Revoked,
    InvalidApiToken,
    ApiTokenExpired,
    UserNotFound,
}

impl AuthFailure {
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::Required => "Authentication required",
            AuthFailure::InvalidJwt => "Invalid or expired token",
            AuthFailure::Revoked => "Token has been revoked",
            AuthFailure::InvalidApiToken => "Invalid API token",
            AuthFailure::ApiTokenExpired => "API token expired",
            AuthFailure::UserNotFound => "User not found",
        }
    }
}

/// What the request head asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A WebSocket upgrade of the telemetry path: the `token` query parameter (decoded, trimmed) and the key.
    Telemetry {
        token: String,
        key: String,
    },
    NotFound,
    /// A broken upgrade of the telemetry path: status and text.
    Refused(u16, &'static str),
}

/// Parse an HTTP/1.1 request head (up to and including the blank line) and route it.
pub fn route(head: &[u8]) -> Route {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Route::Refused(400, "Bad Request"),
    }
    let target = req.path.unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    // A plain HTTP request to a WebSocket route is not found, as Starlette answers.
    if path != TELEMETRY_PATH || req.method != Some("GET") || !has_token("upgrade", "websocket") {
        return Route::NotFound;
    }
    if !has_token("connection", "upgrade") {
        return Route::Refused(400, "Bad Request");
    }
    if header("sec-websocket-version") != Some("13") {
        return Route::Refused(426, "Upgrade Required");
    }
    let Some(key) = header("sec-websocket-key").filter(|k| !k.is_empty()) else {
        return Route::Refused(400, "Bad Request");
    };
    Route::Telemetry {
        token: query_param(query, "token")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        key: key.to_owned(),
    }
}

/// The last value of a query parameter (as Starlette's `query_params.get`), `+` and `%XX` decoded.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k) == name).then(|| percent_decode(v))
        })
        .next_back()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Looks credentials up in the database (spec §3.1 order for API tokens, §7 order for JWTs).
struct Authenticator {
    jwt: JwtKey,
    dsn: String,
    /// One connection: connecting is rare and the lookups are short, so a pool would buy nothing.
    client: tokio::sync::Mutex<Option<Client>>,
}

impl Authenticator {
    /// The user id, or why the credential is refused; Err when the database could not answer.
    async fn authenticate(&self, token: &str) -> Result<Result<i64, AuthFailure>, CoreError> {
        if token.is_empty() {
            return Ok(Err(AuthFailure::Required));
        }
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        // WebSockets decode the JWT before consulting the blacklist (spec §7).
        let jwt_user = if token.starts_with(API_TOKEN_PREFIX) {
            None
        } else {
            match self.jwt.verify(token, now_s) {
                Some(id) => Some(id),
                None => return Ok(Err(AuthFailure::InvalidJwt)),
            }
        };
        let mut guard = self.client.lock().await;
        for attempt in 0..2 {
            if guard.as_ref().is_none_or(|c| c.is_closed()) {
                *guard = Some(writer::connect(&self.dsn, "webmacs-telemetry-auth").await?);
            }
            // Set just above when missing.
            let client = guard.as_ref().expect("connected above");
            let res = match jwt_user {
                Some(id) => lookup_jwt(client, token, id).await,
                None => lookup_api_token(client, token).await,
            };
            match res {
                Ok(r) => return Ok(r),
                // A database restart since the last lookup is the usual cause: retry on a fresh connection.
                Err(e) => {
                    let closed = client.is_closed();
                    *guard = None;
                    if attempt == 1 || !closed {
                        return Err(e.into());
                    }
                }
            }
        }
        Err(CoreError::Database("authentication lookup failed".into()))
    }
}

async fn lookup_jwt(
    c: &Client,
    token: &str,
    user_id: i64,
) -> Result<Result<i64, AuthFailure>, tokio_postgres::Error> {
    let row = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM blacklist_tokens WHERE token = $1),
                    EXISTS (SELECT 1 FROM users WHERE id = $2::int8)",
            &[&token, &user_id],
        )
        .await?;
    Ok(if row.get::<_, bool>(0) {
        Err(AuthFailure::Revoked)
    } else if !row.get::<_, bool>(1) {
        Err(AuthFailure::UserNotFound)
    } else {
        Ok(user_id)
    })
}

async fn lookup_api_token(
    c: &Client,
    token: &str,
) -> Result<Result<i64, AuthFailure>, tokio_postgres::Error> {
    let hash = auth::hash_api_token(token);
    let row = c
        .query_opt(
            "SELECT t.id, t.expires_at IS NOT NULL AND t.expires_at <= now(), u.id::int8
             FROM api_tokens t LEFT JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1",
            &[&hash],
        )
        .await?;
    let Some(row) = row else {
        return Ok(Err(AuthFailure::InvalidApiToken));
    };
    if row.get::<_, bool>(1) {
        return Ok(Err(AuthFailure::ApiTokenExpired));
    }
    let Some(user_id) = row.get::<_, Option<i64>>(2) else {
        return Ok(Err(AuthFailure::UserNotFound));
    };
    let token_id: i32 = row.get(0);
    // Concurrent uses of one token skip the update instead of queueing behind the row lock (as the API does).
    c.execute(
        "UPDATE api_tokens SET last_used_at = now()
         WHERE id = (SELECT id FROM api_tokens WHERE id = $1 FOR UPDATE SKIP LOCKED)",
        &[&token_id],
    )
    .await?;
    Ok(Ok(user_id))
}

/// A running listener. Stopping (or dropping) it closes every connection with 1001.
pub struct Listener {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Listener {
    /// Bind `address` ("host:port"; port 0 picks one) and serve on the engine's runtime.
    pub fn start(engine: Arc<Engine>, address: &str, jwt: JwtKey) -> Result<Listener, CoreError> {
        let cannot =
            |e: std::io::Error| CoreError::Config(format!("cannot listen on {address}: {e}"));
        let std_listener = std::net::TcpListener::bind(address).map_err(cannot)?;
        std_listener.set_nonblocking(true).map_err(cannot)?;
        let local_addr = std_listener.local_addr().map_err(cannot)?;
        let handle = engine.handle().clone();
        let listener = {
            let _entered = handle.enter();
            TcpListener::from_std(std_listener).map_err(cannot)?
        };
        let authenticator = Arc::new(Authenticator {
            jwt,
            dsn: engine.config().dsn.clone(),
            client: tokio::sync::Mutex::new(None),
        });
        let (shutdown, _) = watch::channel(false);
        let stop = shutdown.subscribe();
        let accept = handle.spawn(accept_loop(listener, engine, authenticator, stop));
        Ok(Listener {
            local_addr,
            shutdown,
            accept,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stop(&self) {
        self.accept.abort();
        self.shutdown.send_replace(true);
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(
    listener: TcpListener,
    engine: Arc<Engine>,
    authenticator: Arc<Authenticator>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve(stream, engine.clone(), authenticator.clone(), stop.clone()));
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            _ = stop.changed() => return,
        }
    }
}

async fn read_head(io: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    loop {
        let start = head.len();
        let n = io.read_until(b'\n', &mut head).await.ok()?;
        if n == 0 || head.len() > MAX_HEAD_BYTES {
            return None;
        }
        if matches!(&head[start..], b"\r\n" | b"\n") && start > 0 {
            return Some(head);
        }
    }
}

async fn respond(io: &mut BufReader<TcpStream>, status: u16, text: &str, extra: &str) {
    let body = format!("{text}\n");
    let response = format!(
        "HTTP/1.1 {status} {text}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = io.write_all(response.as_bytes()).await;
    let _ = io.shutdown().await;
}

enum Out {
    /// Send once `ticket` is committed (0: at once).
    Text(u64, String),
    Close(u16, &'static str),
}

async fn serve(
    stream: TcpStream,
    engine: Arc<Engine>,
    authenticator: Arc<Authenticator>,
    mut stop: watch::Receiver<bool>,
) {
    let mut io = BufReader::new(stream);
    let Ok(Some(head)) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut io)).await else {
        return;
    };
    let (token, key) = match route(&head) {
        Route::Telemetry { token, key } => (token, key),
        Route::NotFound => return respond(&mut io, 404, "Not Found", "").await,
        Route::Refused(426, text) => {
            return respond(&mut io, 426, text, "sec-websocket-version: 13\r\n").await
        }
        Route::Refused(status, text) => return respond(&mut io, status, text, "").await,
    };
    let accept = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    if io.write_all(accept.as_bytes()).await.is_err() {
        return;
    }
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(engine.config().max_frame_bytes.max(1 << 20) + 1024);
    config.max_frame_size = config.max_message_size;
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    let (mut sink, mut source) = ws.split();

    // Accepted first, then authenticated (spec §7): the client sees a close frame with a reason.
    let refused = match authenticator.authenticate(&token).await {
        Ok(Ok(_user_id)) => None,
        Ok(Err(failure)) => Some((POLICY_VIOLATION, failure.reason())),
        Err(_) => Some((1011, "Internal error")),
    };
    if let Some((code, reason)) = refused {
        let _ = sink.send(close_message(code, reason)).await;
        // Read until the client's close (or give up) so the close handshake completes.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(m)) = source.next().await {
                if m.is_close() {
                    break;
                }
            }
        })
        .await;
        return;
    }

    let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
    let sender_engine = engine.clone();
    let sender = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            match out {
                Out::Text(ticket, text) => {
                    if ticket > sender_engine.committed_ticket() {
                        if sink.flush().await.is_err() {
                            return;
                        }
                        sender_engine.wait_committed(ticket).await;
                    }
                    if sink.feed(Message::text(text)).await.is_err() {
                        return;
                    }
                    // Coalesce the writes of acks released by one commit.
                    if rx.is_empty() && sink.flush().await.is_err() {
                        return;
                    }
                }
                Out::Close(code, reason) => {
                    let _ = sink.send(close_message(code, reason)).await;
                    return;
                }
            }
        }
        let _ = sink.close().await;
    });

    loop {
        let message = tokio::select! {
            m = source.next() => m,
            _ = stop.changed() => {
                let _ = tx.send(Out::Close(1001, "Server shutting down"));
                break;
            }
        };
        let data = match message {
            Some(Ok(Message::Text(t))) => bytes::Bytes::from(t),
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            Some(Ok(_)) => continue, // ping/pong: answered by tungstenite
        };
        let receipt = loop {
            match engine.submit(&data, false) {
                Err(CoreError::QueueFull { .. }) => {
                    // Back-pressure: this socket is not read until a batch commits.
                    engine.next_commit(Duration::from_secs(1)).await;
                }
                r => break r,
            }
        };
        let out = match receipt {
            Err(CoreError::Frame(FrameError::InvalidJson(_) | FrameError::NotObject)) => {
                let _ = tx.send(Out::Close(INVALID_PAYLOAD, "Frame is not a JSON object"));
                break;
            }
            Err(CoreError::Frame(e)) => {
                let msg = serde_json::json!({"type": "error", "message": e.to_string()});
                tx.send(Out::Text(0, msg.to_string()))
            }
            Err(CoreError::Closed) => {
                let _ = tx.send(Out::Close(1001, "Server shutting down"));
                break;
            }
            Err(_) => {
                let _ = tx.send(Out::Close(1011, "Internal error"));
                break;
            }
            Ok(r) => {
                // Entries of unknown or unlinked events are valid in shape, dropped silently (§7.2 step 5).
                let catalog_miss = r
                    .rejects
                    .iter()
                    .any(|(_, why)| matches!(why, Reject::UnknownEvent | Reject::InactiveEvent));
                let mut sent = Ok(());
                if r.total > 0 && r.accepted == 0 && !catalog_miss {
                    sent = tx.send(Out::Text(0, NO_VALID.to_owned()));
                }
                if let Some(seq) = r.seq {
                    let ack = format!(
                        r#"{{"type":"ack","seq":{seq},"accepted":{},"rejected":{}}}"#,
                        r.accepted,
                        r.rejects.len()
                    );
                    sent = sent.and(tx.send(Out::Text(r.ticket, ack)));
                }
                sent
            }
        };
        if out.is_err() {
            break; // the sender stopped: the socket failed while sending
        }
    }
    drop(tx);
    let _ = sender.await;
}

fn close_message(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(target: &str) -> Vec<u8> {
        format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .into_bytes()
    }

    fn telemetry(token: &str) -> Route {
        Route::Telemetry {
            token: token.into(),
            key: "dGhlIHNhbXBsZSBub25jZQ==".into(),
        }
    }

    #[test]
    fn telemetry_upgrade_with_token() {
        assert_eq!(
            route(&upgrade("/ws/controller/telemetry?token=abc")),
            telemetry("abc")
        );
        assert_eq!(route(&upgrade("/ws/controller/telemetry")), telemetry(""));
        assert_eq!(
            route(&upgrade("/ws/controller/telemetry?token=")),
            telemetry("")
        );
        assert_eq!(
            route(&upgrade("/ws/controller/telemetry?token=%20a%2Eb+%09")),
            telemetry("a.b")
        );
        assert_eq!(
            route(&upgrade("/ws/controller/telemetry?x=1&token=a&token=b")),
            telemetry("b")
        );
        assert_eq!(
            route(&upgrade("/ws/controller/telemetry?token=wm_a-b_c")),
            telemetry("wm_a-b_c")
        );
    }

    #[test]
    fn other_paths_and_plain_requests_are_not_found() {
        for target in [
            "/",
            "/ws/datapoints/stream",
            "/ws/controller/telemetry/",
            "/ws/controller/telemetryx",
        ] {
            assert_eq!(route(&upgrade(target)), Route::NotFound, "{target}");
        }
        let plain = b"GET /ws/controller/telemetry HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(route(plain), Route::NotFound);
        let post = String::from_utf8(upgrade("/ws/controller/telemetry"))
            .unwrap()
            .replacen("GET", "POST", 1);
        assert_eq!(route(post.as_bytes()), Route::NotFound);
    }

    #[test]
    fn broken_upgrades_and_heads_are_refused() {
        assert_eq!(
            route(b"garbage\r\n\r\n"),
            Route::Refused(400, "Bad Request")
        );
        assert_eq!(
            route(b"GET / HTTP/1.1\r\n"),
            Route::Refused(400, "Bad Request")
        );
        let v8 = String::from_utf8(upgrade("/ws/controller/telemetry"))
            .unwrap()
            .replace("Version: 13", "Version: 8");
        assert_eq!(
            route(v8.as_bytes()),
            Route::Refused(426, "Upgrade Required")
        );
        let nokey = String::from_utf8(upgrade("/ws/controller/telemetry"))
            .unwrap()
            .replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
        assert_eq!(route(nokey.as_bytes()), Route::Refused(400, "Bad Request"));
    }

    #[test]
    fn percent_decoding_keeps_invalid_escapes() {
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%C3%A9"), "é");
    }
}
