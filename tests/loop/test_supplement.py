"""Issue 16 part 2 against the real EHR: a reviewer asks for more records, the physician answers by ticking a
record (proposed by the request's FHIR query) and uploading a document, and the reviewer gets a supplement
package: the document is in the EHR first, once, under every write plan; the supplement is signed and encrypted
to the same reviewer, names the first package and each item "added on request", keeps the withholding rules;
the CDex request Task is completed with what was sent; the Case awaits the opinion again."""
from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from fhirbridge.demo.localehr import seed_patient
from fhirbridge.ehr import data_request
from fhirbridge.errors import OpinionNotYet
from fhirbridge.exchange.render import render_package
from fhirbridge.exchange.reviewer import open_package
from fhirbridge.loop import supplement
from fhirbridge.loop.receive import process_inbox, receive_bytes
from fhirbridge.loop.supplement import DOCUMENT_SYSTEM, Upload
from tests.kit.ehrproxy import PROFILES, EhrProxy
from tests.kit.hospital import TestHospital, docrefs

pytestmark = pytest.mark.sekmet

LOINC = "http://loinc.org"
PDF = b"%PDF-1.4\n% an operative report from another hospital (synthetic)\n%%EOF\n"
FAST = {"FHIRBRIDGE_HOSPITAL__HTTP__RETRIES": "1", "FHIRBRIDGE_HOSPITAL__HTTP__MAX_RETRY_AFTER": "0.2"}
QUERY = "DocumentReference?type=http://loinc.org|18842-5"


def discharge_summary(patient: str, *, days_ago: int = 30, security: list | None = None) -> dict:
    doc = {"resourceType": "DocumentReference", "status": "current",
           "type": {"coding": [{"system": LOINC, "code": "18842-5", "display": "Discharge summary"}]},
           "subject": {"reference": patient},
           "date": (datetime.now(UTC) - timedelta(days=days_ago)).isoformat(timespec="seconds"),
           "content": [{"attachment": {"contentType": "text/plain", "title": "Discharge summary",
                                       "data": base64.b64encode(b"Discharged home (synthetic).").decode()}}]}
    if security:
        doc["meta"] = {"security": security}
    return doc


def uploaded(fhir, case) -> list[dict]:
    return [d for d in fhir.search("DocumentReference", {"patient": case.patient})
            if d["resourceType"] == "DocumentReference"
            and any(i.get("system") == DOCUMENT_SYSTEM for i in d.get("identifier", []))]


def by_item(entries: list[dict]) -> dict[str, dict]:
    return {e["item"]: e for e in entries}


@pytest.fixture
def own(ehr, fhir) -> dict:
    return seed_patient(ehr, fhir, profile="spine")


def ask_and_answer(h, fhir, own) -> tuple:
    """A delivered Case, the reviewer's request (with a query), a discharge summary added to the chart since
    the package went, and the physician's answer (the proposed record ticked, a PDF uploaded)."""
    case = h.delivered_case(own["patient"])
    task = data_request.request_records(h.app, case, "Please send the discharge summary of the 2024 stay.", QUERY)
    stored, _ = fhir.create(discharge_summary(own["patient"]))
    summary = f"DocumentReference/{stored['id']}"
    [req] = data_request.open_requests(h.app, h.app.store.get(case.id))
    assert (req.task, req.query, req.text) == (task, QUERY, "Please send the discharge summary of the 2024 stay.")
    offered = supplement.candidates(h.app, h.app.store.get(case.id), req)
    proposed = [c["ref"] for c in offered["records"] if c["proposed"]]
    assert proposed == [summary] and offered["query_error"] is None
    assert not any(c["ref"] in supplement.already_sent(h.app, case) for c in offered["records"])
    supplement.answer_request(h.app, h.app.store.get(case.id), task, records=proposed,
                              upload=Upload("Operative report, 2019 (outside hospital)", "application/pdf", PDF,
                                            code=(LOINC, "11504-8")),
                              actor=h.physician())
    assert h.app.store.get(case.id).step == "supplement"
    return case, task, summary


