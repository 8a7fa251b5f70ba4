"""OTA (spec §4.7, §10): records, every state transition, verified downloads, update check, bundle uploads."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Server, make_settings, start_server, unique, user_with_role
from tests.services.receiver import Receiver, Reply
from tests.services.support import admin_headers, fresh_database
from webmacs.services import ota

CAP = 200_000


@dataclass
class Ota:
    server: Server
    db_url: str
    update_dir: Path
    github: Receiver
    admin: dict[str, str]
    operator: dict[str, str]
    viewer: dict[str, str]


@pytest.fixture(scope="module")
def env(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ota]:
    """A server on its own database (update checks look at every record) with a fake GitHub API, a
    small bundle cap and 127.0.0.1 allowed for downloads."""
    url = fresh_database(db_url)
    tmp = tmp_path_factory.mktemp("ota")
    with Receiver() as github:
        github.default = Reply(404, b"{}")
        s = start_server(
            make_settings(
                url,
                tmp,
                webmacs_webhook_allow_hosts=["127.0.0.1"],
                webmacs_ota_max_bundle_bytes=CAP,
                webmacs_ota_github_api=github.url,
                github_repo="acme/webmacs",
                webmacs_ota_download_timeout_s=5,
                webmacs_ota_github_cache_s=0,
            )
        )
        try:
            admin = admin_headers(s)
            yield Ota(
                s,
                url,
                tmp / "updates",
                github,
                admin,
                user_with_role(s, admin, "operator"),
                user_with_role(s, admin, "viewer"),
            )
        finally:
            s.stop()


@pytest.fixture
def api(env: Ota) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=env.server.url, headers=env.admin, timeout=30) as c:
        yield c


@pytest.fixture
def odb(env: Ota) -> Iterator[psycopg.Connection]:
    with psycopg.connect(env.db_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(autouse=True)
def _github_reset(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "env" in request.fixturenames:
        github: Receiver = request.getfixturevalue("env").github
        github.default = Reply(404, b"{}")
        github.replies.clear()


_counter = iter(range(1, 10**6))


def old_version() -> str:
    """A version below the backend's own (2.0.0), so it never counts as an available update."""
    return f"1.{next(_counter)}.{os.getpid() % 1000}"


def create(api: httpx.Client, odb: psycopg.Connection, version: str | None = None, **extra: Any) -> str:
    version = version or old_version()
    r = api.post("/api/v1/ota", json={"version": version, **extra})
    assert r.status_code == 201, r.text
    row = odb.execute("SELECT public_id FROM firmware_updates WHERE version = %s", (version,)).fetchone()
    assert row is not None
    return str(row[0])


def bundle(
    members: dict[str, bytes] | None = None,
    *,
    manifest: Any = None,
    symlink: tuple[str, str] | None = None,
    padding: int = 5000,
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        files = dict(members or {})
        if manifest is not None:
            files["manifest.json"] = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        files.setdefault("images.tar", os.urandom(padding))
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink[0])
            info.type = tarfile.SYMTYPE
            info.linkname = symlink[1]
            tar.addfile(info)
    return buf.getvalue()


GOOD_MANIFEST = {"version": "2.1.0", "images_sha256": "ab" * 32, "changelog": "x"}


# --- records ---


def test_create_list_get_delete(api: httpx.Client, odb: psycopg.Connection) -> None:
    v = old_version()
    r = api.post("/api/v1/ota", json={"version": v, "changelog": "Fixes\nmore"})
    assert r.status_code == 201 and r.json() == {
        "status": "success",
        "message": "Firmware update successfully registered.",
    }
    r = api.post("/api/v1/ota", json={"version": v})
    assert r.status_code == 409 and r.json() == {"detail": "FirmwareUpdate already exists."}
    row = odb.execute("SELECT public_id FROM firmware_updates WHERE version = %s", (v,)).fetchone()
    assert row is not None
    pid = row[0]
    got = api.get(f"/api/v1/ota/{pid}").json()
    assert set(got) == {
        "public_id",
        "version",
        "changelog",
        "file_hash_sha256",
        "file_size_bytes",
        "status",
        "error_message",
        "created_on",
        "started_on",
        "completed_on",
        "user_public_id",
        "has_firmware_file",
    }
    assert (got["version"], got["changelog"], got["status"], got["has_firmware_file"]) == (
        v,
        "Fixes\nmore",
        "pending",
        False,
    )
    page = api.get("/api/v1/ota", params={"page_size": 100}).json()
    assert pid in [d["public_id"] for d in page["data"]] and all("file_path" not in d for d in page["data"])
    r = api.delete(f"/api/v1/ota/{pid}")
    assert r.status_code == 200 and r.json() == {"status": "success", "message": "FirmwareUpdate successfully deleted."}
    r = api.get(f"/api/v1/ota/{pid}")
    assert r.status_code == 404 and r.json() == {"detail": f"FirmwareUpdate '{pid}' not found."}


