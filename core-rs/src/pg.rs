//! PostgreSQL connections of the engine: connect with deadlines, and tell transient faults from bad data; the
//! binary COPY format's constants, shared by its encoder (`writer`) and decoders (`pgcopy`, `import`).
//!
//! Every connection the core opens (writers, catalog, LISTEN, fan-out, telemetry auth, exports, imports) comes
//! from `open` or `connect`, so session settings, timeouts and TLS (the DSN's `sslmode`, `sslrootcert`,
//! `sslcert`, `sslkey`, as libpq; see `tls`) live in one place. A `PgClient` owns the task that drives its
//! socket: dropping the client ends that task, so a connection abandoned after a timeout (a database that
//! stopped answering) does not linger with its socket.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Connection, Socket};

use crate::error::CoreError;
use crate::tls::{self, MakeRustls, RustlsStream};

/// How long a connection attempt may take (TCP, startup, authentication).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of short statements (catalog loads, credential lookups, latest values).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The 11-byte signature that opens every binary COPY stream.
pub const COPY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// µs from the Unix epoch to PostgreSQL's epoch (2000-01-01 00:00 UTC), the origin of `timestamptz`.
pub const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// A client and the task driving its connection; the task is aborted when the client is dropped.
pub struct PgClient {
    client: Client,
    driver: JoinHandle<()>,
}

impl std::ops::Deref for PgClient {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for PgClient {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

impl Drop for PgClient {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// A connection's socket half (drive it, or poll it for notifications).
pub type PgConnection = Connection<Socket, RustlsStream>;

/// Parse a DSN (libpq URL or key/value form) and set what every engine connection shares; the TLS options
/// become the connector (certificate files are read and checked here, so a bad one fails at start-up).
pub fn config(
    dsn: &str,
    application_name: &str,
) -> Result<(tokio_postgres::Config, MakeRustls), CoreError> {
    let (rest, settings) = tls::split(dsn)?;
    let mut config: tokio_postgres::Config = rest.parse()?;
    config.application_name(application_name);
    config.options("-c timezone=UTC");
    config.connect_timeout(CONNECT_TIMEOUT);
    // A dead peer (cable pulled, host gone) is noticed by the kernel; a peer that answers TCP but not
    // PostgreSQL (a stalled server, a partition behind a proxy) is caught by the callers' deadlines.
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    config.ssl_mode(settings.mode.negotiation());
    #[cfg(unix)]
    {
        // Unix-domain sockets carry no TLS; libpq ignores sslmode there, and so do we.
        let hosts = config.get_hosts();
        if !hosts.is_empty()
            && hosts
                .iter()
                .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)))
        {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
    }
    let connector = settings.connector()?;
    Ok((config, connector))
}

/// Check a DSN as `config` does (syntax, TLS options, certificate files) without connecting.
pub fn check(dsn: &str) -> Result<(), CoreError> {
    config(dsn, "webmacs-check").map(|_| ())
}

/// Open a connection with the deadline of `CONNECT_TIMEOUT`; the caller drives the returned socket half.
pub async fn open(dsn: &str, application_name: &str) -> Result<(Client, PgConnection), CoreError> {
    let (config, connector) = config(dsn, application_name)?;
    let connecting = config.connect(connector);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(CoreError::Database(
            "connecting to the database timed out".into(),
        )),
    }
}

/// Connect on the current runtime; the connection is driven by a task that lives as long as the client.
pub async fn connect(dsn: &str, application_name: &str) -> Result<PgClient, CoreError> {
    let (client, conn) = open(dsn, application_name).await?;
    let driver = tokio::spawn(async move {
        // Errors surface on the client's next call; the connection task just ends.
        let _ = conn.await;
    });
    Ok(PgClient { client, driver })
}

/// Run `fut` with a deadline; a timeout is reported like a lost connection (the caller reconnects).
pub async fn deadline<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, CoreError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(CoreError::Database(format!(
            "{what}: no answer from the database within {} s",
            limit.as_secs_f64()
        ))),
    }
}

/// What a failed statement means for the rows it carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The connection or the server failed (network, restart, disk full, overload, timeout): the same rows
    /// may succeed later, so they are retried.
    Transient(String),
    /// The unique key refused a row: a retry after a lost commit or a client resending its timestamps.
    Duplicate,
    /// The database refused the data itself (a range, a constraint, an encoding, a trigger): retrying the
    /// same rows cannot help. `sqlstate` is the five-character code.
    Data { sqlstate: String, message: String },
}

/// Classify a statement error by SQLSTATE class: 22 (data exception), 23 (integrity constraint, except the
/// unique key) and P0001 (raised by a trigger) are about the rows; everything else is about the server.
pub fn classify(e: &tokio_postgres::Error) -> Failure {
    let Some(db) = e.as_db_error() else {
        return Failure::Transient(crate::error::describe(e));
    };
    let code = db.code();
    if *code == SqlState::UNIQUE_VIOLATION {
        return Failure::Duplicate;
    }
    let sqlstate = code.code();
    if sqlstate.starts_with("22") || sqlstate.starts_with("23") || sqlstate == "P0001" {
        let mut message = db.message().to_owned();
        if let Some(detail) = db.detail() {
            message.push_str(": ");
            message.push_str(detail);
        }
        return Failure::Data {
            sqlstate: sqlstate.to_owned(),
            message,
        };
    }
    Failure::Transient(format!("{} ({sqlstate})", db.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_dsn_is_an_error() {
        assert!(config("not a dsn at all ===", "x").is_err());
        assert!(config("postgresql://u@127.0.0.1:1/db", "x").is_ok());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn refused_connection_fails_fast() {
        // Port 1 on loopback: nothing listens, the connect fails at once instead of waiting.
        let started = std::time::Instant::now();
        let r = connect("postgresql://u@127.0.0.1:1/db", "x").await;
        assert!(matches!(r, Err(CoreError::Database(_))));
        assert!(started.elapsed() < CONNECT_TIMEOUT);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn deadline_turns_a_hang_into_an_error() {
        let hang = std::future::pending::<Result<(), tokio_postgres::Error>>();
        let r = deadline(Duration::from_secs(3), "probe", hang).await;
        match r {
            Err(CoreError::Database(m)) => assert!(m.contains("within 3 s"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
