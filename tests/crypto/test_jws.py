import base64
import copy
import json

import pytest
from joserfc import jws as joserfc_jws
from joserfc.jwk import ECKey, OctKey, RSAKey

from fhirbridge.crypto import jws, keys
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.errors import SealError
from fhirbridge.jsonutil import b64url, b64url_decode, canonical, sha256_hex

PAYLOAD = b'{"resourceType":"Bundle","type":"document"}'


@pytest.fixture(scope="module")
def ours():
    return KeyRing(keys.generate_jwks(), source="hospital.jwks.json")


@pytest.fixture(scope="module")
def trusted(ours):
    return KeyRing(ours.public_jwks(), source="trusted/hospital.json", label="General Hospital")


@pytest.fixture(scope="module")
def stranger():
    return KeyRing(keys.generate_jwks(), source="stranger.jwks.json")


@pytest.fixture(scope="module")
def rsa_signer():
    key = RSAKey.generate_key(2048).as_dict(private=True)
    key["use"] = "sig"
    return KeyRing({"keys": [key]}, source="rsa")


def _error(fn, *args, **kw) -> str:
    with pytest.raises(SealError) as err:
        fn(*args, **kw)
    return str(err.value)


def _bundle():
    return {
        "resourceType": "Bundle",
        "id": "doc-1",
        "meta": {"lastUpdated": "2024-05-01T10:00:00Z"},
        "type": "document",
        "timestamp": "2024-05-01T09:59:00Z",
        "entry": [
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Composition", "title": "Referral"}},
            {"fullUrl": "urn:uuid:2", "resource": {
                "resourceType": "Observation", "status": "final",
                "code": {"text": "Hemoglobin"}, "valueQuantity": {"value": 13.5, "unit": "g/dL"}}},
        ],
    }


WHO = {"reference": "Organization/hospital", "display": "General Hospital"}
WHEN = "2024-05-01T10:00:00Z"


# --- detached ---------------------------------------------------------------------------------

def test_detached_round_trip(ours, trusted):
    token = jws.sign_detached(PAYLOAD, ours, typ="fhirbridge-test")
    header_b64, payload_b64, sig_b64 = token.split(".")
    assert payload_b64 == ""
    assert len(b64url_decode(sig_b64)) == 96  # ES384: r || s, 48 bytes each (RFC 7518 §3.4)
    header = jws.verify_detached(token, PAYLOAD, trusted)
    assert header == {"alg": "ES384", "kid": ours.signing_key().kid, "typ": "fhirbridge-test"}
    assert jws.verify_detached(token, PAYLOAD, ours) == header  # a private ring verifies too


def _tamper_char(text: str, index: int) -> str:
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1:]


def test_each_failure_has_its_own_reason(ours, trusted, stranger):
    token = jws.sign_detached(PAYLOAD, ours)
    header_b64, _, sig_b64 = token.split(".")
    kid = ours.signing_key().kid

    changed_payload = _error(jws.verify_detached, token, PAYLOAD + b" ", trusted)
    changed_sig = _error(jws.verify_detached, f"{header_b64}..{_tamper_char(sig_b64, 40)}", PAYLOAD, trusted)
    unknown_kid = _error(jws.verify_detached, jws.sign_detached(PAYLOAD, stranger), PAYLOAD, trusted)
    none_alg = _error(jws.verify_detached,
                      b64url(json.dumps({"alg": "none", "kid": kid}).encode()) + "..", PAYLOAD, trusted)
    hmac_token = joserfc_jws.detach_content(joserfc_jws.serialize_compact(
        {"alg": "HS256", "kid": kid}, PAYLOAD, OctKey.import_key(b"0" * 32), algorithms=["HS256"]))
    hs256 = _error(jws.verify_detached, hmac_token, PAYLOAD, trusted)
    malformed = _error(jws.verify_detached, "not-a-jws", PAYLOAD, trusted)

    assert "signature does not match: content was changed after signing" in changed_payload
    # Which side was altered cannot be told apart cryptographically; both are the same mismatch.
    assert changed_sig == changed_payload
    # The key set is named by its label, never by its file (issue 13, S9: the message can reach a peer).
    assert f"signed by key {stranger.signing_key().kid}, which is not a trusted key of General Hospital" \
        in unknown_kid
    assert "trusted/hospital.json" not in unknown_kid
    assert "'none'" in none_alg and "HS256" in hs256 and "shared-secret" in hs256
    assert "malformed" in malformed
    assert len({changed_payload, unknown_kid, none_alg, hs256, malformed}) == 5


