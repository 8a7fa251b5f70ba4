"""OTA (spec §10): state machine, verified bundle downloads, streamed bundle uploads, GitHub release lookup."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import quote, urljoin

from webmacs.errors import BadRequest, Conflict, DomainError, TooLarge, Unprocessable
from webmacs.services import ssrf
from webmacs.settings import Settings

# The bundle rules live with the updater that applies them; the API's version pattern is theirs.
from webmacs.updater.bundle import SEMVER as SEMVER
from webmacs.updater.bundle import BundleInvalid, Limits, validate_bundle
from webmacs.updater.bundle import sha256_file as _sha256_file

_SEMVER = re.compile(SEMVER)
CHUNK = 64 * 1024
MAX_REDIRECTS = 5

TRANSITIONS: dict[str, set[str]] = {
    "pending": {"downloading", "completed", "failed"},
    "downloading": {"verifying", "failed"},
    "verifying": {"applying", "failed"},
    "applying": {"completed", "failed"},
    "completed": {"rolled_back"},
    "failed": {"pending"},
    "rolled_back": {"pending"},
}
HASH_MISMATCH = "SHA-256 hash verification failed"


def check_transition(current: str, target: str) -> None:
    if target not in TRANSITIONS.get(current, set()):
        raise Conflict(f"Cannot transition from '{current}' to '{target}'")


def parse_version(v: str | None) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a strict X.Y.Z version, else None (malformed never counts as newer)."""
    m = _SEMVER.match(v or "")
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def version_key(v: str) -> tuple[int, int, int]:
    """Sort key: numeric X.Y.Z, malformed versions lowest."""
    return parse_version(v) or (-1, -1, -1)


def newer(candidate: str | None, than: str) -> bool:
    c, t = parse_version(candidate), parse_version(than)
    return c is not None and t is not None and c > t


def firmware_path(settings: Settings, version: str) -> Path:
    # Strict X.Y.Z (validated on create) is safe in a file name; a row written behind the API's back may not be.
    if parse_version(version) is None:
        raise BadRequest(f"Invalid firmware version '{version}'.")
    return settings.webmacs_update_dir / f"firmware-{version}.tar.gz"


async def sha256_file(path: Path) -> str | None:
    """The file's SHA-256, or None when it is missing or unreadable."""
    try:
        return await asyncio.to_thread(_sha256_file, path)
    except OSError:
        return None


def inside(path: Path, directory: Path) -> bool:
    try:
        return path.resolve().is_relative_to(directory.resolve())
    except OSError:
        return False


# --- download (POST /ota/{id}/apply with download_url) ---


class DownloadFailed(Exception):
    """Any failure of a firmware download; the message is the API's 400 detail."""


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str


async def download(url: str, dest: Path, settings: Settings, expected_sha256: str | None = None) -> Downloaded:
    """Stream `url` into `dest` (atomically: a temporary file renamed at the end) with a size cap; with
    `expected_sha256`, a mismatch fails and leaves no file.
    Every hop (redirects are followed, at most 5) goes through the SSRF guard and is dialled at the
    address that was vetted."""
    import httpx  # here, not at the top: ~7 MB of every server's memory for what only OTA downloads use

    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    cap = settings.webmacs_ota_max_bundle_bytes
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        async with httpx.AsyncClient(
            timeout=settings.webmacs_ota_download_timeout_s, follow_redirects=False, trust_env=False
        ) as client:
            for _ in range(MAX_REDIRECTS + 1):
                try:
                    target = await ssrf.vet(url, settings.webmacs_webhook_allow_hosts)
                except ssrf.Refused as e:
                    raise DownloadFailed(f"download_failed: refused by SSRF guard: {e}") from e
                except (ValueError, ssrf.Unresolvable) as e:
                    raise DownloadFailed(f"download_failed: {e}") from e
                pinned, headers, extensions = ssrf.pinned_request_args(url, target)
                request = client.build_request("GET", pinned, headers=headers, extensions=extensions)
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise DownloadFailed(f"download_failed: status {response.status_code}")
                    h = hashlib.sha256()
                    size = 0
                    # Opening is one metadata call; the writes, which can block, go through a thread.
                    with open(tmp, "wb") as f:  # noqa: ASYNC230
                        async for chunk in response.aiter_bytes(CHUNK):
                            size += len(chunk)
                            if size > cap:
                                raise DownloadFailed(f"download_failed: larger than {cap:,} bytes")
                            h.update(chunk)
                            await asyncio.to_thread(f.write, chunk)
                    digest = h.hexdigest()
                    if expected_sha256 is not None and digest != expected_sha256.lower():
                        raise DownloadFailed(HASH_MISMATCH)
                    os.replace(tmp, dest)
                    return Downloaded(dest, size, digest)
                finally:
                    await response.aclose()
            raise DownloadFailed(f"download_failed: more than {MAX_REDIRECTS} redirects")
    except DownloadFailed:
        raise
    except httpx.TimeoutException as e:
        raise DownloadFailed("download_failed: timed out") from e
    except (httpx.HTTPError, OSError) as e:
        raise DownloadFailed(f"download_failed: {str(e) or type(e).__name__}") from e
    finally:
        tmp.unlink(missing_ok=True)


