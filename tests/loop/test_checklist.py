"""Issue 16 part 6 against the real EHR: each collection profile names the records a reviewer of its specialty
expects, and the physician's preview, the signed manifest and `reviewer open` say per item: included, withheld
(why) or not found in the EHR. A record withheld for a sensitivity label reads "not found" to the reviewer."""
from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fhirbridge.config.mappings import load_profile, profile_names
from fhirbridge.demo.localehr import seed_patient
from fhirbridge.exchange.render import render_package
from fhirbridge.loop.collect import load_collected
from fhirbridge.ui.physician_view import preview

pytestmark = pytest.mark.sekmet

LOINC = "http://loinc.org"
HIV = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"}


def document(patient: str, code: str, display: str, *, when: datetime, security: list | None = None) -> dict:
    doc = {"resourceType": "DocumentReference", "status": "current",
           "type": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
           "subject": {"reference": patient}, "date": when.isoformat(timespec="seconds"),
           "content": [{"attachment": {"contentType": "text/plain", "title": display,
                                       "data": base64.b64encode(f"{display} (synthetic)".encode()).decode()}}]}
    if security:
        doc["meta"] = {"security": security}
    return doc


@pytest.fixture
def patient(ehr, fhir) -> str:
    """A spine patient of its own, with a discharge summary too old for the profile and an HIV-labelled
    pathology report (the seeded one is shared by the session)."""
    ids = seed_patient(ehr, fhir, profile="spine")
    now = datetime.now(UTC)
    fhir.create(document(ids["patient"], "18842-5", "Discharge summary", when=now - timedelta(days=365 * 6)))
    fhir.create(document(ids["patient"], "11526-1", "Pathology study", when=now - timedelta(days=20),
                         security=[HIV]))
    return ids["patient"]


def by_item(entries: list[dict]) -> dict[str, dict]:
    return {e["item"]: e for e in entries}


def test_every_profile_names_the_generic_records_and_its_specialtys_own():
    mappings = Path(__file__).resolve().parents[2] / "mappings"
    generic = {"Pathology reports", "Operative report of an earlier surgery", "Discharge summary of an earlier stay",
               "Current treatment plan", "Medication plan with dosages"}
    own = {"spine": {"MR or CT report of the spine", "MR or CT images"},
           "cardiac": {"Echocardiography", "ECG", "Coronary angiography (catheterisation) report", "Stress test"},
           "oncology": {"Biopsy pathology report", "Tumour staging"}}
    for name in profile_names(mappings):
        items = {e.name for e in load_profile(mappings, name).expect}
        assert generic <= items, name
        assert own.get(name, set()) <= items, name
        for e in load_profile(mappings, name).expect:
            assert all(system == LOINC for system, _ in e.codes), (name, e.name)


def test_the_package_says_per_expected_record_included_withheld_or_not_found(hospital, patient):
    sr = hospital.order(patient, profile="spine")
    hospital.run()
    case = hospital.case_for(sr)
    assert case.step == "await_opinion", case.last_error
    opened = hospital.open(case)
    shown = by_item(opened.manifest["checklist"])

    assert shown["Medication plan with dosages"]["status"] == "included"
    assert all(r.startswith("MedicationStatement/") for r in shown["Medication plan with dosages"]["records"])
    assert shown["Discharge summary of an earlier stay"]["status"] == "withheld"
    assert shown["Discharge summary of an earlier stay"]["reasons"] == ["older than the 1095-day lookback window"]
    assert shown["Operative report of an earlier surgery"]["status"] == "not_found"
    # The HIV-labelled pathology report: the reviewer is told nothing more than if there were none ...
    assert shown["Pathology reports"] == {"item": "Pathology reports", "required": False, "status": "not_found",
                                          "records": [], "reasons": []}
    # ... while the hospital's own copy knows it is there and why it stays.
    kept = by_item(load_collected(hospital.app, case).checklist)
    assert kept["Pathology reports"]["status"] == "withheld"
    assert "HIV" in kept["Pathology reports"]["withheld"][0]["reason"]

    text = render_package(opened.claims, opened.document, sender=opened.sender)
    head = text.split("Problems (")[0]   # the checklist comes before the records
    assert "Checklist (" in head
    assert "[ ] Discharge summary of an earlier stay: withheld (older than the 1095-day lookback window)" in head
    assert "[ ] Pathology reports: not found in the EHR" in head
    assert "[x] Medication plan with dosages: included" in head
    assert "HIV" not in text


def test_the_physicians_preview_shows_the_same_checklist_with_the_hospitals_reasons(hospital, patient):
    got = by_item(preview(hospital.app, patient.split("/", 1)[1], "spine", "spine-center").checklist)
    assert got["Discharge summary of an earlier stay"]["status"] == "withheld"
    assert got["Pathology reports"]["status"] == "withheld"
    assert any("HIV" in r for r in got["Pathology reports"]["reasons"])
    assert got["Operative report of an earlier surgery"]["status"] == "not_found"
    assert got["Medication plan with dosages"]["status"] == "included"
