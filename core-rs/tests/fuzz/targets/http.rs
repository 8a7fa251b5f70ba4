//! The native listener's request handling: `ws::http::route` on arbitrary, mutated and generated request heads
//! (the generated ones against a model of the routing rules), `query_param` against an independent
//! percent-decoder, `read_head` over a reader that delivers the bytes in random pieces (against a model of the
//! head's end and size bound) with the `Prefixed` replay after it, and the stream's client `reply`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, BufReader, ReadBuf};
use webmacs_core::ws::http::{
    query_param, read_head, route, Endpoint, Prefixed, Route, MAX_HEAD_BYTES, STREAM_PATH,
    TELEMETRY_PATH,
};
use webmacs_core::ws::stream::reply;

use crate::harness::{mutate, signature, Corpus, Rng, Target, INVALID_UTF8};

fn upgrade_head(target: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

fn route_signature(r: &Route) -> u64 {
    match r {
        Route::Upgrade { endpoint, token } => signature(&(
            0,
            *endpoint == Endpoint::Telemetry,
            token.is_empty(),
            token.is_ascii(),
        )),
        Route::NotFound => signature(&1),
        Route::Refused(status, text) => signature(&(2, status, text)),
    }
}

/// What holds for any answer of `route`.
fn check_route(head: &[u8], r: &Route) -> Result<(), String> {
    match r {
        Route::Upgrade { token, .. } => {
            if token.trim() != token {
                return Err(format!("token {token:?} is not trimmed"));
            }
            let start = head
                .iter()
                .position(|b| !b"\r\n".contains(b))
                .unwrap_or(head.len());
            if !head[start..].starts_with(b"GET ") {
                return Err("an upgrade of a request that is not a GET".into());
            }
        }
        Route::Refused(400, "Bad Request")
        | Route::Refused(426, "Upgrade Required")
        | Route::NotFound => {}
        Route::Refused(status, text) => return Err(format!("unexpected refusal {status} {text}")),
    }
    // A complete head is answered the same whatever follows it (a client that did not wait for 101).
    if *r != Route::Refused(400, "Bad Request") {
        let mut longer = head.to_vec();
        longer.extend_from_slice(
            b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        );
        let again = route(&longer);
        if again != *r {
            return Err(format!(
                "bytes after the head changed the route: {r:?} → {again:?}"
            ));
        }
    }
    Ok(())
}

const HTTP_DICT: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b": ",
    b" ",
    b"\t",
    b"GET ",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"Upgrade: websocket\r\n",
    b"Connection: Upgrade\r\n",
    b"Sec-WebSocket-Version: 13\r\n",
    b"Sec-WebSocket-Key: x\r\n",
    b"/ws/controller/telemetry",
    b"/ws/datapoints/stream",
    b"?token=",
    b"&token=",
    b"%",
    b"%2",
    b"%zz",
    b"%00",
    b"%ff",
    b"+",
    b"=",
    b"&",
    b",",
    b"\0",
    b"\x7f",
    b"websocket, ",
    b"upgrade,",
];

/// Arbitrary and mutated request heads: invariants only.
pub struct RouteBytes {
    corpus: Corpus,
}

impl Target for RouteBytes {
    type Input = Vec<u8>;

    fn new(_: &mut Rng) -> Self {
        let seeds = vec![
            upgrade_head("/ws/controller/telemetry?token=abc"),
            upgrade_head("/ws/datapoints/stream?x=1&token=%20a%2Eb+%09&token=c"),
            upgrade_head("/ws/controller/telemetry"),
            upgrade_head("/api/v1/events"),
            "GET /ws/controller/telemetry HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            upgrade_head("/ws/datapoints/stream")
                .to_lowercase()
                .replacen("get", "GET", 1),
            upgrade_head("/ws/datapoints/stream").replace("\r\n", "\n"),
        ];
        RouteBytes {
            corpus: Corpus::new(seeds.into_iter().map(String::into_bytes).collect(), 1024),
        }
    }

    fn generate(&mut self, rng: &mut Rng) -> Vec<u8> {
        if rng.one_in(20) {
            let n = rng.len(300);
            return rng.bytes(n);
        }
        let mut b = self.corpus.sample(rng);
        mutate(
            rng,
            &mut b,
            HTTP_DICT,
            &self.corpus.items,
            5,
            2 * MAX_HEAD_BYTES,
        );
        b
    }

