"""Signed bundles: an Ed25519 signature of manifest.json, in minisign's format or bare, checked against the
configured public key. The manifest vouches for every other file by its SHA-256."""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from webmacs.updater.bundle import SIGNATURES, BundleInvalid, Extracted, uncovered

_MINISIGN_ALG = b"Ed"  # minisign's signature algorithm id for Ed25519 (legacy: over the message itself)
_MINISIGN_PREHASHED = b"ED"  # … over the message's BLAKE2b-512 digest (minisign's default since 0.10)


class SignatureInvalid(BundleInvalid):
    pass


@dataclass(frozen=True)
class PublicKey:
    key: Ed25519PublicKey
    #: minisign's 8-byte key id (signatures name the key that made them); None for a bare Ed25519 key.
    key_id: bytes | None

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """A minisign public key (the base64 line of a `.pub` file; its comment line may come along) or a
        bare Ed25519 public key in base64 (32 bytes)."""
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        lines = [ln for ln in lines if not ln.lower().startswith("untrusted comment:")]
        if len(lines) != 1:
            raise ValueError("WEBMACS_UPDATER_PUBLIC_KEY must be one minisign or base64 Ed25519 public key")
        raw = _b64(lines[0])
        if raw is not None and len(raw) == 42 and raw[:2] == _MINISIGN_ALG:
            return cls(Ed25519PublicKey.from_public_bytes(raw[10:]), raw[2:10])
        if raw is not None and len(raw) == 32:
            return cls(Ed25519PublicKey.from_public_bytes(raw), None)
        raise ValueError("WEBMACS_UPDATER_PUBLIC_KEY is neither a minisign public key nor a base64 Ed25519 key")


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _check(key: Ed25519PublicKey, signature: bytes, message: bytes, what: str) -> None:
    try:
        key.verify(signature, message)
    except InvalidSignature as e:
        raise SignatureInvalid(f"{what} does not verify with the configured public key") from e


def _minisign(key: PublicKey, text: str, manifest: bytes) -> None:
    lines = text.splitlines()
    if len(lines) < 4 or not lines[2].startswith("trusted comment: "):
        raise SignatureInvalid("manifest.json.minisig is not a minisign signature")
    sig, global_sig = _b64(lines[1].strip()), _b64(lines[3].strip())
    if sig is None or len(sig) != 74 or global_sig is None or len(global_sig) != 64:
        raise SignatureInvalid("manifest.json.minisig is not a minisign signature")
    alg, key_id, signature = sig[:2], sig[2:10], sig[10:]
    if key.key_id is not None and key_id != key.key_id:
        raise SignatureInvalid("manifest.json.minisig was made with another key")
    if alg == _MINISIGN_PREHASHED:
        manifest = hashlib.blake2b(manifest, digest_size=64).digest()
    elif alg != _MINISIGN_ALG:
        raise SignatureInvalid("manifest.json.minisig uses an unknown algorithm")
    _check(key.key, signature, manifest, "manifest.json.minisig")
    # The trusted comment is signed too (minisign checks it): it must not be altered either.
    _check(key.key, global_sig, signature + lines[2][len("trusted comment: ") :].encode(), "its trusted comment")


def verify(key: PublicKey, extracted: Extracted) -> None:
    """Require a valid signature of manifest.json and a digest in the manifest for every other file."""
    minisig, bare = (extracted.directory / name for name in SIGNATURES)
    if minisig.is_file():
        _minisign(key, minisig.read_text(encoding="utf-8", errors="replace"), extracted.manifest_bytes)
    elif bare.is_file():
        data = bare.read_bytes()
        signature = data if len(data) == 64 else _b64(data.decode("ascii", "replace").strip())
        if signature is None or len(signature) != 64:
            raise SignatureInvalid("manifest.json.sig is not an Ed25519 signature (64 bytes, raw or base64)")
        _check(key.key, signature, extracted.manifest_bytes, "manifest.json.sig")
    else:
        raise SignatureInvalid("the bundle is not signed (no manifest.json.minisig or manifest.json.sig)")
    loose = uncovered(extracted)
    if loose:
        raise SignatureInvalid("not covered by the signed manifest: " + ", ".join(loose[:5]))