@pytest.mark.parametrize("version", ["not-semver", "v1.2.3", "01.2.3", "1.02.3", "1.2", "1.2.3-beta", "1.2.3.4", ""])
def test_strict_semver(api: httpx.Client, version: str) -> None:
    assert api.post("/api/v1/ota", json={"version": version}).status_code == 422


def test_unknown_record_is_404(api: httpx.Client) -> None:
    detail = {"detail": "FirmwareUpdate 'nope' not found."}
    for method, path in [
        ("GET", "/api/v1/ota/nope"),
        ("DELETE", "/api/v1/ota/nope"),
        ("POST", "/api/v1/ota/nope/apply"),
        ("POST", "/api/v1/ota/nope/rollback"),
    ]:
        r = api.request(method, path)
        assert r.status_code == 404 and r.json() == detail, path


def test_creator_deleted_gives_null_user(api: httpx.Client, odb: psycopg.Connection, env: Ota) -> None:
    pid = create(api, odb)
    odb.execute("UPDATE firmware_updates SET user_public_id = NULL WHERE public_id = %s", (pid,))
    assert api.get(f"/api/v1/ota/{pid}").json()["user_public_id"] is None


# --- state machine ---


def test_apply_then_rollback_lifecycle(api: httpx.Client, odb: psycopg.Connection) -> None:
    pid = create(api, odb)
    r = api.post(f"/api/v1/ota/{pid}/rollback")
    assert r.status_code == 409 and r.json() == {"detail": "Cannot transition from 'pending' to 'rolled_back'"}
    r = api.post(f"/api/v1/ota/{pid}/apply")
    assert r.status_code == 200
    assert r.json() == {"status": "success", "message": "Firmware update applied successfully."}
    got = api.get(f"/api/v1/ota/{pid}").json()
    assert got["status"] == "completed" and got["started_on"] and got["completed_on"] and not got["has_firmware_file"]
    r = api.post(f"/api/v1/ota/{pid}/apply")
    assert r.status_code == 409 and r.json() == {"detail": "Cannot transition from 'completed' to 'completed'"}
    r = api.post(f"/api/v1/ota/{pid}/apply", json={"download_url": "http://127.0.0.1:1/x"})
    assert r.status_code == 409 and r.json() == {"detail": "Cannot transition from 'completed' to 'downloading'"}
    r = api.post(f"/api/v1/ota/{pid}/rollback")
    assert r.status_code == 200 and r.json() == {
        "status": "success",
        "message": "Firmware update rolled back successfully.",
    }
    assert api.get(f"/api/v1/ota/{pid}").json()["status"] == "rolled_back"
    r = api.post(f"/api/v1/ota/{pid}/rollback")
    assert r.status_code == 409 and r.json() == {"detail": "Cannot transition from 'rolled_back' to 'rolled_back'"}


STATES = ["pending", "downloading", "verifying", "applying", "completed", "failed", "rolled_back"]