def test_a_supplement_reaches_the_reviewer_and_completes_the_request(hospital, fhir, own):
    case, task, summary = ask_and_answer(hospital, fhir, own)
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "await_opinion", case.last_error

    # The document is in the chart, once, for this patient and order, before anything was sent.
    [doc] = uploaded(fhir, case)
    docref = f"DocumentReference/{doc['id']}"
    assert doc["type"]["coding"][0]["code"] == "11504-8"
    assert base64.b64decode(doc["content"][0]["attachment"]["data"]) == PDF
    assert doc["context"]["related"] == [{"reference": case.service_request}]
    kinds = [e["kind"] for e in hospital.app.store.events(case.id)]
    assert kinds.index("records.document") < kinds.index("supplement.done")

    # The request is completed with what was sent.
    t = fhir.read_ref(task)
    assert t["status"] == "completed"
    assert sorted(o["valueReference"]["reference"] for o in t["output"]) == sorted([summary, docref])
    assert all(o["type"]["coding"][0]["code"] == "data-value" for o in t["output"])
    assert data_request.open_requests(hospital.app, case) == []

    # The reviewer: a second package in the outbox, signed by the hospital, to the same keys.
    [entry] = case.data["supplements"]
    r = hospital.reviewers[case.reviewer]
    opened = open_package(hospital.root / "outbox" / case.reviewer / entry["package_id"], r.key, r.trusted)
    m = opened.manifest
    assert m["supplement_of"] == case.package_id != entry["package_id"]
    assert sorted(a["reference"] for a in m["added_on_request"]) == sorted([summary, docref])
    assert all(a["reason"] == "added on request" for a in m["added_on_request"])
    assert {summary, docref} <= set(m["shared"])
    assert m["request"] == {"task": task, "text": "Please send the discharge summary of the 2024 stay.",
                            "query": QUERY}
    checklist = by_item(m["checklist"])
    assert checklist["Discharge summary of an earlier stay"]["status"] == "included"
    assert checklist["Operative report of an earlier surgery"]["status"] == "included"
    assert opened.claims["due_at"] == case.due_at
    text = render_package(opened.claims, opened.document, sender=opened.sender)
    assert text.splitlines()[1].startswith(f"NEW RECORDS: a supplement to package {case.package_id}")
    assert "You asked: Please send the discharge summary" in text
    # Accounted for as a disclosure of its own.
    assert sorted(a["kind"] for a in hospital.app.store.list_audit(case_id=case.id)) == ["disclosure", "disclosure"]

    # Run again: nothing more is written or sent.
    hospital.run(intake=False, ignore_backoff=True)
    assert len(uploaded(fhir, case)) == 1
    assert len(list((hospital.root / "outbox" / case.reviewer).iterdir())) == 2


