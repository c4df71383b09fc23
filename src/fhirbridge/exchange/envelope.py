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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import quote

from fhirbridge import jsonutil
from fhirbridge.crypto import files, jwe, jws
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.errors import SealError

PACKAGE = "fhirbridge-package"
OPINION = "fhirbridge-opinion"
# The conversation after the opinion (exchange/followup.py): a follow-up question (hospital -> reviewer) and its
# answer (reviewer -> hospital). A few paragraphs of text each: the opinion's caps are ample.
QUESTION = "fhirbridge-followup"
ANSWER = "fhirbridge-followup-answer"
ENVELOPE_FILE = "package.jwe"
MiB = 1024 * 1024
# Size caps per direction. The file cap is checked before decryption (a huge file is refused unopened); the
# plaintext cap while inflating, because the envelope is DEFLATE-compressed (zip DEF, RFC 7516 section 4.1.3)
# and a small file could otherwise expand to gigabytes before its signature is even looked at.
# A package carries a patient's records (large attachments travel in their own files, so this is the
# document with its inline Binaries); an opinion is a few sections of text and three Observations, so its
# caps are far smaller: whoever can drop a file in the inbox must not be able to make us inflate 1.8 GB.
MAX_PACKAGE_ENVELOPE_BYTES = 256 * MiB
MAX_PACKAGE_PLAINTEXT_BYTES = 512 * MiB
MAX_OPINION_ENVELOPE_BYTES = 8 * MiB
MAX_OPINION_PLAINTEXT_BYTES = 32 * MiB
_CAPS = {PACKAGE: (MAX_PACKAGE_ENVELOPE_BYTES, MAX_PACKAGE_PLAINTEXT_BYTES),
         OPINION: (MAX_OPINION_ENVELOPE_BYTES, MAX_OPINION_PLAINTEXT_BYTES),
         QUESTION: (MAX_OPINION_ENVELOPE_BYTES, MAX_OPINION_PLAINTEXT_BYTES),
         ANSWER: (MAX_OPINION_ENVELOPE_BYTES, MAX_OPINION_PLAINTEXT_BYTES)}
# Kept for callers written before the caps depended on the direction: the package (largest) caps.
MAX_ENVELOPE_BYTES = MAX_PACKAGE_ENVELOPE_BYTES
MAX_PLAINTEXT_BYTES = MAX_PACKAGE_PLAINTEXT_BYTES
CLOCK_SKEW = 300


# --- who sends and who receives -------------------------------------------------------------------
# RFC 7519 §4.1.1 and §4.1.3: `iss` is a StringOrURI and `aud` a StringOrURI or an array of them, and a value
# with a ':' must be a URI (§2). The claims name each organisation by the URI of its identifier; the
# {system, value, display} object (what a FHIR Reference.identifier needs) travels next to it under the
# private claim names `iss_org` / `aud_org`, and must name the same identifier. Packages and opinions sealed
# before (the object in `iss`/`aud` itself) are still read: see `party_uri`.
RFC3986 = "urn:ietf:rfc:3986"


def organization_uri(system: str, value: str) -> str:
    """The URI of an organisation identifier. With system urn:ietf:rfc:3986 the value is a URI already (R4
    identifier-registry); otherwise the value, percent-encoded, becomes the fragment of the system's URI
    (inside an existing fragment after an encoded '|', FHIR's system|value token separator)."""
    if system == RFC3986:
        return value
    encoded = quote(value, safe="-._~!$&'()*+,;=:@/?")
    return f"{system}%7C{encoded}" if "#" in system else f"{system}#{encoded}"


def addressing(sender: dict, recipient: dict) -> dict:
    """`iss`, `aud` (URIs) and `iss_org`, `aud_org` (the {system, value, display} objects) for claims."""
    return {"iss": organization_uri(sender["system"], sender["value"]), "iss_org": dict(sender),
            "aud": organization_uri(recipient["system"], recipient["value"]), "aud_org": dict(recipient)}


