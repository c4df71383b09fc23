"""Issue 14: the opinion is filed exactly once on every EHR profile, each through the write plan chosen for it.

The EHR is sekmet behind the capability proxy (tests/kit/ehrproxy.py) behaving like the profile; the hospital
pins the profile's capabilities in `[hospital.ehr]`. What is filed is counted in sekmet directly (not through
the proxy): one DocumentReference with the opinion's identifier and one Provenance targeting it.
"""
from __future__ import annotations

import base64

import pytest

from fhirbridge import jsonutil
from fhirbridge.ehr.write_plan import Kind
from fhirbridge.loop.actions import resolve
from fhirbridge.loop.receive import receive_file
from fhirbridge.loop.writeback import OPINION_ID_SYSTEM
from tests.kit.ehrproxy import PROFILES, EhrProxy
from tests.kit.hospital import TestHospital, docrefs

pytestmark = pytest.mark.sekmet

FAST = {"FHIRBRIDGE_HOSPITAL__HTTP__RETRIES": "1", "FHIRBRIDGE_HOSPITAL__HTTP__MAX_RETRY_AFTER": "0.2"}


def notes(fhir, case) -> list[dict]:
    return [d for d in fhir.search("DocumentReference",
                                   {"identifier": f"{OPINION_ID_SYSTEM}|urn:uuid:{case.opinion_id}"})
            if d["resourceType"] == "DocumentReference"]


def provenances(fhir, docref: str) -> int:
    return sum(1 for p in fhir.search("Provenance", {"target": docref}) if p["resourceType"] == "Provenance")


@pytest.fixture
def profiled(tmp_path, ehr, request):
    """(proxy, hospital) for the profile named by the test's parameter."""
    profile = PROFILES[request.param]
    proxy = EhrProxy(ehr.base_url, profile.behaviour)
    h = TestHospital(tmp_path, proxy.base_url, env=FAST, ehr_pins=profile.pins)
    try:
        yield profile, proxy, h
    finally:
        h.close()
        proxy.close()


def _with_encounter(fhir, seeded, sr: dict) -> None:
    encounter, _ = fhir.create({"resourceType": "Encounter", "status": "finished",
                                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                          "code": "AMB"}, "subject": {"reference": seeded["patient"]}})
    fhir.update({**fhir.read_ref(f"ServiceRequest/{sr['id']}"),
                 "encounter": {"reference": f"Encounter/{encounter['id']}"}})


def _to_file(h, fhir, seeded, profile):
    sr = h.order(seeded["patient"])
    if profile.behaviour.requires_encounter:
        _with_encounter(fhir, seeded, sr)
    h.run()
    case = h.case_for(sr)
    assert case.step == "await_opinion", case.last_error
    receive_file(h.app, h.answer(case))
    return h.app.store.get(case.id)


