"""Key images in the opinion document: checked, listed in a DCM 121180 "Key Images" section and as
ImagingStudy entries of the marked instances only, valid R4, safe narrative, read back by `listed`."""
from __future__ import annotations

from pathlib import Path

from fhirbridge.config.mappings import load_opinion_form
from fhirbridge.exchange import key_images as keys
from fhirbridge.exchange.opinion import build_opinion_document, reviewer_organization
from fhirbridge.exchange.render import render_opinion
from fhirbridge.fhir.narrative import narrative_problems
from fhirbridge.fhir.validate import validate

MAPPINGS = Path(__file__).resolve().parents[2] / "src" / "fhirbridge" / "mappings"
MR = "1.2.840.10008.5.1.4.1.1.4"
K1 = {"study_uid": "1.2.3", "series_uid": "1.2.3.4", "sop_uid": "1.2.3.4.5", "sop_class_uid": MR,
      "modality": "MR", "frame": 1}
K2 = {**K1, "sop_uid": "1.2.3.4.6", "frame": 3}
K3 = {**K1, "study_uid": "1.2.9", "series_uid": "1.2.9.1", "sop_uid": "1.2.9.1.1", "modality": "CT"}


def _document(key_images):
    form = load_opinion_form(MAPPINGS, "default")
    patient = {"fullUrl": "https://ehr.example/fhir/Patient/p1", "resource": {"resourceType": "Patient", "id": "p1"}}
    order = {"fullUrl": "https://ehr.example/fhir/ServiceRequest/sr1", "resource": {
        "resourceType": "ServiceRequest", "id": "sr1", "status": "active", "intent": "order",
        "subject": {"reference": patient["fullUrl"]}}}
    answer = {"concordance": "concordant", "recommendation": "proceed-as-planned", "urgency": "routine",
              "risks_benefits": "None."}
    answer = {k: v for k, v in answer.items() if k in form.fields}
    return build_opinion_document(answer, form, opinion_id="0b5f7ab0-8a4c-4b36-9d1a-0a0e5b4f2d10",
                                  timestamp="2026-01-02T00:00:00Z", patient_entry=patient,
                                  service_request_entry=order,
                                  reviewer_org=reviewer_organization({"system": "urn:ietf:rfc:3986",
                                                                      "value": "urn:oid:2.999.7.9"}),
                                  key_images=key_images)


def test_well_formed_key_images_have_no_problems_and_bad_ones_are_named():
    assert keys.problems([K1, K2]) == []
    assert keys.problems("x") != []
    found = keys.problems([{**K1, "sop_uid": "1.2.<b>"}, {**K1, "frame": 0}, {**K1, "modality": "m r"},
                           {**K1, "extra": 1}, {**K1, "frame": True}])
    assert any("sop_uid is not a DICOM UID" in p for p in found)
    assert any("frame must be a number from 1" in p for p in found)
    assert any("modality" in p for p in found)
    assert any("unknown key 'extra'" in p for p in found)


def test_the_opinion_lists_the_key_images_by_uid_and_stays_valid_r4():
    document = _document([K1, K2, K3])
    comp = document["entry"][0]["resource"]
    section = next(s for s in comp["section"] if s.get("code", {}).get("coding", [{}])[0].get("code") == "121180")
    assert section["code"]["coding"][0]["system"] == keys.DCM
    assert section["focus"]["reference"].endswith("ServiceRequest/sr1")
    studies = [e["resource"] for e in document["entry"] if e["resource"]["resourceType"] == "ImagingStudy"]
    assert [s["identifier"][0]["value"] for s in studies] == ["urn:oid:1.2.3", "urn:oid:1.2.9"]
    assert [r["reference"] for r in section["entry"]] == [e["fullUrl"] for e in document["entry"]
                                                          if e["resource"]["resourceType"] == "ImagingStudy"]
    assert studies[0]["numberOfInstances"] == 2 and studies[0]["series"][0]["instance"][1]["title"] == \
        "key image, frame 3"
    for entry in document["entry"]:
        assert validate(entry["resource"]) == [], entry["resource"]["resourceType"]
    for div in (section["text"]["div"], comp["text"]["div"]):
        assert narrative_problems(div) == []
        assert "1.2.3.4.5" in div and "frame 3" in div
    assert keys.listed(document) == [
        {"study_uid": "1.2.3", "series_uid": "1.2.3.4", "sop_uid": "1.2.3.4.5", "frames": [1]},
        {"study_uid": "1.2.3", "series_uid": "1.2.3.4", "sop_uid": "1.2.3.4.6", "frames": [3]},
        {"study_uid": "1.2.9", "series_uid": "1.2.9.1", "sop_uid": "1.2.9.1.1", "frames": [1]}]
    # The text filed in the chart names them too.
    assert "Key images" in render_opinion(document) and "1.2.9.1.1" in render_opinion(document)


def test_without_key_images_the_opinion_has_no_such_section():
    document = _document(None)
    assert not [s for s in document["entry"][0]["resource"]["section"] if s["title"] == "Key images"]
    assert keys.listed(document) == []