def party_uri(value: object) -> str | None:
    """The identifier URI an `iss`/`aud` claim names: the string itself, or, for an envelope sealed before
    they were strings, the URI of its {system, value} object. None when it is neither."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("system"), str) and isinstance(value.get("value"), str):
        return organization_uri(value["system"], value["value"])
    return None


def party(claims: dict, which: str) -> dict:
    """The {system, value, display} object of `iss` or `aud` (`iss_org`/`aud_org`, or an older envelope's
    object claim); empty when the claims carry none."""
    for value in (claims.get(f"{which}_org"), claims.get(which)):
        if isinstance(value, dict):
            return value
    return {}


def reply_addressing(claims: dict) -> dict:
    """The addressing of an answer to an envelope with these claims: its sender and recipient swapped, in the
    same form (an older hospital gets the object claims it reads)."""
    if isinstance(claims.get("iss"), dict) or isinstance(claims.get("aud"), dict):
        return {"iss": claims.get("aud"), "aud": claims.get("iss")}
    return addressing(party(claims, "aud"), party(claims, "iss"))


def _check_addressing(claims: dict) -> None:
    """`iss_org`/`aud_org` must name what `iss`/`aud` name. Whether those are whom the receiver expects (or
    usable at all) is the receiver's check, with its own reason."""
    for which in ("iss", "aud"):
        uri, org = party_uri(claims.get(which)), claims.get(f"{which}_org")
        if uri is not None and org is not None and party_uri(org) != uri:
            raise SealError(f"claims {which}_org names another organisation than {which}")


# --- what a package says about urgency and its due date (issue 16) -------------------------------------
# R4 request-priority, most urgent first. `routine` and an order without a priority sort after them.
URGENT = ("stat", "asap", "urgent")


def due_at(claims: dict) -> float | None:
    """When the answer is due: the signed `due_at` (set at seal from the reviewer's turnaround target); a
    package sealed before packages carried one gives its expiry, which is what the reviewer was shown then."""
    for key in ("due_at", "exp"):
        value = claims.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def priority(claims: dict) -> str:
    """The order's request-priority as the manifest carries it (`routine` when it names none)."""
    value = (claims.get("manifest") or {}).get("priority")
    return value if isinstance(value, str) and value else "routine"


def urgency_rank(value: str) -> int:
    """0 for stat, 1 asap, 2 urgent, 3 for routine or anything else: the inbox sorts by it first."""
    return URGENT.index(value) if value in URGENT else len(URGENT)


def requester(claims: dict) -> dict:
    """The referring physician the manifest names: {reference, name, telecom: [{system, value}], organization};
    empty values when the package names none (sealed before issue 16)."""
    r = (claims.get("manifest") or {}).get("requester")
    r = r if isinstance(r, dict) else {}
    telecom = [t for t in r.get("telecom") or [] if isinstance(t, dict) and isinstance(t.get("value"), str)]
    return {"reference": str(r.get("reference") or ""), "name": str(r.get("name") or ""),
            "organization": str(r.get("organization") or ""), "telecom": telecom}


def requester_line(claims: dict) -> str:
    """The referring physician in one line: name, organisation, contacts."""
    r = requester(claims)
    contacts = ", ".join(f"{t.get('system', 'contact')} {t['value']}" for t in r["telecom"])
    return "; ".join(x for x in (r["name"] or r["reference"], r["organization"], contacts) if x)


def _caps(typ: str) -> tuple[int, int]:
    try:
        return _CAPS[typ]
    except KeyError:
        raise ValueError(f"unknown envelope type {typ!r} (expected {PACKAGE!r} or {OPINION!r})") from None


def max_envelope_bytes(typ: str) -> int:
    """The largest sealed file of this type (PACKAGE or OPINION) that `open_sealed` accepts; a sender checks
    against it so it never builds what its receiver will refuse unopened."""
    return _caps(typ)[0]


def max_plaintext_bytes(typ: str) -> int:
    """The most the decrypted (inflated) content of an envelope of this type may amount to."""
    return _caps(typ)[1]


def seal(*, typ: str, claims: dict, document: dict, signer: KeyRing, recipient: KeyRing,
         document_sha256: str | None = None) -> bytes:
    """`document_sha256`: the document's `jws.bundle_digest` when the caller has it already
    (`jws.sign_bundle_with_digest`), so a large document is not canonicalised twice."""
    recipients = recipient.encryption_keys()
    if not recipients:
        raise SealError(f"{recipient.label} has no public encryption key to seal to")
    claims = {**claims, "typ": typ, "document_sha256": document_sha256 or jws.bundle_digest(document)}
    max_file, max_plain = _caps(typ)
    token = jws.sign_compact(claims, signer, typ=typ)
    plaintext = jsonutil.dumps({"claims": token, "document": document})
    # Refuse here what the receiver would refuse unopened: a clear error now beats a silent refusal there.
    if len(plaintext) > max_plain:
        raise SealError(f"the {typ} content is {len(plaintext)} bytes; the receiver accepts at most {max_plain} "
                        "(move large attachments out of the document)")
    data = jwe.encrypt_bytes(plaintext, recipients, typ=f"{typ}+jwe", cty="application/json")
    if len(data) > max_file:
        raise SealError(f"the sealed {typ} is {len(data)} bytes; the receiver accepts at most {max_file}")
    return data


