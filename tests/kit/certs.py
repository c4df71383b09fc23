"""X.509 chains for tests: a self-signed CA and a leaf certificate for a given signing key, made with
`cryptography` (what a hospital's PKI would issue; self-signed only because this is a test)."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str = "Test Hospital CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_leaf(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], public_key, *, san: str | None = None,
              digital_signature: bool = True, days: int = 365) -> x509.Certificate:
    """A certificate for `public_key` issued by `ca`; `san`: a URI Subject Alternative Name (CDex asks that it
    match Signature.who.identifier)."""
    ca_key, ca_cert = ca
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(_name("Test Hospital signing")).issuer_name(ca_cert.subject)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=days))
               .add_extension(x509.KeyUsage(digital_signature=digital_signature, content_commitment=True,
                                            key_encipherment=False, data_encipherment=False, key_agreement=False,
                                            key_cert_sign=False, crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]),
                                        critical=False)
    return builder.sign(ca_key, hashes.SHA384())


def write_pem(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path
