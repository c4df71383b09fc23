"""An X.509 certificate chain for the signing key, carried as `x5c` (RFC 7515 §4.1.6) in JWS headers.

Da Vinci CDex (STU 2, signatures.html "Digital Signature Rules", Sender/Signer steps) asks a signer to put
the certificate chain of its signing key in the JWS protected header as `x5c`: an array of base64 (not
base64url) DER certificates, the one holding the signing key first, each next one certifying the one
before. A receiver that has no JWKS of ours then verifies with the leaf's public key and decides trust
from the chain (its own CA roots). A hospital that has such a certificate configures the PEM file next to
its key set (`hospital.certificate_chain`); we only check that the chain is well formed and belongs to
our key, never that it is trusted: trust is the receiver's decision.
"""
from __future__ import annotations

import base64
import os
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from fhirbridge.crypto import files
from fhirbridge.errors import ConfigError

MAX_CHAIN = 10   # a chain longer than this is a mistake (a CA bundle given instead of our chain)


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def read_chain(path: str | os.PathLike) -> list[x509.Certificate]:
    """The certificates of a PEM file, in file order (leaf first)."""
    file = os.fspath(path)
    raw = files.read_config_file(file, "certificate chain file")
    try:
        chain = x509.load_pem_x509_certificates(raw)
    except ValueError:
        raise ConfigError("not a PEM file of X.509 certificates (-----BEGIN CERTIFICATE-----)", file=file) from None
    if len(chain) > MAX_CHAIN:
        raise ConfigError(f"{len(chain)} certificates: give the chain of the signing key only (leaf first, at "
                          f"most {MAX_CHAIN}), not a bundle of CA roots", file=file)
    return chain


def check_chain(chain: list[x509.Certificate], public_key, *, file: str, now: datetime | None = None) -> None:
    """Refuse a chain that does not belong to `public_key` (a cryptography public key): the leaf must hold
    exactly that key, be valid now and allow digital signatures, and each certificate must be issued by the
    next one. A receiver verifying by `x5c` would otherwise be told to check our signature with a key that
    did not make it."""
    if not chain:
        raise ConfigError("the certificate chain file holds no certificate", file=file)
    leaf = chain[0]
    if _spki(leaf.public_key()) != _spki(public_key):
        raise ConfigError("the first certificate does not hold the signing key of the hospital's key set (the "
                          "leaf certificate, for that key, must come first)", file=file)
    now = now or datetime.now(UTC)
    if not (leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc):
        raise ConfigError(f"the signing certificate is not valid now (valid {leaf.not_valid_before_utc:%Y-%m-%d} "
                          f"to {leaf.not_valid_after_utc:%Y-%m-%d})", file=file)
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    # CDex: "The KeyUsage SHOULD include 'DigitalSignature'"; one that excludes it forbids this use.
    if usage is not None and not usage.digital_signature:
        raise ConfigError("the signing certificate's KeyUsage does not allow digitalSignature", file=file)
    for n, (cert, issuer) in enumerate(zip(chain, chain[1:], strict=False), 1):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise ConfigError(f"certificate {n} is not issued by certificate {n + 1}: list the chain leaf first, "
                              "each certificate followed by its issuer", file=file) from None


def x5c(chain: list[x509.Certificate]) -> list[str]:
    """The `x5c` header value: standard base64 of each certificate's DER (RFC 7515 §4.1.6)."""
    return [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii") for c in chain]


def load_x5c(path: str | os.PathLike, public_key) -> list[str]:
    """Read, check against `public_key` and encode a chain: what a signer puts in its JWS headers."""
    chain = read_chain(path)
    check_chain(chain, public_key, file=os.fspath(path))
    return x5c(chain)


def leaf_public_key(x5c_value: object):
    """The public key of the first certificate of an `x5c` header value, or None when it is not one."""
    if not isinstance(x5c_value, list) or not x5c_value or not isinstance(x5c_value[0], str):
        return None
    try:
        return x509.load_der_x509_certificate(base64.b64decode(x5c_value[0], validate=True)).public_key()
    except ValueError:
        return None


def same_key(a, b) -> bool:
    return _spki(a) == _spki(b)
