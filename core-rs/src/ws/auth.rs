//! Who is on a WebSocket, and whether they still may be: credential checks at the upgrade (spec §3.1, §7)
//! and a periodic re-check of every open session, so that logout, a deleted API token, a deleted user, a
//! role change or expiry end the session within `recheck_interval` (close 1008).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use crate::auth::{self, JwtKey, API_TOKEN_PREFIX};
use crate::error::CoreError;
use crate::pg::{self, PgClient};

/// A lookup on the credentials connection (boxed: the closures that make them borrow the client).
type Lookup<'c, T> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>,
>;

/// Why a connection was refused or ended; the text is the close reason of spec §7.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Required,
    InvalidJwt,
    Revoked,
    InvalidApiToken,
    ApiTokenExpired,
    UserNotFound,
    /// The user's role changed since the session began (not in the spec: sessions there never end).
    RoleChanged,
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
            AuthFailure::RoleChanged => "Role changed",
        }
    }
}

/// The credential a session was opened with.
#[derive(Debug, Clone, PartialEq)]
pub enum Credential {
    /// A JWT: revoked by its `jti`, or by its exact text (blacklist rows written before revocation by `jti`,
    /// tokens issued without one). Only canonical spellings verify, so the text has no second form.
    Jwt {
        jti: Option<String>,
        text: String,
        exp: f64,
    },
    ApiToken {
        id: i32,
    },
}

/// An authenticated session's identity.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub user_id: i64,
    pub role: String,
    pub credential: Credential,
    /// An ingest-only device token (`api_tokens.scope = 'write'`): no live stream.
    pub write_only: bool,
    /// The plugin instance a device token is bound to: only its events may be fed.
    pub instance: Option<i32>,
}

/// One open session, as the re-check sees it; `ended` fires once with the reason.
#[derive(Debug)]
pub struct Session {
    pub identity: Identity,
    pub ended: Notify,
    reason: Mutex<Option<AuthFailure>>,
}

impl Session {
    /// Why the session was ended (after `ended` fired).
    pub fn reason(&self) -> Option<AuthFailure> {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn end(&self, why: AuthFailure) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(why);
            // notify_one keeps a permit: the session sees it even if it is not waiting right now.
            self.ended.notify_one();
        }
    }
}

/// Removes the session from the registry when the connection ends.
pub struct Registration {
    sessions: Arc<Mutex<HashMap<u64, Arc<Session>>>>,
    id: u64,
    pub session: Arc<Session>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Looks credentials up in the database and keeps the register of open sessions.
pub struct Authenticator {
    jwt: JwtKey,
    dsn: String,
    /// One connection: connecting is rare and the lookups are short, so a pool would buy nothing.
    client: tokio::sync::Mutex<Option<PgClient>>,
    sessions: Arc<Mutex<HashMap<u64, Arc<Session>>>>,
    next_id: AtomicU64,
    pub revoked: AtomicU64,
}

impl Authenticator {
    pub fn new(jwt: JwtKey, dsn: &str) -> Authenticator {
        Authenticator {
            jwt,
            dsn: dsn.to_owned(),
            client: tokio::sync::Mutex::new(None),
            sessions: Arc::default(),
            next_id: AtomicU64::new(1),
            revoked: AtomicU64::new(0),
        }
    }

    /// Run `f` on the lookup connection with a deadline, reconnecting once if the connection was lost.
    async fn with_client<T, F>(&self, f: F) -> Result<T, CoreError>
    where
        F: for<'c> Fn(&'c PgClient) -> Lookup<'c, T>,
    {
        let limit = pg::CONNECT_TIMEOUT + pg::QUERY_TIMEOUT;
        let mut guard = tokio::time::timeout(limit, self.client.lock())
            .await
            .map_err(|_| CoreError::Database("credential lookups are stalled".into()))?;
        for attempt in 0..2 {
            if guard.as_ref().is_none_or(|c| c.is_closed()) {
                *guard = Some(pg::connect(&self.dsn, "webmacs-ws-auth").await?);
            }
            // Set just above when missing.
            let client = guard.as_ref().expect("connected above");
            match pg::deadline(pg::QUERY_TIMEOUT, "credential lookup", f(client)).await {
                Ok(r) => return Ok(r),
                Err(e) => {
                    let closed = client.is_closed();
                    *guard = None;
                    // A database restart since the last lookup is the usual cause: retry on a fresh connection.
                    if attempt == 1 || !closed {
                        return Err(e);
                    }
                }
            }
        }
        Err(CoreError::Database("credential lookup failed".into()))
    }