@pytest.mark.parametrize("state", STATES)
def test_every_transition_from_every_state(api: httpx.Client, odb: psycopg.Connection, state: str) -> None:
    for action, target, body in [
        ("apply", "completed", None),
        ("rollback", "rolled_back", None),
        ("apply", "downloading", {"download_url": "http://10.0.0.1/x.tar.gz"}),
    ]:
        pid = create(api, odb)
        odb.execute("UPDATE firmware_updates SET status = %s WHERE public_id = %s", (state, pid))
        r = api.post(f"/api/v1/ota/{pid}/{action}", json=body)
        legal = target in ota.TRANSITIONS[state]
        if not legal:
            assert r.status_code == 409, (state, target)
            assert r.json() == {"detail": f"Cannot transition from '{state}' to '{target}'"}
            assert api.get(f"/api/v1/ota/{pid}").json()["status"] == state
        elif target == "downloading":
            # Legal, but the download is refused (private address): 400 and the state is unchanged.
            assert r.status_code == 400 and r.json()["detail"].startswith("download_failed: refused by SSRF guard")
            assert api.get(f"/api/v1/ota/{pid}").json()["status"] == state
        else:
            assert r.status_code == 200, (state, target, r.text)
            assert api.get(f"/api/v1/ota/{pid}").json()["status"] == target


def test_delete_in_any_state(api: httpx.Client, odb: psycopg.Connection) -> None:
    for state in STATES:
        pid = create(api, odb)
        odb.execute("UPDATE firmware_updates SET status = %s WHERE public_id = %s", (state, pid))
        assert api.delete(f"/api/v1/ota/{pid}").status_code == 200


# --- downloads ---


def test_apply_with_download_and_hash(api: httpx.Client, odb: psycopg.Connection, env: Ota) -> None:
    data = bundle(manifest=GOOD_MANIFEST)
    digest = hashlib.sha256(data).hexdigest()
    pid = create(api, odb)
    version = api.get(f"/api/v1/ota/{pid}").json()["version"]
    with Receiver() as files:
        files.default = Reply(200, data)
        r = api.post(
            f"/api/v1/ota/{pid}/apply",
            json={"download_url": f"{files.url}/b.tar.gz", "file_hash_sha256": digest.upper()},
        )
        assert r.status_code == 200, r.text
        assert [q.path for q in files.requests] == ["/b.tar.gz"] and files.requests[0].method == "GET"
    got = api.get(f"/api/v1/ota/{pid}").json()
    assert got["status"] == "completed" and got["has_firmware_file"] is True
    assert got["file_hash_sha256"] == digest and got["file_size_bytes"] == len(data)
    stored = env.update_dir / f"firmware-{version}.tar.gz"
    assert stored.read_bytes() == data
    # Re-verification on a later apply: tamper with the file, bring the record back to pending.
    odb.execute("UPDATE firmware_updates SET status = 'pending' WHERE public_id = %s", (pid,))
    stored.write_bytes(data + b"x")
    r = api.post(f"/api/v1/ota/{pid}/apply")
    assert r.status_code == 400 and r.json() == {"detail": "SHA-256 hash verification failed"}
    got = api.get(f"/api/v1/ota/{pid}").json()
    assert got["status"] == "failed" and got["error_message"] == "SHA-256 hash verification failed"
    # And the record's file goes with the record.
    assert api.delete(f"/api/v1/ota/{pid}").status_code == 200
    assert not stored.exists()


def test_reapply_with_intact_file(api: httpx.Client, odb: psycopg.Connection, env: Ota) -> None:
    data = bundle(manifest=GOOD_MANIFEST)
    pid = create(api, odb)
    with Receiver() as files:
        files.default = Reply(200, data)
        assert api.post(f"/api/v1/ota/{pid}/apply", json={"download_url": f"{files.url}/b"}).status_code == 200
    odb.execute("UPDATE firmware_updates SET status = 'applying' WHERE public_id = %s", (pid,))
    assert api.post(f"/api/v1/ota/{pid}/apply").status_code == 200
    assert api.get(f"/api/v1/ota/{pid}").json()["status"] == "completed"


def _no_firmware_files(env: Ota) -> bool:
    return not [p for p in env.update_dir.iterdir() if p.name.startswith((".firmware-",))]


