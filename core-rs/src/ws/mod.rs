//! The engine's WebSocket server: `/ws/controller/telemetry` and `/ws/datapoints/stream`, in Rust.
//!
//! Connections reach it two ways. On the API's own port, uvicorn parses the request head and, for a
//! WebSocket upgrade, hands the socket over (`adopt`, see `webmacs.server`): every frame after the upgrade is
//! Rust's. On a port of its own (`listen`, WEBMACS_TELEMETRY_LISTEN) it accepts connections itself. Either
//! way the upgrade is accepted first and then authenticated, as the spec has it (close 1008 with its reason).

pub mod auth;
pub mod http;
pub mod stream;
pub mod telemetry;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

use crate::auth::JwtKey;
use crate::engine::Engine;
use crate::error::CoreError;
use auth::Authenticator;
use http::{Endpoint, Prefixed, Route};
use stream::Hub;

/// Close code of every authentication failure (spec §7).
pub const POLICY_VIOLATION: u16 = 1008;
/// Close code for a frame that is not a JSON object.
pub const INVALID_PAYLOAD: u16 = 1007;
/// Close code for a message beyond `MAX_MESSAGE_BYTES`.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// Largest WebSocket message read (uvicorn's limit in the Python implementation this replaces).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct WsConfig {
    pub jwt: JwtKey,
    /// How often open sessions' credentials are checked again (logout, deletion, role change, expiry).
    pub recheck_interval: Duration,
    /// Replies (acks, error frames) queued per telemetry connection before it stops reading.
    pub outbox: usize,
    /// Broadcasts queued per stream subscriber before it is dropped.
    pub subscriber_queue: usize,
    /// A socket write that takes longer ends the connection (a peer that stopped reading).
    pub send_timeout: Duration,
    /// Open WebSocket connections at most; more are refused with 503 before the upgrade.
    pub max_connections: usize,
}

impl WsConfig {
    pub fn new(jwt: JwtKey) -> WsConfig {
        WsConfig {
            jwt,
            recheck_interval: Duration::from_secs(2),
            outbox: 1024,
            subscriber_queue: 256,
            send_timeout: Duration::from_secs(30),
            max_connections: 10_000,
        }
    }
}

/// Counters of the WebSocket server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsStats {
    pub connections: usize,
    pub telemetry_sessions: usize,
    pub subscribers: usize,
    pub subscribers_dropped: u64,
    pub sessions_ended: u64,
    pub refused_busy: u64,
}

pub(crate) struct Inner {
    engine: Arc<Engine>,
    config: WsConfig,
    auth: Arc<Authenticator>,
    hub: Hub,
    stop: watch::Sender<bool>,
    stop_tasks: Arc<Notify>,
    next_id: AtomicU64,
    connections: AtomicUsize,
    telemetry_sessions: AtomicUsize,
    refused_busy: AtomicU64,
}

/// The running server; stopping (or dropping) it closes every connection with 1001.
pub struct WsServer {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

/// A port the server accepts connections on itself.
pub struct Listener {
    local_addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Listener {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl WsServer {
    /// Start the server's background tasks (session re-checks, live broadcasts) on the engine's runtime.
    pub fn start(engine: Arc<Engine>, config: WsConfig) -> Result<WsServer, CoreError> {
        if config.outbox == 0 || config.subscriber_queue == 0 || config.recheck_interval.is_zero() {
            return Err(CoreError::Config(
                "WebSocket queues and the re-check interval must be positive".into(),
            ));
        }
        let auth = Arc::new(Authenticator::new(config.jwt.clone(), &engine.config().dsn));
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            engine: engine.clone(),
            auth: auth.clone(),
            hub: Hub::default(),
            stop,
            stop_tasks: Arc::new(Notify::new()),
            next_id: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            telemetry_sessions: AtomicUsize::new(0),
            refused_busy: AtomicU64::new(0),
            config,
        });
        let handle = engine.handle();
        let tasks = vec![
            handle
                .spawn(auth.recheck_loop(inner.config.recheck_interval, inner.stop_tasks.clone())),
            handle.spawn(stream::broadcaster(inner.clone())),
        ];
        Ok(WsServer { inner, tasks })
    }

