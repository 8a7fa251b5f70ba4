//! The fuzzing engine: a seeded generator, byte mutators, a corpus kept by novel behaviour, and a runner that
//! counts cases, catches panics and records invariant violations with the input that caused them.
//!
//! No coverage instrumentation (stable toolchain): a target reports a "behaviour signature" of each case (which
//! error, which reject reasons, which route…) and an input that shows a new one joins the corpus that later
//! mutations start from, so the search drifts towards inputs that reach different outcomes.

use std::cell::RefCell;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// wyrand: small, fast, good enough for test input (not for anything secret).
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "below(0)");
        ((u128::from(self.u64()) * n as u128) >> 64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        let span = (hi as i128 - lo as i128 + 1) as u128;
        (lo as i128 + ((u128::from(self.u64()) * span) >> 64) as i128) as i64
    }

    /// True once in `n` times.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    pub fn pick_ref<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u64() as u8).collect()
    }

    /// A length biased to small values, sometimes up to `max`.
    pub fn len(&mut self, max: usize) -> usize {
        match self.below(8) {
            0..=4 => self.below(max.min(8) + 1),
            5 | 6 => self.below(max.min(64) + 1),
            _ => self.below(max + 1),
        }
    }

    /// An f64 from several distributions: any bit pattern, small decimals, integers, extremes.
    pub fn f64(&mut self) -> f64 {
        match self.below(6) {
            0 => f64::from_bits(self.u64()),
            1 => (self.range(-1_000_000, 1_000_000) as f64) / 100.0,
            2 => self.range(i64::MIN, i64::MAX) as f64,
            3 => self.pick(&[
                0.0,
                -0.0,
                f64::MIN_POSITIVE,
                -f64::MIN_POSITIVE,
                5e-324,
                f64::MAX,
                f64::MIN,
                f64::EPSILON,
                9_007_199_254_740_993.0,
                1e300,
                -1e300,
                0.1,
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
            ]),
            4 => {
                let m = self.range(-999_999, 999_999) as f64;
                m * 10f64.powi(self.range(-320, 310) as i32)
            }
            _ => self.range(-10_000, 10_000) as f64,
        }
    }
}

/// Integers that tend to sit on boundaries.
pub const INTERESTING_I64: [i64; 20] = [
    0,
    1,
    -1,
    2,
    7,
    8,
    9,
    127,
    128,
    255,
    256,
    i16::MAX as i64,
    i16::MIN as i64,
    i32::MAX as i64,
    i32::MIN as i64,
    u32::MAX as i64,
    i64::MAX,
    i64::MIN,
    1 << 53,
    -(1 << 53),
];

/// Byte sequences that are not UTF-8 (or not allowed in it): overlong, surrogate, beyond U+10FFFF, lone
/// continuation and truncated sequences.
pub const INVALID_UTF8: [&[u8]; 7] = [
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\x80",
    b"\xff",
    b"\xe2\x82",
    b"\xf0\x9f\x98",
];