# --- upload (POST /ota/upload) ---

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def bundle_name(filename: str) -> str:
    """The stored name: the client's base name only (no directories), restricted to a safe alphabet."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not base.endswith(".tar.gz"):
        raise BadRequest("File must be a .tar.gz update bundle.")
    if not _SAFE_NAME.match(base) or ".." in base or len(base) > 255:
        raise BadRequest("Invalid bundle file name.")
    return base


class StorageUnavailable(DomainError):
    status_code = 503


async def store_bundle(filename: str, chunks: AsyncIterator[bytes], settings: Settings) -> tuple[str, int]:
    """Write an uploaded bundle to a temporary file in the update directory as it arrives, enforcing the size cap;
    validate it; then give it its final name (never replacing an existing bundle). Returns (name, size). Nothing
    is left behind on failure."""
    name = bundle_name(filename)
    directory = settings.webmacs_update_dir
    cap = settings.webmacs_ota_max_bundle_bytes
    tmp: Path | None = None
    size = 0
    try:
        if (directory / name).exists():
            raise Conflict(f"Bundle '{name}' already exists.")
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".upload-{uuid.uuid4().hex}.part"
        out: IO[bytes] = await asyncio.to_thread(open, tmp, "xb")
        with out:
            async for data in chunks:
                size += len(data)
                if size > cap:
                    raise TooLarge(f"Bundle exceeds maximum allowed size ({_size_text(cap)}).")
                await asyncio.to_thread(out.write, data)
        try:
            await asyncio.to_thread(validate_bundle, tmp, Limits.from_settings(settings))
        except BundleInvalid as e:
            raise Unprocessable(f"Invalid update bundle: {e}.") from e
        try:
            # link() never replaces an existing file, unlike rename(): a concurrent upload of the same
            # name loses with 409 instead of overwriting.
            os.link(tmp, directory / name)
        except FileExistsError as e:
            raise Conflict(f"Bundle '{name}' already exists.") from e
        return name, size
    except OSError as e:  # the update directory is missing, not writable or full: a deployment problem
        raise StorageUnavailable(f"Cannot store the bundle in the update directory: {e.strerror or e}.") from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _size_text(n: int) -> str:
    mib = 1024 * 1024
    return f"{n // mib} MB" if n >= mib and n % mib == 0 else f"{n:,} bytes"


# --- GET /ota/check: GitHub ---


@dataclass
class GithubRelease:
    version: str | None = None
    download_url: str | None = None
    release_url: str | None = None
    error: str | None = None


async def github_latest(settings: Settings) -> GithubRelease:
    """The latest release of `GITHUB_REPO` (spec §10.4); failures become `error` text, never exceptions."""
    repo = settings.github_repo.strip()
    if not repo:
        return GithubRelease(error="github_repo not configured")
    base = settings.webmacs_ota_github_api.strip().rstrip("/")
    if not base:
        return GithubRelease(error="GitHub lookup disabled (WEBMACS_OTA_GITHUB_API is empty)")
    url = f"{base}/repos/{quote(repo, safe='/')}/releases/latest"
    import httpx

    try:
        async with httpx.AsyncClient(timeout=settings.webmacs_ota_github_timeout_s) as client:
            r = await client.get(url, headers={"Accept": "application/vnd.github+json"})
            if r.status_code == 404:
                return GithubRelease()
            if r.status_code != 200:
                return GithubRelease(error=f"GitHub API returned {r.status_code}")
            data = r.json()
    except httpx.TimeoutException:
        return GithubRelease(error="Connection timed out")
    except httpx.HTTPError as e:
        return GithubRelease(error=str(e) or type(e).__name__)
    except ValueError:
        return GithubRelease(error="GitHub API returned invalid JSON")
    if not isinstance(data, dict):
        return GithubRelease(error="GitHub API returned an unexpected response")
    tag = data.get("tag_name")
    version = tag.lstrip("v") if isinstance(tag, str) else None
    download = None
    for asset in data.get("assets") or []:
        if not isinstance(asset, dict):
            continue
        name = str(asset.get("name") or "")
        if name.endswith(".tar.gz") and "webmacs-update" in name:
            download = asset.get("browser_download_url")
            break
    html = data.get("html_url")
    return GithubRelease(
        version=version,
        download_url=download if isinstance(download, str) else None,
        release_url=html if isinstance(html, str) else None,
    )


class GithubCache:
    """The last lookup per (API base, repository), reused for `webmacs_ota_github_cache_s` seconds so that
    update checks from every browser do not each hit GitHub's rate limit. One per app (its Runtime)."""

    def __init__(self) -> None:
        self._entry: tuple[float, tuple[str, str], GithubRelease] | None = None
        self._lock = asyncio.Lock()

    async def latest(self, settings: Settings) -> GithubRelease:
        ttl = settings.webmacs_ota_github_cache_s
        key = (settings.webmacs_ota_github_api, settings.github_repo)
        async with self._lock:  # concurrent checks share one lookup
            entry = self._entry
            if ttl > 0 and entry is not None and entry[1] == key and time.monotonic() < entry[0]:
                return entry[2]
            result = await github_latest(settings)
            self._entry = (time.monotonic() + ttl, key, result)
            return result
