"""Structural validation: short reasons with element paths, never element values."""
from __future__ import annotations

import pytest

from fhirbridge.errors import InvalidResource
from fhirbridge.fhir.client import FhirClient
from fhirbridge.fhir.validate import check, validate

REPORT = {"resourceType": "DiagnosticReport", "id": "r1", "status": "final", "code": {"text": "MRI"},
          "subject": {"reference": "Patient/p1"}}


def test_valid_resource_has_no_reasons():
    assert validate(REPORT) == []
    check(REPORT)  # does not raise


def test_missing_required_field():
    resource = {k: v for k, v in REPORT.items() if k != "status"}
    assert validate(resource) == ["DiagnosticReport.status: field required"]


def test_nested_paths_use_indexes():
    resource = {**REPORT, "result": [{"reference": "Observation/1"}, {"reference": 7}]}
    assert validate(resource) == ["DiagnosticReport.result[1].reference: expected a string"]


def test_unknown_element_is_reported():
    assert validate({**REPORT, "colour": "blue"}) == ["DiagnosticReport.colour: unknown element"]


def test_unknown_and_missing_resource_type():
    assert validate({"resourceType": "Spaceship", "id": "x"}) == ["unknown resourceType Spaceship"]
    assert validate({"id": "x"}) == ["missing resourceType"]
    assert validate(["not", "a", "resource"]) == ["not a JSON object"]


def test_reasons_never_contain_values():
    phi = {"resourceType": "Patient", "id": "p1", "birthDate": "1961-13-45",
           "name": [{"family": ["Zeltwanger"], "given": "Anna-Maria"}],
           "telecom": [{"system": "phone", "value": {"nested": "+49 170 1234567"}}],
           "secretNote": "lives with Jane Doe"}
    reasons = validate(phi)
    assert reasons
    joined = " ".join(reasons)
    for value in ("1961", "Zeltwanger", "Anna", "1234567", "Jane"):
        assert value not in joined
    assert any(r.startswith("Patient.birthDate:") for r in reasons)
    assert "Patient.secretNote: unknown element" in reasons


def test_check_raises_with_type_and_id():
    with pytest.raises(InvalidResource) as err:
        check({"resourceType": "Observation", "id": "o9", "code": {"text": "x"}})
    assert err.value.where == "Observation/o9"
    assert err.value.reasons == ["Observation.status: field required"]
    with pytest.raises(InvalidResource) as named:
        check({"resourceType": "Observation"}, where="bundle entry 3")
    assert named.value.where == "bundle entry 3"


@pytest.mark.sekmet
def test_every_seeded_resource_validates(ehr, seeded: dict):
    refs = [seeded["patient"], seeded["old_procedure"]]
    refs += [ref for key, value in seeded.items() if isinstance(value, list) for ref in value]
    with FhirClient(ehr.base_url) as client:
        for ref in refs:
            resource = client.read_ref(ref, strict=True)
            assert validate(resource) == [], ref
        # and what a search brings back for the patient, including sekmet's own Tasks and Specimens
        for type_ in ("Task", "Specimen", "Condition", "Observation", "DocumentReference"):
            list(client.search(type_, {"patient": seeded["patient"]}))
        assert client.invalid == []


def test_choice_elements_get_short_reasons():
    two = {"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"},
           "valueQuantity": {"value": 1}, "valueString": "x"}
    assert validate(two) == ["Observation: at most one value[x] element is allowed"]
    none = {"resourceType": "MedicationRequest", "id": "m", "status": "active", "intent": "order",
            "subject": {"reference": "Patient/1"}}
    assert validate(none) == ["MedicationRequest: one medication[x] element is required"]