    /// Accept connections on `address` ("host:port"; port 0 picks one).
    pub fn listen(&self, address: &str) -> Result<Listener, CoreError> {
        let cannot =
            |e: std::io::Error| CoreError::Config(format!("cannot listen on {address}: {e}"));
        let std_listener = bind_shared(address).map_err(cannot)?;
        std_listener.set_nonblocking(true).map_err(cannot)?;
        let local_addr = std_listener.local_addr().map_err(cannot)?;
        let handle = self.inner.engine.handle().clone();
        let listener = {
            let _entered = handle.enter();
            TcpListener::from_std(std_listener).map_err(cannot)?
        };
        let accept = handle.spawn(accept_loop(listener, self.inner.clone()));
        Ok(Listener { local_addr, accept })
    }

    /// Serve a connection whose request head another server already read (uvicorn, on the API's port).
    pub fn adopt(&self, socket: OwnedFd, head: Vec<u8>) -> Result<(), CoreError> {
        let std_stream = std::net::TcpStream::from(socket);
        std_stream
            .set_nonblocking(true)
            .map_err(|e| CoreError::Config(format!("cannot adopt the connection: {e}")))?;
        let handle = self.inner.engine.handle().clone();
        let stream = {
            let _entered = handle.enter();
            TcpStream::from_std(std_stream)
                .map_err(|e| CoreError::Config(format!("cannot adopt the connection: {e}")))?
        };
        let _ = stream.set_nodelay(true);
        let inner = self.inner.clone();
        handle.spawn(async move {
            let _guard = ConnectionGuard::enter(&inner);
            if _guard.is_none() {
                let mut s = stream;
                return http::respond(&mut s, 503, "Service Unavailable", "").await;
            }
            serve_head(inner.clone(), head, stream).await;
        });
        Ok(())
    }

    pub fn stats(&self) -> WsStats {
        let i = &self.inner;
        WsStats {
            connections: i.connections.load(Ordering::Relaxed),
            telemetry_sessions: i.telemetry_sessions.load(Ordering::Relaxed),
            subscribers: i.hub.len(),
            subscribers_dropped: i.hub.dropped.load(Ordering::Relaxed),
            sessions_ended: i.auth.revoked.load(Ordering::Relaxed),
            refused_busy: i.refused_busy.load(Ordering::Relaxed),
        }
    }

