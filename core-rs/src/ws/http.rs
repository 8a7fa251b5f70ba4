//! The HTTP side of a WebSocket connection: reading and routing the request head, refusing what is not an
//! upgrade of one of our routes with a proper status, and replaying an already-read head to the handshake.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};

pub const TELEMETRY_PATH: &str = "/ws/controller/telemetry";
pub const STREAM_PATH: &str = "/ws/datapoints/stream";
/// A request head larger than this is refused (uvicorn's limit is similar).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a client may take to send its request head (slowloris).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The WebSocket routes the engine serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Telemetry,
    Stream,
}

/// What the request head asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A WebSocket upgrade of one of our paths, with the `token` query parameter (decoded, trimmed).
    Upgrade {
        endpoint: Endpoint,
        token: String,
    },
    NotFound,
    /// A broken upgrade of one of our paths: status and text.
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
    let endpoint = match path {
        TELEMETRY_PATH => Endpoint::Telemetry,
        STREAM_PATH => Endpoint::Stream,
        _ => return Route::NotFound,
    };
    // A plain HTTP request to a WebSocket route is not found, as Starlette answers.
    if req.method != Some("GET") || !has_token("upgrade", "websocket") {
        return Route::NotFound;
    }
    if !has_token("connection", "upgrade") {
        return Route::Refused(400, "Bad Request");
    }
    if header("sec-websocket-version") != Some("13") {
        return Route::Refused(426, "Upgrade Required");
    }
    if header("sec-websocket-key").is_none_or(str::is_empty) {
        return Route::Refused(400, "Bad Request");
    }
    Route::Upgrade {
        endpoint,
        token: query_param(query, "token")
            .unwrap_or_default()
            .trim()
            .to_owned(),
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

/// Read a request head (bounded in size); None when the peer closes or sends too much.
pub async fn read_head<S: AsyncRead + Unpin>(io: &mut BufReader<S>) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    loop {
        let start = head.len();
        let n = (&mut *io)
            .take((MAX_HEAD_BYTES + 1 - head.len()) as u64)
            .read_until(b'\n', &mut head)
            .await
            .ok()?;
        if n == 0 || head.len() > MAX_HEAD_BYTES {
            return None;
        }
        if matches!(&head[start..], b"\r\n" | b"\n") && start > 0 {
            return Some(head);
        }
    }
}

/// Answer a refused request and close.
pub async fn respond<S: AsyncWrite + Unpin>(io: &mut S, status: u16, text: &str, extra: &str) {
    let body = format!("{text}\n");
    let response = format!(
        "HTTP/1.1 {status} {text}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = io.write_all(response.as_bytes()).await;
        let _ = io.shutdown().await;
    })
    .await;
}

/// A stream that first yields bytes already read from it (the request head), then reads on.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn upgrade(target: &str) -> Vec<u8> {
        format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .into_bytes()
    }

    fn telemetry(token: &str) -> Route {
        Route::Upgrade {
            endpoint: Endpoint::Telemetry,
            token: token.into(),
        }
    }

    #[test]
    fn upgrades_with_token() {
        assert_eq!(
            route(&upgrade("/ws/controller/telemetry?token=abc")),
            telemetry("abc")
        );
        assert_eq!(route(&upgrade("/ws/controller/telemetry")), telemetry(""));
        assert_eq!(
            route(&upgrade("/ws/controller/telemetry?token=%20a%2Eb+%09")),
            telemetry("a.b")
        );
        assert_eq!(
            route(&upgrade("/ws/controller/telemetry?x=1&token=a&token=b")),
            telemetry("b")
        );
        assert_eq!(
            route(&upgrade("/ws/datapoints/stream?token=t")),
            Route::Upgrade {
                endpoint: Endpoint::Stream,
                token: "t".into()
            }
        );
        // uvicorn hands sockets over with the head it rebuilt: lower-case header names.
        let head = String::from_utf8(upgrade("/ws/datapoints/stream?token=t")).unwrap();
        let (line, headers) = head.split_once("\r\n").unwrap();
        let lower = format!("{line}\r\n{}", headers.to_lowercase());
        assert!(matches!(
            route(lower.as_bytes()),
            Route::Upgrade {
                endpoint: Endpoint::Stream,
                ..
            }
        ));
    }

    #[test]
    fn other_paths_and_plain_requests_are_not_found() {
        for target in [
            "/",
            "/ws/controller/telemetry/",
            "/ws/controller/telemetryx",
            "/api/v1/events",
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
        assert_eq!(percent_decode("%FF"), "\u{fffd}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn heads_are_bounded() {
        let ok = upgrade("/ws/datapoints/stream");
        let mut r = BufReader::new(&ok[..]);
        assert_eq!(read_head(&mut r).await.as_deref(), Some(&ok[..]));
        let huge = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        let mut r = BufReader::new(huge.as_bytes());
        assert_eq!(read_head(&mut r).await, None);
        // A head that never ends with a blank line.
        let mut r = BufReader::new(&b"GET / HTTP/1.1\r\nHost: x\r\n"[..]);
        assert_eq!(read_head(&mut r).await, None);
        let endless = vec![b'a'; 4 * MAX_HEAD_BYTES];
        let mut r = BufReader::new(&endless[..]);
        assert_eq!(read_head(&mut r).await, None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn prefixed_replays_then_reads_on() {
        let mut p = Prefixed::new(b"head".to_vec(), &b"-rest"[..]);
        let mut out = String::new();
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "head-rest");
    }
}
