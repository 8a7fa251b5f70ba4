//! TLS for the core's PostgreSQL connections: the libpq `sslmode`/`sslrootcert`/`sslcert`/`sslkey` options,
//! taken out of a DSN, and a rustls connector for tokio-postgres that enforces them.
//!
//! tokio-postgres itself knows only `disable`/`prefer`/`require` and no certificate files, so `split` removes
//! the TLS options from the DSN (URL or key/value form) before tokio-postgres parses the rest, and
//! `Settings::connector` builds the rustls configuration that does what libpq does with them:
//! - `disable`: plain TCP; `prefer` (libpq's default): TLS when the server offers it, no certificate check;
//! - `require`: TLS, no certificate check — unless `sslrootcert` is given, then like `verify-ca` (as libpq);
//! - `verify-ca`: the server's chain must lead to a root in `sslrootcert`; `verify-full`: and the certificate
//!   must name the host. Without `sslrootcert`, `~/.postgresql/root.crt` when it exists, else the system's
//!   roots (`sslrootcert=system` asks for those explicitly).
//! - `sslcert` + `sslkey`: a client certificate (for `hostssl … cert` in `pg_hba.conf`); by default
//!   `~/.postgresql/postgresql.crt` and `.key` when both exist.
//!
//! The `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT` and `PGSSLKEY` environment variables apply when the DSN
//! does not set the option, as in libpq. Unix-domain sockets never use TLS (libpq ignores `sslmode` there).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;

use crate::error::CoreError;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, CoreError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            // libpq's "allow" tries plain first, then TLS; plain-or-TLS without checks is what it grants.
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(CoreError::Config(format!(
                    "sslmode {other:?}: expected disable, allow, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }

    /// What tokio-postgres is told: whether to ask for TLS and whether a refusal is fatal.
    pub fn negotiation(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }
}

/// The TLS options of one DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub mode: SslMode,
    pub root_cert: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Split a DSN into the part tokio-postgres parses and the TLS settings (DSN, then environment, as libpq).
pub fn split(dsn: &str) -> Result<(String, Settings), CoreError> {
    let (rest, mut found) = if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        split_url(dsn)?
    } else {
        split_key_values(dsn)?
    };
    let mut take = |key: &str, env: &str| {
        let i = TLS_KEYS
            .iter()
            .position(|k| *k == key)
            .expect("key from TLS_KEYS");
        found[i]
            .take()
            .or_else(|| std::env::var(env).ok().filter(|v| !v.is_empty()))
    };
    let mode = match take("sslmode", "PGSSLMODE") {
        Some(m) => SslMode::parse(&m)?,
        None => SslMode::Prefer,
    };
    let settings = Settings {
        mode,
        root_cert: take("sslrootcert", "PGSSLROOTCERT"),
        cert: take("sslcert", "PGSSLCERT"),
        key: take("sslkey", "PGSSLKEY"),
    };
    Ok((rest, settings))
}

type Found = [Option<String>; 4];

fn split_url(dsn: &str) -> Result<(String, Found), CoreError> {
    let mut found: Found = Default::default();
    let Some((base, query)) = dsn.split_once('?') else {
        return Ok((dsn.to_owned(), found));
    };
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key)?;
        match TLS_KEYS.iter().position(|k| *k == key) {
            Some(i) => found[i] = Some(percent_decode(value)?),
            None => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, found))
}

fn percent_decode(s: &str) -> Result<String, CoreError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    CoreError::Config("invalid percent-encoding in the database URL".into())
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| CoreError::Config("database URL option is not UTF-8".into()))
}

