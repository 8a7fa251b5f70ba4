"""With a public key configured, only bundles whose manifest.json is signed by it (minisign or bare Ed25519),
and whose every file the manifest vouches for, are applied; the rest go to failed/."""

from __future__ import annotations

import base64
import hashlib
import json
import tarfile
from typing import Any

import pytest

from tests.updater.conftest import Rig
from tests.updater.support import COMPOSE_V2, SigningKey, manifest_for, member
from webmacs.updater.service import Updater

COMPOSE = "docker-compose.prod.yml"


def signed_manifest(**extra: Any) -> bytes:
    return json.dumps(manifest_for(files={COMPOSE: hashlib.sha256(COMPOSE_V2).hexdigest()}, **extra)).encode()


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.new()


def run(rig: Rig, public_key: str, **bundle: Any) -> tuple[str, str | None]:
    rig.bundle(**bundle)
    result = rig.run(webmacs_updater_public_key=public_key)
    return result.outcome, result.reason


def test_minisign_signed_bundle_is_applied(rig: Rig, key: SigningKey) -> None:
    raw = signed_manifest()
    files = {COMPOSE: COMPOSE_V2, "manifest.json.minisig": key.minisig(raw).encode()}
    assert run(rig, key.minisign_public(), manifest=raw, files=files) == ("applied", None)


def test_legacy_minisign_signature_is_accepted(rig: Rig, key: SigningKey) -> None:
    raw = signed_manifest()
    files = {COMPOSE: COMPOSE_V2, "manifest.json.minisig": key.minisig(raw, prehashed=False).encode()}
    assert run(rig, key.minisign_public(), manifest=raw, files=files) == ("applied", None)


def test_bare_ed25519_signature_is_accepted(rig: Rig, key: SigningKey) -> None:
    raw = signed_manifest()
    public = base64.b64encode(key.raw_public()).decode()
    assert run(rig, public, manifest=raw, files={COMPOSE: COMPOSE_V2, "manifest.json.sig": key.bare(raw)}) == (
        "applied",
        None,
    )


def refused(rig: Rig, key: SigningKey, reason: str, **bundle: Any) -> None:
    outcome, why = run(rig, key.minisign_public(), **bundle)
    assert outcome == "refused" and why is not None and reason in why
    assert rig.docker.calls() == []


def test_unsigned_bundle_is_refused(rig: Rig, key: SigningKey) -> None:
    refused(rig, key, "the bundle is not signed", manifest=signed_manifest(), files={COMPOSE: COMPOSE_V2})


def test_signature_by_another_key_is_refused(rig: Rig, key: SigningKey) -> None:
    raw = signed_manifest()
    other = SigningKey.new()
    files = {COMPOSE: COMPOSE_V2, "manifest.json.minisig": other.minisig(raw).encode()}
    refused(rig, key, "made with another key", manifest=raw, files=files)
    # Claiming the right key id does not help: the signature itself fails.
    forged = SigningKey(other.private, key.key_id)
    files = {COMPOSE: COMPOSE_V2, "manifest.json.minisig": forged.minisig(raw).encode()}
    refused(rig, key, "does not verify", manifest=raw, files=files)


def test_altered_manifest_is_refused(rig: Rig, key: SigningKey) -> None:
    signature = key.minisig(signed_manifest()).encode()
    altered = signed_manifest(changelog="Something else.")
    files = {COMPOSE: COMPOSE_V2, "manifest.json.minisig": signature}
    refused(rig, key, "manifest.json.minisig does not verify", manifest=altered, files=files)


def test_altered_trusted_comment_is_refused(rig: Rig, key: SigningKey) -> None:
    raw = signed_manifest()
    lines = key.minisig(raw).splitlines()
    lines[2] = "trusted comment: timestamp:1800000000"
    refused(
        rig,
        key,
        "its trusted comment does not verify",
        manifest=raw,
        files={COMPOSE: COMPOSE_V2, "manifest.json.minisig": ("\n".join(lines) + "\n").encode()},
    )


def test_file_the_manifest_does_not_vouch_for_is_refused(rig: Rig, key: SigningKey) -> None:
    raw = json.dumps(manifest_for()).encode()  # signed, but says nothing of the compose file
    files = {COMPOSE: COMPOSE_V2, "manifest.json.minisig": key.minisig(raw).encode()}
    refused(rig, key, f"not covered by the signed manifest: {COMPOSE}", manifest=raw, files=files)
    link = [member("latest", type=tarfile.SYMTYPE, linkname="images.tar")]
    files = {"manifest.json.minisig": key.minisig(raw).encode()}
    refused(rig, key, "not covered by the signed manifest: latest", manifest=raw, files=files, extra=link)


def test_malformed_key_stops_the_updater_at_start(rig: Rig) -> None:
    with pytest.raises(ValueError, match="neither a minisign public key nor a base64 Ed25519 key"):
        Updater(rig.settings(webmacs_updater_public_key="not a key"))