def seal_signed_document_to(dst: BinaryIO, *, typ: str, claims: dict, document: dict, signer: KeyRing,
                            recipient: KeyRing, who: dict, when: str, x5c: list[str] | None = None) -> int:
    """Sign the document Bundle (Bundle.signature by `signer`, as `jws.sign_bundle`), seal it with `claims`
    as `seal` does, and write the JWE to `dst`; returns the bytes written. One pass: each piece of the
    document's canonical form is hashed for the signature and the digest and goes straight into the
    streaming encryptor, whose output goes to the file, so the document is serialised once and neither
    the plaintext nor the JWE is ever whole in memory (issue 19 goal 2: a 7.3 MiB document took 12x its
    floor and peaked at 7x its size). The plaintext is the same JSON object as `seal`'s with its members in
    another order: {"document": canonical members..., "id", "meta", "signature"}, then "claims" (they
    carry the document's digest, known only at the end). The limits are `seal`'s: a plaintext over the
    receiver's cap is refused as soon as it is passed."""
    recipients = recipient.encryption_keys()
    if not recipients:
        raise SealError(f"{recipient.label} has no public encryption key to seal to")
    max_file, max_plain = _caps(typ)
    start = dst.tell()
    enc = jwe.Encryptor(dst, recipients, typ=f"{typ}+jwe", cty="application/json")
    plain = 0

    def write(chunk: bytes) -> None:
        nonlocal plain
        plain += len(chunk)
        if plain > max_plain:
            raise SealError(f"the {typ} content is more than {max_plain} bytes, what the receiver accepts at most "
                            "(move large attachments out of the document)")
        enc.write(chunk)

    held = b""

    def pass_on(chunk: bytes) -> None:   # one piece behind: the last one's closing brace is replaced below
        nonlocal held
        if held:
            write(held)
        held = chunk

    write(b'{"document":')
    signature, digest = jws.sign_bundle_streaming(document, signer, who=who, when=when, sink=pass_on, x5c=x5c)
    if not held.endswith(b"}"):
        raise SealError("the document's canonical form is not a JSON object")   # a Bundle always is
    write(held[:-1])
    rest = {k: document[k] for k in jws.BUNDLE_EXCLUDED if k in document and k != "signature"}
    rest["signature"] = signature
    write(b"".join(b"," + jsonutil.dumps(k) + b":" + jsonutil.dumps(v) for k, v in rest.items()) + b"}")
    token = jws.sign_compact({**claims, "typ": typ, "document_sha256": digest}, signer, typ=typ)
    write(b',"claims":' + jsonutil.dumps(token) + b"}")
    enc.close()
    size = dst.tell() - start
    if size > max_file:
        raise SealError(f"the sealed {typ} is {size} bytes; the receiver accepts at most {max_file}")
    return size


def write_atomic(path: Path, data: bytes) -> None:
    """Write a sealed file (or anything else holding PHI) atomically, 0600 whatever the umask (issue 13, S11)."""
    files.write_atomic(path, data)