    /// The identity behind `token`, or why it is refused; Err when the database could not answer.
    pub async fn authenticate(
        &self,
        token: &str,
    ) -> Result<Result<Identity, AuthFailure>, CoreError> {
        if token.is_empty() {
            return Ok(Err(AuthFailure::Required));
        }
        if token.starts_with(API_TOKEN_PREFIX) {
            let hash = auth::hash_api_token(token);
            return self
                .with_client(move |c| {
                    let hash = hash.clone();
                    Box::pin(async move { lookup_api_token(c, &hash).await })
                })
                .await;
        }
        // WebSockets decode the JWT before consulting the blacklist (spec §7).
        let Some(claims) = self.jwt.claims(token, now_s()) else {
            return Ok(Err(AuthFailure::InvalidJwt));
        };
        let credential = Credential::Jwt {
            jti: claims.jti,
            text: token.to_owned(),
            exp: claims.exp,
        };
        let user_id = claims.user_id;
        self.with_client(move |c| {
            let credential = credential.clone();
            Box::pin(async move { lookup_jwt(c, &credential, user_id).await })
        })
        .await
    }

    /// Register an open session for the periodic re-check.
    pub fn register(&self, identity: Identity) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session {
            identity,
            ended: Notify::new(),
            reason: Mutex::new(None),
        });
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, session.clone());
        Registration {
            sessions: self.sessions.clone(),
            id,
            session,
        }
    }

    pub fn open_sessions(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Re-check every open session against the database (three queries for all of them) and end those whose
    /// credential no longer holds. When the database cannot answer, sessions are left alone.
    pub async fn recheck(&self) -> Result<usize, CoreError> {
        let sessions: Vec<Arc<Session>> = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        if sessions.is_empty() {
            return Ok(0);
        }
        let now = now_s();
        let (mut jtis, mut texts, mut token_ids, mut user_ids) = (vec![], vec![], vec![], vec![]);
        for s in &sessions {
            user_ids.push(s.identity.user_id);
            match &s.identity.credential {
                Credential::Jwt { jti, text, .. } => {
                    jtis.extend(jti.clone());
                    texts.push(text.clone());
                }
                Credential::ApiToken { id } => token_ids.push(*id),
            }
        }
        let (revoked, tokens, users) = self
            .with_client(move |c| {
                let (jtis, texts, token_ids, user_ids) = (
                    jtis.clone(),
                    texts.clone(),
                    token_ids.clone(),
                    user_ids.clone(),
                );
                Box::pin(async move {
                    let revoked: HashSet<String> = c
                        .query(
                            "SELECT coalesce(jti, token) FROM blacklist_tokens
                         WHERE jti = ANY($1::text[]) OR token = ANY($2::text[])",
                            &[&jtis, &texts],
                        )
                        .await?
                        .iter()
                        .filter_map(|r| r.try_get::<_, Option<String>>(0).ok().flatten())
                        .collect();
                    let mut tokens: HashMap<i32, bool> = HashMap::new();
                    for r in c
                    .query(
                        "SELECT id, expires_at IS NOT NULL AND expires_at <= now() FROM api_tokens
                         WHERE id = ANY($1::int4[])",
                        &[&token_ids],
                    )
                    .await?
                {
                    tokens.insert(r.try_get(0)?, r.try_get(1)?);
                }
                    let mut users: HashMap<i64, String> = HashMap::new();
                    for r in c
                        .query(
                            "SELECT id::int8, role FROM users WHERE id = ANY($1::int8[])",
                            &[&user_ids],
                        )
                        .await?
                    {
                        users.insert(r.try_get(0)?, r.try_get(1)?);
                    }
                    Ok((revoked, tokens, users))
                })
            })
            .await?;
        let mut ended = 0;
        for s in sessions {
            let id = &s.identity;
            let why = match &id.credential {
                Credential::Jwt { exp, .. } if *exp <= now => Some(AuthFailure::InvalidJwt),
                Credential::Jwt { jti, text, .. }
                    if revoked.contains(text)
                        || jti.as_ref().is_some_and(|j| revoked.contains(j)) =>
                {
                    Some(AuthFailure::Revoked)
                }
                Credential::ApiToken { id } => match tokens.get(id) {
                    None => Some(AuthFailure::InvalidApiToken),
                    Some(true) => Some(AuthFailure::ApiTokenExpired),
                    Some(false) => None,
                },
                Credential::Jwt { .. } => None,
            };
            let why = why.or(match users.get(&id.user_id) {
                None => Some(AuthFailure::UserNotFound),
                Some(role) if *role != id.role => Some(AuthFailure::RoleChanged),
                Some(_) => None,
            });
            if let Some(why) = why {
                s.end(why);
                ended += 1;
            }
        }
        self.revoked.fetch_add(ended as u64, Ordering::Relaxed);
        Ok(ended)
    }

    /// Re-check every `interval` until `stop` fires.
    pub async fn recheck_loop(self: Arc<Self>, interval: Duration, stop: Arc<Notify>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => { let _ = self.recheck().await; }
                _ = stop.notified() => return,
            }
        }
    }
}

