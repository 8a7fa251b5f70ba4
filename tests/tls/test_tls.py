"""TLS on every Rust-side database connection: a private cluster with `ssl=on` and a `hostssl`-only pg_hba, a CA,
server and client certificates made here; ingest and exports with verify-full, require, client certificates,
and a wrong CA refused at start-up with the reason."""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import orjson
import psycopg
import pyarrow.parquet as pq
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from websockets.sync.client import connect

from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, Server, login, make_settings, start_server, throwaway_cluster
from webmacs import _core
from webmacs.db.cluster import Cluster

Key = ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> tuple[Key, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(ca: tuple[Key, x509.Certificate], cn: str, *, server: bool) -> tuple[Key, x509.Certificate]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        sans: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_key(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: Path, data: bytes, owner: Path | None = None) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if owner is not None:
        st = owner.stat()
        os.chown(path, st.st_uid, st.st_gid)
    return path


@dataclass
class TlsCluster:
    cluster: Cluster
    ca: Path
    wrong_ca: Path
    client_cert: Path
    client_key: Path
    garbage: Path

    def url(self, user: str = "webmacs", host: str = "127.0.0.1", **params: str) -> str:
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
        return f"postgresql://{user}@{host}:{self.cluster.port}/webmacs" + (f"?{query}" if query else "")


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCluster]:
    certs = tmp_path_factory.mktemp("certs")
    ca = make_ca("webmacs test CA")
    server_key, server_cert = make_leaf(ca, "localhost", server=True)
    client_key, client_cert = make_leaf(ca, "certuser", server=False)
    _, other_ca = make_ca("some other CA")
    with throwaway_cluster("webmacs-tls-") as c:
        data = c.data_dir
        write_private(data / "server.crt", pem_cert(server_cert), owner=data)
        write_private(data / "server.key", pem_key(server_key), owner=data)
        write_private(data / "root.crt", pem_cert(ca[1]), owner=data)
        with open(data / "postgresql.conf", "a", encoding="utf-8") as f:
            f.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\n")
        hba = data / "pg_hba.conf"
        st = hba.stat()
        # TCP only with TLS; the client-certificate user only with a certificate the CA signed.
        hba.write_text(
            "local all all trust\nhostssl all certuser 127.0.0.1/32 cert\nhostssl all all 127.0.0.1/32 trust\n",
            encoding="utf-8",
        )
        os.chown(hba, st.st_uid, st.st_gid)
        c.restart()
        with psycopg.connect(c.url(), autocommit=True, sslmode="require") as db:
            db.execute("CREATE ROLE certuser LOGIN")
            db.execute("GRANT webmacs TO certuser")
        garbage = certs / "garbage.pem"
        garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\n\xff\xfe not base64 \x00\n-----END CERTIFICATE-----\n")
        yield TlsCluster(
            cluster=c,
            ca=write_private(certs / "ca.crt", pem_cert(ca[1])),
            wrong_ca=write_private(certs / "other-ca.crt", pem_cert(other_ca)),
            client_cert=write_private(certs / "client.crt", pem_cert(client_cert)),
            client_key=write_private(certs / "client.key", pem_key(client_key)),
            garbage=garbage,
        )


@pytest.fixture(scope="module")
def verify_full_server(tls_cluster: TlsCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    url = tls_cluster.url(sslmode="verify-full", sslrootcert=str(tls_cluster.ca))
    s = start_server(make_settings(url, tmp_path_factory.mktemp("tls-server")))
    try:
        yield s
    finally:
        s.stop()


def active_event(db: psycopg.Connection, server: Server) -> tuple[int, str]:
    ev = db.execute(
        "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1e9, 'u', 'sensor')"
        " RETURNING id, public_id",
        (f"tls-{os.urandom(4).hex()}",),
    ).fetchone()
    pi = db.execute(
        "INSERT INTO plugin_instances (plugin_id, instance_name, enabled) VALUES ('simulated', %s, true) RETURNING id",
        (f"tls-{os.urandom(4).hex()}",),
    ).fetchone()
    assert ev is not None and pi is not None
    db.execute(
        "INSERT INTO channel_mappings (plugin_instance_id, channel_id, channel_name, direction, unit, event_public_id)"
        " VALUES (%s, 'ch', 'Channel', 'input', 'u', %s)",
        (pi[0], ev[1]),
    )
    server.refresh_catalog()
    return int(ev[0]), str(ev[1])


def test_ws_ingest_and_parquet_export_with_verify_full(tls_cluster: TlsCluster, verify_full_server: Server) -> None:
    server = verify_full_server
    with httpx.Client(base_url=server.url, timeout=30) as http:
        token = login(http, ADMIN_EMAIL, ADMIN_PASSWORD)
    with psycopg.connect(tls_cluster.url(sslmode="require"), autocommit=True) as db:
        event_id, public_id = active_event(db, server)
        url = f"{server.url.replace('http://', 'ws://')}/ws/controller/telemetry?token={token}"
        with connect(url, open_timeout=10) as ws:
            for seq in range(5):
                points = [{"event_public_id": public_id, "value": seq * 100 + i} for i in range(100)]
                ws.send(orjson.dumps({"seq": seq, "datapoints": points}))
            acks = [orjson.loads(ws.recv(timeout=30)) for _ in range(5)]
        assert [(a["seq"], a["accepted"], a["rejected"]) for a in acks] == [(s, 100, 0) for s in range(5)]
        stored = [
            r[0] for r in db.execute("SELECT value FROM datapoints WHERE event_id = %s ORDER BY time", (event_id,))
        ]
        assert stored == [float(v) for v in range(500)]

        with httpx.Client(base_url=server.url, timeout=60) as http:
            r = http.get(
                "/api/v1/export",
                params={"events": public_id, "format": "parquet"},
                headers={"Authorization": f"Bearer {token}"},
            )
        assert r.status_code == 200, r.text
        table = pq.read_table(io.BytesIO(r.content))
        assert table.column("value").to_pylist() == [float(v) for v in range(500)]

        # Every connection the Rust core holds (writers, catalog LISTEN, fan-out LISTEN, …) is encrypted.
        rows = db.execute(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)"
            " WHERE a.application_name LIKE 'webmacs-%%'"
        ).fetchall()
    names = {name for name, _ in rows}
    assert {"webmacs-ingest-writer", "webmacs-ingest-listen", "webmacs-ingest-fanout-listen"} <= names, names
    assert all(ssl for _, ssl in rows), rows


