//! Credentials of the native listener (spec §3.1, §3.3, §7): HS256 JWT verification and `wm_` token hashes.
//!
//! The one JWT check of the product (HTTP through `webmacs.security`, WebSockets here): the header's `alg`
//! must be the configured one, the signature must match, `exp` must be in the future, `nbf`/`iat` not ahead
//! of the clock, no `aud`, and `sub` a string of at most 18 ASCII digits (pyjwt's rules with
//! `require=["exp","sub"]`). Each segment must be canonical unpadded base64url: a token with `=` appended or
//! other spare bits set decodes to the same bytes, and would otherwise be a second spelling of a revoked token.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::error::CoreError;

/// Prefix of API tokens; anything else is a JWT.
pub const API_TOKEN_PREFIX: &str = "wm_";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    HS256,
    HS384,
    HS512,
}

impl Algorithm {
    pub fn parse(name: &str) -> Result<Algorithm, CoreError> {
        match name {
            "HS256" => Ok(Algorithm::HS256),
            "HS384" => Ok(Algorithm::HS384),
            "HS512" => Ok(Algorithm::HS512),
            other => Err(CoreError::Config(format!(
                "JWT algorithm {other:?} is not supported by the native listener (HS256, HS384, HS512)"
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Algorithm::HS256 => "HS256",
            Algorithm::HS384 => "HS384",
            Algorithm::HS512 => "HS512",
        }
    }
}

/// The key and algorithm JWTs are verified with.
#[derive(Clone)]
pub struct JwtKey {
    secret: Vec<u8>,
    alg: Algorithm,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

fn mac_ok<M: Mac + hmac::digest::KeyInit>(secret: &[u8], signed: &[u8], sig: &[u8]) -> bool {
    match <M as hmac::digest::KeyInit>::new_from_slice(secret) {
        Ok(mut mac) => {
            mac.update(signed);
            // Constant-time comparison.
            mac.verify_slice(sig).is_ok()
        }
        Err(_) => false,
    }
}

fn int_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, ()> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or(()),
        Some(_) => Err(()),
    }
}

/// What a verified token says. Authorisation uses the user's current role from the database, not a claim.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    pub user_id: i64,
    /// The token's id: what logout revokes (tokens issued without one are revoked by their exact text).
    pub jti: Option<String>,
    /// Expiry, Unix seconds.
    pub exp: f64,
}

impl JwtKey {
    pub fn new(secret: &str, algorithm: &str) -> Result<JwtKey, CoreError> {
        Ok(JwtKey {
            secret: secret.as_bytes().to_vec(),
            alg: Algorithm::parse(algorithm)?,
        })
    }

    /// The user id (`sub`) of a valid token at `now_s` (Unix seconds), or None for anything forged, expired,
    /// malformed, non-canonical or signed with another algorithm.
    pub fn verify(&self, token: &str, now_s: f64) -> Option<i64> {
        self.claims(token, now_s).map(|c| c.user_id)
    }

    /// The claims of a valid token at `now_s`, or None (see `verify`).
    pub fn claims(&self, token: &str, now_s: f64) -> Option<Claims> {
        match self.inspect(token, now_s)? {
            (claims, true) => Some(claims),
            (_, false) => None,
        }
    }

