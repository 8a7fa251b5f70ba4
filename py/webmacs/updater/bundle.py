"""Update bundles (spec §10.6): the archive rules shared by upload and updater, safe extraction, verification."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from webmacs.settings import Settings

SEMVER = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$"
_SEMVER = re.compile(SEMVER)
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
#: What the updater picks up in the update directory (spec §10.6).
BUNDLE_GLOB = "webmacs-update-*.tar.gz"
MANIFEST = "manifest.json"
IMAGES = "images.tar"
#: Detached signatures of manifest.json inside the bundle: minisign's format, or a bare Ed25519 signature.
SIGNATURES = ("manifest.json.minisig", "manifest.json.sig")
MAX_MANIFEST_BYTES = 1024 * 1024


class BundleInvalid(Exception):
    """The bundle is refused; the message says why (it ends up in the API's 422 or the updater's record)."""


@dataclass(frozen=True)
class Limits:
    """Caps that keep a hostile archive (a zip bomb, millions of members) from filling the disk."""

    max_unpacked_bytes: int = 8 * 1024**3
    max_members: int = 10_000

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.webmacs_updater_max_unpacked_bytes, settings.webmacs_updater_max_members)


@dataclass(frozen=True)
class Manifest:
    version: str
    images_sha256: str
    changelog: str | None = None
    #: SHA-256 of further files (relative path → hex), e.g. docker-compose.prod.yml; checked when present,
    #: required for every file when bundles must be signed.
    files: dict[str, str] = field(default_factory=dict)


def _escapes(norm: str) -> bool:
    return norm.startswith(("/", "../")) or norm == ".."


@dataclass
class _MemberRules:
    """Checks members one at a time, in archive order, before anything is written."""

    limits: Limits
    seen: set[str] = field(default_factory=set)
    unpacked: int = 0

    def check(self, member: tarfile.TarInfo) -> str:
        name = member.name
        norm = posixpath.normpath(name)
        if "\\" in name or _escapes(norm):
            raise BundleInvalid(f"member '{name}' has an unsafe path")
        if member.issym() or member.islnk():
            # A symbolic link is resolved from its own directory, a hard link from the archive's root.
            base = posixpath.dirname(norm) if member.issym() else ""
            link = posixpath.normpath(posixpath.join(base, member.linkname))
            if member.linkname.startswith("/") or _escapes(link):
                raise BundleInvalid(f"link '{name}' points outside the bundle")
        elif not (member.isfile() or member.isdir()):
            raise BundleInvalid(f"member '{name}' is not a regular file or directory")
        if norm in self.seen and not member.isdir():
            # A later member of the same name silently replaces the earlier one on extraction: what was
            # checked would not be what is used.
            raise BundleInvalid(f"member '{name}' appears twice")
        self.seen.add(norm)
        if len(self.seen) > self.limits.max_members:
            raise BundleInvalid(f"more than {self.limits.max_members:,} members")
        self.unpacked += member.size if member.isfile() else 0
        if self.unpacked > self.limits.max_unpacked_bytes:
            raise BundleInvalid(f"unpacks to more than {self.limits.max_unpacked_bytes:,} bytes")
        if norm in (MANIFEST, IMAGES, *SIGNATURES) and not member.isfile():
            raise BundleInvalid(f"{norm} must be a regular file")
        if norm in (MANIFEST, *SIGNATURES) and member.size > MAX_MANIFEST_BYTES:
            raise BundleInvalid(f"{norm} must be at most 1 MiB")
        return norm


def parse_manifest(raw: bytes) -> Manifest:
    try:
        data: Any = json.loads(raw)
    except ValueError as e:
        raise BundleInvalid("manifest.json is not valid JSON") from e
    if not isinstance(data, dict):
        raise BundleInvalid("manifest.json must be a JSON object")
    version, images, changelog, files = (data.get(k) for k in ("version", "images_sha256", "changelog", "files"))
    if not isinstance(version, str) or not _SEMVER.match(version):
        raise BundleInvalid("manifest.json 'version' must be a version X.Y.Z")
    if not isinstance(images, str) or not _SHA256.match(images):
        raise BundleInvalid("manifest.json 'images_sha256' must be 64 hexadecimal characters")
    if changelog is not None and not isinstance(changelog, str):
        raise BundleInvalid("manifest.json 'changelog' must be text")
    files = {} if files is None else files
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _SHA256.match(v) for k, v in files.items()
    ):
        raise BundleInvalid("manifest.json 'files' must map file names to SHA-256 digests")
    listed = {posixpath.normpath(k): v.lower() for k, v in files.items()}
    if any(_escapes(k) for k in listed):
        raise BundleInvalid("manifest.json 'files' must name files inside the bundle")
    return Manifest(version, images.lower(), changelog, listed)


def validate_bundle(path: Path, limits: Limits | None = None) -> Manifest:
    """Check an update bundle without writing anything: a gzip tar whose members pass the rules above and
    whose manifest.json carries `version` (X.Y.Z) and `images_sha256` (64 hex digits)."""
    rules = _MemberRules(limits or Limits())
    manifest: Manifest | None = None
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for member in tar:
                if rules.check(member) == MANIFEST:
                    f = tar.extractfile(member)
                    assert f is not None  # a regular file member always has content
                    manifest = parse_manifest(f.read())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise BundleInvalid("not a gzip-compressed tar archive") from e
    if manifest is None:
        raise BundleInvalid("manifest.json is missing")
    return manifest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Extracted:
    directory: Path
    manifest: Manifest
    manifest_bytes: bytes


def extract(path: Path, dest: Path, limits: Limits | None = None) -> Extracted:
    """Extract a bundle into the empty directory `dest`, member by member, each checked before it is
    written; tarfile's "data" filter checks again against the real file system (it resolves links already
    extracted, which a check of names alone cannot). Then require manifest.json and an images.tar with the
    manifest's SHA-256, and the SHA-256 of every file the manifest lists."""
    rules = _MemberRules(limits or Limits())
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for member in tar:
                rules.check(member)
                tar.extract(member, dest, filter="data")
    except tarfile.FilterError as e:
        raise BundleInvalid(f"unsafe member: {e}") from e
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise BundleInvalid("not a gzip-compressed tar archive") from e
    manifest_path = dest / MANIFEST
    if not manifest_path.is_file() or manifest_path.is_symlink():
        raise BundleInvalid("manifest.json is missing")
    raw = manifest_path.read_bytes()
    manifest = parse_manifest(raw)
    images = dest / IMAGES
    if not images.is_file() or images.is_symlink():
        raise BundleInvalid("images.tar is missing")
    if sha256_file(images) != manifest.images_sha256:
        raise BundleInvalid("images.tar does not match the manifest's images_sha256")
    for name, digest in manifest.files.items():
        listed = dest / name
        if listed.is_symlink() or not listed.is_file():
            raise BundleInvalid(f"'{name}' listed in the manifest is missing")
        if sha256_file(listed) != digest:
            raise BundleInvalid(f"'{name}' does not match its SHA-256 in the manifest")
    return Extracted(dest, manifest, raw)


def uncovered(extracted: Extracted) -> list[str]:
    """Files of an extracted bundle that no digest in the manifest vouches for (links count too: a signed
    manifest says nothing about where they point)."""
    covered = {MANIFEST, IMAGES, *SIGNATURES, *extracted.manifest.files}
    found = []
    for root, dirs, files in os.walk(extracted.directory):
        for name in [*files, *(d for d in dirs if (Path(root) / d).is_symlink())]:
            rel = (Path(root) / name).relative_to(extracted.directory).as_posix()
            if rel not in covered or (Path(root) / name).is_symlink():
                found.append(rel)
    return sorted(found)