/// Apply 1..=`max_ops` random edits to `data` (libFuzzer's mutators, simplified): bit flips, random and
/// interesting bytes, insertions and deletions, copies of a range, dictionary words, splices with another
/// corpus entry, truncation, invalid UTF-8. The result is at most `max_len` bytes.
pub fn mutate(
    rng: &mut Rng,
    data: &mut Vec<u8>,
    dict: &[&[u8]],
    corpus: &[Vec<u8>],
    max_ops: usize,
    max_len: usize,
) {
    let ops = 1 + rng.below(max_ops.max(1));
    for _ in 0..ops {
        let len = data.len();
        match rng.below(13) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.u64() as u8;
            }
            2 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.pick(&[
                    0u8, 0xff, 0x7f, 0x80, b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b'.',
                    b'-', b'0', b'9', b'e', b'%', b'+', b'&', b'=', b'\r', b'\n', b' ', b'\t',
                ]);
            }
            3 => {
                let at = rng.below(len + 1);
                let n = rng.len(16);
                let ins = rng.bytes(n);
                data.splice(at..at, ins);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(32));
                data.drain(at..at + n);
            }
            5 if len > 0 => {
                // Copy a range elsewhere (repeats structure: more entries, more headers).
                let from = rng.below(len);
                let n = 1 + rng.below((len - from).min(256));
                let piece = data[from..from + n].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, piece);
            }
            6 | 7 if !dict.is_empty() => {
                let word = rng.pick(dict).to_vec();
                let at = rng.below(len + 1);
                if rng.one_in(2) || at == len {
                    data.splice(at..at, word);
                } else {
                    let end = (at + word.len()).min(len);
                    data.splice(at..end, word);
                }
            }
            8 if !corpus.is_empty() => {
                // Splice: a prefix of this input, a suffix of another.
                let other = rng.pick_ref(corpus);
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            9 if len > 0 => {
                let cut = rng.below(len);
                data.truncate(cut);
            }
            10 => {
                let at = rng.below(len + 1);
                let bad = rng.pick(&INVALID_UTF8).to_vec();
                data.splice(at..at, bad);
            }
            11 if len > 0 => {
                // Replace a run of digits with an interesting number.
                let start = rng.below(len);
                if let Some(off) = data[start..].iter().position(u8::is_ascii_digit) {
                    let s = start + off;
                    let e = s + data[s..].iter().take_while(|b| b.is_ascii_digit()).count();
                    let n = match rng.below(3) {
                        0 => rng.pick(&INTERESTING_I64).to_string(),
                        1 => format!("{:e}", rng.f64()),
                        _ => "9".repeat(1 + rng.below(400)),
                    };
                    data.splice(s..e, n.into_bytes());
                }
            }
            _ => {
                // Swap two bytes.
                if len > 1 {
                    let (a, b) = (rng.below(len), rng.below(len));
                    data.swap(a, b);
                }
            }
        }
    }
    data.truncate(max_len);
}

/// Inputs that showed a new behaviour, to mutate further (bounded; a full corpus replaces at random).
pub struct Corpus {
    pub items: Vec<Vec<u8>>,
    seen: HashSet<u64>,
    cap: usize,
}

impl Corpus {
    pub fn new(seeds: Vec<Vec<u8>>, cap: usize) -> Corpus {
        Corpus {
            items: seeds,
            seen: HashSet::new(),
            cap,
        }
    }

    /// Keep `input` if `signature` is new; true when kept.
    pub fn offer(&mut self, rng: &mut Rng, signature: u64, input: &[u8]) -> bool {
        if !self.seen.insert(signature) {
            return false;
        }
        if self.items.len() < self.cap {
            self.items.push(input.to_vec());
        } else {
            let i = rng.below(self.items.len());
            self.items[i] = input.to_vec();
        }
        true
    }

    /// A copy of a random entry (empty when there is none).
    pub fn sample(&self, rng: &mut Rng) -> Vec<u8> {
        if self.items.is_empty() {
            Vec::new()
        } else {
            rng.pick_ref(&self.items).clone()
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }
}

/// A behaviour signature from anything hashable (the standard hasher is deterministic with `new()`).
pub fn signature<T: Hash>(t: &T) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

/// One fuzz target: generates inputs, runs the code under test on them and checks the invariants.
pub trait Target {
    type Input;
    fn new(rng: &mut Rng) -> Self;
    fn generate(&mut self, rng: &mut Rng) -> Self::Input;
    /// Run the code under test: Ok(behaviour signature) or Err(the invariant that does not hold).
    fn check(&mut self, input: &Self::Input) -> Result<u64, String>;
    /// A case showed a new behaviour: keep its input for mutation (targets without a corpus ignore it).
    fn keep(&mut self, _rng: &mut Rng, _signature: u64, _input: &Self::Input) {}
    /// The input as bytes, saved when a case fails.
    fn artifact(input: &Self::Input) -> Vec<u8>;
    /// How many inputs the target keeps for mutation (reported).
    fn corpus_len(&self) -> usize {
        0
    }
}

/// A failing case: what went wrong, and where its input was saved.
#[derive(Debug)]
pub struct Failure {
    pub target: &'static str,
    pub case: u64,
    pub panic: bool,
    pub message: String,
    pub input: PathBuf,
}

/// What a run of one target (or one shard of it) counted.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub cases: u64,
    pub panics: u64,
    pub violations: u64,
    pub behaviours: u64,
    pub corpus: u64,
    pub busy: Duration,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.cases += o.cases;
        self.panics += o.panics;
        self.violations += o.violations;
        self.behaviours += o.behaviours;
        self.corpus += o.corpus;
        self.busy += o.busy;
    }
}

