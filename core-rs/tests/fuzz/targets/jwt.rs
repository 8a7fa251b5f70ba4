//! `auth::JwtKey::inspect` (and `verify`/`claims` on top of it): arbitrary strings never verify; tokens signed
//! here from generated headers and claims are judged as a model of pyjwt's rules says; and no mutation of a
//! signed token (bit flips, padding, truncation, spare bits, re-encoded segments…) verifies: only the original
//! canonical spelling does.

use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Sha256, Sha384, Sha512};
use webmacs_core::auth::{Claims, JwtKey};

use crate::harness::{signature, Rng, Target};

const ALGS: [&str; 3] = ["HS256", "HS384", "HS512"];
const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const NOW: f64 = 1_800_000_000.0;

fn mac(alg: &str, secret: &[u8], data: &[u8]) -> Vec<u8> {
    fn run<M: Mac + hmac::digest::KeyInit>(secret: &[u8], data: &[u8]) -> Vec<u8> {
        let mut m =
            <M as hmac::digest::KeyInit>::new_from_slice(secret).expect("HMAC takes any key");
        m.update(data);
        m.finalize().into_bytes().to_vec()
    }
    match alg {
        "HS384" => run::<Hmac<Sha384>>(secret, data),
        "HS512" => run::<Hmac<Sha512>>(secret, data),
        _ => run::<Hmac<Sha256>>(secret, data),
    }
}

fn sign(header: &str, claims: &str, alg: &str, secret: &str) -> String {
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let sig = URL_SAFE_NO_PAD.encode(mac(alg, secret.as_bytes(), signed.as_bytes()));
    format!("{signed}.{sig}")
}

fn secret(rng: &mut Rng) -> String {
    let n = rng.len(64);
    (0..n)
        .map(|_| match rng.below(10) {
            0 => rng.pick(&['é', '\0', '😀', ' ']),
            _ => char::from(b' ' + rng.below(95) as u8),
        })
        .collect()
}

fn now(rng: &mut Rng) -> f64 {
    match rng.below(20) {
        0 => rng.pick(&[
            0.0,
            -1.0,
            1e300,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.0,
        ]),
        _ => NOW + rng.range(-100, 100) as f64 + rng.below(1000) as f64 / 1000.0,
    }
}

/// Every answer is the same through the three entry points.
fn consistent(key: &JwtKey, token: &str, now_s: f64) -> Result<Option<(Claims, bool)>, String> {
    let inspected = key.inspect(token, now_s);
    let claims = key.claims(token, now_s);
    let user = key.verify(token, now_s);
    let want_claims = inspected.clone().filter(|c| c.1).map(|c| c.0);
    if claims != want_claims || user != want_claims.as_ref().map(|c| c.user_id) {
        return Err(format!(
            "{token:?}: inspect {inspected:?}, claims {claims:?}, verify {user:?} disagree"
        ));
    }
    Ok(inspected)
}

/// Strings that were never signed with the key: nothing verifies, nothing panics.
pub struct Arbitrary {
    key: JwtKey,
    alg: &'static str,
}

impl Target for Arbitrary {
    type Input = (String, f64);

    fn new(rng: &mut Rng) -> Self {
        let alg = rng.pick(&ALGS);
        Arbitrary {
            key: JwtKey::new(&secret(rng), alg).expect("a supported algorithm"),
            alg,
        }
    }

