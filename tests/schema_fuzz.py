"""Schema fuzzing: schemathesis over `/openapi.json` of a live server, as admin, operator, viewer and anonymous.

The check is `not_a_server_error`: whatever the input, no response is ≥ 500. `FUZZ_API_CHECKS=all` runs every
schemathesis check instead (undeclared statuses, response bodies against the schema, `Allow` on 405, auth that
is not enforced…); the deviations it still reports are listed and justified in README ("OpenAPI"). Run by
`make fuzz-api` (`FUZZ_API_EXAMPLES` cases per operation and role, default 100; `FUZZ_API_ROLES=admin,viewer`
picks roles); CI runs a short pass. Exits non-zero when schemathesis reports a failure. The server runs on a
throwaway cluster with plugin installs disabled, so the fuzzer cannot change anything outside it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "py"))

from webmacs.db.cluster import Cluster  # noqa: E402 - after the path is set

SECRET = "schema-fuzz-secret-key-that-is-long-enough-0123"
ROLES = ("admin", "operator", "viewer", "anonymous")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(url: str, home: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    for d in ("updates", "plugins", "home"):
        (home / d).mkdir(exist_ok=True)
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "SECRET_KEY": SECRET,
        "ENV": "test",
        "WEBMACS_BCRYPT_ROUNDS": "4",
        "WEBMACS_HOME": str(home / "home"),
        "WEBMACS_UPDATE_DIR": str(home / "updates"),
        "WEBMACS_PLUGIN_DIR": str(home / "plugins"),
        "WEBMACS_PLUGIN_INSTALL_CMD": "true",  # never pip-install what the fuzzer uploads
        "WEBMACS_OTA_GITHUB_API": "",  # never leave the machine
        "RATE_LIMIT_PER_MINUTE": "100000000",
        "WEBMACS_LOGIN_MAX_FAILURES_ACCOUNT": "100000000",
        "WEBMACS_LOGIN_MAX_FAILURES_PEER": "100000000",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "webmacs.cli", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=home,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("schema fuzz: the server did not start")
        time.sleep(0.2)


def tokens(base: str) -> dict[str, str | None]:
    with httpx.Client(base_url=base, timeout=30) as c:
        admin = c.post("/api/v1/auth/login", json={"email": "admin@webmacs.io", "password": "admin123"}).json()
        headers = {"Authorization": f"Bearer {admin['access_token']}"}
        out: dict[str, str | None] = {"admin": admin["access_token"], "anonymous": None}
        for role in ("operator", "viewer"):
            email = f"{role}@fuzz.example.com"
            r = c.post(
                "/api/v1/users",
                headers=headers,
                json={"email": email, "username": f"fuzz-{role}", "password": "password123", "role": role},
            )
            assert r.status_code == 201, r.text
            out[role] = c.post("/api/v1/auth/login", json={"email": email, "password": "password123"}).json()[
                "access_token"
            ]
        # Something for the fuzzer to find: an event with a plugin mapping, an experiment, a dashboard.
        c.post(
            "/api/v1/events",
            headers=headers,
            json={"name": "fuzz-event", "min_value": 0, "max_value": 1, "unit": "u", "type": "sensor"},
        )
        c.post("/api/v1/experiments", headers=headers, json={"name": "fuzz-experiment"})
        c.post("/api/v1/dashboards", headers=headers, json={"name": "fuzz-dashboard"})
    return out


def isolate() -> None:
    """Re-run this program in a network namespace of its own (root only): the fuzzer creates webhooks and OTA
    records for random hosts, and nothing it makes the server look up or call may leave loopback."""
    if os.environ.get("WEBMACS_FUZZ_ISOLATED") or os.geteuid() != 0 or not shutil.which("unshare"):
        return
    env = {**os.environ, "WEBMACS_FUZZ_ISOLATED": "1"}
    script = f"ip link set lo up && exec {sys.executable} {Path(__file__).resolve()}"
    raise SystemExit(subprocess.run(["unshare", "--net", "sh", "-c", script], env=env, check=False).returncode)


def main() -> int:
    isolate()
    if not os.environ.get("WEBMACS_FUZZ_ISOLATED"):
        print("schema fuzz: not isolated in a network namespace (needs root and unshare)", flush=True)
    examples = os.environ.get("FUZZ_API_EXAMPLES", "100")
    checks = os.environ.get("FUZZ_API_CHECKS", "not_a_server_error")
    # With every check, two of them judge semantics no schema states (README "OpenAPI"): left out by default,
    # FUZZ_API_EXCLUDE= (empty) runs them too.
    exclude = os.environ.get("FUZZ_API_EXCLUDE", "positive_data_acceptance,negative_data_rejection")
    roles = [r for r in os.environ.get("FUZZ_API_ROLES", ",".join(ROLES)).split(",") if r in ROLES]
    seed = os.environ.get("FUZZ_API_SEED", "20261129")
    home = Path(tempfile.mkdtemp(prefix="webmacs-schema-fuzz-"))
    home.chmod(0o755)
    cluster = Cluster(home / "db", free_port())
    failures = 0
    proc = None
    try:
        proc, base = start_server(cluster.up(), home)
        role_tokens = tokens(base)
        schemathesis = Path(sys.executable).with_name("schemathesis")
        # The schema declares a login and a bearer scheme: schemathesis would try to sign up an account of its
        # own for the anonymous run. Every role's credentials are given here instead (anonymous: none).
        config = home / "schemathesis.toml"
        config.write_text("[auth]\nauto-signup = false\n", encoding="utf-8")
        for role in roles:
            token = role_tokens[role]
            cmd = [
                str(schemathesis),
                "--config-file",
                str(config),
                "run",
                f"{base}/openapi.json",
                "--checks",
                checks,
                "--max-examples",
                examples,
                "--seed",
                seed,
                "--workers",
                "2",
                "--request-timeout",
                "60",
                "--no-color",
                "--generation-database",
                "none",
                # Logging the fuzzer's own token out would leave the rest of the run unauthenticated.
                "--exclude-path",
                "/api/v1/auth/logout",
            ]
            if checks == "all" and exclude:
                cmd += ["--exclude-checks", exclude]
            if token:
                cmd += ["--header", f"Authorization: Bearer {token}"]
            started = time.monotonic()
            print(f"\n=== schemathesis as {role}: {examples} examples per operation ===", flush=True)
            # In the throwaway home: schemathesis keeps a crash cache in its working directory.
            code = subprocess.run(cmd, check=False, cwd=home).returncode
            print(f"=== {role}: exit {code} in {time.monotonic() - started:.0f} s ===", flush=True)
            failures += code != 0
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.destroy()
        shutil.rmtree(home, ignore_errors=True)
    print(f"\nschema fuzz: {failures} of {len(roles)} roles had failures", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
