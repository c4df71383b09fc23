"""The x5c certificate chain (Da Vinci CDex signatures: a receiver without our JWKS verifies with the leaf of
the chain in the JWS header). The CA and the leaf are made here with `cryptography`."""
from __future__ import annotations

import base64

import pytest
from cryptography import x509
from joserfc import jws as joserfc_jws
from joserfc.jwk import ECKey

from fhirbridge.crypto import certs, jws, keys
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.errors import ConfigError, SealError
from fhirbridge.jsonutil import b64url_decode, canonical, loads
from tests.kit.certs import make_ca, make_leaf, write_pem

WHO = {"identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.1.2"}, "display": "Hospital"}
BUNDLE = {"resourceType": "Bundle", "id": "x", "meta": {"versionId": "3"}, "type": "document",
          "timestamp": "2024-05-01T09:59:00Z",
          "entry": [{"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Composition", "title": "Referral"}}]}


@pytest.fixture(scope="module")
def ours():
    return KeyRing(keys.generate_jwks(), source="hospital.jwks.json")


@pytest.fixture(scope="module")
def ca():
    return make_ca()


@pytest.fixture
def chain_file(tmp_path, ours, ca):
    leaf = make_leaf(ca, ours.signing_key().public_key, san="urn:oid:2.999.1.2")
    return write_pem(tmp_path / "chain.pem", leaf, ca[1])


def _header(signature: dict) -> dict:
    token = base64.b64decode(signature["data"]).decode("ascii")
    return loads(b64url_decode(token.split(".")[0]))


def test_a_receiver_without_our_jwks_verifies_a_document_with_the_x5c_leaf(ours, ca, chain_file):
    x5c = certs.load_x5c(chain_file, ours.signing_key().public_key)
    signed = jws.sign_bundle(BUNDLE, ours, who=WHO, when="2024-05-01T10:00:00Z", x5c=x5c)
    header = _header(signed["signature"])
    assert header["x5c"] == x5c and len(x5c) == 2 and header["kid"] == ours.signing_key().kid
    # What a CDex verifier does: leaf from x5c[0] (standard base64 DER), chain checked against its own trusted
    # root (here the test CA), then the detached JWS over the JCS form without id, meta and signature.
    leaf = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))
    issuer = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][1]))
    leaf.verify_directly_issued_by(issuer)
    assert issuer == ca[1]
    token = base64.b64decode(signed["signature"]["data"]).decode("ascii")
    payload = canonical({k: v for k, v in signed.items() if k not in ("id", "meta", "signature")})
    key = ECKey.import_key(leaf.public_key())
    registry = joserfc_jws.JWSRegistry(algorithms=["ES384"])
    registry.max_header_length = 16 * 1024   # joserfc's default (512 bytes) is less than one certificate
    verified = joserfc_jws.deserialize_compact(token, key, payload=payload, registry=registry)
    assert verified.protected["alg"] == "ES384"
    # And it still verifies the usual way, with our JWKS.
    assert jws.verify_bundle(signed, KeyRing(ours.public_jwks()))["x5c"] == x5c


def test_a_chain_must_hold_the_signing_key_and_be_in_order(tmp_path, ours, ca):
    other = KeyRing(keys.generate_jwks()).signing_key().public_key
    public = ours.signing_key().public_key
    leaf = make_leaf(ca, public)
    with pytest.raises(ConfigError, match="does not hold the signing key"):
        certs.load_x5c(write_pem(tmp_path / "other.pem", make_leaf(ca, other), ca[1]), public)
    with pytest.raises(ConfigError, match="does not hold the signing key"):
        certs.load_x5c(write_pem(tmp_path / "reversed.pem", ca[1], leaf), public)
    with pytest.raises(ConfigError, match="not issued by certificate 2"):
        certs.load_x5c(write_pem(tmp_path / "foreign.pem", leaf, make_ca("Another CA")[1]), public)
    with pytest.raises(ConfigError, match="KeyUsage does not allow digitalSignature"):
        certs.load_x5c(write_pem(tmp_path / "usage.pem", make_leaf(ca, public, digital_signature=False)), public)
    with pytest.raises(ConfigError, match="not valid now"):
        certs.load_x5c(write_pem(tmp_path / "expired.pem", make_leaf(ca, public, days=-1)), public)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM file"):
        certs.load_x5c(tmp_path / "junk.pem", public)
    # A leaf alone (the receiver holds the CA) is a chain too.
    assert len(certs.load_x5c(write_pem(tmp_path / "leaf.pem", leaf), public)) == 1


def test_an_x5c_for_another_key_is_never_signed_nor_accepted(ours, ca):
    stranger = KeyRing(keys.generate_jwks())
    foreign = certs.x5c([make_leaf(ca, stranger.signing_key().public_key)])
    with pytest.raises(SealError, match="does not hold signing key"):
        jws.sign_bundle(BUNDLE, ours, who=WHO, when="2024-05-01T10:00:00Z", x5c=foreign)
    # A token whose header names someone else's certificate: our key verifies it, but a receiver trusting the
    # x5c would check it against another key, so it is refused.
    key = ours.signing_key()
    payload = canonical({k: v for k, v in BUNDLE.items() if k not in ("id", "meta", "signature")})
    token = joserfc_jws.detach_content(joserfc_jws.serialize_compact(
        {"alg": "ES384", "kid": key.kid, "x5c": foreign}, payload, key, algorithms=["ES384"]))
    with pytest.raises(SealError, match="x5c certificate chain in the signature does not hold trusted key"):
        jws.verify_detached(token, payload, KeyRing(ours.public_jwks()))