@pytest.mark.parametrize(
    ("reply", "hash_", "detail"),
    [
        (Reply(404, b"missing"), None, "download_failed: status 404"),
        (Reply(200, b"payload"), "00" * 32, "SHA-256 hash verification failed"),
        (Reply(200, os.urandom(CAP + 1)), None, f"download_failed: larger than {CAP:,} bytes"),
        (
            Reply(302, headers={"Location": "http://169.254.169.254/latest"}),
            None,
            "download_failed: refused by SSRF guard: 169.254.169.254 is a cloud metadata address",
        ),
    ],
)
def test_download_failures_are_400_and_roll_back(
    api: httpx.Client, odb: psycopg.Connection, env: Ota, reply: Reply, hash_: str | None, detail: str
) -> None:
    pid = create(api, odb)
    version = api.get(f"/api/v1/ota/{pid}").json()["version"]
    with Receiver() as files:
        files.default = reply
        body: dict[str, Any] = {"download_url": f"{files.url}/b.tar.gz"}
        if hash_:
            body["file_hash_sha256"] = hash_
        r = api.post(f"/api/v1/ota/{pid}/apply", json=body)
    assert r.status_code == 400 and r.json() == {"detail": detail}
    got = api.get(f"/api/v1/ota/{pid}").json()
    assert (got["status"], got["started_on"], got["has_firmware_file"]) == ("pending", None, False)
    assert not (env.update_dir / f"firmware-{version}.tar.gz").exists()
    assert _no_firmware_files(env)


def test_download_follows_vetted_redirects(api: httpx.Client, odb: psycopg.Connection) -> None:
    data = bundle(manifest=GOOD_MANIFEST)
    pid = create(api, odb)
    with Receiver() as origin, Receiver() as cdn:
        cdn.default = Reply(200, data)
        origin.default = Reply(302, headers={"Location": f"{cdn.url}/asset"})
        assert api.post(f"/api/v1/ota/{pid}/apply", json={"download_url": f"{origin.url}/r"}).status_code == 200
        assert [q.path for q in cdn.requests] == ["/asset"]
    assert api.get(f"/api/v1/ota/{pid}").json()["file_size_bytes"] == len(data)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/x",
        "http://localhost/x",
        "http://[::1]/x",
        "ftp://example.com/x",
        "http://no-such-host.invalid/x",
    ],
)
def test_download_url_guarded(api: httpx.Client, odb: psycopg.Connection, url: str) -> None:
    pid = create(api, odb)
    r = api.post(f"/api/v1/ota/{pid}/apply", json={"download_url": url})
    assert r.status_code == 400 and r.json()["detail"].startswith("download_failed: ")
    assert api.get(f"/api/v1/ota/{pid}").json()["status"] == "pending"


def test_apply_body_validation(api: httpx.Client, odb: psycopg.Connection) -> None:
    pid = create(api, odb)
    for body in [{"file_hash_sha256": "ab"}, {"file_hash_sha256": "z" * 64}, {"download_url": "h" * 2049}]:
        assert api.post(f"/api/v1/ota/{pid}/apply", json=body).status_code == 422


# --- update check ---


