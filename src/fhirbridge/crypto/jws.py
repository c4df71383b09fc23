"""JWS signatures (RFC 7515) over documents and small claim sets, via joserfc.

Only the compact serialization is used. Verification never trusts a key named or embedded in the
token (jwk/jku/x5u headers are ignored): the key comes from the caller's trusted KeyRing by `kid`. An `x5c`
chain (crypto/certs.py) is for receivers without our JWKS; when one is present its leaf must hold the very
key that verified, so the header can never point such a receiver at another key.
"""
from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator

import rfc8785
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from joserfc import jws
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import ECKey

from fhirbridge.crypto import certs
from fhirbridge.crypto.keys import SIG_ALGS, KeyRing
from fhirbridge.errors import SealError
from fhirbridge.jsonutil import b64url, b64url_decode, canonical, canonical_chunks, dumps, loads

ALLOWED_ALGS = SIG_ALGS  # never "none" or HS*: a MAC key is shared, so it cannot prove who signed

# One registry with our allow-list; joserfc's default 128 kB payload cap is far below a FHIR document.
_REGISTRY = jws.JWSRegistry(algorithms=list(ALLOWED_ALGS))
# The header may carry an x5c chain (a few base64 DER certificates, twice encoded): room for ten of them.
_REGISTRY.max_header_length = 64 * 1024
_REGISTRY.max_payload_length = 256 * 1024 * 1024
_REGISTRY.max_signature_length = 2048