def start_engine(dsn: str) -> _core.Engine:
    return _core.Engine(dsn, fanout="off", writers=1)


def test_require_encrypts_and_plain_tcp_is_refused(tls_cluster: TlsCluster, verify_full_server: Server) -> None:
    engine = start_engine(tls_cluster.url(sslmode="require"))
    engine.close(10.0)
    # The cluster accepts TCP only with TLS: a plain connection is refused, so `require` above really used TLS.
    with pytest.raises(_core.DatabaseError, match=r"pg_hba\.conf"):
        start_engine(tls_cluster.url(sslmode="disable"))


def test_wrong_ca_fails_at_start_up_with_the_reason(tls_cluster: TlsCluster, verify_full_server: Server) -> None:
    for mode in ("verify-full", "verify-ca", "require"):
        with pytest.raises(_core.DatabaseError, match=r"(?i)certificate.*UnknownIssuer"):
            start_engine(tls_cluster.url(sslmode=mode, sslrootcert=str(tls_cluster.wrong_ca)))
    # The exporter's reader too: the same DatabaseError, with the reason.
    with pytest.raises(_core.DatabaseError, match=r"^database error: error performing TLS handshake: .*UnknownIssuer"):
        _core.CopyReader(tls_cluster.url(sslmode="verify-full", sslrootcert=str(tls_cluster.wrong_ca)))


def test_bad_tls_settings_are_config_errors(tls_cluster: TlsCluster, verify_full_server: Server) -> None:
    cases = {
        "sslrootcert": {"sslmode": "verify-full", "sslrootcert": str(tls_cluster.ca.with_name("missing.crt"))},
        "not valid PEM|no certificate": {"sslmode": "verify-full", "sslrootcert": str(tls_cluster.garbage)},
        "sslmode": {"sslmode": "verify-everything"},
        "sslkey": {"sslmode": "require", "sslcert": str(tls_cluster.client_cert), "sslkey": str(tls_cluster.ca)},
    }
    for reason, params in cases.items():
        with pytest.raises(_core.ConfigError, match=reason):
            start_engine(tls_cluster.url(**params))


def test_verify_full_checks_the_host_name_and_verify_ca_does_not(
    tls_cluster: TlsCluster, verify_full_server: Server
) -> None:
    # The certificate names localhost and 127.0.0.1, not this name; hostaddr still reaches the server.
    params = {"hostaddr": "127.0.0.1", "sslrootcert": str(tls_cluster.ca)}
    with pytest.raises(_core.DatabaseError, match="not valid for name"):
        start_engine(tls_cluster.url(host="db.invalid", sslmode="verify-full", **params))
    start_engine(tls_cluster.url(host="db.invalid", sslmode="verify-ca", **params)).close(10.0)
    start_engine(tls_cluster.url(host="localhost", sslmode="verify-full", sslrootcert=str(tls_cluster.ca))).close(10.0)


def test_client_certificate_authentication(tls_cluster: TlsCluster, verify_full_server: Server) -> None:
    with_cert = tls_cluster.url(
        user="certuser",
        sslmode="verify-full",
        sslrootcert=str(tls_cluster.ca),
        sslcert=str(tls_cluster.client_cert),
        sslkey=str(tls_cluster.client_key),
    )
    engine = start_engine(with_cert)
    engine.close(10.0)
    reader = _core.CopyReader(with_cert)
    reader.close()
    without = tls_cluster.url(user="certuser", sslmode="verify-full", sslrootcert=str(tls_cluster.ca))
    with pytest.raises(_core.DatabaseError, match="certificate"):
        start_engine(without)
