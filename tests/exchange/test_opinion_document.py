"""The opinion's Composition is a complete FHIR document on its own: an attested narrative generated from the
structured answer (never markup the reviewer typed) and an attester (R4 Composition.attester)."""
from __future__ import annotations

import pytest

from fhirbridge.config import loader as config
from fhirbridge.config.mappings import load_opinion_form
from fhirbridge.exchange import envelope
from fhirbridge.exchange.opinion import build_opinion_document, reviewer_organization
from fhirbridge.fhir.narrative import narrative_problems
from fhirbridge.fhir.validate import validate

ANSWER = {"concordance": "discordant", "recommendation": "non-surgical-care", "urgency": "urgent",
          "risks_benefits": 'Risky <script>alert(1)</script> & <img src=x onerror="alert(2)"> "quoted"',
          "alternatives": ["Physio <b>now</b>"],
          "answers": [{"question": "Fusion?", "answer": "<a href=\"javascript:alert(3)\">No</a>"}]}


@pytest.fixture(scope="module")
def document():
    form = load_opinion_form(config.PACKAGE_MAPPINGS)
    patient = {"fullUrl": "urn:uuid:6f1c3a52-0d4e-4c7b-9b1e-2f0a7d1e9c11",
               "resource": {"resourceType": "Patient", "id": "p"}}
    sr = {"fullUrl": "urn:uuid:0b7d2c1e-5a44-4e3a-8f6e-9d2b1c3a4e55", "resource": {
        "resourceType": "ServiceRequest", "id": "s", "status": "active", "intent": "order",
        "subject": {"reference": patient["fullUrl"]}}}
    org = reviewer_organization({"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.1.2", "display": "Spine"})
    return build_opinion_document(ANSWER, form, opinion_id="op-1", timestamp="2024-06-01T12:00:00Z",
                                  patient_entry=patient, service_request_entry=sr, reviewer_org=org)


def test_the_opinion_composition_has_a_safe_generated_narrative(document):
    composition = document["entry"][0]["resource"]
    text = composition["text"]
    assert text["status"] == "generated" and narrative_problems(text["div"]) == []
    div = text["div"]
    # Everything the reviewer wrote is there as text, escaped; none of it as markup.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in div and "&lt;b&gt;now&lt;/b&gt;" in div
    assert "<script" not in div and "<img" not in div and "<a " not in div and "<b>now" not in div
    # Every section and every choice's display is in it (the narrative is the attested content).
    for section in composition["section"]:
        assert f"<h3>{section['title']}</h3>" in div
    assert "Discordant: different diagnosis" in div and "Non-surgical care" in div
    assert validate(composition) == []


def test_the_opinion_composition_is_attested_by_its_author(document):
    composition = document["entry"][0]["resource"]
    assert composition["attester"] == [{"mode": "official", "time": "2024-06-01T12:00:00Z",
                                        "party": composition["author"][0]}]


def test_addressing_uses_identifier_uris_and_answers_in_the_form_it_was_asked():
    hospital = {"system": "http://hospital.example/ids", "value": "H 1/2", "display": "H"}
    reviewer = {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.1.2", "display": "R"}
    claims = envelope.addressing(hospital, reviewer)
    # RFC 7519 StringOrURI: a value with ':' is a URI (RFC 3986); the identifier value is percent-encoded.
    assert claims["iss"] == "http://hospital.example/ids#H%201/2" and claims["aud"] == "urn:oid:2.999.1.2"
    assert envelope.organization_uri("urn:x#frag", "v|w") == "urn:x#frag%7Cv%7Cw"
    reply = envelope.reply_addressing(claims)
    assert (reply["iss"], reply["aud"], reply["iss_org"], reply["aud_org"]) == (
        claims["aud"], claims["iss"], reviewer, hospital)
    # A package from a hospital still on the object claims is answered with object claims it can read.
    older = {"iss": hospital, "aud": reviewer}
    assert envelope.reply_addressing(older) == {"iss": reviewer, "aud": hospital}
    assert envelope.party(older, "iss") == hospital and envelope.party_uri(older["iss"]) == claims["iss"]
