"""The whole second-opinion loop against a real FHIR R4 server (sekmet), asserting on what lands in it."""
from __future__ import annotations

import base64

import pytest

from fhirbridge import jsonutil
from fhirbridge.crypto import jws
from fhirbridge.ehr.task import CASE_ID_SYSTEM
from fhirbridge.errors import RejectedOpinion
from fhirbridge.fhir.validate import validate
from fhirbridge.loop.receive import receive_file
from fhirbridge.loop.writeback import OPINION_ID_SYSTEM

pytestmark = pytest.mark.sekmet



def _count(fhir, rtype, params) -> int:
    return sum(1 for r in fhir.search(rtype, params) if r.get("resourceType") == rtype)


def test_full_loop_files_one_opinion_linked_to_patient_and_order(hospital, seeded, fhir):
    sr = hospital.order(seeded["patient"], "Is the planned L4-L5 decompression indicated?")
    report = hospital.run()
    assert report.opened == 1 and not report.errors
    case = hospital.case_for(sr)
    assert case.step == "await_opinion"

    # The Task in the EHR follows the Case (BSeR: intent order, code fulfill, focus the order).
    task = fhir.read_ref(case.task)
    assert task["status"] == "in-progress"
    assert task["businessStatus"]["coding"][0]["code"] == "sent-to-reviewer"
    assert task["focus"]["reference"] == f"ServiceRequest/{sr['id']}"
    assert task["for"]["reference"] == seeded["patient"]
    assert task["intent"] == "order" and task["code"]["coding"][0]["code"] == "fulfill"
    assert task["owner"]["identifier"]["value"] == "urn:oid:2.999.9.1"

    opinion = hospital.answer(case)
    received = receive_file(hospital.app, opinion)
    assert received.case.step == "file"
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "done", case.last_error

    # Exactly one DocumentReference for this opinion, with the right subject and context.
    docs = [d for d in fhir.search("DocumentReference",
                                   {"identifier": f"{OPINION_ID_SYSTEM}|urn:uuid:{case.opinion_id}"})
            if d["resourceType"] == "DocumentReference"]
    assert len(docs) == 1
    doc = docs[0]
    assert f"DocumentReference/{doc['id']}" == case.document_reference
    assert doc["subject"]["reference"] == seeded["patient"]
    assert doc["type"]["coding"][0]["code"] == "11488-4"
    assert doc["masterIdentifier"]["value"] == f"urn:uuid:{case.opinion_id}"
    assert {"reference": f"ServiceRequest/{sr['id']}"} in doc["context"]["related"]
    types = [c["attachment"]["contentType"] for c in doc["content"]]
    assert types[0] == "application/fhir+json" and types[1].startswith("text/plain")
    text = base64.b64decode(doc["content"][1]["attachment"]["data"]).decode()
    assert "Concordant" in text and "Proceed with the planned treatment" in text

    # The FHIR document is stored as a Binary and is the signed Consult note, still verifiable.
    binary = fhir.read_ref(doc["content"][0]["attachment"]["url"])
    stored = jsonutil.loads(base64.b64decode(binary["data"]))
    assert stored["entry"][0]["resource"]["type"]["coding"][0]["code"] == "11488-4"
    jws.verify_bundle(stored, hospital.reviewers["spine-center"].key)

    # Task completed with output -> the DocumentReference; Provenance present.
    task = fhir.read_ref(case.task)
    assert task["status"] == "completed"
    assert task["output"][0]["valueReference"]["reference"] == case.document_reference
    provs = [p for p in fhir.search("Provenance", {"target": case.document_reference})
             if p["resourceType"] == "Provenance"]
    assert len(provs) == 1
    assert provs[0]["agent"][0]["who"]["identifier"]["value"] == "urn:oid:2.999.9.1"
    assert provs[0]["signature"][0]["sigFormat"] == "application/jose"

    # Filing the same opinion twice writes nothing new.
    task_version = task["meta"]["versionId"]
    with pytest.raises(RejectedOpinion, match="already has its opinion filed"):
        receive_file(hospital.app, opinion)
    assert _count(fhir, "DocumentReference", {"identifier": f"{OPINION_ID_SYSTEM}|urn:uuid:{case.opinion_id}"}) == 1
    assert fhir.read_ref(case.task)["meta"]["versionId"] == task_version