thread_local! {
    /// Set while a case runs: its panic message is recorded here instead of printed.
    static CAUGHT: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let inside = CAUGHT.with(|c| {
                let mut c = c.borrow_mut();
                match c.as_mut() {
                    Some(slot) => {
                        let msg = info
                            .payload()
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| info.payload().downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "(non-string panic payload)".into());
                        let at = info
                            .location()
                            .map(|l| format!(" at {}:{}", l.file(), l.line()))
                            .unwrap_or_default();
                        *slot = Some(format!("{msg}{at}"));
                        true
                    }
                    None => false,
                }
            });
            if !inside {
                default(info);
            }
        }));
    });
}

/// Where failing inputs are written.
pub fn artifact_dir() -> PathBuf {
    std::env::var_os("FUZZ_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures"))
}

/// Run `cases` cases of target `T` from `seed`; failures go to `failures` (the first few per target with
/// their input saved).
pub fn run<T: Target>(
    name: &'static str,
    seed: u64,
    cases: u64,
    failures: &Mutex<Vec<Failure>>,
) -> Counts {
    install_panic_hook();
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let mut target = T::new(&mut rng);
    let mut counts = Counts::default();
    let mut seen = HashSet::new();
    for case in 0..cases {
        let input = target.generate(&mut rng);
        CAUGHT.with(|c| *c.borrow_mut() = Some(None));
        let result = panic::catch_unwind(AssertUnwindSafe(|| target.check(&input)));
        let caught = CAUGHT.with(|c| c.borrow_mut().take()).flatten();
        counts.cases += 1;
        let failure = match result {
            Ok(Ok(sig)) => {
                if seen.insert(sig) {
                    counts.behaviours += 1;
                    target.keep(&mut rng, sig, &input);
                }
                None
            }
            Ok(Err(violation)) => {
                counts.violations += 1;
                Some((false, violation))
            }
            Err(_) => {
                counts.panics += 1;
                Some((true, caught.unwrap_or_else(|| "panic".into())))
            }
        };
        if let Some((panic, message)) = failure {
            let mut f = failures.lock().unwrap_or_else(|p| p.into_inner());
            if f.iter().filter(|x| x.target == name).count() < 5 {
                let dir = artifact_dir();
                let path = dir.join(format!("{name}-{seed:016x}-{case}.bin"));
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::write(&path, T::artifact(&input));
                f.push(Failure {
                    target: name,
                    case,
                    panic,
                    message,
                    input: path,
                });
            }
        }
    }
    counts.corpus = target.corpus_len() as u64;
    counts.busy = started.elapsed();
    counts
}

/// Printable form of bytes for reports (escaped, cut at `max` bytes).
pub fn escape(bytes: &[u8], max: usize) -> String {
    let mut s: String = bytes[..bytes.len().min(max)].escape_ascii().to_string();
    if bytes.len() > max {
        s.push_str(&format!("…(+{} bytes)", bytes.len() - max));
    }
    s
}