    fn generate(&mut self, rng: &mut Rng) -> Self::Input {
        let seg = |rng: &mut Rng, max: usize| -> String {
            let n = rng.len(max);
            (0..n).map(|_| char::from(rng.pick(B64))).collect()
        };
        let token = match rng.below(6) {
            0 => {
                let n = rng.len(256);
                String::from_utf8_lossy(&rng.bytes(n)).into_owned()
            }
            1 => {
                let parts = rng.below(6);
                (0..parts)
                    .map(|_| seg(rng, 100))
                    .collect::<Vec<_>>()
                    .join(".")
            }
            2 | 3 => {
                // A well-formed, plausible token with a signature that was not made with the key: a forgery.
                let header = format!(r#"{{"alg":"{}","typ":"JWT"}}"#, self.alg);
                let claims = format!(
                    r#"{{"sub":"{}","exp":{}}}"#,
                    rng.below(1000),
                    NOW as i64 + 60
                );
                let sig_len = match self.alg {
                    "HS384" => 64,
                    "HS512" => 86,
                    _ => 43,
                };
                let sig: String = match rng.below(3) {
                    0 => seg(rng, 100),
                    1 => (0..sig_len).map(|_| char::from(rng.pick(B64))).collect(),
                    // Signed with another key.
                    _ => {
                        let other = format!("{}x", secret(rng));
                        let t = sign(&header, &claims, self.alg, &other);
                        t.rsplit('.').next().unwrap_or_default().to_string()
                    }
                };
                format!(
                    "{}.{}.{sig}",
                    URL_SAFE_NO_PAD.encode(header),
                    URL_SAFE_NO_PAD.encode(claims)
                )
            }
            4 => {
                // alg "none" and empty signatures.
                let header = rng.pick(&[
                    r#"{"alg":"none"}"#,
                    r#"{"alg":"None"}"#,
                    r#"{}"#,
                    "[]",
                    "null",
                ]);
                let claims = format!(r#"{{"sub":"1","exp":{}}}"#, NOW as i64 + 60);
                format!(
                    "{}.{}.{}",
                    URL_SAFE_NO_PAD.encode(header),
                    URL_SAFE_NO_PAD.encode(claims),
                    rng.pick(&["", "AA", "x"])
                )
            }
            _ => {
                // Segments that decode to bytes which are not JSON, or not UTF-8.
                let n = rng.len(64);
                let parts: Vec<_> = (0..3)
                    .map(|_| URL_SAFE_NO_PAD.encode(rng.bytes(n)))
                    .collect();
                parts.join(".")
            }
        };
        (token, now(rng))
    }

    fn check(&mut self, (token, now_s): &Self::Input) -> Result<u64, String> {
        match consistent(&self.key, token, *now_s)? {
            None => Ok(signature(&(
                token.matches('.').count().min(4),
                token.len().min(100) / 10,
            ))),
            Some(c) => Err(format!(
                "{token:?} was never signed with the key, yet inspect gave {c:?}"
            )),
        }
    }

    fn artifact(input: &Self::Input) -> Vec<u8> {
        input.0.clone().into_bytes()
    }
}

/// A claim value in JSON and how pyjwt's rules read it.
#[derive(Debug, Clone)]
enum Claim {
    Absent,
    Number(String, f64),
    Other(String),
}

impl Claim {
    fn text(&self) -> Option<&str> {
        match self {
            Claim::Absent => None,
            Claim::Number(t, _) | Claim::Other(t) => Some(t),
        }
    }
}

fn number(rng: &mut Rng, near: f64) -> Claim {
    match rng.below(6) {
        0..=2 => {
            let v = (near as i64 + rng.range(-3, 3)).to_string();
            let f = v.parse().expect("integer");
            Claim::Number(v, f)
        }
        3 => {
            let v = near + rng.range(-3000, 3000) as f64 / 1000.0;
            Claim::Number(format!("{v:?}"), v)
        }
        4 => {
            let t = rng
                .pick(&[
                    "0",
                    "-1",
                    "1e308",
                    "-1e308",
                    "18446744073709551615",
                    "9223372036854775807",
                    "-9223372036854775808",
                    "1.8e9",
                    "5e-324",
                ])
                .to_string();
            let v = t.parse().expect("number");
            Claim::Number(t, v)
        }
        _ => Claim::Number("1e400".into(), f64::INFINITY),
    }
}

/// A generated token: its JSON texts, how it was signed, and the model's verdict.
#[derive(Debug, Clone)]
pub struct Case {
    key_secret: String,
    key_alg: &'static str,
    token: String,
    mutant: String,
    now: f64,
    want: Option<(Claims, bool)>,
}

/// Tokens signed here; the original judged by the model, every distinct mutation refused.
pub struct Mutated;

impl Mutated {
    fn token(
        rng: &mut Rng,
        key_secret: &str,
        key_alg: &'static str,
        now_s: f64,
    ) -> (String, Option<(Claims, bool)>) {
        let mut valid = true;
        // Header.
        let header_alg = match rng.below(10) {
            0 => rng
                .pick(&[
                    "\"none\"",
                    "\"hs256\"",
                    "256",
                    "null",
                    "\"RS256\"",
                    "\"HS256 \"",
                ])
                .to_string(),
            1 => format!("\"{}\"", rng.pick(&ALGS)),
            _ => format!("\"{key_alg}\""),
        };
        valid &= header_alg == format!("\"{key_alg}\"");
        let mut header_fields = vec![format!("\"alg\":{header_alg}")];
        if rng.one_in(10) {
            header_fields.clear();
            valid = false;
        }
        if rng.one_in(2) {
            header_fields.push("\"typ\":\"JWT\"".into());
        }
        if rng.one_in(4) {
            header_fields.push("\"kid\":\"k1\"".into());
        }
        rng_shuffle(rng, &mut header_fields);
        let header = if rng.one_in(40) {
            valid = false;
            rng.pick(&[
                "[\"alg\",\"HS256\"]",
                "\"HS256\"",
                "{\"alg\":",
                "{\"alg\":\"HS256\"}x",
            ])
            .to_string()
        } else {
            format!("{{{}}}", header_fields.join(rng.pick(&[",", ", ", ",\n"])))
        };

        // Claims.
        let sub_digits = 1 + rng.below(18);
        let (sub_text, user_id) = match rng.below(12) {
            0 => (Some("\"\"".to_string()), None),
            1 => (Some(format!("\"{}\"", "1".repeat(19))), None),
            2 => (Some("\"4x\"".into()), None),
            3 => (Some("42".into()), None),
            4 => (None, None),
            5 => (
                Some(
                    rng.pick(&["\"+1\"", "\"-1\"", "\"٤٢\"", "\" 1\"", "null"])
                        .to_string(),
                ),
                None,
            ),
            _ => {
                let d: String = (0..sub_digits)
                    .map(|_| char::from(b'0' + rng.below(10) as u8))
                    .collect();
                let id: i64 = d.parse().expect("≤ 18 digits fit");
                (Some(format!("\"{d}\"")), Some(id))
            }
        };
        valid &= user_id.is_some();
        let exp = match rng.below(12) {
            0 => Claim::Absent,
            1 => Claim::Other(rng.pick(&["\"soon\"", "null", "true", "[1]"]).to_string()),
            _ => number(rng, NOW + 60.0),
        };
        let nbf = match rng.below(6) {
            0 => number(rng, NOW),
            1 => Claim::Other("\"now\"".into()),
            _ => Claim::Absent,
        };
        let iat = match rng.below(4) {
            0 | 1 => number(rng, NOW),
            2 if rng.one_in(4) => Claim::Other("null".into()),
            _ => Claim::Absent,
        };
        let jti = match rng.below(8) {
            0 | 1 => None,
            2 => Some((rng.pick(&["7", "null", "[\"a\"]"]).to_string(), None)),
            3 => {
                let n = 250 + rng.below(10);
                let s = "j".repeat(n);
                Some((format!("\"{s}\""), (n <= 255).then_some(s)))
            }
            _ => {
                let s: String = (0..rng.len(40))
                    .map(|_| char::from(rng.pick(B64)))
                    .collect();
                Some((format!("\"{s}\""), Some(s)))
            }
        };
        let aud = rng.one_in(25);
        let mut fields = Vec::new();
        if let Some(t) = &sub_text {
            fields.push(format!("\"sub\":{t}"));
        }
        for (name, c) in [("exp", &exp), ("nbf", &nbf), ("iat", &iat)] {
            if let Some(t) = c.text() {
                fields.push(format!("\"{name}\":{t}"));
            }
        }
        if let Some((t, _)) = &jti {
            fields.push(format!("\"jti\":{t}"));
        }
        if aud {
            fields.push(format!("\"aud\":{}", rng.pick(&["\"x\"", "null", "[]"])));
        }
        if rng.one_in(2) {
            fields.push(format!("\"role\":\"{}\"", rng.pick(&["admin", "viewer"])));
        }
        rng_shuffle(rng, &mut fields);
        let claims_text = if rng.one_in(40) {
            valid = false;
            rng.pick(&["[\"sub\",\"1\"]", "1", "\"x\"", "{"])
                .to_string()
        } else {
            format!("{{{}}}", fields.join(rng.pick(&[",", ", ", " ,\t"])))
        };

        // pyjwt's rules, written out: exp required and a number; nbf/iat numbers if present; no aud; jti a
        // string of at most 255 bytes; every number finite JSON (1e400 does not parse).
        let numbers = [&exp, &nbf, &iat];
        if numbers
            .iter()
            .any(|c| matches!(c, Claim::Number(_, v) if !v.is_finite()))
        {
            valid = false;
        }
        let exp_v = match exp {
            Claim::Number(_, v) => Some(v),
            _ => None,
        };
        valid &= exp_v.is_some();
        valid &= !matches!(nbf, Claim::Other(_)) && !matches!(iat, Claim::Other(_));
        valid &= !aud;
        valid &= jti.as_ref().is_none_or(|j| j.1.is_some());

        // Signature: usually the key's algorithm and secret.
        let (sign_alg, sign_secret) = match rng.below(12) {
            0 => {
                valid = false;
                (key_alg, format!("{key_secret}-other"))
            }
            1 => {
                let a = rng.pick(&ALGS);
                valid &= a == key_alg;
                (a, key_secret.to_string())
            }
            _ => (key_alg, key_secret.to_string()),
        };
        let token = sign(&header, &claims_text, sign_alg, &sign_secret);
        let want = valid.then(|| {
            let exp = exp_v.expect("valid implies exp").trunc();
            let not_ahead = |c: &Claim| match c {
                Claim::Number(_, v) => {
                    v.trunc() <= now_s || v.trunc().partial_cmp(&now_s).is_none()
                }
                _ => true,
            };
            let current = exp > now_s && not_ahead(&nbf) && not_ahead(&iat);
            let claims = Claims {
                user_id: user_id.expect("valid implies sub"),
                jti: jti.and_then(|j| j.1),
                exp,
            };
            (claims, current)
        });
        (token, want)
    }
}

fn rng_shuffle<T>(rng: &mut Rng, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i + 1);
        v.swap(i, j);
    }
}