async fn lookup_jwt(
    c: &PgClient,
    credential: &Credential,
    user_id: i64,
) -> Result<Result<Identity, AuthFailure>, tokio_postgres::Error> {
    let (jti, text) = match credential {
        Credential::Jwt { jti, text, .. } => (jti.as_deref(), Some(text.as_str())),
        Credential::ApiToken { .. } => (None, None),
    };
    let row = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM blacklist_tokens WHERE jti = $1 OR token = $2),
                    (SELECT role FROM users WHERE id = $3::int8)",
            &[&jti, &text, &user_id],
        )
        .await?;
    Ok(if row.try_get::<_, bool>(0)? {
        Err(AuthFailure::Revoked)
    } else {
        match row.try_get::<_, Option<String>>(1)? {
            None => Err(AuthFailure::UserNotFound),
            Some(role) => Ok(Identity {
                user_id,
                role,
                credential: credential.clone(),
                write_only: false,
                instance: None,
            }),
        }
    })
}

pub(crate) async fn lookup_api_token(
    c: &PgClient,
    hash: &str,
) -> Result<Result<Identity, AuthFailure>, tokio_postgres::Error> {
    let row = c
        .query_opt(
            "SELECT t.id, t.expires_at IS NOT NULL AND t.expires_at <= now(), u.id::int8, u.role,
                    t.scope = 'write', t.plugin_instance_id
             FROM api_tokens t LEFT JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1",
            &[&hash],
        )
        .await?;
    let Some(row) = row else {
        return Ok(Err(AuthFailure::InvalidApiToken));
    };
    if row.try_get::<_, bool>(1)? {
        return Ok(Err(AuthFailure::ApiTokenExpired));
    }
    let (Some(user_id), Some(role)) = (
        row.try_get::<_, Option<i64>>(2)?,
        row.try_get::<_, Option<String>>(3)?,
    ) else {
        return Ok(Err(AuthFailure::UserNotFound));
    };
    let token_id: i32 = row.try_get(0)?;
    // Concurrent uses of one token skip the update instead of queueing behind the row lock (as the API does).
    c.execute(
        "UPDATE api_tokens SET last_used_at = now()
         WHERE id = (SELECT id FROM api_tokens WHERE id = $1 FOR UPDATE SKIP LOCKED)",
        &[&token_id],
    )
    .await?;
    Ok(Ok(Identity {
        user_id,
        role,
        credential: Credential::ApiToken { id: token_id },
        write_only: row.try_get(4)?,
        instance: row.try_get(5)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(cred: Credential) -> Session {
        Session {
            identity: Identity {
                user_id: 1,
                role: "admin".into(),
                credential: cred,
                write_only: false,
                instance: None,
            },
            ended: Notify::new(),
            reason: Mutex::new(None),
        }
    }

    #[test]
    fn a_session_ends_once_with_the_first_reason() {
        let s = session(Credential::ApiToken { id: 1 });
        assert_eq!(s.reason(), None);
        s.end(AuthFailure::InvalidApiToken);
        s.end(AuthFailure::UserNotFound);
        assert_eq!(s.reason(), Some(AuthFailure::InvalidApiToken));
    }

    #[test]
    fn registrations_leave_with_their_connection() {
        let a = Authenticator::new(
            JwtKey::new("k", "HS256").unwrap(),
            "postgresql://x@127.0.0.1:1/x",
        );
        let r1 = a.register(session(Credential::ApiToken { id: 1 }).identity);
        let r2 = a.register(session(Credential::ApiToken { id: 2 }).identity);
        assert_eq!(a.open_sessions(), 2);
        drop(r1);
        assert_eq!(a.open_sessions(), 1);
        drop(r2);
        assert_eq!(a.open_sessions(), 0);
    }

    #[test]
    fn reasons_are_the_specs() {
        assert_eq!(AuthFailure::Revoked.reason(), "Token has been revoked");
        assert_eq!(AuthFailure::InvalidJwt.reason(), "Invalid or expired token");
    }
}