    fn check(&mut self, head: &Vec<u8>) -> Result<u64, String> {
        let r = route(head);
        check_route(head, &r)?;
        Ok(route_signature(&r))
    }

    fn keep(&mut self, rng: &mut Rng, sig: u64, input: &Vec<u8>) {
        self.corpus.offer(rng, sig, input);
    }

    fn artifact(input: &Vec<u8>) -> Vec<u8> {
        input.clone()
    }

    fn corpus_len(&self) -> usize {
        self.corpus.len()
    }
}

/// A random string for tokens and parameter names: URL-special characters, Unicode, whitespace.
fn token_text(rng: &mut Rng) -> String {
    let n = rng.len(40);
    (0..n)
        .map(|_| match rng.below(8) {
            0 => rng.pick(&['&', '=', '+', '%', '#', '?', '/', '.', ' ', '\t', '~']),
            1 => rng.pick(&['é', '中', '😀', '\u{a0}', '\u{7f}', '\0', '\n', '\u{2028}']),
            2 => char::from(b'0' + rng.below(10) as u8),
            3 => char::from(rng.pick(b"-_")),
            _ => char::from(b'a' + rng.below(26) as u8),
        })
        .collect()
}

/// `s` percent-encoded for a request target: each byte raw where the URL grammar allows it, else `%XX` (in
/// either case), spaces sometimes as `+`.
fn encode(rng: &mut Rng, s: &str) -> String {
    let mut out = String::new();
    for &b in s.as_bytes() {
        let raw_ok = b.is_ascii_alphanumeric() || b"-._~!$'()*,;:@/".contains(&b);
        if b == b' ' && rng.one_in(2) {
            out.push('+');
        } else if raw_ok && !rng.one_in(6) {
            out.push(char::from(b));
        } else if rng.one_in(2) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

/// The routing rules (spec §7), written out: our two paths only; a GET whose `Upgrade` lists `websocket`
/// (else 404 as Starlette says); then `Connection` must list `upgrade` (400), the version be 13 (426) and a
/// key be present (400). A header is its first occurrence; the token is the last `token` parameter, trimmed.
#[derive(Debug, Clone)]
pub struct HeadCase {
    head: Vec<u8>,
    want: Route,
}

pub struct Structured;

impl Target for Structured {
    type Input = HeadCase;

    fn new(_: &mut Rng) -> Self {
        Structured
    }

    fn generate(&mut self, rng: &mut Rng) -> HeadCase {
        let method = rng.pick(&["GET", "GET", "GET", "POST", "get", "HEAD", "OPTIONS"]);
        let (path, endpoint) = match rng.below(8) {
            0..=2 => (TELEMETRY_PATH.to_string(), Some(Endpoint::Telemetry)),
            3..=5 => (STREAM_PATH.to_string(), Some(Endpoint::Stream)),
            _ => (
                rng.pick(&[
                    "/",
                    "/ws/controller/telemetry/",
                    "/ws/datapoints/streamx",
                    "/WS/datapoints/stream",
                    "/ws/controller/telemetry%2F",
                ])
                .to_string(),
                None,
            ),
        };
        // Query: some parameters, some of them `token` (under any spelling that decodes to it).
        let mut params = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..rng.below(5) {
            if rng.one_in(2) {
                let value = token_text(rng);
                let name = match rng.below(4) {
                    0 => "tok%65n".to_string(),
                    1 => "%74oken".to_string(),
                    _ => "token".to_string(),
                };
                if rng.one_in(8) {
                    params.push(name);
                    token = Some(String::new());
                } else {
                    params.push(format!("{name}={}", encode(rng, &value)));
                    token = Some(value);
                }
            } else {
                let mut name = token_text(rng);
                if name == "token" {
                    name.push('x');
                }
                let value = token_text(rng);
                params.push(format!("{}={}", encode(rng, &name), encode(rng, &value)));
            }
        }
        let target = if params.is_empty() && rng.one_in(2) {
            path.clone()
        } else {
            format!("{path}?{}", params.join("&"))
        };
        let version = rng.pick(&["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]);

        // Headers: each of the four that matter present or not, with values that pass or fail.
        let case = |rng: &mut Rng, name: &str| -> String {
            match rng.below(4) {
                0 => name.to_lowercase(),
                1 => name.to_uppercase(),
                _ => name.to_string(),
            }
        };
        let ows = |rng: &mut Rng| rng.pick(&["", " ", "  ", "\t"]);
        // First occurrences (shuffled below) and later duplicates (after them all: they do not count).
        let mut headers: Vec<String> = Vec::new();
        let mut duplicates: Vec<String> = Vec::new();
        let mut first = |name: &str,
                         values: &[(&str, bool)],
                         rng: &mut Rng,
                         headers: &mut Vec<String>|
         -> Option<bool> {
            if rng.one_in(8) {
                return None;
            }
            let (v, ok) = rng.pick(values);
            let (a, b) = (ows(rng), ows(rng));
            headers.push(format!("{}:{a}{v}{b}", case(rng, name)));
            if rng.one_in(10) {
                duplicates.push(format!("{name}: {}", rng.pick(values).0));
            }
            Some(ok)
        };
        let upgrade = first(
            "Upgrade",
            &[
                ("websocket", true),
                ("WebSocket", true),
                ("h2c, websocket", true),
                ("websocket ,x", true),
                ("websockets", false),
                ("", false),
                ("web socket", false),
            ],
            rng,
            &mut headers,
        );
        let connection = first(
            "Connection",
            &[
                ("Upgrade", true),
                ("keep-alive, upgrade", true),
                ("UPGRADE,close", true),
                ("close", false),
                ("upgrades", false),
                ("", false),
            ],
            rng,
            &mut headers,
        );
        let version_ok = first(
            "Sec-WebSocket-Version",
            &[
                ("13", true),
                ("8", false),
                ("13, 8", false),
                ("", false),
                ("013", false),
            ],
            rng,
            &mut headers,
        );
        let key_ok = first(
            "Sec-WebSocket-Key",
            &[("dGhlIHNhbXBsZSBub25jZQ==", true), ("x", true), ("", false)],
            rng,
            &mut headers,
        );
        for _ in 0..rng.below(4) {
            let name = rng.pick(&[
                "Host",
                "Origin",
                "X-Forwarded-For",
                "Sec-WebSocket-Protocol",
                "Cookie",
            ]);
            let value = token_text(rng);
            headers.push(format!("{name}: {}", encode(rng, &value)));
        }
        // More headers than the parser's 64 slots: refused as a bad request.
        if rng.one_in(30) {
            for i in 0..rng.range(60, 70) {
                headers.push(format!("X-Filler-{i}: {i}"));
            }
        }
        for i in (1..headers.len()).rev() {
            let j = rng.below(i + 1);
            headers.swap(i, j);
        }
        headers.extend(duplicates);
        let eol = rng.pick(&["\r\n", "\r\n", "\n"]);
        let mut head = format!("{method} {target} {version}{eol}");
        for h in &headers {
            head.push_str(h);
            head.push_str(eol);
        }
        head.push_str(eol);

        let total_headers = headers.len();
        let want = if total_headers > 64 {
            Route::Refused(400, "Bad Request")
        } else {
            match endpoint {
                None => Route::NotFound,
                Some(_) if method != "GET" || upgrade != Some(true) => Route::NotFound,
                Some(_) if connection != Some(true) => Route::Refused(400, "Bad Request"),
                Some(_) if version_ok != Some(true) => Route::Refused(426, "Upgrade Required"),
                Some(_) if key_ok != Some(true) => Route::Refused(400, "Bad Request"),
                Some(endpoint) => Route::Upgrade {
                    endpoint,
                    token: token.unwrap_or_default().trim().to_string(),
                },
            }
        };
        HeadCase {
            head: head.into_bytes(),
            want,
        }
    }

    fn check(&mut self, c: &HeadCase) -> Result<u64, String> {
        let got = route(&c.head);
        check_route(&c.head, &got)?;
        if got != c.want {
            return Err(format!("want {:?}, got {got:?}", c.want));
        }
        Ok(route_signature(&got))
    }

    fn artifact(c: &HeadCase) -> Vec<u8> {
        c.head.clone()
    }
}

/// The reference decoding of one query component: `+` is a space, `%` and two hex digits a byte, anything
/// else itself; the bytes read as UTF-8 with replacement characters.
fn decode_model(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let escape = b[i..]
            .get(1..3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
        if let (b'%', Some(hex)) = (b[i], escape) {
            let hex = std::str::from_utf8(hex).expect("hex digits are ASCII");
            out.push(u8::from_str_radix(hex, 16).expect("two hex digits"));
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `query_param` on any query string and name, against `decode_model`.
pub struct QueryParam;

impl Target for QueryParam {
    type Input = (String, String);

    fn new(_: &mut Rng) -> Self {
        QueryParam
    }

    fn generate(&mut self, rng: &mut Rng) -> Self::Input {
        let name = if rng.one_in(3) {
            token_text(rng)
        } else {
            "token".to_string()
        };
        let mut parts = Vec::new();
        for _ in 0..rng.len(6) {
            let part = match rng.below(5) {
                0 => {
                    // Raw bytes of the query, including broken escapes at the very end.
                    let n = rng.len(20);
                    let b: Vec<u8> = (0..n).map(|_| rng.pick(b"%+&=aF09zZ\xc3\xa9 ")).collect();
                    String::from_utf8_lossy(&b).into_owned()
                }
                1 => {
                    let value = token_text(rng);
                    format!("{}={}", encode(rng, &name), encode(rng, &value))
                }
                2 => encode(rng, &name),
                _ => {
                    let (k, v) = (token_text(rng), token_text(rng));
                    format!("{}={}", encode(rng, &k), encode(rng, &v))
                }
            };
            parts.push(part);
        }
        let mut q = parts.join("&");
        if rng.one_in(4) {
            q.push_str(rng.pick(&["%", "%2", "%g", "&", "=", "%%", "%2%41"]));
        }
        (q, name)
    }

    fn check(&mut self, (q, name): &Self::Input) -> Result<u64, String> {
        let got = query_param(q, name);
        let want = q
            .split('&')
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (decode_model(k) == *name).then(|| decode_model(v))
            })
            .next_back();
        if got != want {
            return Err(format!(
                "query_param({q:?}, {name:?}) = {got:?}, want {want:?}"
            ));
        }
        Ok(signature(&(
            got.is_some(),
            got.as_ref().is_some_and(|v| v.contains('\u{fffd}')),
        )))
    }

    fn artifact(input: &Self::Input) -> Vec<u8> {
        format!("{}\n{}", input.1, input.0).into_bytes()
    }
}

/// A reader that hands out its bytes in pieces of random size, sometimes saying "not yet" first (and waking
/// itself), then ends.
struct Trickle {
    data: Vec<u8>,
    at: usize,
    rng: Rng,
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.rng.one_in(8) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let left = self.data.len() - self.at;
        let n = left.min(buf.remaining()).min(1 + self.rng.len(4096));
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

/// The end of the head by the rule: lines end at `\n`; the first empty line (`\r\n` or `\n`) that is not the
/// very first line ends the head; a head longer than `MAX_HEAD_BYTES`, or input that ends first, gives None.
fn head_model(data: &[u8]) -> Option<usize> {
    let mut start = 0;
    while start < data.len() {
        let end = data[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|p| start + p + 1)?;
        let line = &data[start..end];
        if end > MAX_HEAD_BYTES {
            return None;
        }
        if start > 0 && (line == b"\r\n" || line == b"\n") {
            return Some(end);
        }
        start = end;
    }
    None
}

#[derive(Debug)]
pub struct HeadInput {
    data: Vec<u8>,
    reader_seed: u64,
}

/// `read_head` over `Trickle`, then the listener's replay of what was read (head and buffer) before the rest.
pub struct ReadHead {
    runtime: tokio::runtime::Runtime,
}

impl Target for ReadHead {
    type Input = HeadInput;

    fn new(_: &mut Rng) -> Self {
        ReadHead {
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a current-thread runtime"),
        }
    }

    fn generate(&mut self, rng: &mut Rng) -> HeadInput {
        let mut data = match rng.below(4) {
            0 => {
                let mut d = upgrade_head("/ws/controller/telemetry?token=t").into_bytes();
                mutate(rng, &mut d, HTTP_DICT, &[], 4, 4 * MAX_HEAD_BYTES);
                d
            }
            1 => {
                // A head whose blank line falls just inside or just outside the size bound.
                let line = b"GET / HTTP/1.1\r\nX: ";
                let eol: &[u8] = if rng.one_in(2) { b"\r\n\r\n" } else { b"\n\n" };
                let target = (MAX_HEAD_BYTES as i64 + rng.range(-3, 3)) as usize;
                let fill = target.saturating_sub(line.len() + eol.len());
                let mut d = line.to_vec();
                d.extend(std::iter::repeat_n(b'a', fill));
                d.extend_from_slice(eol);
                d
            }
            2 => {
                // Lines of every kind: empty first lines, bare LF, CR alone, long lines.
                let mut d = Vec::new();
                for _ in 0..rng.len(40) {
                    match rng.below(6) {
                        0 => d.extend_from_slice(b"\r\n"),
                        1 => d.extend_from_slice(b"\n"),
                        2 => d.extend_from_slice(b"\r"),
                        3 => d.extend(std::iter::repeat_n(b'x', rng.len(9000))),
                        4 => d.extend_from_slice(rng.pick(&INVALID_UTF8)),
                        _ => d.extend_from_slice(b"Header: value\r\n"),
                    }
                }
                d
            }
            _ => {
                let n = rng.len(600);
                rng.bytes(n)
            }
        };
        if rng.one_in(2) {
            // What a client sends after its head without waiting for 101: a masked WebSocket frame.
            data.extend_from_slice(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58");
        }
        HeadInput {
            data,
            reader_seed: rng.u64(),
        }
    }

    fn check(&mut self, input: &HeadInput) -> Result<u64, String> {
        let want = head_model(&input.data);
        let trickle = Trickle {
            data: input.data.clone(),
            at: 0,
            rng: Rng::new(input.reader_seed),
        };
        let data = &input.data;
        self.runtime.block_on(async move {
            let mut io = BufReader::new(trickle);
            let head = read_head(&mut io).await;
            match (&head, want) {
                (None, None) => return Ok(signature(&0)),
                (Some(h), Some(n)) if h[..] == data[..n] => {}
                _ => {
                    return Err(format!(
                        "read_head gave {:?}, the rule says {want:?}",
                        head.as_ref().map(Vec::len)
                    ))
                }
            }
            let head = head.expect("matched Some");
            let r = route(&head);
            check_route(&head, &r)?;
            // The listener's replay: the head, what the BufReader holds beyond it, then the socket.
            let mut replay = head.clone();
            replay.extend_from_slice(io.buffer());
            let mut rest = Vec::new();
            Prefixed::new(replay, io.into_inner())
                .read_to_end(&mut rest)
                .await
                .map_err(|e| e.to_string())?;
            if rest != *data {
                return Err(format!(
                    "the replay gave {} bytes, not the {} sent",
                    rest.len(),
                    data.len()
                ));
            }
            Ok(signature(&(1, route_signature(&r))))
        })
    }

    fn artifact(input: &HeadInput) -> Vec<u8> {
        input.data.clone()
    }
}

/// `ws::stream::reply`: a ping object gets a pong, any other object nothing, anything else is an error.
pub struct Reply {
    corpus: Corpus,
}

impl Target for Reply {
    type Input = Vec<u8>;

    fn new(_: &mut Rng) -> Self {
        let seeds = [
            &br#"{"type":"ping"}"#[..],
            br#"{"type":"pong","x":[1,{"type":"ping"}]}"#,
            br#"{"type":"ping","type":"x"}"#,
            b"[\"ping\"]",
            b"\"ping\"",
        ];
        Reply {
            corpus: Corpus::new(seeds.iter().map(|s| s.to_vec()).collect(), 256),
        }
    }

    fn generate(&mut self, rng: &mut Rng) -> Vec<u8> {
        let mut b = self.corpus.sample(rng);
        mutate(
            rng,
            &mut b,
            &[b"\"type\"", b"\"ping\"", b"{", b"}", b"NaN", b"\\u0070"],
            &self.corpus.items,
            4,
            4096,
        );
        b
    }

    fn check(&mut self, raw: &Vec<u8>) -> Result<u64, String> {
        let got = reply(raw);
        let want = match serde_json::from_slice::<serde_json::Value>(raw) {
            Ok(serde_json::Value::Object(o)) => {
                Ok((o.get("type") == Some(&"ping".into())).then_some(()))
            }
            _ => Err(()),
        };
        if got.map(|r| r.map(|_| ())) != want {
            return Err(format!("reply gave {got:?}, want {want:?}"));
        }
        if let Ok(Some(pong)) = got {
            if pong != r#"{"type":"pong"}"# {
                return Err(format!("pong is {pong:?}"));
            }
        }
        Ok(signature(&format!("{want:?}")))
    }

    fn keep(&mut self, rng: &mut Rng, sig: u64, input: &Vec<u8>) {
        self.corpus.offer(rng, sig, input);
    }

    fn artifact(input: &Vec<u8>) -> Vec<u8> {
        input.clone()
    }

    fn corpus_len(&self) -> usize {
        self.corpus.len()
    }
}