def check(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/api/v1/ota/check")
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_check_without_candidates(api: httpx.Client, odb: psycopg.Connection, env: Ota) -> None:
    create(api, odb)  # older than the running version: not an update
    newer_failed = create(api, odb, "9.9.9")
    odb.execute("UPDATE firmware_updates SET status = 'failed' WHERE public_id = %s", (newer_failed,))
    try:
        assert check(api) == {
            "current_version": "2.0.0",
            "latest_version": None,
            "update_available": False,
            "github_latest_version": None,
            "github_download_url": None,
            "github_release_url": None,
            "github_error": None,
        }
        [req] = env.github.requests[-1:]
        assert req.path == "/repos/acme/webmacs/releases/latest"
        assert req.headers["Accept"] == "application/vnd.github+json"
    finally:
        api.delete(f"/api/v1/ota/{newer_failed}")


def test_check_with_db_candidate_and_github_release(api: httpx.Client, odb: psycopg.Connection, env: Ota) -> None:
    pids = [create(api, odb, "2.1.0"), create(api, odb, "2.0.10")]
    try:
        got = check(api)
        assert (got["update_available"], got["latest_version"], got["current_version"]) == (True, "2.1.0", "2.0.0")
        release = {
            "tag_name": "vv2.2.0",
            "html_url": "https://github.com/acme/webmacs/releases/v2.2.0",
            "assets": [
                {"name": "notes.txt", "browser_download_url": "https://x/notes.txt"},
                {
                    "name": "webmacs-update-2.2.0.tar.gz",
                    "browser_download_url": "https://x/webmacs-update-2.2.0.tar.gz",
                },
            ],
        }
        env.github.default = Reply(200, json.dumps(release).encode(), {"Content-Type": "application/json"})
        got = check(api)
        assert got["latest_version"] == "2.2.0" and got["github_latest_version"] == "2.2.0"
        assert got["github_download_url"] == "https://x/webmacs-update-2.2.0.tar.gz"
        assert got["github_release_url"] == release["html_url"] and got["github_error"] is None
        # An older GitHub release is reported but does not win.
        env.github.default = Reply(200, json.dumps({"tag_name": "1.0.0"}).encode())
        got = check(api)
        assert (got["latest_version"], got["github_latest_version"], got["github_download_url"]) == (
            "2.1.0",
            "1.0.0",
            None,
        )
    finally:
        for pid in pids:
            api.delete(f"/api/v1/ota/{pid}")


def test_check_github_only_and_errors(api: httpx.Client, env: Ota) -> None:
    env.github.default = Reply(200, json.dumps({"tag_name": "v3.0.0"}).encode())
    got = check(api)
    assert (got["update_available"], got["latest_version"]) == (True, "3.0.0")
    env.github.default = Reply(500, b"oops")
    got = check(api)
    assert got["github_error"] == "GitHub API returned 500" and got["update_available"] is False
    env.github.default = Reply(200, b"not json")
    assert check(api)["github_error"] == "GitHub API returned invalid JSON"


def test_github_lookup_edge_cases(env: Ota) -> None:
    settings = env.server.settings
    got = asyncio.run(ota.github_latest(settings.model_copy(update={"github_repo": ""})))
    assert got.error == "github_repo not configured" and got.version is None
    got = asyncio.run(ota.github_latest(settings.model_copy(update={"webmacs_ota_github_api": ""})))
    assert got.error is not None and "disabled" in got.error
    env.github.default = Reply(200, b"{}", delay=1.0)
    got = asyncio.run(ota.github_latest(settings.model_copy(update={"webmacs_ota_github_timeout_s": 0.2})))
    assert got.error == "Connection timed out"
    with Receiver() as gone:
        closed = gone.url
    got = asyncio.run(ota.github_latest(settings.model_copy(update={"webmacs_ota_github_api": closed})))
    assert got.error and got.version is None


# --- uploads ---


def upload(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return client.post("/api/v1/ota/upload", files={"file": (name, data, "application/gzip")})


def leftovers(env: Ota) -> list[str]:
    return [p.name for p in env.update_dir.iterdir() if p.name.startswith(".upload-")]


def test_upload_good_bundle(api: httpx.Client, env: Ota) -> None:
    name = f"webmacs-update-{unique('b')}.tar.gz"
    data = bundle(manifest=GOOD_MANIFEST)
    r = upload(api, name, data)
    assert r.status_code == 201, r.text
    assert r.json() == {
        "status": "success",
        "message": f"Bundle '{name}' uploaded ({len(data):,} bytes). Update will be applied automatically.",
    }
    assert "," in f"{len(data):,}"
    assert (env.update_dir / name).read_bytes() == data
    r = upload(api, name, data)
    assert r.status_code == 409 and r.json() == {"detail": f"Bundle '{name}' already exists."}
    assert leftovers(env) == []


@pytest.mark.parametrize(
    "filename",
    ["../../escape-{u}.tar.gz", "..\\..\\escape-{u}.tar.gz", "/etc/escape-{u}.tar.gz", "a/b/c/escape-{u}.tar.gz"],
)
def test_upload_path_traversal_keeps_base_name(api: httpx.Client, env: Ota, filename: str) -> None:
    u = unique("p")
    r = upload(api, filename.format(u=u), bundle(manifest=GOOD_MANIFEST))
    assert r.status_code == 201, r.text
    assert f"Bundle 'escape-{u}.tar.gz' uploaded" in r.json()["message"]
    assert (env.update_dir / f"escape-{u}.tar.gz").is_file()
    assert not (env.update_dir.parent / f"escape-{u}.tar.gz").exists()
    assert not Path(f"/etc/escape-{u}.tar.gz").exists()


@pytest.mark.parametrize("filename", ["bundle.zip", "bundle.tar", "bundle.tar.gz.exe", "bundle.tgz", "noext"])
def test_upload_wrong_type_is_400(api: httpx.Client, env: Ota, filename: str) -> None:
    r = upload(api, filename, bundle(manifest=GOOD_MANIFEST))
    assert r.status_code == 400 and r.json() == {"detail": "File must be a .tar.gz update bundle."}
    assert not (env.update_dir / filename).exists()


@pytest.mark.parametrize("filename", [".tar.gz", "-x.tar.gz", "bad name.tar.gz", "a..b.tar.gz"])
def test_upload_unsafe_names_are_400(api: httpx.Client, filename: str) -> None:
    r = upload(api, filename, bundle(manifest=GOOD_MANIFEST))
    assert r.status_code == 400 and r.json() == {"detail": "Invalid bundle file name."}


def test_upload_oversize_is_413_and_removed(api: httpx.Client, env: Ota) -> None:
    name = f"big-{unique('b')}.tar.gz"
    r = upload(api, name, bundle(manifest=GOOD_MANIFEST, padding=CAP + 10_000))
    assert r.status_code == 413 and r.json() == {"detail": f"Bundle exceeds maximum allowed size ({CAP:,} bytes)."}
    assert not (env.update_dir / name).exists() and leftovers(env) == []


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"plain text, not gzip", "not a gzip-compressed tar archive"),
        (bundle(), "manifest.json is missing"),
        (bundle(manifest=b"{not json"), "manifest.json is not valid JSON"),
        (bundle(manifest=["2.1.0"]), "manifest.json must be a JSON object"),
        (bundle(manifest={"images_sha256": "ab" * 32}), "manifest.json 'version' must be a version X.Y.Z"),
        (
            bundle(manifest={"version": "v2.1", "images_sha256": "ab" * 32}),
            "manifest.json 'version' must be a version X.Y.Z",
        ),
        (
            bundle(manifest={"version": "2.1.0", "images_sha256": "xyz"}),
            "manifest.json 'images_sha256' must be 64 hexadecimal characters",
        ),
        (bundle(manifest={"version": "2.1.0"}), "manifest.json 'images_sha256' must be 64 hexadecimal characters"),
        (bundle({"../evil.sh": b"rm -rf /"}, manifest=GOOD_MANIFEST), "member '../evil.sh' has an unsafe path"),
        (bundle({"/etc/cron.d/x": b"x"}, manifest=GOOD_MANIFEST), "member '/etc/cron.d/x' has an unsafe path"),
        (bundle({"a/../../x": b"x"}, manifest=GOOD_MANIFEST), "member 'a/../../x' has an unsafe path"),
        (bundle(manifest=GOOD_MANIFEST, symlink=("link", "/etc/passwd")), "link 'link' points outside the bundle"),
        (bundle(manifest=GOOD_MANIFEST, symlink=("d/link", "../../x")), "link 'd/link' points outside the bundle"),
    ],
)
def test_upload_invalid_bundle_is_422_and_removed(api: httpx.Client, env: Ota, data: bytes, reason: str) -> None:
    name = f"webmacs-update-{unique('bad')}.tar.gz"
    r = upload(api, name, data)
    assert r.status_code == 422 and r.json() == {"detail": f"Invalid update bundle: {reason}."}
    assert not (env.update_dir / name).exists() and leftovers(env) == []


