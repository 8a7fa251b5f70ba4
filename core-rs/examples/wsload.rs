//! Load generator for `/ws/controller/telemetry`: N connections, frames with `seq`, a bounded number
//! unacknowledged per connection; prints acknowledged (= committed) frames per second and the time from
//! sending a frame to its ack (the ack is sent after the commit).
//!
//! A Python client of 100 connections tops out near the server's rate; this one is not the ceiling.
//! `--rate` paces the frames (in total over all connections) instead of sending as fast as acks allow.
//!
//! ```text
//! cargo run --release --example wsload -- 'ws://127.0.0.1:8001/ws/controller/telemetry?token=…' \
//!     --events id1,id2,… [--connections 100] [--seconds 15] [--window 4] [--points 1] [--rate FRAMES_PER_S]
//! ```
//! Last line: `wsload frames_per_s=N rows_per_s=N frames=N rows=N seconds=X connections=N window=N
//! p50_ms=X p99_ms=X max_ms=X`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{Barrier, Semaphore};
use tokio_tungstenite::tungstenite::Message;

struct Args {
    url: String,
    events: Vec<String>,
    connections: usize,
    seconds: f64,
    window: usize,
    points: usize,
    /// Frames per second over all connections; 0 = as fast as the window allows.
    rate: f64,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut args = Args {
        url: String::new(),
        events: Vec::new(),
        connections: 100,
        seconds: 15.0,
        window: 4,
        points: 1,
        rate: 0.0,
    };
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--events" => args.events = value("--events")?.split(',').map(str::to_owned).collect(),
            "--connections" => {
                args.connections = value(&a)?.parse().map_err(|e| format!("{a}: {e}"))?
            }
            "--seconds" => args.seconds = value(&a)?.parse().map_err(|e| format!("{a}: {e}"))?,
            "--window" => args.window = value(&a)?.parse().map_err(|e| format!("{a}: {e}"))?,
            "--points" => args.points = value(&a)?.parse().map_err(|e| format!("{a}: {e}"))?,
            "--rate" => args.rate = value(&a)?.parse().map_err(|e| format!("{a}: {e}"))?,
            url if url.starts_with("ws://") => args.url = url.to_owned(),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.url.is_empty() || args.events.is_empty() || args.window == 0 || args.points == 0 {
        return Err(
            "usage: wsload ws://host:port/path?token=… --events id,id,… [--connections N] \
                    [--seconds S] [--window W] [--points P] [--rate FRAMES_PER_S]"
                .into(),
        );
    }
    Ok(args)
}

#[derive(Default)]
struct Totals {
    frames: AtomicU64,
    rows: AtomicU64,
    /// Send → ack of every acknowledged frame, µs.
    latencies: std::sync::Mutex<Vec<u32>>,
}