def test_missing_kid_and_attached_token_rejected(ours, trusted):
    no_kid = joserfc_jws.detach_content(joserfc_jws.serialize_compact(
        {"alg": "ES384"}, PAYLOAD, ours.signing_key(), algorithms=["ES384"]))
    assert "no kid" in _error(jws.verify_detached, no_kid, PAYLOAD, trusted)
    attached = jws.sign_compact({"a": 1}, ours, typ="x")
    assert "detached" in _error(jws.verify_detached, attached, PAYLOAD, trusted)


def test_rsa_signatures_rs384_and_ps256(rsa_signer):
    trusted = KeyRing(rsa_signer.public_jwks())
    token = jws.sign_detached(PAYLOAD, rsa_signer)
    assert jws.verify_detached(token, PAYLOAD, trusted)["alg"] == "RS384"
    key = rsa_signer.signing_key()
    ps256 = joserfc_jws.detach_content(joserfc_jws.serialize_compact(
        {"alg": "PS256", "kid": key.kid}, PAYLOAD, key, algorithms=["PS256"]))
    assert jws.verify_detached(ps256, PAYLOAD, trusted)["alg"] == "PS256"
    rs256 = joserfc_jws.detach_content(joserfc_jws.serialize_compact(
        {"alg": "RS256", "kid": key.kid}, PAYLOAD, key, algorithms=["RS256"]))
    assert "not allowed" in _error(jws.verify_detached, rs256, PAYLOAD, trusted)


def test_alg_must_fit_the_trusted_key(ours, trusted):
    # An ES256 header naming our P-384 key: refused before any signature maths.
    kid = ours.signing_key().kid
    forged = b64url(json.dumps({"alg": "ES256", "kid": kid}).encode()) + ".." + b64url(b"x" * 64)
    assert "does not fit" in _error(jws.verify_detached, forged, PAYLOAD, trusted)


# --- attached (compact claims) ---------------------------------------------------------------

def test_compact_round_trip_and_typ(ours, trusted, stranger):
    claims = {"case": "c-1", "digest": "ab" * 32, "n": 3}
    token = jws.sign_compact(claims, ours, typ="fhirbridge-manifest+jwt")
    assert b64url_decode(token.split(".")[1]) == canonical(claims)
    header, got = jws.verify_compact(token, trusted, typ="fhirbridge-manifest+jwt")
    assert got == claims and header["typ"] == "fhirbridge-manifest+jwt"
    assert jws.verify_compact(token, trusted)[1] == claims
    assert "wrong token type" in _error(jws.verify_compact, token, trusted, typ="fhirbridge-opinion+jwt")
    assert "not a trusted key" in _error(jws.verify_compact, token, KeyRing(stranger.public_jwks()))
    h, p, s = token.split(".")
    altered = b64url(canonical({**claims, "n": 4}))
    assert "does not match" in _error(jws.verify_compact, f"{h}.{altered}.{s}", trusted)


# --- FHIR Bundle signatures ------------------------------------------------------------------

def test_sign_and_verify_bundle(ours, trusted):
    bundle = _bundle()
    original = copy.deepcopy(bundle)
    signed = jws.sign_bundle(bundle, ours, who=WHO, when=WHEN)
    assert bundle == original  # a new bundle is returned
    sig = signed["signature"]
    # CDex Signature profile: the Verification Signature slice (required), the Author's next to it.
    assert sig["type"] == [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.5",
                            "display": "Verification Signature"},
                           {"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1",
                            "display": "Author's Signature"}]
    assert (sig["when"], sig["who"]) == (WHEN, WHO)
    # CDex Digital Signature profile: both fixed values.
    assert (sig["sigFormat"], sig["targetFormat"]) == (
        "application/jose", "application/fhir+json;canonicalization=http://hl7.org/fhir/canonicalization/json#document")
    token = base64.b64decode(sig["data"], validate=True).decode("ascii")
    assert token.split(".")[1] == ""
    assert jws.verify_bundle(signed, trusted)["kid"] == ours.signing_key().kid

    # The signature covers the JCS form of the bundle without id/meta/signature.
    stripped = {k: v for k, v in bundle.items() if k not in ("id", "meta")}
    assert jws.verify_detached(token, canonical(stripped), trusted)
    assert jws.bundle_digest(bundle) == jws.bundle_digest(signed) == sha256_hex(canonical(stripped))
    # Key order and whitespace do not matter once parsed (JCS).
    reordered = json.loads(json.dumps(signed, indent=3, sort_keys=True))
    assert jws.verify_bundle(reordered, trusted)