_EC_ALG_BY_CURVE = {"P-256": "ES256", "P-384": "ES384"}
_ALG_KEY = {"ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "RS384": ("RSA", None), "PS256": ("RSA", None)}

SIGNATURE_TYPES = "urn:iso-astm:E1762-95:2013"
AUTHOR_SIGNATURE = {"system": SIGNATURE_TYPES, "code": "1.2.840.10065.1.12.1.1", "display": "Author's Signature"}
# Da Vinci CDex Signature profiles (cdex-signature, cdex-digital-signature): Signature.type has a required
# slice fixed to ASTM E1762-95(2013) 1.2.840.10065.1.12.1.5 "Verification Signature"; the slicing is open, so
# the Author's Signature (the sender authored the Composition) stays next to it.
VERIFICATION_SIGNATURE = {"system": SIGNATURE_TYPES, "code": "1.2.840.10065.1.12.1.5",
                          "display": "Verification Signature"}
SIG_FORMAT = "application/jose"
# CDex Digital Signature profile: targetFormat fixed to the JSON canonicalization "#document" (everything in
# the Bundle but Bundle.id and Bundle.meta, and the enveloped signature itself), done with RFC 8785 JCS
# (CDex pre-adopts the FHIR R6 rule); sigFormat fixed to application/jose.
TARGET_FORMAT = "application/fhir+json"
BUNDLE_TARGET_FORMAT = "application/fhir+json;canonicalization=http://hl7.org/fhir/canonicalization/json#document"
# A signature over one resource (Provenance.signature over its targets): FHIR json.html#canonical "#static"
# leaves out Resource.text and Resource.meta, which a server may set on storing, so it still verifies
# when read back from the EHR.
RESOURCE_TARGET_FORMAT = "application/fhir+json;canonicalization=http://hl7.org/fhir/canonicalization/json#static"
BUNDLE_EXCLUDED = ("id", "meta", "signature")   # what a Bundle signature does not cover
_RESOURCE_EXCLUDED = ("meta", "text")

_PLAIN_KID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def _show(kid: object) -> str:
    """A kid from an untrusted token, safe to print."""
    if isinstance(kid, str) and _PLAIN_KID.fullmatch(kid):
        return kid
    return repr(kid)[:80]


# --- signing ---------------------------------------------------------------------------------

def _signing_alg(key) -> str:
    if key.alg:
        if key.alg not in ALLOWED_ALGS:
            raise SealError(f"signing key {key.kid} is for alg {key.alg}, which is not allowed "
                            f"(allowed: {', '.join(ALLOWED_ALGS)})")
        return key.alg
    if key.key_type == "EC" and key.curve_name in _EC_ALG_BY_CURVE:
        return _EC_ALG_BY_CURVE[key.curve_name]
    if key.key_type == "RSA":
        return "RS384"
    raise SealError(f"signing key {key.kid} ({key.key_type}) has no allowed signature algorithm")


def _header(key, typ: str | None, x5c: list[str] | None) -> dict:
    header: dict = {"alg": _signing_alg(key), "kid": key.kid}
    if typ:
        header["typ"] = typ
    if x5c:
        leaf = certs.leaf_public_key(x5c)
        if leaf is None or not certs.same_key(leaf, key.public_key):
            raise SealError(f"the certificate chain given does not hold signing key {key.kid}")
        header["x5c"] = list(x5c)
    return header


def _sign(payload: bytes, keyring: KeyRing, typ: str | None, x5c: list[str] | None = None) -> str:
    key = keyring.signing_key()
    return jws.serialize_compact(_header(key, typ, x5c), payload, key, registry=_REGISTRY)


def sign_detached(payload: bytes, keyring: KeyRing, *, typ: str | None = None, x5c: list[str] | None = None) -> str:
    """Compact JWS with the payload segment left empty (RFC 7515 Appendix F): `header..signature`.
    `x5c`: the certificate chain of the signing key (crypto/certs.py), put in the protected header."""
    return sign_detached_chunks([payload], keyring, typ=typ, x5c=x5c)


def sign_detached_chunks(chunks: Iterable[bytes], keyring: KeyRing, *, typ: str | None = None,
                         x5c: list[str] | None = None) -> str:
    """`sign_detached` of the concatenation of `chunks`, which is never built.

    The signing input (RFC 7515 section 5.1: ASCII(BASE64URL(header) || '.' || BASE64URL(payload))) is hashed
    as its base64url form is made, a piece at a time, and the digest signed pre-hashed: a detached payload is
    a whole document (7.3 MiB for 10,000 resources), and building the signing input whole, as a JWS library
    does, held two more copies of it (issue 19 goal 2: peak memory of the seal)."""
    key = keyring.signing_key()
    header = _header(key, typ, x5c)
    alg = header["alg"]
    digest_alg: hashes.HashAlgorithm = _DIGEST[alg]()
    h = hashlib.new(digest_alg.name)
    h.update(b64url(dumps(header)).encode("ascii") + b".")
    rest = b""
    for chunk in chunks:
        data = rest + chunk if rest else chunk
        cut = len(data) - len(data) % 3   # whole 3-byte groups encode with no padding, so the pieces concatenate
        h.update(base64.urlsafe_b64encode(memoryview(data)[:cut]))
        rest = bytes(data[cut:])
    h.update(base64.urlsafe_b64encode(rest).rstrip(b"="))
    digest = h.digest()
    private = key.private_key
    if isinstance(private, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(private.sign(digest, ec.ECDSA(Prehashed(digest_alg))))
        size = (private.curve.key_size + 7) // 8
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")   # RFC 7518 section 3.4: R || S
    elif isinstance(private, rsa.RSAPrivateKey):   # RS384, the one RSA algorithm _signing_alg chooses
        signature = private.sign(digest, padding.PKCS1v15(), Prehashed(digest_alg))
    else:
        raise SealError(f"signing key {key.kid} cannot sign {alg}")
    return f"{b64url(dumps(header))}..{b64url(signature)}"


_DIGEST: dict[str, type[hashes.HashAlgorithm]] = {"ES256": hashes.SHA256, "ES384": hashes.SHA384,
                                                  "RS384": hashes.SHA384}


def sign_compact(claims: dict, keyring: KeyRing, *, typ: str) -> str:
    """Compact JWS whose payload is the RFC 8785 canonical JSON of `claims`."""
    return _sign(canonical(claims), keyring, typ)


# --- verifying -------------------------------------------------------------------------------

def _split(token: str) -> tuple[list[str], dict]:
    if not isinstance(token, str):
        raise SealError("malformed signature: expected a compact JWS string")
    parts = token.split(".")
    if len(parts) != 3:
        raise SealError("malformed signature: a compact JWS has three dot-separated parts")
    try:
        header = loads(b64url_decode(parts[0]))
    except (ValueError, binascii.Error):
        raise SealError("malformed signature: the header is not base64url-encoded JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("alg"), str):
        raise SealError("malformed signature: the header has no alg")
    return parts, header


def _check_alg(alg: str) -> None:
    if alg in ALLOWED_ALGS:
        return
    allowed = ", ".join(ALLOWED_ALGS)
    if alg == "none":
        raise SealError(f"unsigned token: signature algorithm 'none' is never accepted (allowed: {allowed})")
    if alg.startswith("HS"):
        raise SealError(f"signature algorithm {_show(alg)} (a shared-secret MAC) is not allowed: it cannot "
                        f"prove who signed (allowed: {allowed})")
    raise SealError(f"signature algorithm {_show(alg)} is not allowed (allowed: {allowed})")


def _trusted_key(header: dict, trusted: KeyRing):
    alg = header["alg"]
    _check_alg(alg)
    # RFC 7515 §4.1.11: extensions listed in crit must be understood; we understand none (incl. RFC 7797 b64).
    if "crit" in header or "b64" in header:
        raise SealError("malformed signature: header uses JWS extensions (crit/b64) that are not supported")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise SealError("signature names no key: the JWS header has no kid")
    key = trusted.verification_key(kid)
    if key is None:
        raise SealError(f"signed by key {_show(kid)}, which is not a trusted key of {trusted.label}")
    kty, crv = _ALG_KEY[alg]
    # A curve is named only for EC algorithms, so the key is an ECKey whenever it is compared.
    if key.key_type != kty or (crv and isinstance(key, ECKey) and key.curve_name != crv):
        raise SealError(f"signature algorithm {alg} does not fit trusted key {kid} ({key.key_type})")
    if key.alg and key.alg != alg:  # RFC 7517 §4.4: the key is meant for one algorithm only
        raise SealError(f"signature uses {alg} but trusted key {kid} is for {key.alg}")
    if "x5c" in header:
        # Not a source of trust (the key above is), but a receiver without our JWKS verifies with this leaf:
        # a chain for another key would make the same signature mean something else to it.
        leaf = certs.leaf_public_key(header["x5c"])
        if leaf is None or not certs.same_key(leaf, key.public_key):
            raise SealError(f"the x5c certificate chain in the signature does not hold trusted key {kid}")
    return key


def _verify(token: str, key, payload: bytes | None) -> jws.CompactSignature:
    try:
        return jws.deserialize_compact(token, key, registry=_REGISTRY, payload=payload)
    except BadSignatureError:
        raise SealError("signature does not match: content was changed after signing") from None
    except JoseError as err:
        raise SealError(f"malformed signature: {err}") from None


def verify_detached(token: str, payload: bytes, trusted: KeyRing) -> dict:
    """Verify a detached compact JWS over `payload` with a key of `trusted`; returns the protected header."""
    parts, header = _split(token)
    key = _trusted_key(header, trusted)
    if parts[1]:
        raise SealError("malformed signature: expected a detached signature (empty payload segment)")
    _verify(token, key, payload)
    return header


def verify_compact(token: str, trusted: KeyRing, *, typ: str | None = None) -> tuple[dict, dict]:
    """Verify an attached compact JWS of JSON claims; returns (protected header, claims)."""
    parts, header = _split(token)
    key = _trusted_key(header, trusted)
    # RFC 7515 §4.1.9: typ values compare case-insensitively.
    if typ is not None and str(header.get("typ", "")).lower() != typ.lower():
        raise SealError(f"wrong token type: expected typ {typ!r}, got {_show(header.get('typ'))}")
    if not parts[1]:
        raise SealError("malformed signature: the token has no payload (a detached signature was given)")
    obj = _verify(token, key, None)
    try:
        claims = loads(obj.payload)
    except ValueError:
        raise SealError("malformed token: the signed payload is not JSON") from None
    if not isinstance(claims, dict):
        raise SealError("malformed token: the signed payload is not a JSON object")
    return header, claims


# --- FHIR Bundle signatures ------------------------------------------------------------------

def _bundle_signed_bytes(bundle: dict) -> bytes:
    return b"".join(_bundle_signed_chunks(bundle))


def _bundle_signed_chunks(bundle: dict) -> Iterator[bytes]:
    # What is signed is the RFC 8785 (JCS) form of the Bundle without Bundle.id, Bundle.meta and
    # Bundle.signature. This follows the FHIR "Digital Signatures" JSON canonicalization (R5
    # signatures.html "Canonical JSON"; the CDex signing guidance for R4 Bundle.signature does the
    # same): a server that stores the document assigns its own id/meta, and the signature cannot
    # cover itself. Everything clinical (every entry) is covered.
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise SealError("not a FHIR Bundle: resourceType must be 'Bundle'")
    stripped = {k: v for k, v in bundle.items() if k not in BUNDLE_EXCLUDED}
    try:
        yield from canonical_chunks(stripped)
    except rfc8785.CanonicalizationError as err:
        raise SealError(f"document cannot be canonicalized for signing (RFC 8785): {type(err).__name__}") from None


def bundle_digest(bundle: dict) -> str:
    """SHA-256 hex of the bytes a Bundle signature covers (binds a manifest to the document)."""
    h = hashlib.sha256()
    for chunk in _bundle_signed_chunks(bundle):
        h.update(chunk)
    return h.hexdigest()


def sign_bundle(bundle: dict, keyring: KeyRing, *, who: dict, when: str, x5c: list[str] | None = None) -> dict:
    """A copy of `bundle` carrying Bundle.signature (FHIR R4 Signature datatype, JWS detached)."""
    return sign_bundle_with_digest(bundle, keyring, who=who, when=when, x5c=x5c)[0]


def sign_bundle_with_digest(bundle: dict, keyring: KeyRing, *, who: dict, when: str,
                            x5c: list[str] | None = None) -> tuple[dict, str]:
    """`sign_bundle`, also returning `bundle_digest` of the result, from the one canonicalisation both need
    (RFC 8785 of a large document is the costliest part of sealing), made a batch of entries at a time and
    never held whole. The copy is shallow: its entries are the caller's, so neither side may change them
    afterwards."""
    h = hashlib.sha256()

    def hashed() -> Iterator[bytes]:
        for chunk in _bundle_signed_chunks(bundle):
            h.update(chunk)
            yield chunk

    token = sign_detached_chunks(hashed(), keyring, x5c=x5c)
    signed = dict(bundle)
    signed["signature"] = _signature(token, who=who, when=when, target_format=BUNDLE_TARGET_FORMAT)
    # The signature is excluded from what is signed, so the digest of the signed Bundle is that of the input.
    return signed, h.hexdigest()


def sign_bundle_streaming(bundle: dict, keyring: KeyRing, *, who: dict, when: str, sink: Callable[[bytes], object],
                          x5c: list[str] | None = None) -> tuple[dict, str]:
    """Sign `bundle` in one pass over its canonical form, handing each piece to `sink` as it is hashed;
    returns (its Bundle.signature element, `bundle_digest`). The pieces join to the canonical bytes of the
    Bundle without id, meta and signature: a sealer can send those very bytes as the document (any JSON
    reader parses them) instead of serialising it a second time (issue 19 goal 2)."""
    h = hashlib.sha256()

    def pieces() -> Iterator[bytes]:
        for chunk in _bundle_signed_chunks(bundle):
            h.update(chunk)
            sink(chunk)
            yield chunk

    token = sign_detached_chunks(pieces(), keyring, x5c=x5c)
    return _signature(token, who=who, when=when, target_format=BUNDLE_TARGET_FORMAT), h.hexdigest()


def _signature(token: str, *, who: dict, when: str, target_format: str, on_behalf_of: dict | None = None) -> dict:
    sig = {
        "type": [dict(VERIFICATION_SIGNATURE), dict(AUTHOR_SIGNATURE)],
        "when": when,
        "who": copy.deepcopy(who),
        "targetFormat": target_format,
        "sigFormat": SIG_FORMAT,
        # Signature.data is base64Binary: standard base64 (with padding) of the JWS text (CDex: the compact
        # JWS "must be base64 encoded again", its '.' is not a base64 character).
        "data": base64.b64encode(token.encode("ascii")).decode("ascii"),
    }
    if on_behalf_of is not None:
        sig["onBehalfOf"] = copy.deepcopy(on_behalf_of)
    return sig


def _resource_signed_bytes(resource: dict) -> bytes:
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise SealError("not a FHIR resource: it has no resourceType")
    try:
        return canonical({k: v for k, v in resource.items() if k not in _RESOURCE_EXCLUDED})
    except rfc8785.CanonicalizationError as err:
        raise SealError(f"resource cannot be canonicalized for signing (RFC 8785): {type(err).__name__}") from None


def sign_resource(resource: dict, keyring: KeyRing, *, who: dict, when: str, on_behalf_of: dict | None = None,
                  x5c: list[str] | None = None) -> dict:
    """A Signature (FHIR R4 datatype, JWS detached) over one resource: its RFC 8785 form without `meta` and
    `text` (canonicalization "#static"). For Provenance.signature, which signs the Provenance's targets."""
    token = sign_detached(_resource_signed_bytes(resource), keyring, x5c=x5c)
    # The verification type alone: the signer vouches for what it verified and wrote, it did not author it.
    sig = _signature(token, who=who, when=when, target_format=RESOURCE_TARGET_FORMAT, on_behalf_of=on_behalf_of)
    sig["type"] = [dict(VERIFICATION_SIGNATURE)]
    return sig


def _signature_token(sig: object, where: str) -> str:
    if not isinstance(sig, dict):
        raise SealError(f"malformed signature: {where} is not an object")
    if sig.get("sigFormat") != SIG_FORMAT:
        raise SealError(f"{where} has sigFormat {_show(sig.get('sigFormat'))}; only {SIG_FORMAT} (JWS) is supported")
    data = sig.get("data")
    if not isinstance(data, str) or not data:
        raise SealError(f"malformed signature: {where}.data is empty")
    try:
        return base64.b64decode(data, validate=True).decode("ascii")
    except (binascii.Error, ValueError):
        raise SealError(f"malformed signature: {where}.data is not base64 of a JWS") from None


def verify_resource(sig: dict, resource: dict, trusted: KeyRing) -> dict:
    """Verify a `sign_resource` Signature over `resource` (as read back: meta and text are not covered)."""
    if not isinstance(sig, dict) or sig.get("targetFormat") != RESOURCE_TARGET_FORMAT:
        raise SealError(f"the signature's targetFormat is not {RESOURCE_TARGET_FORMAT}")
    return verify_detached(_signature_token(sig, "the signature"), _resource_signed_bytes(resource), trusted)


def verify_bundle(bundle: dict, trusted: KeyRing) -> dict:
    """Verify Bundle.signature against `trusted`; returns the JWS protected header."""
    if not isinstance(bundle, dict):
        raise SealError("not a FHIR Bundle")
    sig = bundle.get("signature")
    if not sig:
        raise SealError("document is not signed: Bundle.signature is missing")
    if not isinstance(sig, dict):
        raise SealError("malformed signature: Bundle.signature is not an object")
    if sig.get("sigFormat") != SIG_FORMAT:
        raise SealError(f"document signature has sigFormat {_show(sig.get('sigFormat'))}; "
                        f"only {SIG_FORMAT} (JWS) is supported")
    target = sig.get("targetFormat")
    # Plain application/fhir+json is what packages and opinions sealed before the CDex canonicalization
    # parameter was written carry (the same bytes are signed): still accepted while they are in flight.
    if target is not None and not (isinstance(target, str) and target.startswith(TARGET_FORMAT)):
        raise SealError(f"document signature has targetFormat {_show(target)}; expected {BUNDLE_TARGET_FORMAT}")
    return verify_detached(_signature_token(sig, "Bundle.signature"), _bundle_signed_bytes(bundle), trusted)
