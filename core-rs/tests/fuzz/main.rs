//! Fuzzing of the core's input boundaries: frame parser, JWT check, WebSocket request handling, binary COPY
//! decoder, timestamp formatting, line-protocol parser. A structure-aware, mutation-based harness on the stable
//! toolchain.
//!
//! `make fuzz` runs the ignored test `fuzz` (FUZZ_CASES cases in total, default 1,000,000; FUZZ_SEED to replay a
//! run; FUZZ_TARGETS=name,prefix… to run some targets; FUZZ_THREADS). `cargo test` runs `fuzz_smoke`, a few
//! thousand cases from a fixed seed. Each target is split into shards with seeds derived from the run's seed, so
//! a run is reproducible whatever the thread count; failing inputs are saved (see the report) with the case.

mod harness;
mod targets;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use harness::{run, Counts, Failure};

/// A target's name, its share of the cases (per mille) and its runner.
type Runner = fn(&'static str, u64, u64, &Mutex<Vec<Failure>>) -> Counts;

const TARGETS: &[(&str, u64, Runner)] = &[
    ("frame.bytes", 175, run::<targets::frame::Bytes>),
    ("frame.structured", 150, run::<targets::frame::Structured>),
    ("frame.timestamp", 50, run::<targets::frame::Timestamp>),
    ("jwt.arbitrary", 75, run::<targets::jwt::Arbitrary>),
    ("jwt.mutated", 125, run::<targets::jwt::Mutated>),
    ("http.route", 100, run::<targets::http::RouteBytes>),
    ("http.structured", 100, run::<targets::http::Structured>),
    ("http.query_param", 50, run::<targets::http::QueryParam>),
    ("http.read_head", 40, run::<targets::http::ReadHead>),
    ("stream.reply", 25, run::<targets::http::Reply>),
    ("pgcopy.mutated", 60, run::<targets::pgcopy::Mutated>),
    ("pgcopy.roundtrip", 25, run::<targets::pgcopy::RoundTrip>),
    ("isoformat_utc", 25, run::<targets::time::Isoformat>),
    ("lineproto.mutated", 60, run::<targets::lineproto::Mutated>),
    (
        "lineproto.structured",
        40,
        run::<targets::lineproto::Structured>,
    ),
];

/// Shards per target: enough to keep every thread busy to the end, independent of the thread count.
const SHARDS: u64 = 8;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim().replace(['_', ','], "");
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Run the selected targets for `total` cases (at least) from `seed`; print the report; the failures.
fn fuzz_run(total: u64, seed: u64, only: Option<&str>, threads: usize) -> Vec<Failure> {
    let selected: Vec<_> = TARGETS
        .iter()
        .filter(|(name, ..)| {
            only.is_none_or(|o| {
                o.split(',')
                    .any(|p| !p.is_empty() && name.starts_with(p.trim()))
            })
        })
        .collect();
    assert!(!selected.is_empty(), "FUZZ_TARGETS matches no target");
    let weights: u64 = selected.iter().map(|t| t.1).sum();
    // (target index, shard, cases); a target's cases are split evenly over its shards, rounding up.
    let mut jobs = Vec::new();
    for (t, &(_, weight, _)) in selected.iter().enumerate() {
        let cases = (total * weight).div_ceil(weights).max(1);
        for shard in 0..SHARDS {
            let n = cases / SHARDS + u64::from(shard < cases % SHARDS);
            if n > 0 {
                jobs.push((t, shard, n));
            }
        }
    }
    let failures = Mutex::new(Vec::new());
    let results = Mutex::new(vec![Counts::default(); selected.len()]);
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let Some(&(t, shard, n)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                let (name, _, runner) = *selected[t];
                let shard_seed = harness::signature(&(seed, name, shard));
                let counts = runner(name, shard_seed, n, &failures);
                results.lock().unwrap()[t].add(&counts);
            });
        }
    });
    let elapsed = started.elapsed();
    let results = results.into_inner().unwrap();
    let mut sum = Counts::default();
    println!(
        "\nfuzz: seed {seed:#018x}, {} threads, {:.1} s",
        threads,
        elapsed.as_secs_f64()
    );
    println!(
        "  {:<18} {:>11} {:>7} {:>10} {:>10} {:>7} {:>12}",
        "target", "cases", "panics", "violations", "behaviours", "corpus", "cases/s"
    );
    // behaviours: distinct outcome signatures (per shard, summed); corpus: inputs kept for mutation.
    for (t, c) in results.iter().enumerate() {
        sum.add(c);
        println!(
            "  {:<18} {:>11} {:>7} {:>10} {:>10} {:>7} {:>12}",
            selected[t].0,
            thousands(c.cases),
            c.panics,
            c.violations,
            c.behaviours,
            c.corpus,
            thousands((c.cases as f64 / c.busy.as_secs_f64().max(1e-9)) as u64),
        );
    }
    println!(
        "  {:<18} {:>11} {:>7} {:>10}",
        "total",
        thousands(sum.cases),
        sum.panics,
        sum.violations
    );
    println!(
        "fuzz cases={} panics={} violations={} seconds={:.1} seed={seed:#x}",
        sum.cases,
        sum.panics,
        sum.violations,
        elapsed.as_secs_f64()
    );
    let failures = failures.into_inner().unwrap();
    for f in &failures {
        println!(
            "\n{} case {}: {} — {}\n  input: {} ({})",
            f.target,
            f.case,
            if f.panic {
                "PANIC"
            } else {
                "invariant violated"
            },
            f.message,
            f.input.display(),
            std::fs::read(&f.input)
                .map(|b| harness::escape(&b, 300))
                .unwrap_or_default()
        );
    }
    failures
}