/// A different spelling of `token`, or a damaged one.
fn mutant(rng: &mut Rng, token: &str) -> String {
    let mut t = token.to_string();
    let segs: Vec<&str> = token.split('.').collect();
    match rng.below(13) {
        0 if !t.is_empty() => {
            // Flip a bit of one byte (kept ASCII, so the string stays a string).
            let mut b = t.into_bytes();
            let i = rng.below(b.len());
            b[i] ^= 1 << rng.below(7);
            t = String::from_utf8(b).expect("ASCII stays UTF-8");
        }
        1 => t.push_str(rng.pick(&["=", "==", ".", "\n", " ", "\0", "A", "%3D"])),
        2 => t.insert_str(0, rng.pick(&[" ", "Bearer ", "\t", "."])),
        3 if !t.is_empty() => t.truncate(rng.below(t.len())),
        4 => {
            // The spare bits of a segment's last character: same bytes, another text.
            let s = rng.below(3);
            let end: usize = segs[..=s].iter().map(|x| x.len()).sum::<usize>() + s;
            if let Some(&last) = t.as_bytes().get(end.wrapping_sub(1)) {
                if let Some(pos) = B64.iter().position(|&c| c == last) {
                    let twin = B64[pos ^ (1 + rng.below(3))];
                    t.replace_range(end - 1..end, &char::from(twin).to_string());
                }
            }
        }
        5 => {
            // The payload re-encoded: same claims, another JSON spelling, signature kept.
            if let Ok(bytes) = URL_SAFE_NO_PAD.decode(segs[1]) {
                let mut v = bytes;
                match rng.below(3) {
                    0 => v.insert(0, b' '),
                    1 => v.push(b'\n'),
                    _ => {
                        if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&v) {
                            v = serde_json::to_vec_pretty(&json).expect("a Value serialises");
                        }
                    }
                }
                t = format!("{}.{}.{}", segs[0], URL_SAFE_NO_PAD.encode(v), segs[2]);
            }
        }
        6 => {
            // Padding added to a segment, or another base64 alphabet.
            let s = rng.below(3);
            let mut parts: Vec<String> = segs.iter().map(|x| x.to_string()).collect();
            match rng.below(3) {
                0 => {
                    if let Ok(b) = URL_SAFE_NO_PAD.decode(&parts[s]) {
                        parts[s] = URL_SAFE.encode(b);
                    }
                }
                1 => {
                    if let Ok(b) = URL_SAFE_NO_PAD.decode(&parts[s]) {
                        parts[s] = STANDARD_NO_PAD.encode(b);
                    }
                }
                _ => parts[s].push_str("=="),
            }
            t = parts.join(".");
        }
        7 => t = format!("{}.{}.{}", segs[1], segs[0], segs[2]),
        8 => {
            let s = rng.below(3);
            t = format!("{token}.{}", segs[s]);
        }
        9 => t = format!("{}.{}", segs[0], segs[2]),
        10 if !t.is_empty() => {
            let i = rng.below(t.len());
            let c = t.as_bytes()[i];
            if c.is_ascii_alphabetic() {
                t.replace_range(i..=i, &char::from(c ^ 0x20).to_string());
            }
        }
        11 if !t.is_empty() => {
            t.remove(rng.below(t.len()));
        }
        _ => {
            let i = rng.below(t.len() + 1);
            t.insert(i, char::from(rng.pick(B64)));
        }
    }
    t
}