def test_intake_twice_opens_one_case_and_one_task(hospital, seeded, fhir):
    sr = hospital.order(seeded["patient"])
    first = hospital.run(intake=True, case_id="none")  # intake only: no Case has this id
    second = hospital.run(intake=True, case_id="none")
    assert first.opened == 1 and second.opened == 0
    case = hospital.case_for(sr)
    # A second machine with its own empty store still finds the Task by the Case identifier.
    assert _count(fhir, "Task", {"identifier": f"{CASE_ID_SYSTEM}|{case.id}"}) == 1
    assert len([c for c in hospital.app.store.list_cases() if c.service_request == f"ServiceRequest/{sr['id']}"]) == 1


def test_package_is_a_valid_signed_document_with_manifest(hospital, seeded):
    case = hospital.delivered_case(seeded["patient"])
    opened = hospital.open(case)
    doc = opened.document
    assert doc["type"] == "document" and doc["identifier"]["value"] == f"urn:uuid:{case.package_id}"
    comp = doc["entry"][0]["resource"]
    assert comp["resourceType"] == "Composition"
    assert comp["type"]["coding"][0]["code"] == "57133-1"
    titles = [s["title"] for s in comp["section"]]
    for t in ("Reason for referral", "Problems", "Diagnostic reports", "Imaging studies", "Procedures",
              "Medications", "Clinical notes", "Records withheld"):
        assert t in titles
    # Every resource the Composition points at is in the document (FHIR documents are complete).
    full_urls = {e["fullUrl"] for e in doc["entry"]}
    for s in comp["section"]:
        for e in s.get("entry", []):
            assert e["reference"] in full_urls
    # Valid FHIR R4, entry by entry.
    for e in doc["entry"]:
        assert validate(e["resource"]) == [], e["resource"]["resourceType"]
    # Imaging travels with where to fetch the pixels (ImagingStudy.endpoint -> a DICOMweb Endpoint).
    by_url = {e["fullUrl"]: e["resource"] for e in doc["entry"]}
    studies = [e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] == "ImagingStudy"]
    assert studies and all(s["series"][0]["uid"] for s in studies)
    for s in studies:
        endpoint = by_url[f"{hospital.app.hospital.fhir_base_url}/{s['endpoint'][0]['reference']}"]
        assert endpoint["connectionType"]["code"] == "dicom-wado-rs" and endpoint["address"].startswith("https://")
    kinds = {e["resource"]["resourceType"] for e in doc["entry"]}
    assert {"Patient", "ServiceRequest", "Condition", "DiagnosticReport", "ImagingStudy", "Procedure",
            "MedicationStatement", "MedicationRequest", "DocumentReference", "Observation",
            "Practitioner"} <= kinds
    # The manifest says what was withheld and why: the 5-year-old procedure is outside the lookback.
    withheld = {w["reference"]: w["reason"] for w in opened.manifest["withheld"]}
    assert "lookback" in withheld[seeded["old_procedure"]]
    assert seeded["old_procedure"] not in opened.manifest["shared"]
    # The large PDF travels as its own encrypted file, named in the signed manifest with its hash.
    files = opened.manifest["attachments"]
    assert len(files) == 1 and files[0]["content_type"] == "application/pdf"
    assert (hospital.package_path(case) / files[0]["file"]).exists()
    assert files[0]["url"] in {f"Binary/{b.split('/')[-1]}" for b in seeded["binaries"]}


def test_renaming_the_hospital_reopens_no_case(hospital, seeded):
    sr = hospital.order(seeded["patient"])
    hospital.run(case_id="none")
    cfg = hospital.config_path.read_text()
    hospital.config_path.write_text(cfg.replace('name = "Test Hospital', 'name = "Renamed Test Hospital', 1))
    renamed = hospital.new_app()
    try:
        assert renamed.hospital.name.startswith("Renamed")
        assert hospital.run(app=renamed, case_id="none").opened == 0
        assert len([c for c in renamed.store.list_cases() if c.service_request == f"ServiceRequest/{sr['id']}"]) == 1
    finally:
        renamed.close()