    /// The claims of a genuine token (our signature, canonical, well-formed) and whether it is valid at
    /// `now_s` (`exp`, `nbf`, `iat`); None for anything else. HTTP checks revocation before expiry (spec §3.1),
    /// so it needs the `jti` of an expired token too.
    pub fn inspect(&self, token: &str, now_s: f64) -> Option<(Claims, bool)> {
        let mut parts = token.split('.');
        let (h, p, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).ok()?).ok()?;
        if header.get("alg").and_then(Value::as_str) != Some(self.alg.name()) {
            return None;
        }
        let sig = URL_SAFE_NO_PAD.decode(s).ok()?;
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
        let ok = match self.alg {
            Algorithm::HS256 => mac_ok::<Hmac<Sha256>>(&self.secret, signed, &sig),
            Algorithm::HS384 => mac_ok::<Hmac<Sha384>>(&self.secret, signed, &sig),
            Algorithm::HS512 => mac_ok::<Hmac<Sha512>>(&self.secret, signed, &sig),
        };
        if !ok {
            return None;
        }
        let claims = match serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).ok()?).ok()? {
            Value::Object(m) => m,
            _ => return None,
        };
        let exp = int_claim(&claims, "exp").ok()??;
        let mut current = exp.trunc() > now_s;
        for name in ["nbf", "iat"] {
            if int_claim(&claims, name)
                .ok()?
                .is_some_and(|t| t.trunc() > now_s)
            {
                current = false;
            }
        }
        // pyjwt: an `aud` claim needs an expected audience (none is configured); `jti` must be a string.
        if claims.contains_key("aud") || claims.get("jti").is_some_and(|j| !j.is_string()) {
            return None;
        }
        let sub = claims.get("sub")?.as_str()?;
        if sub.is_empty() || sub.len() > 18 || !sub.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let jti = match claims.get("jti") {
            Some(Value::String(j)) if j.len() <= 255 => Some(j.clone()),
            Some(_) => return None,
            None => None,
        };
        let claims = Claims {
            user_id: sub.parse().ok()?,
            jti,
            exp: exp.trunc(),
        };
        Some((claims, current))
    }
}

