"""What the signatures and addressing of a package, an opinion and the filed Provenance say, checked on the
real EHR: identifier URIs in iss/aud (RFC 7519), the x5c chain and signature types (Da Vinci CDex), the
Compositions' attesters, and a Provenance whose signatures cover its own targets."""
from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from fhirbridge import jsonutil
from fhirbridge.crypto import jws
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.errors import SealError
from fhirbridge.exchange import envelope
from fhirbridge.loop.receive import receive_bytes, receive_file
from tests.kit.certs import make_ca, make_leaf, write_pem
from tests.kit.hospital import craft_opinion

pytestmark = pytest.mark.sekmet

VERIFICATION = {"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.5",
                "display": "Verification Signature"}


def _header(signature: dict) -> dict:
    token = base64.b64decode(signature["data"]).decode("ascii")
    return jsonutil.loads(jsonutil.b64url_decode(token.split(".")[0]))


def test_a_package_names_both_parties_by_uri_and_carries_the_certificate_chain(hospital, seeded, tmp_path):
    h = hospital.app.hospital
    ca = make_ca()
    signing = KeyRing.load(h.keys).signing_key()
    chain = write_pem(tmp_path / "chain.pem", make_leaf(ca, signing.public_key, san=h.identifier_value), ca[1])
    hospital.app.close()
    hospital.app = hospital.new_app(FHIRBRIDGE_HOSPITAL__CERTIFICATE_CHAIN=str(chain))
    case = hospital.delivered_case(seeded["patient"])
    opened = hospital.open(case)

    # RFC 7519 §4.1.1/§4.1.3: StringOrURI; the richer identifier object rides along in iss_org/aud_org.
    claims = opened.claims
    assert claims["iss"] == envelope.organization_uri(h.identifier_system, h.identifier_value)
    assert claims["aud"] == "urn:oid:2.999.9.1"   # system urn:ietf:rfc:3986: the value is the URI
    assert claims["iss_org"] == {"system": h.identifier_system, "value": h.identifier_value, "display": h.name}
    assert claims["aud_org"]["value"] == "urn:oid:2.999.9.1"

    # CDex: the Verification Signature type, the fixed targetFormat/sigFormat, and x5c = our chain.
    sig = opened.document["signature"]
    assert VERIFICATION in sig["type"] and sig["sigFormat"] == "application/jose"
    assert sig["targetFormat"] == ("application/fhir+json;canonicalization="
                                   "http://hl7.org/fhir/canonicalization/json#document")
    x5c = _header(sig)["x5c"]
    assert len(x5c) == 2 and base64.b64decode(x5c[1]) == ca[1].public_bytes(Encoding.DER)



def test_an_opinion_answers_with_uris_and_an_older_reviewers_objects_are_still_read(hospital, seeded):
    case = hospital.delivered_case(seeded["patient"])
    claims, document = envelope.open_sealed(hospital.answer(case).read_bytes(), typ=envelope.OPINION,
                                             decrypt=hospital.app.hospital_keys,
                                             trusted=hospital.reviewers["spine-center"].key)
    assert isinstance(claims["iss"], str) and isinstance(claims["aud"], str)
    assert claims["iss"] == "urn:oid:2.999.9.1" and claims["aud"] == hospital.open(case).claims["iss"]

    # An opinion sealed by a reviewer tool from before (the objects in iss/aud themselves) is still received.
    def older(c: dict) -> None:
        c["iss"], c["aud"] = c.pop("iss_org"), c.pop("aud_org")
    received = receive_bytes(hospital.app, craft_opinion(hospital, case, claims=older))
    assert received.case.step == "file"


def test_both_compositions_name_their_attester(hospital, seeded):
    """R4 Composition.attester: the hospital attests the referral packet, the reviewer its opinion; both are
    organisations, so mode `official`, at the time the document was made, the party its author."""
    case = hospital.delivered_case(seeded["patient"])
    referral = hospital.open(case).document
    _claims, opinion = envelope.open_sealed(hospital.answer(case).read_bytes(), typ=envelope.OPINION,
                                            decrypt=hospital.app.hospital_keys,
                                            trusted=hospital.reviewers["spine-center"].key)
    for document in (referral, opinion):
        composition = document["entry"][0]["resource"]
        party = composition["author"][0]
        assert composition["attester"] == [{"mode": "official", "time": composition["date"], "party": party}]
        org = next(e["resource"] for e in document["entry"] if e["fullUrl"] == party["reference"])
        assert org["resourceType"] == "Organization"


def test_the_provenance_signs_its_own_targets(hospital, seeded, fhir):
    case = hospital.delivered_case(seeded["patient"])
    receive_file(hospital.app, hospital.answer(case))
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "done", case.last_error
    provs = [p for p in fhir.search("Provenance", {"target": case.document_reference})
             if p["resourceType"] == "Provenance"]
    assert len(provs) == 1
    prov = provs[0]
    hospital_public = KeyRing(hospital.app.hospital_keys.public_jwks())
    reviewer_public = KeyRing(hospital.reviewers["spine-center"].key.public_jwks())
    # R4 Provenance.signature: "a digital signature on the target Reference(s)": one per target, in order,
    # each over the target as the EHR holds it, by the hospital's key (the transmitter agent's).
    assert len(prov["signature"]) == len(prov["target"]) == 2
    for target, sig in zip(prov["target"], prov["signature"], strict=True):
        stored = fhir.read_ref(target["reference"])
        assert jws.verify_resource(sig, stored, hospital_public)["kid"] == hospital.app.hospital_keys.signing_key().kid
        assert sig["type"] == [VERIFICATION] and sig["who"] == prov["agent"][1]["who"]
        assert sig["onBehalfOf"] == prov["agent"][1]["onBehalfOf"]
        with pytest.raises(SealError, match="not a trusted key"):
            jws.verify_resource(sig, stored, reviewer_public)
        changed = {**stored, "status": "entered-in-error"} if stored["resourceType"] != "Binary" else \
            {**stored, "contentType": "text/plain"}
        with pytest.raises(SealError, match="does not match"):
            jws.verify_resource(sig, changed, hospital_public)
    # The reviewer's own signature stays where it belongs: on the document the Binary holds.
    binary = fhir.read_ref(prov["target"][1]["reference"])
    jws.verify_bundle(jsonutil.loads(base64.b64decode(binary["data"])), reviewer_public)
