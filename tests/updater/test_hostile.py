"""Hostile and broken bundles end in failed/ with the reason recorded, before any backup or docker command,
and nothing is written outside the updater's work directory."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.updater.conftest import Rig
from tests.updater.support import IMAGES, build, manifest_for, member, tree
from webmacs.updater.bundle import BundleInvalid, Limits, validate_bundle

GOOD = manifest_for()
# Paths a hostile bundle aims at, relative to the test's root (the updater works in <root>/updates/.work/<b>/).
ESCAPE = "../../../../escaped.txt"


def hostile_cases(root: Path) -> list[tuple[str, dict[str, Any], str]]:
    return [
        ("path traversal", {"extra": [member(ESCAPE, b"owned")]}, "has an unsafe path"),
        ("absolute path", {"extra": [member(str(root / "abs-escaped.txt"), b"owned")]}, "has an unsafe path"),
        (
            "symlink out of the tree",
            {"extra": [member("etc", type=tarfile.SYMTYPE, linkname="/etc"), member("etc/cron.d/x", b"x")]},
            "points outside the bundle",
        ),
        (
            "relative symlink out of the tree",
            {"extra": [member("up", type=tarfile.SYMTYPE, linkname="../../../.."), member("up/escaped.txt", b"x")]},
            "points outside the bundle",
        ),
        (
            # Each link on its own points inside; together they lead out (d1 -> ".", so d1/d2/s -> ../../x
            # resolves above the tree). Only the check against the real file system can see it.
            "symlink chain out of the tree",
            {
                "extra": [
                    member("d1", type=tarfile.SYMTYPE, linkname="."),
                    member("d1/d2", type=tarfile.DIRTYPE, mode=0o755),
                    member("d1/d2/s", type=tarfile.SYMTYPE, linkname="../../escaped-dir"),
                    member("d1/d2/s/escaped.txt", b"owned"),
                ]
            },
            "unsafe member",
        ),
        (
            # A hard link's target is relative to the archive's root, not to the link's directory.
            "hard link out of the tree",
            {"extra": [member("a/b", type=tarfile.LNKTYPE, linkname="../escaped.txt")]},
            "points outside the bundle",
        ),
        (
            "hard link to an absolute path",
            {"extra": [member("passwd", type=tarfile.LNKTYPE, linkname="/etc/passwd")]},
            "points outside the bundle",
        ),
        ("device file", {"extra": [member("dev/tty", type=tarfile.CHRTYPE, devmajor=5, devminor=0)]}, "not a regular"),
        ("fifo", {"extra": [member("pipe", type=tarfile.FIFOTYPE)]}, "not a regular file"),
        ("member twice", {"extra": [member("manifest.json", b'{"version":"9.9.9"}')]}, "appears twice"),
        ("manifest as a link", {"manifest": None, "extra": [_link("manifest.json", "images.tar")]}, "regular file"),
        ("missing manifest", {"manifest": None}, "manifest.json is missing"),
        ("manifest not JSON", {"manifest": b"{version: 2.1.0"}, "manifest.json is not valid JSON"),
        ("manifest not an object", {"manifest": ["2.1.0"]}, "must be a JSON object"),
        ("version with a v", {"manifest": {**GOOD, "version": "v2.1.0"}}, "'version' must be a version X.Y.Z"),
        ("version X.Y", {"manifest": {**GOOD, "version": "2.1"}}, "'version' must be a version X.Y.Z"),
        ("leading zero", {"manifest": {**GOOD, "version": "2.01.0"}}, "'version' must be a version X.Y.Z"),
        ("no images hash", {"manifest": {"version": "2.1.0"}}, "'images_sha256' must be 64 hexadecimal"),
        (
            "bad images hash",
            {"manifest": {**GOOD, "images_sha256": hashlib.sha256(b"other").hexdigest()}},
            "images.tar does not match the manifest's images_sha256",
        ),
        ("missing images.tar", {"images": None}, "images.tar is missing"),
        (
            "listed file with a wrong hash",
            {
                "manifest": {**GOOD, "files": {"docker-compose.prod.yml": "0" * 64}},
                "files": {"docker-compose.prod.yml": b"x"},
            },
            "'docker-compose.prod.yml' does not match its SHA-256",
        ),
        (
            "listed file outside",
            {"manifest": {**GOOD, "files": {"../../x": "0" * 64}}},
            "'files' must name files inside the bundle",
        ),
    ]


def _link(name: str, target: str) -> tuple[tarfile.TarInfo, bytes | None]:
    return member(name, type=tarfile.SYMTYPE, linkname=target)


CASES = [c[0] for c in hostile_cases(Path("/root"))]


@pytest.mark.parametrize("case", CASES)
def test_hostile_bundle_is_refused_and_writes_nothing_outside_the_work_directory(rig: Rig, case: str) -> None:
    _, kw, reason = next(c for c in hostile_cases(rig.root) if c[0] == case)
    bundle = rig.bundle(**kw)
    updater = rig.updater()
    before = tree(rig.root)
    [result] = updater.run_once() or []

    assert result.outcome == "refused" and reason in (result.reason or "")
    failed = rig.updates / "failed" / bundle.name
    assert result.moved_to == failed and failed.is_file() and not bundle.exists()
    assert reason in failed.with_name(failed.name + ".reason").read_text()
    # Only the bundle's move, its reason file, the lock and the (emptied) work directory are new.
    rel = bundle.relative_to(rig.root).as_posix()
    expected = (before - {rel}) | {
        "updates/failed",
        f"updates/failed/{bundle.name}",
        f"updates/failed/{bundle.name}.reason",
        "updates/.updater.lock",
        "updates/.work",
    }
    assert tree(rig.root) == expected
    assert rig.docker.calls() == []  # refused before anything was run …
    assert not (rig.updates / "backups").exists()  # … or backed up
    [(content, level)] = rig.log_entries(bundle)
    assert level == "error" and content.startswith(f"Update bundle '{bundle.name}' refused: ")


def test_not_a_gzip_tar(rig: Rig) -> None:
    bundle = rig.updates / "webmacs-update-2.1.0-plain.tar.gz"
    bundle.write_bytes(b"plain text, not gzip")
    result = rig.run()
    assert result.outcome == "refused" and result.reason == "not a gzip-compressed tar archive"


def test_zip_bomb_stops_at_the_unpacked_size_cap(rig: Rig) -> None:
    # 16 MiB of zeros compress to ~16 KiB: the cap (here 1 MiB) stops it before a byte of it is written.
    bomb = b"\0" * (16 * 1024 * 1024)
    bundle = rig.bundle(manifest=manifest_for(images=bomb), images=bomb)
    assert bundle.stat().st_size < 1024 * 1024
    result = rig.run(webmacs_updater_max_unpacked_bytes=1024 * 1024)
    assert result.outcome == "refused" and result.reason == "unpacks to more than 1,048,576 bytes"
    assert rig.docker.calls() == []


def test_member_count_cap(rig: Rig) -> None:
    bundle = rig.bundle(manifest=GOOD, files={f"f{i}": b"" for i in range(50)})
    result = rig.run(webmacs_updater_max_members=20)
    assert result.outcome == "refused" and result.reason == "more than 20 members"
    assert (rig.updates / "failed" / bundle.name).exists()


def test_upload_check_shares_the_rules(tmp_path: Path) -> None:
    """POST /ota/upload validates with the same rules, caps included (no extraction there)."""
    escape = build(tmp_path / "a.tar.gz", manifest=GOOD, extra=[member("a/b", type=tarfile.LNKTYPE, linkname="../x")])
    with pytest.raises(BundleInvalid, match="link 'a/b' points outside the bundle"):
        validate_bundle(escape)
    many = build(tmp_path / "b.tar.gz", manifest=GOOD, files={f"f{i}": b"" for i in range(5)})
    with pytest.raises(BundleInvalid, match="more than 3 members"):
        validate_bundle(many, Limits(max_members=3))
    assert validate_bundle(build(tmp_path / "c.tar.gz", manifest=GOOD)).version == "2.1.0"
    assert IMAGES  # the good bundle above carries the standard images.tar