def test_upload_missing_file_is_422(api: httpx.Client) -> None:
    r = api.post("/api/v1/ota/upload", data={"other": "x"}, files={"notfile": ("x.tar.gz", b"x")})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "file"]
    r = api.post("/api/v1/ota/upload", json={"file": "x"})
    assert r.status_code == 422
    r = api.post(
        "/api/v1/ota/upload", content=b"--zz\r\ngarbage", headers={"Content-Type": "multipart/form-data; boundary=zz"}
    )
    assert r.status_code == 422


# --- access ---


def test_access_matrix(api: httpx.Client, odb: psycopg.Connection, env: Ota) -> None:
    pid = create(api, odb)
    admin_only = [
        ("GET", "/api/v1/ota"),
        ("POST", "/api/v1/ota"),
        ("GET", f"/api/v1/ota/{pid}"),
        ("POST", f"/api/v1/ota/{pid}/apply"),
        ("POST", f"/api/v1/ota/{pid}/rollback"),
        ("DELETE", f"/api/v1/ota/{pid}"),
        ("POST", "/api/v1/ota/upload"),
    ]
    with httpx.Client(base_url=env.server.url) as anon:
        for method, path in [*admin_only, ("GET", "/api/v1/ota/check")]:
            assert anon.request(method, path).status_code == 401, path
            for who in (env.viewer, env.operator):
                r = anon.request(method, path, headers=who, json={"version": old_version()})
                expected = 200 if path.endswith("/check") else 403
                assert r.status_code == expected, (method, path, r.text)
                if expected == 403:
                    assert r.json() == {"detail": "Admin privileges required."}
    assert check(api)["current_version"] == "2.0.0"
    assert api.get("/api/v1/ota").status_code == 200
    assert api.get(f"/api/v1/ota/{pid}").status_code == 200
    assert api.post(f"/api/v1/ota/{pid}/apply").status_code == 200
    assert api.post(f"/api/v1/ota/{pid}/rollback").status_code == 200
    assert api.delete(f"/api/v1/ota/{pid}").status_code == 200