async fn connection(
    n: usize,
    args: Arc<Args>,
    totals: Arc<Totals>,
    start: Arc<Barrier>,
) -> Result<(), String> {
    let rest = args.url.strip_prefix("ws://").ok_or("only ws:// URLs")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let tcp = TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect {authority}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (ws, _) = tokio_tungstenite::client_async(args.url.as_str(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sink, mut source) = ws.split();
    let free = Arc::new(Semaphore::new(args.window));
    let reader_free = free.clone();
    let reader_totals = totals.clone();
    // Acks come in frame order on one connection: the oldest send time is the one an ack answers.
    let sent_at = Arc::new(std::sync::Mutex::new(
        std::collections::VecDeque::<Instant>::new(),
    ));
    let reader_sent_at = sent_at.clone();
    let reader = tokio::spawn(async move {
        let mut latencies = Vec::new();
        while let Some(msg) = source.next().await {
            let text = match msg {
                Ok(Message::Text(t)) => t,
                Ok(Message::Close(c)) => {
                    // The answer to our own close at the end, or the server ending the session: either way
                    // hand over what was measured.
                    if let Ok(mut all) = reader_totals.latencies.lock() {
                        all.append(&mut latencies);
                    }
                    return Err(format!("closed by the server: {c:?}"));
                }
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            };
            let ack: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            if ack["type"] != "ack" {
                return Err(format!("unexpected message {text}"));
            }
            reader_totals.frames.fetch_add(1, Ordering::Relaxed);
            reader_totals
                .rows
                .fetch_add(ack["accepted"].as_u64().unwrap_or(0), Ordering::Relaxed);
            if let Some(t) = reader_sent_at
                .lock()
                .map_err(|e| e.to_string())?
                .pop_front()
            {
                latencies.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            reader_free.add_permits(1);
            if latencies.len() >= 4096 {
                let mut all = reader_totals.latencies.lock().map_err(|e| e.to_string())?;
                all.append(&mut latencies);
            }
        }
        if let Ok(mut all) = reader_totals.latencies.lock() {
            all.append(&mut latencies);
        }
        Ok(())
    });
    // Every connection is up before the clock starts.
    start.wait().await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    // Paced: this connection's share of the rate, offset so connections do not send in lockstep.
    let interval =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(args.connections as f64 / args.rate));
    let mut next_at = started
        + interval.map_or(Duration::ZERO, |i| {
            i.mul_f64(n as f64 / args.connections as f64)
        });
    let mut seq: u64 = 0;
    while Instant::now() < deadline {
        if let Some(i) = interval {
            tokio::time::sleep_until(next_at.into()).await;
            next_at += i;
        }
        let Ok(permit) = free.acquire().await else {
            break;
        };
        permit.forget();
        // Unpaced: send everything the window allows, then flush once.
        let mut burst = 1;
        while interval.is_none() {
            match free.try_acquire() {
                Ok(p) => {
                    p.forget();
                    burst += 1;
                }
                Err(_) => break,
            }
        }
        for _ in 0..burst {
            seq += 1;
            let points: Vec<String> = (0..args.points)
                .map(|i| {
                    let e = &args.events[(n + seq as usize + i) % args.events.len()];
                    format!(r#"{{"value":1.5,"event_public_id":"{e}"}}"#)
                })
                .collect();
            let frame = format!(r#"{{"seq":{seq},"datapoints":[{}]}}"#, points.join(","));
            sent_at
                .lock()
                .map_err(|e| e.to_string())?
                .push_back(Instant::now());
            sink.feed(Message::text(frame))
                .await
                .map_err(|e| e.to_string())?;
        }
        sink.flush().await.map_err(|e| e.to_string())?;
    }
    // Wait for the frames still in flight.
    let drained = tokio::time::timeout(
        Duration::from_secs(120),
        free.acquire_many(args.window as u32),
    )
    .await;
    if drained.is_err() {
        return Err("acks of the last frames did not arrive within 120 s".into());
    }
    let _ = sink.close().await;
    // The reader ends with the connection and hands over its latencies.
    let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let totals = Arc::new(Totals::default());
    let result = runtime.block_on(async {
        let start = Arc::new(Barrier::new(args.connections + 1));
        let tasks: Vec<_> = (0..args.connections)
            .map(|n| tokio::spawn(connection(n, args.clone(), totals.clone(), start.clone())))
            .collect();
        start.wait().await;
        let t0 = Instant::now();
        let mut first_error = None;
        for t in tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => first_error = first_error.or(Some(e)),
                Err(e) => first_error = first_error.or(Some(e.to_string())),
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(t0.elapsed().as_secs_f64()),
        }
    });
    let elapsed = match result {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wsload: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let frames = totals.frames.load(Ordering::Relaxed);
    let rows = totals.rows.load(Ordering::Relaxed);
    let mut lat = std::mem::take(&mut *totals.latencies.lock().unwrap_or_else(|p| p.into_inner()));
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |&us| us as f64 / 1000.0)
    };
    println!(
        "wsload frames_per_s={:.0} rows_per_s={:.0} frames={frames} rows={rows} seconds={elapsed:.2} connections={} window={} p50_ms={:.1} p99_ms={:.1} max_ms={:.1}",
        frames as f64 / elapsed,
        rows as f64 / elapsed,
        args.connections,
        args.window,
        pct(0.5),
        pct(0.99),
        lat.last().map_or(0.0, |&us| us as f64 / 1000.0),
    );
    std::process::ExitCode::SUCCESS
}
