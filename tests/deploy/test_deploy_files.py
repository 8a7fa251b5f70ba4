"""examples/deploy: the compose file parses and wires what it should, the systemd unit verifies, the Dockerfile
builds the wheel in one stage and runs it in another, the nginx snippet upgrades every WebSocket route."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "examples" / "deploy"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_compose_uses_timescaledb_with_health_checks() -> None:
    services = _compose()["services"]
    assert services.keys() == {"db", "backend"}
    db, backend = services["db"], services["backend"]
    assert db["image"].startswith("timescale/timescaledb:")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert backend["depends_on"]["db"]["condition"] == "service_healthy"
    assert "/health/ready" in " ".join(backend["healthcheck"]["test"])
    env = backend["environment"]
    assert env["DATABASE_URL"].startswith("postgresql://") and "@db:5432/" in env["DATABASE_URL"]
    assert env["ENV"] == "production" and env["SECRET_KEY"].startswith("${SECRET_KEY:?")
    assert backend["build"]["dockerfile"] == "examples/deploy/Dockerfile"
    assert (DEPLOY / backend["build"]["context"] / backend["build"]["dockerfile"]).resolve() == (
        DEPLOY / "Dockerfile"
    ).resolve()
    # Published on loopback only: the reverse proxy is the way in.
    assert all(str(p).startswith("127.0.0.1:") for p in backend["ports"])
    # Longer than uvicorn's graceful shutdown plus the engine's shutdown budget.
    assert int(backend["stop_grace_period"].rstrip("s")) >= 30


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed to verify examples/deploy/webmacs.service"
    text = (DEPLOY / "webmacs.service").read_text(encoding="utf-8")
    assert "ExecStart=/opt/webmacs-ts/venv/bin/webmacs serve" in text
    # The unit names the installed console script; verify against this environment's one (it must exist).
    webmacs = Path(sys.executable).with_name("webmacs")
    assert webmacs.exists()
    unit = tmp_path / "webmacs.service"
    unit.write_text(text.replace("/opt/webmacs-ts/venv/bin/webmacs", str(webmacs)), encoding="utf-8")
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False, timeout=60)
    # Unknown keys or bad values are only warnings (exit 0): any output counts as a failure.
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr + r.stdout


def test_systemd_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze
    unit = tmp_path / "broken.service"
    unit.write_text("[Service]\nExecStart=/bin/true\nRestartt=always\n", encoding="utf-8")
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False, timeout=60)
    assert "Unknown key" in r.stderr


def test_dockerfile_is_multi_stage_with_a_slim_unprivileged_runtime() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.MULTILINE | re.IGNORECASE)
    assert len(stages) == 2
    (build_image, build_name), (runtime_image, _) = stages
    assert build_image.startswith("rust:") and "maturin build --release" in text
    assert "slim" in runtime_image and runtime_image.startswith("python:3.1")
    runtime = text.split(stages[1][0], 1)[1]
    # The runtime gets the wheel from the build stage, not the sources or a compiler.
    assert f"COPY --from={build_name}" in runtime and "COPY core-rs" not in runtime and "cargo" not in runtime
    assert re.search(r"^USER\s+(?!root)\S+", runtime, flags=re.MULTILINE)
    assert "HEALTHCHECK" in runtime and 'CMD ["webmacs", "serve"]' in runtime
    # Everything the wheel is built from is copied (the migrations above all).
    for part in ("Cargo.toml", "Cargo.lock", "pyproject.toml", "README.md", "LICENSE", "core-rs", "py", "sql"):
        assert re.search(rf"^COPY .*\b{re.escape(part)}\b", text, flags=re.MULTILINE), part


def _blocks(text: str) -> dict[str, str]:
    """`location` blocks of the nginx snippet by their argument (no nested blocks inside them)."""
    return {m.group(1).strip(): m.group(2) for m in re.finditer(r"location\s+([^{]+)\{([^}]*)\}", text)}


def test_nginx_snippet_upgrades_websockets_and_routes_telemetry() -> None:
    text = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    stripped = re.sub(r"#.*", "", text)
    assert stripped.count("{") == stripped.count("}")
    blocks = _blocks(stripped)
    telemetry = blocks["= /ws/controller/telemetry"]
    assert "proxy_pass http://webmacs_telemetry;" in telemetry
    for ws in (telemetry, blocks["/ws/"]):
        assert "proxy_http_version 1.1;" in ws
        assert "proxy_set_header Upgrade $http_upgrade;" in ws
        assert "proxy_set_header Connection $connection_upgrade;" in ws
    assert "proxy_pass http://webmacs_api;" in blocks["/ws/"] and "proxy_pass http://webmacs_api;" in blocks["/"]
    # The app believes X-Forwarded-For only from WEBMACS_TRUSTED_PROXIES (loopback by default): nginx sets it.
    assert all("X-Forwarded-For" in b for b in blocks.values())


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "webmacs.example.org")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_nginx_accepts_the_snippet_where_nginx_is_installed(tmp_path: Path) -> None:
    """`nginx -t` on the snippet inside an http block, when nginx is on this machine (it is no dependency of
    the project; the structural test above always runs)."""
    nginx = shutil.which("nginx")
    if nginx is None:
        return
    cert, key = _self_signed(tmp_path)
    site = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    site = site.replace("/etc/ssl/certs/webmacs.pem", str(cert)).replace("/etc/ssl/private/webmacs.key", str(key))
    (tmp_path / "site.conf").write_text(site, encoding="utf-8")
    main = f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\n  include {tmp_path}/site.conf;\n}}\n"
    (tmp_path / "nginx.conf").write_text(main, encoding="utf-8")
    r = subprocess.run([nginx, "-t", "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