def test_nul_input_is_422_or_404_never_500(api: httpx.Client, odb: psycopg.Connection) -> None:
    assert api.post("/api/v1/ota", json={"version": old_version(), "changelog": "a\x00b"}).status_code == 422
    pid = create(api, odb)
    assert api.post(f"/api/v1/ota/{pid}/apply", json={"download_url": "http://x\x00/"}).status_code == 422
    for method, path in [
        ("GET", "/api/v1/ota/x%00"),
        ("DELETE", "/api/v1/ota/x%00"),
        ("POST", "/api/v1/ota/x%00/apply"),
        ("POST", "/api/v1/ota/x%00/rollback"),
    ]:
        assert api.request(method, path).status_code == 404, path


def test_github_result_is_cached(env: Ota) -> None:
    settings = env.server.settings.model_copy(update={"webmacs_ota_github_cache_s": 300})
    env.github.default = Reply(200, json.dumps({"tag_name": "v4.0.0"}).encode())

    async def twice() -> tuple[ota.GithubRelease, ota.GithubRelease, ota.GithubRelease]:
        cache = ota.GithubCache()
        first = await cache.latest(settings)
        env.github.default = Reply(200, json.dumps({"tag_name": "v5.0.0"}).encode())
        second = await cache.latest(settings)
        other_repo = await cache.latest(settings.model_copy(update={"github_repo": "acme/other"}))
        return first, second, other_repo

    before = len(env.github.requests)
    first, second, other = asyncio.run(twice())
    assert (first.version, second.version, other.version) == ("4.0.0", "4.0.0", "5.0.0")
    assert len(env.github.requests) == before + 2


def test_unwritable_update_dir_is_503_not_500(api: httpx.Client, env: Ota, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    settings = env.server.settings
    original = settings.webmacs_update_dir
    settings.webmacs_update_dir = blocker / "updates"  # a directory below a regular file cannot be created
    try:
        r = upload(api, f"webmacs-update-{unique('w')}.tar.gz", bundle(manifest=GOOD_MANIFEST))
    finally:
        settings.webmacs_update_dir = original
    assert r.status_code == 503
    assert r.json()["detail"].startswith("Cannot store the bundle in the update directory: ")


def test_download_never_writes_outside_the_update_dir(api: httpx.Client, odb: psycopg.Connection) -> None:
    """A version written behind the API's back cannot steer the firmware file name."""
    row = odb.execute(
        "INSERT INTO firmware_updates (version) VALUES (%s) RETURNING public_id", (f"../../{unique('evil')}",)
    ).fetchone()
    assert row is not None
    with Receiver() as files:
        files.default = Reply(200, b"data")
        r = api.post(f"/api/v1/ota/{row[0]}/apply", json={"download_url": f"{files.url}/x"})
        assert files.requests == []
    assert r.status_code == 400 and r.json()["detail"].startswith("Invalid firmware version")
    assert api.get(f"/api/v1/ota/{row[0]}").json()["status"] == "pending"
