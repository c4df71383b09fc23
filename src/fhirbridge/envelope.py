"""The sealed envelope both directions use: a referral package (hospital -> reviewer) and an opinion
(reviewer -> hospital).

    JWE (General JSON, A256GCM, zip DEF; to every encryption key of the recipient)
      plaintext = {"claims": <compact JWS, signed by the sender>, "document": <FHIR document Bundle>}

The document carries its own detached JWS in Bundle.signature (so any FHIR tool can verify it on its own);
the claims JWS binds what the Bundle cannot say about itself: message id (jti), issued/expiry times,
sender and recipient organisation, the Case, the document's canonical SHA-256, and for packages the
manifest (what was shared, withheld and why, and the SHA-256 of each separately encrypted attachment).
Opening checks all of it before anything is trusted.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from . import jsonutil
from .crypto import jwe, jws
from .crypto.keys import KeyRing
from .errors import SealError

PACKAGE = "fhirbridge-package"
OPINION = "fhirbridge-opinion"
ENVELOPE_FILE = "package.jwe"
MAX_ENVELOPE_BYTES = 256 * 1024 * 1024  # checked before decryption: a huge file is refused unopened
# The envelope is compressed: without a limit on what it inflates to, a small file could still exhaust memory.
MAX_PLAINTEXT_BYTES = 512 * 1024 * 1024
CLOCK_SKEW = 300


def seal(*, typ: str, claims: dict, document: dict, signer: KeyRing, recipient: KeyRing) -> bytes:
    recipients = recipient.encryption_keys()
    if not recipients:
        raise SealError(f"{recipient.source} has no public encryption key to seal to")
    claims = {**claims, "typ": typ, "document_sha256": jws.bundle_digest(document)}
    token = jws.sign_compact(claims, signer, typ=typ)
    plaintext = jsonutil.dumps({"claims": token, "document": document})
    return jwe.encrypt_bytes(plaintext, recipients, typ=f"{typ}+jwe", cty="application/json")


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def peek_claims(token: str) -> dict:
    """The claims of a compact JWS before verification, only to learn whose keys should verify it."""
    try:
        _h, payload, _s = token.split(".")
        claims = jsonutil.loads(jsonutil.b64url_decode(payload))
    except (ValueError, TypeError) as exc:
        raise SealError(f"the claims are not a compact JWS ({exc.__class__.__name__})") from None
    if not isinstance(claims, dict):
        raise SealError("the claims are not a JSON object")
    return claims


def open_sealed(data: bytes, *, typ: str, decrypt: KeyRing, trusted: KeyRing | Callable[[dict], KeyRing],
                now: float | None = None, check_expiry: bool = True) -> tuple[dict, dict]:
    """Decrypt, verify and check one envelope; returns (claims, document). Raises SealError with the
    reason (too large, wrong key, tampered, bad signature, wrong type, expired, digest mismatch)."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise SealError(f"refusing a {len(data)} byte envelope (limit {MAX_ENVELOPE_BYTES})")
    header, plaintext = jwe.decrypt_bytes_with_header(data, decrypt, max_plaintext=MAX_PLAINTEXT_BYTES)
    if header.get("typ") not in (None, f"{typ}+jwe"):
        raise SealError(f"this is a {header.get('typ')!r}, not a {typ}")
    try:
        body = jsonutil.loads(plaintext)
    except Exception:  # noqa: BLE001 - orjson raises its own error type
        raise SealError("decrypted content is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("claims"), str) \
            or not isinstance(body.get("document"), dict):
        raise SealError("decrypted content lacks claims or document")
    keys = trusted(peek_claims(body["claims"])) if callable(trusted) else trusted
    _hdr, claims = jws.verify_compact(body["claims"], keys, typ=typ)
    document = body["document"]
    jws.verify_bundle(document, keys)
    if claims.get("document_sha256") != jws.bundle_digest(document):
        raise SealError("the document does not match the digest its sender signed")
    now = time.time() if now is None else now
    for field in ("jti", "iat", "exp"):
        if field not in claims:
            raise SealError(f"claims lack {field}")
    if check_expiry and claims["exp"] + CLOCK_SKEW < now:
        raise SealError(f"expired at {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(claims['exp']))}")
    if claims["iat"] - CLOCK_SKEW > now:
        raise SealError("issued in the future: check the sender's clock")
    return claims, document


def read_limited(path: Path) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SealError(f"{path}: no such file") from None
    if size > MAX_ENVELOPE_BYTES:
        raise SealError(f"{path}: refusing a {size} byte envelope (limit {MAX_ENVELOPE_BYTES})")
    return path.read_bytes()