    /// Close every connection with 1001 and stop the background tasks.
    pub fn stop(&self) {
        self.inner.stop.send_replace(true);
        self.inner.stop_tasks.notify_waiters();
    }
}

impl Drop for WsServer {
    fn drop(&mut self) {
        self.stop();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Bind with SO_REUSEPORT: every worker process of `webmacs serve --workers N` listens on the same port and
/// the kernel spreads new connections over them (each worker's engine serves its own).
fn bind_shared(address: &str) -> std::io::Result<std::net::TcpListener> {
    use std::net::ToSocketAddrs;
    let addr = address
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address"))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Counts an open connection for as long as it lives; None when the server is at its connection limit.
struct ConnectionGuard(Arc<Inner>);

impl ConnectionGuard {
    fn enter(inner: &Arc<Inner>) -> Option<ConnectionGuard> {
        let n = inner.connections.fetch_add(1, Ordering::AcqRel);
        if n >= inner.config.max_connections {
            inner.connections.fetch_sub(1, Ordering::AcqRel);
            inner.refused_busy.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnectionGuard(inner.clone()))
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let inner = inner.clone();
                    tokio::spawn(async move {
                        let Some(_guard) = ConnectionGuard::enter(&inner) else {
                            let mut s = stream;
                            return http::respond(&mut s, 503, "Service Unavailable", "").await;
                        };
                        let mut io = BufReader::new(stream);
                        let Ok(Some(head)) = tokio::time::timeout(http::HEAD_TIMEOUT, http::read_head(&mut io)).await
                        else {
                            return;
                        };
                        // The BufReader may hold bytes after the head (a client that did not wait for 101).
                        let rest = io.buffer().to_vec();
                        let stream = io.into_inner();
                        let mut replay = head;
                        replay.extend_from_slice(&rest);
                        serve_head(inner, replay, stream).await;
                    });
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            _ = stop.changed() => return,
        }
    }
}

/// Route a connection by its request head (`replay` holds the head and anything read after it).
async fn serve_head(inner: Arc<Inner>, replay: Vec<u8>, mut stream: TcpStream) {
    let head_len = replay
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(replay.len(), |p| p + 4);
    let (endpoint, token) = match http::route(&replay[..head_len]) {
        Route::Upgrade { endpoint, token } => (endpoint, token),
        Route::NotFound => return http::respond(&mut stream, 404, "Not Found", "").await,
        Route::Refused(426, text) => {
            return http::respond(&mut stream, 426, text, "sec-websocket-version: 13\r\n").await
        }
        Route::Refused(status, text) => return http::respond(&mut stream, status, text, "").await,
    };
    upgrade(inner, Prefixed::new(replay, stream), endpoint, token).await;
}

fn ws_config(inner: &Inner) -> WebSocketConfig {
    let mut config = WebSocketConfig::default();
    // A message up to 16 MiB reaches the engine (which answers an oversized frame with an error frame, as
    // the reference's uvicorn limit let it); beyond that the connection is closed with 1009.
    let max = (inner.engine.config().max_frame_bytes + 1024).max(MAX_MESSAGE_BYTES);
    config.max_message_size = Some(max);
    config.max_frame_size = Some(max);
    // Replies are bounded by the outbox; this bounds what one slow peer can make us buffer in bytes.
    config.max_write_buffer_size = 16 << 20;
    config
}

async fn upgrade<S>(inner: Arc<Inner>, io: S, endpoint: Endpoint, token: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = ws_config(&inner);
    // Routed and checked above; tungstenite validates the handshake again and answers it.
    let accept = tokio_tungstenite::accept_async_with_config(io, Some(config));
    let Ok(Ok(ws)) = tokio::time::timeout(http::HEAD_TIMEOUT, accept).await else {
        return;
    };
    let (mut sink, mut source) = ws.split();

    // Accepted first, then authenticated (spec §7): the client sees a close frame with a reason.
    let refusal = match inner.auth.authenticate(&token).await {
        Ok(Ok(identity)) => Ok(identity),
        Ok(Err(failure)) => Err((POLICY_VIOLATION, failure.reason())),
        Err(_) => Err((1011, "Internal error")),
    };
    // A device token writes only: the live stream is refused like a bad credential (close with a reason).
    let refusal = refusal.and_then(|identity| match endpoint {
        Endpoint::Stream if identity.write_only => {
            Err((POLICY_VIOLATION, "This API token may only write datapoints"))
        }
        _ => Ok(identity),
    });
    let identity = match refusal {
        Ok(identity) => identity,
        Err((code, reason)) => {
            use futures_util::SinkExt;
            let _ = tokio::time::timeout(
                inner.config.send_timeout,
                sink.send(close_message(code, reason)),
            )
            .await;
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
    };
    let registration = inner.auth.register(identity);
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    match endpoint {
        Endpoint::Telemetry => {
            inner.telemetry_sessions.fetch_add(1, Ordering::Relaxed);
            // Each connection is its own source for the queue's fair shares (high bit: never a REST source).
            let source_id = (1 << 63) | id;
            telemetry::serve(
                inner.clone(),
                sink,
                source,
                registration.session.clone(),
                source_id,
            )
            .await;
            inner.telemetry_sessions.fetch_sub(1, Ordering::Relaxed);
        }
        Endpoint::Stream => {
            stream::serve(
                inner.clone(),
                sink,
                source,
                registration.session.clone(),
                id,
            )
            .await;
        }
    }
    drop(registration);
}

pub(crate) fn close_message(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}