@pytest.mark.parametrize("path, value", [
    (("entry", 1, "resource", "valueQuantity", "value"), 135),
    (("entry", 1, "resource", "code", "text"), "Hematocrit"),
    (("entry", 0, "resource", "title"), "Referral (amended)"),
    (("timestamp",), "2024-05-02T09:59:00Z"),
    (("type",), "collection"),
])
def test_changing_clinical_content_breaks_the_signature(ours, trusted, path, value):
    signed = jws.sign_bundle(_bundle(), ours, who=WHO, when=WHEN)
    target = signed
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    assert "does not match" in _error(jws.verify_bundle, signed, trusted)


def test_removing_an_entry_breaks_the_signature(ours, trusted):
    signed = jws.sign_bundle(_bundle(), ours, who=WHO, when=WHEN)
    signed["entry"].pop()
    assert "does not match" in _error(jws.verify_bundle, signed, trusted)


def test_server_assigned_id_and_meta_do_not_matter(ours, trusted):
    signed = jws.sign_bundle(_bundle(), ours, who=WHO, when=WHEN)
    signed["id"] = "server-assigned-42"
    signed["meta"] = {"versionId": "3", "lastUpdated": "2024-06-01T00:00:00Z"}
    assert jws.verify_bundle(signed, trusted)
    del signed["id"], signed["meta"]
    assert jws.verify_bundle(signed, trusted)


def test_bundle_signature_problems(ours, trusted, stranger):
    assert "document is not signed" in _error(jws.verify_bundle, _bundle(), trusted)
    signed = jws.sign_bundle(_bundle(), ours, who=WHO, when=WHEN)
    xml = copy.deepcopy(signed)
    xml["signature"]["sigFormat"] = "application/signature+xml"
    assert "sigFormat" in _error(jws.verify_bundle, xml, trusted)
    garbage = copy.deepcopy(signed)
    garbage["signature"]["data"] = "***"
    assert "not base64" in _error(jws.verify_bundle, garbage, trusted)
    foreign = jws.sign_bundle(_bundle(), stranger, who=WHO, when=WHEN)
    assert "not a trusted key" in _error(jws.verify_bundle, foreign, trusted)
    assert "not a FHIR Bundle" in _error(jws.bundle_digest, {"resourceType": "Patient"})


# --- canonical JSON --------------------------------------------------------------------------

def test_jcs_matches_rfc8785_example():
    # RFC 8785 §3.2.2 / §3.2.3: sorted keys, ECMAScript number serialization, minimal escaping.
    source = (r'{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
              r' "string": "\u20ac$\u000F\u000aA'"'"r'\u0042\u0022\u005c\\\"\/",'
              r' "literals": [null, true, false]}')
    expected = ('{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
                '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}').encode("utf-8")
    assert canonical(json.loads(source)) == expected


def test_sign_with_digest_gives_the_digest_of_the_signed_bundle_and_leaves_the_input_alone(ours, trusted):
    original = _bundle()
    before = copy.deepcopy(original)
    signed, digest = jws.sign_bundle_with_digest(original, ours, who={"display": "H"}, when="2024-05-01T10:00:00Z")
    assert digest == jws.bundle_digest(signed) == jws.bundle_digest(original)
    assert original == before and "signature" not in original
    jws.verify_bundle(signed, trusted)


@pytest.mark.parametrize("curve", ["P-256", "P-384", "RSA"])
@pytest.mark.parametrize("size", [0, 1, 2, 3 * (1 << 18) - 1, 3 * (1 << 18), 3 * (1 << 18) + 1, 2_000_003])
def test_a_detached_signature_hashed_in_chunks_verifies_with_joserfc(curve, size, rsa_signer):
    """The signing input is hashed as its base64url form is made, a chunk at a time, and signed pre-hashed:
    a JOSE library that builds the whole signing input must accept it, at every chunk boundary."""
    if curve == "RSA":
        signer = rsa_signer
    else:
        key = ECKey.generate_key(curve).as_dict(private=True)
        key["use"] = "sig"
        signer = KeyRing({"keys": [key]}, source=curve)
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    token = jws.sign_detached(payload, signer)
    header = jws.verify_detached(token, payload, KeyRing(signer.public_jwks()))
    assert header["alg"] == {"P-256": "ES256", "P-384": "ES384", "RSA": "RS384"}[curve]
    assert "signature does not match" in _error(jws.verify_detached, token, payload + b" ",
                                                 KeyRing(signer.public_jwks()))
