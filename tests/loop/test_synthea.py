"""A larger, real-shaped patient: a Synthea R4 record from ../shared/testdata (skipped when absent).

Synthea 2.4 writes no MedicationStatement or DocumentReference and its records end in 2019, so with a
realistic lookback window most of the record is withheld: that checks the manifest at scale. With a
wide window, everything collectable must arrive, matching what the server holds for the patient.
"""
from __future__ import annotations

import json
import re

import pytest

from fhirbridge.fhir.client import FhirClient
from fhirbridge.fhir.validate import validate
from fhirbridge.loop.receive import receive_file
from tests.kit.hospital import TestHospital

pytestmark = pytest.mark.sekmet

PATIENT_FILE = "Fletcher_Hyatt_*.json"
INFRASTRUCTURE = ("hospitalInformation*.json", "practitionerInformation*.json")
COLLECTED = ("Condition", "DiagnosticReport", "ImagingStudy", "Procedure", "MedicationRequest")


@pytest.fixture(scope="module")
def synthea_patient(testdata_dir, ehr) -> str:
    folder = testdata_dir / "synthea-r4"
    files = [next(folder.glob(p), None) for p in (*INFRASTRUCTURE, PATIENT_FILE)]
    if not all(files):
        pytest.skip(f"Synthea files {INFRASTRUCTURE + (PATIENT_FILE,)} not all present in {folder}")
    with FhirClient(ehr.base_url) as client:
        response = None
        for f in files:
            response = client.transaction(json.loads(f.read_text(encoding="utf-8")))
    location = next(e["response"]["location"] for e in response["entry"] if "/Patient/" in e["response"]["location"])
    return "Patient/" + re.search(r"/Patient/([^/]+)", location).group(1)


def _widen_lookback(h: TestHospital, days: int) -> None:
    path = h.app.config.mappings_dir / "collect" / "default.toml"
    path.write_text(re.sub(r"lookback_days = \d+", f"lookback_days = {days}", path.read_text()))


def test_whole_synthea_record_is_collected_and_the_opinion_filed(tmp_path, ehr, fhir, synthea_patient):
    h = TestHospital(tmp_path, ehr.base_url)
    try:
        _widen_lookback(h, 40_000)
        case = h.delivered_case(synthea_patient, profile="default")
        opened = h.open(case)
        shared = opened.manifest["shared"]
        for rtype in COLLECTED:
            on_server = {f"{rtype}/{r['id']}" for r in fhir.search(rtype, {"patient": synthea_patient})
                         if r["resourceType"] == rtype and r.get("status") != "entered-in-error"}
            assert on_server, rtype
            assert on_server <= set(shared), f"{rtype}: {len(on_server - set(shared))} missing"
        # DiagnosticReport results travel with their reports.
        doc_refs = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in opened.document["entry"]}
        for e in opened.document["entry"]:
            results = e["resource"].get("result", []) if e["resource"]["resourceType"] == "DiagnosticReport" else []
            for result in results:
                assert result["reference"] in doc_refs
        for e in opened.document["entry"]:
            assert validate(e["resource"]) == [], e["resource"]["resourceType"]
        receive_file(h.app, h.answer(case))
        h.run(intake=False)
        assert h.app.store.get(case.id).step == "done"
    finally:
        h.close()


def test_realistic_lookback_withholds_old_records_and_says_so(tmp_path, ehr, synthea_patient):
    h = TestHospital(tmp_path, ehr.base_url)
    try:
        case = h.delivered_case(synthea_patient, profile="default")   # lookback 730 days; records end 2019
        m = h.open(case).manifest
        reasons = [w["reason"] for w in m["withheld"]]
        assert sum("lookback" in r for r in reasons) >= 100
        # Conditions are exempt from the lookback (the problem list matters whatever its age).
        assert any(s.startswith("Condition/") for s in m["shared"])
        assert not any(w["reference"].startswith("Condition/") and "lookback" in w["reason"] for w in m["withheld"])
    finally:
        h.close()