/// The full run (`make fuzz`).
#[test]
#[ignore = "long: run by `make fuzz`"]
fn fuzz() {
    let total = env_u64("FUZZ_CASES").unwrap_or(1_000_000);
    let seed = env_u64("FUZZ_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        harness::signature(&(t.as_nanos(), std::process::id()))
    });
    let threads = env_u64("FUZZ_THREADS").map_or_else(
        || std::thread::available_parallelism().map_or(2, |n| n.get()),
        |n| n as usize,
    );
    let only = std::env::var("FUZZ_TARGETS").ok();
    let failures = fuzz_run(total, seed, only.as_deref(), threads);
    assert!(
        failures.is_empty(),
        "{} failing case(s); replay with FUZZ_SEED={seed:#x}",
        failures.len()
    );
}

/// A short pass over every target from a fixed seed, in the normal test run (about 0.2 s unoptimised).
#[test]
fn fuzz_smoke() {
    let failures = fuzz_run(6_000, 0x5eed, None, 2);
    assert!(failures.is_empty(), "{} failing case(s)", failures.len());
}

/// The runner itself: a panic and a violated invariant are each counted, their inputs saved, and reported.
#[test]
fn the_harness_reports_panics_and_violations() {
    struct Faulty;
    impl harness::Target for Faulty {
        type Input = u8;
        fn new(_: &mut harness::Rng) -> Self {
            Faulty
        }
        fn generate(&mut self, rng: &mut harness::Rng) -> u8 {
            rng.below(8) as u8
        }
        fn check(&mut self, &i: &u8) -> Result<u64, String> {
            match i {
                0 => panic!("boom"),
                1 => Err("bad".into()),
                _ => Ok(u64::from(i)),
            }
        }
        fn artifact(&i: &u8) -> Vec<u8> {
            vec![i]
        }
    }
    let failures = Mutex::new(Vec::new());
    let counts = run::<Faulty>("faulty", 1, 200, &failures);
    assert_eq!(counts.cases, 200);
    assert!(counts.panics > 0 && counts.violations > 0, "{counts:?}");
    assert_eq!(counts.behaviours, 6);
    let failures = failures.into_inner().unwrap();
    assert!(failures
        .iter()
        .any(|f| f.panic && f.message.starts_with("boom at ")));
    assert!(failures.iter().any(|f| !f.panic && f.message == "bad"));
    assert!(failures
        .iter()
        .all(|f| std::fs::read(&f.input).is_ok_and(|b| b.len() == 1)));
}