/// libpq key/value form: `key = value` pairs, values optionally single-quoted with backslash escapes.
fn split_key_values(dsn: &str) -> Result<(String, Found), CoreError> {
    let mut found: Found = Default::default();
    let mut kept: Vec<&str> = Vec::new();
    let s = dsn.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && s[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= s.len() {
            break;
        }
        let start = i;
        while i < s.len() && s[i] != b'=' && !s[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &dsn[start..i];
        skip_ws(&mut i);
        if s.get(i) != Some(&b'=') {
            // Not ours to judge: tokio-postgres reports the malformed DSN.
            return Ok((dsn.to_owned(), found));
        }
        i += 1;
        skip_ws(&mut i);
        let mut value = Vec::new();
        if s.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match s.get(i) {
                    None => return Ok((dsn.to_owned(), found)),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < s.len() => {
                        value.push(s[i + 1]);
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < s.len() && !s[i].is_ascii_whitespace() {
                if s[i] == b'\\' && i + 1 < s.len() {
                    i += 1;
                }
                value.push(s[i]);
                i += 1;
            }
        }
        match TLS_KEYS.iter().position(|k| *k == key) {
            Some(k) => {
                found[k] = Some(
                    String::from_utf8(value)
                        .map_err(|_| CoreError::Config(format!("{key} is not UTF-8")))?,
                )
            }
            None => kept.push(&dsn[start..i]),
        }
    }
    Ok((kept.join(" "), found))
}

fn home_file(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".postgresql").join(name);
    path.is_file().then_some(path)
}

fn read(path: &str, what: &str) -> Result<Vec<u8>, CoreError> {
    std::fs::read(path).map_err(|e| CoreError::Config(format!("cannot read {what} {path:?}: {e}")))
}

fn pem_certs(path: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, CoreError> {
    let pem = read(path, what)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CoreError::Config(format!("{what} {path:?} is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(CoreError::Config(format!(
            "{what} {path:?} holds no certificate"
        )));
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Settings {
    /// Build the connector: read and check the certificate files now, so a wrong path or a bad file is a
    /// configuration error at start-up, not a failure of some later reconnect.
    pub fn connector(&self) -> Result<MakeRustls, CoreError> {
        if self.mode == SslMode::Disable {
            return Ok(MakeRustls { config: None });
        }
        let provider = provider();
        let tls_error = |e: rustls::Error| CoreError::Config(format!("TLS setup: {e}"));
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?;
        // libpq: a root certificate given with `require` makes it check the chain like verify-ca.
        let mode = match (self.mode, &self.root_cert) {
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            (m, _) => m,
        };
        let verifier: Arc<dyn ServerCertVerifier> = match mode {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => {
                Arc::new(AnyCertificate(provider.clone()))
            }
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = self.roots()?;
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| CoreError::Config(format!("TLS setup: {e}")))?;
                if mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let client_files = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (Some(c), None) => Some((c.clone(), default_key_for(c))),
            (None, Some(_)) => {
                return Err(CoreError::Config("sslkey given without sslcert".into()));
            }
            (None, None) => match (home_file("postgresql.crt"), home_file("postgresql.key")) {
                (Some(c), Some(k)) => Some((c.display().to_string(), k.display().to_string())),
                _ => None,
            },
        };
        let config = match client_files {
            Some((cert, key)) => {
                let certs = pem_certs(&cert, "sslcert")?;
                let pem = read(&key, "sslkey")?;
                let key_der: PrivateKeyDer<'static> =
                    rustls_pemfile::private_key(&mut pem.as_slice())
                        .map_err(|e| {
                            CoreError::Config(format!("sslkey {key:?} is not valid PEM: {e}"))
                        })?
                        .ok_or_else(|| {
                            CoreError::Config(format!("sslkey {key:?} holds no private key"))
                        })?;
                builder
                    .with_client_auth_cert(certs, key_der)
                    .map_err(|e| CoreError::Config(format!("sslcert/sslkey: {e}")))?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(MakeRustls {
            config: Some(Arc::new(config)),
        })
    }

    fn roots(&self) -> Result<RootCertStore, CoreError> {
        let mut roots = RootCertStore::empty();
        let file = match self.root_cert.as_deref() {
            Some("system") => None,
            Some(path) => Some(path.to_owned()),
            None => home_file("root.crt").map(|p| p.display().to_string()),
        };
        match file {
            Some(path) => {
                for cert in pem_certs(&path, "sslrootcert")? {
                    roots.add(cert).map_err(|e| {
                        CoreError::Config(format!(
                            "sslrootcert {path:?}: unusable certificate: {e}"
                        ))
                    })?;
                }
            }
            None => {
                // Unreadable or unparsable system certificates are skipped, as libpq and browsers do.
                let system = rustls_native_certs::load_native_certs().certs;
                let (added, _ignored) = roots.add_parsable_certificates(system);
                if added == 0 {
                    return Err(CoreError::Config(
                        "sslmode verify-ca/verify-full without sslrootcert, and the system has no root certificates"
                            .into(),
                    ));
                }
            }
        }
        Ok(roots)
    }
}

/// libpq looks for the key beside a default certificate only; with an explicit `sslcert` and no `sslkey` it
/// uses `~/.postgresql/postgresql.key`.
fn default_key_for(_cert: &str) -> String {
    home_file("postgresql.key")
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "~/.postgresql/postgresql.key".into())
}

/// `prefer`/`require`: encryption without authentication of the server (libpq's semantics); the handshake
/// signatures are still checked so the session key belongs to whoever holds the presented certificate.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the full WebPKI check except the host name. webpki checks the chain before the name, so a
/// name mismatch means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The `MakeTlsConnect` handed to tokio-postgres; `None` when TLS is disabled.
#[derive(Clone)]
pub struct MakeRustls {
    config: Option<Arc<rustls::ClientConfig>>,
}

impl MakeTlsConnect<Socket> for MakeRustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        // A Unix socket has no host name; its connector is never used (TLS is off there), so no error here.
        let server_name = ServerName::try_from(domain.to_owned()).ok();
        Ok(RustlsConnect {
            config: self.config.clone(),
            server_name,
        })
    }
}