/// `sha256_hex(token)`, the key of `api_tokens.token_hash`.
pub fn hash_api_token(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const SECRET: &str = "test-secret-key-that-is-long-enough-0123456789";
    const NOW: f64 = 1_800_000_000.0;

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    /// Sign like pyjwt does (tests only).
    pub fn sign(header: &Value, claims: &Value, secret: &str) -> String {
        let signed = format!("{}.{}", b64(header), b64(claims));
        let mut mac =
            <Hmac<Sha256> as hmac::digest::KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(signed.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signed}.{sig}")
    }

    fn hs256() -> Value {
        serde_json::json!({"alg": "HS256", "typ": "JWT"})
    }

    fn key() -> JwtKey {
        JwtKey::new(SECRET, "HS256").unwrap()
    }

    #[test]
    fn valid_token_gives_the_user_id() {
        let claims = serde_json::json!({"sub": "42", "exp": NOW as i64 + 60, "iat": NOW as i64,
            "role": "admin", "jti": "x"});
        assert_eq!(
            key().verify(&sign(&hs256(), &claims, SECRET), NOW),
            Some(42)
        );
    }

    #[test]
    fn pyjwt_token_verifies() {
        // jwt.encode({"sub": "1", "exp": 4102444800}, "secret", algorithm="HS256")
        let t = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxIiwiZXhwIjo0MTAyNDQ0ODAwfQ.\
                 p2YIuOmWEZe6HSvFHRiNAq2mGm7cdD4I3XoHFSplP7U";
        let k = JwtKey::new("secret", "HS256").unwrap();
        assert_eq!(k.verify(t, NOW), Some(1));
        assert_eq!(JwtKey::new("secreT", "HS256").unwrap().verify(t, NOW), None);
    }

    #[test]
    fn wrong_key_is_refused() {
        let claims = serde_json::json!({"sub": "42", "exp": NOW as i64 + 60});
        assert_eq!(
            key().verify(&sign(&hs256(), &claims, "another key"), NOW),
            None
        );
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let claims = serde_json::json!({"sub": "42", "exp": NOW as i64 + 60});
        let none = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg": "none"})),
            b64(&claims)
        );
        assert_eq!(key().verify(&none, NOW), None);
        // Signed correctly, but the header names another algorithm than the configured one.
        let t = sign(&serde_json::json!({"alg": "HS512"}), &claims, SECRET);
        assert_eq!(key().verify(&t, NOW), None);
        assert!(JwtKey::new(SECRET, "RS256").is_err());
    }

    #[test]
    fn expired_and_not_yet_valid_tokens_are_refused() {
        let exp = |e: i64| serde_json::json!({"sub": "42", "exp": e});
        assert_eq!(
            key().verify(&sign(&hs256(), &exp(NOW as i64 - 1), SECRET), NOW),
            None
        );
        assert_eq!(
            key().verify(&sign(&hs256(), &exp(NOW as i64), SECRET), NOW),
            None
        );
        let nbf = serde_json::json!({"sub": "42", "exp": NOW as i64 + 60, "nbf": NOW as i64 + 30});
        assert_eq!(key().verify(&sign(&hs256(), &nbf, SECRET), NOW), None);
        let iat = serde_json::json!({"sub": "42", "exp": NOW as i64 + 60, "iat": NOW as i64 + 30});
        assert_eq!(key().verify(&sign(&hs256(), &iat, SECRET), NOW), None);
    }

    #[test]
    fn malformed_tokens_and_claims_are_refused() {
        for t in ["", "garbage", "a.b", "a.b.c", "a.b.c.d", "...", "é.é.é"] {
            assert_eq!(key().verify(t, NOW), None, "{t:?}");
        }
        let bad_claims = [
            serde_json::json!({"exp": NOW as i64 + 60}),
            serde_json::json!({"sub": "42"}),
            serde_json::json!({"sub": 42, "exp": NOW as i64 + 60}),
            serde_json::json!({"sub": "4x", "exp": NOW as i64 + 60}),
            serde_json::json!({"sub": "", "exp": NOW as i64 + 60}),
            serde_json::json!({"sub": "1234567890123456789", "exp": NOW as i64 + 60}),
            serde_json::json!({"sub": "42", "exp": "soon"}),
            serde_json::json!({"sub": "42", "exp": NOW as i64 + 60, "aud": "x"}),
            serde_json::json!({"sub": "42", "exp": NOW as i64 + 60, "jti": 7}),
            serde_json::json!(["sub", "42"]),
        ];
        for c in bad_claims {
            assert_eq!(key().verify(&sign(&hs256(), &c, SECRET), NOW), None, "{c}");
        }
    }

    #[test]
    fn non_canonical_spellings_are_refused() {
        let claims = serde_json::json!({"sub": "42", "exp": NOW as i64 + 60, "jti": "abc"});
        let t = sign(&hs256(), &claims, SECRET);
        assert_eq!(
            key().claims(&t, NOW),
            Some(Claims {
                user_id: 42,
                jti: Some("abc".into()),
                exp: NOW + 60.0
            })
        );
        // Padding appended to the signature (the logout bypass) or to any other segment.
        assert_eq!(key().verify(&format!("{t}="), NOW), None);
        assert_eq!(key().verify(&format!("{t}=="), NOW), None);
        let (h, rest) = t.split_once('.').unwrap();
        assert_eq!(key().verify(&format!("{h}=.{rest}"), NOW), None);
        // The last character of the 43-character signature carries 2 spare bits: flip one and the bytes are
        // the same, the text is not.
        let last = t.chars().last().unwrap();
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let pos = alphabet.find(last).unwrap();
        let twin = alphabet.chars().nth(pos ^ 1).unwrap();
        let respelled = format!("{}{twin}", &t[..t.len() - 1]);
        assert_ne!(respelled, t);
        assert_eq!(key().verify(&respelled, NOW), None);
        // Whitespace and other characters around or inside.
        for bad in [format!(" {t}"), format!("{t}\n"), t.replacen('.', "..", 1)] {
            assert_eq!(key().verify(&bad, NOW), None, "{bad:?}");
        }
    }

    #[test]
    fn api_token_hash_is_sha256_hex() {
        assert_eq!(
            hash_api_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
