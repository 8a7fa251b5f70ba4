"""Test scaffolding for the updater: real bundles, a recording stand-in for `docker` on PATH, signing helpers."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.services.receiver import Reply

IMAGES = b"docker save output stand-in\n" * 100
COMPOSE_V2 = b"services:\n  backend:\n    image: webmacs/backend:${WEBMACS_VERSION}\n# bundled with 2.1.0\n"
COMPOSE_V1 = b"services:\n  backend:\n    image: webmacs/backend:${WEBMACS_VERSION}\n# installed 2.0.0\n"

JSON = {"Content-Type": "application/json"}
HEALTHY = Reply(200, b'{"status":"ok","version":"2.0.0","database":"ok"}', JSON)
DEGRADED = Reply(200, b'{"status":"degraded","version":"2.0.0","database":"error"}', JSON)
BROKEN = Reply(500, b"Internal Server Error")

# The stand-in for `docker`: records its arguments (and the WEBMACS_VERSION it was given), then exits with the
# status scripted for its sub-command ("load", "up", "exec"), one per call, 0 once the script runs out.
# "block" makes it wait for a release file, so that a test can hold an updater inside `docker load`.
STAND_IN = """#!{python}
import json, os, sys, time
args = sys.argv[1:]
kind = next((a for a in ("load", "up", "exec") if a in args), "other")
with open(os.environ["DOCKER_STUB_LOG"], "a") as f:
    f.write(json.dumps({{"args": args, "WEBMACS_VERSION": os.environ.get("WEBMACS_VERSION")}}) + "\\n")
rules_path = os.environ["DOCKER_STUB_RULES"]
with open(rules_path) as f:
    rules = json.load(f)
queue = rules.get(kind, [])
status = queue.pop(0) if queue else 0
with open(rules_path, "w") as f:
    json.dump(rules, f)
if status == "block":
    open(rules_path + ".blocked", "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(rules_path + ".release") and time.monotonic() < deadline:
        time.sleep(0.02)
    status = 0
sys.stderr.write(f"stand-in docker {{kind}}: exit {{status}}\\n")
sys.exit(status)
"""


@dataclass
class Docker:
    """The recording stand-in, installed as `docker` in a directory put first on PATH."""

    bin_dir: Path
    log: Path
    rules: Path

    def script(self, **statuses: list[Any]) -> None:
        self.rules.write_text(json.dumps(statuses))

    def calls(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def args(self) -> list[list[str]]:
        return [c["args"] for c in self.calls()]

    def env(self) -> dict[str, str]:
        return {
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ['PATH']}",
            "DOCKER_STUB_LOG": str(self.log),
            "DOCKER_STUB_RULES": str(self.rules),
        }

    def wait_blocked(self, timeout: float = 60) -> None:
        """Until an updater sits inside a blocking `docker load` (bounded; the test fails past it)."""
        marker = Path(str(self.rules) + ".blocked")
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert time.monotonic() < deadline, "no updater reached docker load"
            time.sleep(0.02)

    def release(self) -> None:
        Path(str(self.rules) + ".release").touch()


def install_docker(directory: Path) -> Docker:
    bin_dir = directory / "stand-in-bin"
    bin_dir.mkdir(parents=True)
    exe = bin_dir / "docker"
    exe.write_text(STAND_IN.format(python=sys.executable))
    exe.chmod(0o755)
    d = Docker(bin_dir, directory / "docker-calls.jsonl", directory / "docker-rules.json")
    d.script()
    return d


def compose_up(compose_dir: Path) -> list[str]:
    """The spec's command, exactly."""
    return ["compose", "-f", f"{compose_dir}/docker-compose.prod.yml", "up", "-d", "--no-build", "--remove-orphans"]


def compose_exec_health(compose_dir: Path, url: str = "http://localhost:8000/health") -> list[str]:
    check = (
        "import json, urllib.request; "
        f"r = urllib.request.urlopen({url!r}, timeout=5); "
        "raise SystemExit(0 if json.load(r).get('status') == 'ok' else 1)"
    )
    return ["compose", "-f", f"{compose_dir}/docker-compose.prod.yml", "exec", "-T", "backend", "python", "-c", check]


# --- bundles ---


def member(name: str, data: bytes = b"", **attrs: Any) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    for k, v in attrs.items():
        setattr(info, k, v)
    if info.type != tarfile.REGTYPE:
        info.size = 0
    return info, (data if info.type == tarfile.REGTYPE else None)


def manifest_for(version: str = "2.1.0", images: bytes = IMAGES, **extra: Any) -> dict[str, Any]:
    return {"version": version, "images_sha256": hashlib.sha256(images).hexdigest(), "changelog": "Fixes.", **extra}


def build(
    path: Path,
    *,
    manifest: Any = None,
    files: dict[str, bytes] | None = None,
    extra: list[tuple[tarfile.TarInfo, bytes | None]] | None = None,
    images: bytes | None = IMAGES,
) -> Path:
    """A bundle as a release build would make it: manifest.json (default: a valid one for 2.1.0), images.tar,
    further files, then any hand-made members (links, devices, traversal) appended."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        content: dict[str, bytes] = {}
        if manifest is not None:
            content["manifest.json"] = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        if images is not None:
            content["images.tar"] = images
        content.update(files or {})
        for name, data in content.items():
            info, body = member(name, data)
            tar.addfile(info, io.BytesIO(body or b""))
        for info, body in extra or []:
            tar.addfile(info, io.BytesIO(body) if body is not None else None)
    path.write_bytes(buf.getvalue())
    return path


# --- signatures (minisign's format, written here so that no minisign binary is needed) ---


@dataclass
class SigningKey:
    private: Ed25519PrivateKey
    key_id: bytes

    @classmethod
    def new(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate(), os.urandom(8))

    def raw_public(self) -> bytes:
        return self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def minisign_public(self) -> str:
        """The two lines of a minisign `.pub` file."""
        line = base64.b64encode(b"Ed" + self.key_id + self.raw_public()).decode()
        return f"untrusted comment: minisign public key {self.key_id.hex().upper()}\n{line}\n"

    def minisig(self, message: bytes, *, prehashed: bool = True, trusted: str = "timestamp:1700000000") -> str:
        alg, signed = (b"ED", hashlib.blake2b(message, digest_size=64).digest()) if prehashed else (b"Ed", message)
        signature = self.private.sign(signed)
        global_signature = self.private.sign(signature + trusted.encode())
        return (
            "untrusted comment: signature from minisign secret key\n"
            f"{base64.b64encode(alg + self.key_id + signature).decode()}\n"
            f"trusted comment: {trusted}\n"
            f"{base64.b64encode(global_signature).decode()}\n"
        )

    def bare(self, message: bytes) -> bytes:
        return base64.b64encode(self.private.sign(message)) + b"\n"


def tree(root: Path) -> set[str]:
    """Every path below `root` (files, directories and links), relative."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}