pub struct RustlsConnect {
    config: Option<Arc<rustls::ClientConfig>>,
    server_name: Option<ServerName<'static>>,
}

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let config = self
                .config
                .ok_or_else(|| io::Error::other("TLS is disabled (sslmode=disable)"))?;
            let name = self
                .server_name
                .ok_or_else(|| io::Error::other("no valid host name for the TLS handshake"))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// A TLS session over a PostgreSQL socket.
pub struct RustlsStream(tokio_rustls::client::TlsStream<Socket>);

impl tokio_postgres::tls::TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM without channel binding (what libpq does with channel_binding=prefer when it cannot bind).
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_options_are_taken_out() {
        let (rest, s) = split(
            "postgresql://u:p@db.example:5432/app?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgresql://u:p@db.example:5432/app?application_name=x"
        );
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert.as_deref(), Some("/tmp/ca.pem"));
        let (rest, s) = split("postgresql://u@h/db?sslmode=require").unwrap();
        assert_eq!(rest, "postgresql://u@h/db");
        assert_eq!(s.mode, SslMode::Require);
    }

    #[test]
    fn key_value_options_are_taken_out() {
        let (rest, s) =
            split("host=h user=u sslmode = verify-ca sslcert='/a b/c\\'s.pem' sslkey=/k dbname=d")
                .unwrap();
        assert_eq!(rest, "host=h user=u dbname=d");
        assert_eq!(s.mode, SslMode::VerifyCa);
        assert_eq!(s.cert.as_deref(), Some("/a b/c's.pem"));
        assert_eq!(s.key.as_deref(), Some("/k"));
    }

    #[test]
    fn hostile_values_are_errors_not_panics() {
        assert!(split("postgresql://u@h/db?sslmode=bogus").is_err());
        assert!(split("postgresql://u@h/db?sslrootcert=%zz").is_err());
        assert!(split("postgresql://u@h/db?sslrootcert=%").is_err());
        assert!(split("postgresql://u@h/db?sslrootcert=%ff").is_err());
        // Unterminated quote: left to tokio-postgres to refuse.
        assert!(split("host=h sslmode='require").is_ok());
        let missing = Settings {
            mode: SslMode::VerifyFull,
            root_cert: Some("/nonexistent/ca.pem".into()),
            cert: None,
            key: None,
        };
        match missing.connector() {
            Err(CoreError::Config(m)) => assert!(m.contains("sslrootcert"), "{m}"),
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("a missing CA file must be refused"),
        }
    }
}