impl Target for Mutated {
    type Input = Case;

    fn new(_: &mut Rng) -> Self {
        Mutated
    }

    fn generate(&mut self, rng: &mut Rng) -> Case {
        let key_secret = secret(rng);
        let key_alg = rng.pick(&ALGS);
        let now_s = now(rng);
        let (token, want) = Mutated::token(rng, &key_secret, key_alg, now_s);
        let mutant = mutant(rng, &token);
        Case {
            key_secret,
            key_alg,
            token,
            mutant,
            now: now_s,
            want,
        }
    }

    fn check(&mut self, c: &Case) -> Result<u64, String> {
        let key = JwtKey::new(&c.key_secret, c.key_alg).map_err(|e| e.to_string())?;
        let got = consistent(&key, &c.token, c.now)?;
        if got != c.want {
            return Err(format!(
                "{:?} at {}: want {:?}, got {got:?}",
                c.token, c.now, c.want
            ));
        }
        if c.mutant != c.token {
            if let Some(m) = consistent(&key, &c.mutant, c.now)? {
                return Err(format!(
                    "mutant {:?} of {:?} was accepted: {m:?}",
                    c.mutant, c.token
                ));
            }
        }
        Ok(signature(&(got.map(|g| g.1), c.mutant == c.token)))
    }

    fn artifact(c: &Case) -> Vec<u8> {
        format!("{c:?}").into_bytes()
    }
}