@pytest.mark.parametrize("profiled", sorted(PROFILES), indirect=True)
def test_every_profile_files_exactly_one_note(profiled, fhir, seeded):
    profile, proxy, h = profiled
    assert h.app.write_plan.kind is Kind[profile.plan]
    case = _to_file(h, fhir, seeded, profile)
    h.run(intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "done", case.last_error
    [note] = notes(fhir, case)
    assert case.document_reference == f"DocumentReference/{note['id']}"
    assert provenances(fhir, case.document_reference) == 1
    assert note["subject"]["reference"] == seeded["patient"]
    b = profile.behaviour
    if b.requires_encounter:
        assert note["context"]["encounter"][0]["reference"].startswith("Encounter/")
    if b.one_attachment:
        assert [c["attachment"]["contentType"] for c in note["content"]] == ["text/plain; charset=utf-8"]
        assert "Concordant" in base64.b64decode(note["content"][0]["attachment"]["data"]).decode()
    if profile.plan != "ATOMIC":
        assert proxy.written("DocumentReference", "POST") == 1 and proxy.written("Provenance", "POST") == 1
        assert proxy.written("Binary") == 0          # the document travels inside the note
        if "application/fhir+json" in h.app.capabilities.attachment_types:
            doc = jsonutil.loads(base64.b64decode(note["content"][0]["attachment"]["data"]))
            assert doc["entry"][0]["resource"]["type"]["coding"][0]["code"] == "11488-4"
    if b.no_task_write:
        assert case.task is None and proxy.written("Task") == 0
        assert not [m for m, p, s in proxy.log if "/Task" in p and s == 405]   # never even tried
    else:
        task = fhir.read_ref(case.task)
        assert task["status"] == "completed"
        assert task["output"][0]["valueReference"]["reference"] == case.document_reference

    h.run(intake=False, ignore_backoff=True)             # nothing more to do, nothing written again
    assert len(notes(fhir, case)) == 1


@pytest.mark.parametrize("profiled", ["post-only", "post-only-encounter-one-attachment"], indirect=True)
def test_ledger_plan_lost_answer_is_reconciled_by_identifier_not_posted_again(profiled, fhir, seeded):
    """The EHR files the note but the answer is lost: the ledger says `sent`, the next run finds the note by
    its identifier, and only then goes on (Provenance, Task); one POST of the note in all."""
    profile, proxy, h = profiled
    case = _to_file(h, fhir, seeded, profile)
    proxy.add(method="POST", path=r"^/fhir/DocumentReference/?$", action="lose-response", times=1)
    h.run(intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "file" and "looked for by its identifier" in case.last_error
    assert h.app.store.ledger(case.id)["DocumentReference"]["state"] == "sent"
    assert docrefs(fhir, case) == 1
    h.run(intake=False, ignore_backoff=True)
    case = h.app.store.get(case.id)
    assert case.step == "done", case.last_error
    assert docrefs(fhir, case) == 1 and provenances(fhir, case.document_reference) == 1
    assert proxy.written("DocumentReference", "POST") == 1
    kinds = [e["kind"] for e in h.app.store.events(case.id)]
    assert "write.reconciled" in kinds


@pytest.mark.parametrize("profiled", ["post-only"], indirect=True)
def test_ledger_plan_lost_provenance_answer_is_reconciled(profiled, fhir, seeded):
    profile, proxy, h = profiled
    case = _to_file(h, fhir, seeded, profile)
    proxy.add(method="POST", path=r"^/fhir/Provenance/?$", action="lose-response", times=1)
    h.run(intake=False)
    assert h.app.store.get(case.id).step == "file"
    h.run(intake=False, ignore_backoff=True)
    case = h.app.store.get(case.id)
    assert case.step == "done", case.last_error
    assert provenances(fhir, case.document_reference) == 1 and proxy.written("Provenance", "POST") == 1


@pytest.mark.parametrize("profiled", ["post-only-no-search"], indirect=True)
@pytest.mark.parametrize("fault", ["lose-response", "status-502"])
def test_once_plan_uncertain_outcome_stops_at_needs_review_never_a_second_post(profiled, fhir, seeded, fault):
    profile, proxy, h = profiled
    case = _to_file(h, fhir, seeded, profile)
    if fault == "lose-response":
        proxy.add(method="POST", path=r"^/fhir/DocumentReference/?$", action="lose-response", times=1)
    else:   # a gateway's 502 after the EHR filed it
        proxy.add(method="POST", path=r"^/fhir/DocumentReference/?$", action="status-after-commit", status=502,
                  times=1)
    h.run(intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "needs_review"
    assert f"resolve {case.id} --filed DocumentReference/<id>" in case.last_error
    assert case.patient in case.last_error and "Anna" not in case.last_error   # the patient by id only
    h.run(intake=False, ignore_backoff=True)               # no worker touches it
    assert h.app.store.get(case.id).step == "needs_review"
    assert proxy.written("DocumentReference", "POST") == 1
    [note] = notes(fhir, case)                              # a person looks in the chart and finds it

    resolve(h.app, h.app.store.get(case.id), filed=f"DocumentReference/{note['id']}")
    h.run(intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "done", case.last_error
    assert case.document_reference == f"DocumentReference/{note['id']}"
    assert proxy.written("DocumentReference", "POST") == 1 and len(notes(fhir, case)) == 1
    assert provenances(fhir, case.document_reference) == 1
    assert fhir.read_ref(case.task)["status"] == "completed"


@pytest.mark.parametrize("profiled", ["post-only-no-search"], indirect=True)
def test_once_plan_not_filed_answer_files_it_once_more(profiled, fhir, seeded):
    """The answer never reached the EHR (dropped before it): the person finds nothing, says so, and the note is
    POSTed once more, once."""
    profile, proxy, h = profiled
    case = _to_file(h, fhir, seeded, profile)
    proxy.add(method="POST", path=r"^/fhir/DocumentReference/?$", action="drop", times=1)
    h.run(intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "needs_review" and notes(fhir, case) == []
    resolve(h.app, case, filed=None)
    h.run(intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "done", case.last_error
    assert len(notes(fhir, case)) == 1 and provenances(fhir, case.document_reference) == 1


@pytest.mark.parametrize("profiled", ["post-only-encounter-one-attachment"], indirect=True)
def test_required_encounter_missing_is_a_clear_failure(profiled, fhir, seeded):
    profile, proxy, h = profiled
    sr = h.order(seeded["patient"])
    h.run()
    case = h.case_for(sr)
    receive_file(h.app, h.answer(case))
    h.run(intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "failed"
    assert "Encounter" in case.last_error and case.service_request in case.last_error
    assert proxy.written("DocumentReference") == 0 and notes(fhir, case) == []


def test_the_note_carries_a_pdf_where_the_ehr_takes_one(tmp_path, ehr, fhir, seeded):
    """attachment_types decide the note's content: a PDF rendering first (what many EHR viewers show), then the
    text, at most max_attachments of them; the PDF is the opinion's, inline."""
    profile = PROFILES["post-only"]
    proxy = EhrProxy(ehr.base_url, profile.behaviour)
    pins = {**profile.pins, "attachment_types": ["application/pdf", "text/plain", "application/fhir+json"],
            "max_attachments": 2}
    h = TestHospital(tmp_path, proxy.base_url, env=FAST, ehr_pins=pins)
    try:
        case = _to_file(h, fhir, seeded, profile)
        h.run(intake=False)
        case = h.app.store.get(case.id)
        assert case.step == "done", case.last_error
        [note] = notes(fhir, case)
        assert [c["attachment"]["contentType"] for c in note["content"]] == ["application/pdf",
                                                                              "text/plain; charset=utf-8"]
        pdf = base64.b64decode(note["content"][0]["attachment"]["data"])
        assert pdf.startswith(b"%PDF") and note["content"][0]["attachment"]["size"] == len(pdf)
    finally:
        h.close()
        proxy.close()