def test_an_opinion_arriving_while_the_supplement_goes_waits_for_it(hospital, fhir, own):
    """The reviewer's opinion can cross the supplement on its way: it is neither refused nor taken early. From
    the inbox it stays for the next pass; over the reviewer API it is a 503 with Retry-After; once the
    supplement has gone it is accepted and filed, once."""
    h = hospital
    case, _task, _summary = ask_and_answer(h, fhir, own)
    sealed = h.answer(case)
    inbox = h.app.config.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / sealed.name).write_bytes(sealed.read_bytes())
    early = process_inbox(h.app)
    assert not early.accepted and not early.refused
    [(kept, why)] = early.deferred
    assert kept == inbox / sealed.name and kept.exists() and "sending you the records you asked for" in why
    assert h.app.store.get(case.id).step == "supplement" and h.app.store.get(case.id).opinion_id is None
    with pytest.raises(OpinionNotYet):
        receive_bytes(h.app, sealed.read_bytes())

    h.run(intake=False)                       # the supplement goes
    assert h.app.store.get(case.id).step == "await_opinion" and (inbox / sealed.name).exists()
    later = process_inbox(h.app)              # the inbox's next pass (the service ticks it) takes the opinion
    assert [r.opinion_id for r in later.accepted] == [sealed.stem.removeprefix("opinion-")]
    h.run(intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "done", case.last_error
    assert case.opinion_id == sealed.stem.removeprefix("opinion-") and docrefs(fhir, case) == 1
    assert not (inbox / sealed.name).exists()


def test_the_answer_is_refused_when_it_cannot_be_right(hospital, fhir, own):
    case = hospital.delivered_case(own["patient"])
    task = data_request.request_records(hospital.app, case, "More imaging, please.")
    with pytest.raises(data_request.BadRequest, match="tick at least one record"):
        supplement.answer_request(hospital.app, case, task, records=[], upload=None, actor="x")
    with pytest.raises(data_request.BadRequest, match="not a record this Case can send"):
        supplement.answer_request(hospital.app, case, task, records=["Condition/not-this-patients"], upload=None,
                                  actor="x")
    with pytest.raises(data_request.BadRequest, match="not a PDF"):
        supplement.answer_request(hospital.app, case, task, records=[],
                                  upload=Upload("x", "application/pdf", b"MZ\x90\x00"), actor="x")
    with pytest.raises(data_request.BadRequest, match="no such request"):
        supplement.answer_request(hospital.app, case, "Task/../../Patient/1", records=[], upload=None, actor="x")
    with pytest.raises(data_request.BadRequest, match="another patient"):
        data_request.request_records(hospital.app, case, "x", "DocumentReference?patient=Patient/someone-else")
    with pytest.raises(data_request.BadRequest, match="may ask for"):
        data_request.request_records(hospital.app, case, "x", "Patient?name=smith")
    assert hospital.app.store.get(case.id).step == "await_opinion"


def test_withholding_applies_to_the_supplement_as_to_the_first_package(hospital, fhir, own):
    """A record the reviewer's query finds but a sensitivity label holds back is never offered nor sent, and the
    reviewer is not told about it."""
    case = hospital.delivered_case(own["patient"])
    task = data_request.request_records(hospital.app, case, "Discharge summary, please.", QUERY)
    hiv = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"}
    stored, _ = fhir.create(discharge_summary(own["patient"], security=[hiv]))
    [req] = data_request.open_requests(hospital.app, case)
    offered = supplement.candidates(hospital.app, case, req)
    assert f"DocumentReference/{stored['id']}" not in {c["ref"] for c in offered["records"]}
    with pytest.raises(data_request.BadRequest):
        supplement.answer_request(hospital.app, case, task, records=[f"DocumentReference/{stored['id']}"],
                                  upload=None, actor="x")


@pytest.mark.parametrize("profile", ["post-only", "post-only-no-search"])
def test_the_document_is_written_once_when_the_ehrs_answer_is_lost(tmp_path, ehr, fhir, own, profile):
    """Write plans LEDGER and ONCE: the POST of the uploaded document lands but its answer is lost; the next run
    finds it (by identifier, or among the patient's documents where the EHR has no identifier search) and sends
    the supplement with it. One POST in all."""
    p = PROFILES[profile]
    proxy = EhrProxy(ehr.base_url, p.behaviour)
    h = TestHospital(tmp_path, proxy.base_url, env=FAST, ehr_pins=p.pins)
    try:
        assert h.app.write_plan.kind.name == p.plan
        case, task, _summary = ask_and_answer(h, fhir, own)
        before = proxy.written("DocumentReference", "POST")
        proxy.add(method="POST", path=r"^/fhir/DocumentReference/?$", action="lose-response", times=1)
        h.run(intake=False)
        assert h.app.store.get(case.id).step == "supplement"
        h.run(intake=False, ignore_backoff=True)
        case = h.app.store.get(case.id)
        assert case.step == "await_opinion", case.last_error
        assert proxy.written("DocumentReference", "POST") == before + 1
        assert len(uploaded(fhir, case)) == 1
        assert "write.reconciled" in [e["kind"] for e in h.app.store.events(case.id)]
        assert fhir.read_ref(task)["status"] == "completed"
    finally:
        h.close()
        proxy.close()