def _peek_segment(token: str, index: int, what: str) -> dict:
    try:
        segment = token.split(".")
        if len(segment) != 3:
            raise ValueError("not three segments")
        value = jsonutil.loads(jsonutil.b64url_decode(segment[index]))
    except (ValueError, TypeError, AttributeError) as exc:
        raise SealError(f"the claims are not a compact JWS ({exc.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise SealError(f"the claims' {what} is not a JSON object")
    return value


def peek_claims(token: str) -> dict:
    """The claims of a compact JWS before verification, only to learn whose keys should verify it."""
    return _peek_segment(token, 1, "payload")


def peek_header(token: str) -> dict:
    """The protected header of a compact JWS (RFC 7515 section 7.1: its first segment) before verification,
    only to learn which key signed it (`kid`) and so whose key set must verify it."""
    return _peek_segment(token, 0, "header")


class KeyResolver(Protocol):
    """Chooses the key set that must verify an envelope from its (unverified) claims JWS: a reviewer trusting
    several hospitals picks the one hospital whose file holds the signing key's kid."""

    def keyring_for(self, token: str, claims: dict) -> KeyRing: ...


@dataclass(frozen=True)
class Opened:
    claims: dict
    document: dict
    keys: KeyRing    # the key set that verified both signatures (so its owner is the sender)


def open_sealed(data: bytes, *, typ: str, decrypt: KeyRing,
                trusted: KeyRing | Callable[[dict], KeyRing] | KeyResolver,
                now: float | None = None, check_expiry: bool = True) -> tuple[dict, dict]:
    """Decrypt, verify and check one envelope; returns (claims, document). Raises SealError with the
    reason (too large, wrong key, tampered, bad signature, wrong type, expired, digest mismatch).

    The caps depend on `typ` (see max_envelope_bytes): the file size is checked before decrypting, the
    plaintext size while inflating, so neither a large file nor a small compressed one costs more memory
    than an honest envelope of this type could."""
    opened = open_verified(data, typ=typ, decrypt=decrypt, trusted=trusted, now=now, check_expiry=check_expiry)
    return opened.claims, opened.document


def open_verified(data: bytes, *, typ: str, decrypt: KeyRing,
                  trusted: KeyRing | Callable[[dict], KeyRing] | KeyResolver,
                  now: float | None = None, check_expiry: bool = True) -> Opened:
    """open_sealed, also returning the key set that verified the envelope."""
    max_file, max_plain = _caps(typ)
    if len(data) > max_file:
        raise SealError(f"refusing a {len(data)} byte {typ} envelope (limit {max_file})")
    header, plaintext = jwe.decrypt_bytes_with_header(data, decrypt, max_plaintext=max_plain)
    if header.get("typ") not in (None, f"{typ}+jwe"):
        raise SealError(f"this is a {header.get('typ')!r}, not a {typ}")
    try:
        body = jsonutil.loads(plaintext)
    except Exception:  # noqa: BLE001 - orjson raises its own error type
        raise SealError("decrypted content is not JSON") from None
    del plaintext
    if not isinstance(body, dict) or not isinstance(body.get("claims"), str) \
            or not isinstance(body.get("document"), dict):
        raise SealError("decrypted content lacks claims or document")
    if isinstance(trusted, KeyRing):
        keys = trusted
    elif hasattr(trusted, "keyring_for"):
        keys = trusted.keyring_for(body["claims"], peek_claims(body["claims"]))
    else:
        keys = trusted(peek_claims(body["claims"]))
    _hdr, claims = jws.verify_compact(body["claims"], keys, typ=typ)
    document = body["document"]
    jws.verify_bundle(document, keys)
    if claims.get("document_sha256") != jws.bundle_digest(document):
        raise SealError("the document does not match the digest its sender signed")
    _check_addressing(claims)
    now = time.time() if now is None else now
    for field in ("jti", "iat", "exp"):
        if field not in claims:
            raise SealError(f"claims lack {field}")
    for field in ("iat", "exp"):
        # RFC 7519 NumericDate: a number of seconds (a JSON true or a string is not a time, and must not crash us)
        if isinstance(claims[field], bool) or not isinstance(claims[field], (int, float)):
            raise SealError(f"claims {field} is not a NumericDate (seconds since 1970)")
    if check_expiry and claims["exp"] + CLOCK_SKEW < now:
        raise SealError(f"expired at {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(claims['exp']))}")
    if claims["iat"] - CLOCK_SKEW > now:
        raise SealError("issued in the future: check the sender's clock")
    return Opened(claims, document, keys)


def read_limited(path: Path, typ: str | None = None, *, limit: int | None = None) -> bytes:
    """Read a sealed file of type `typ` (PACKAGE or OPINION), refusing it unread if it exceeds that type's
    cap (or `limit`). A caller that names neither gets the strictest cap, so forgetting to say what is
    being read can never let a large file through."""
    if limit is None:
        limit = max_envelope_bytes(typ) if typ is not None else min(c[0] for c in _CAPS.values())
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise SealError(f"{path}: refusing a {size} byte envelope (limit {limit})")
            # At most one byte past the limit: the file may grow between fstat() and read().
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise SealError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SealError(f"{path}: is a directory, not a sealed file") from None
    if len(data) > limit:
        raise SealError(f"{path}: refusing an envelope larger than {limit} bytes")
    return data
