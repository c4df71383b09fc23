"""Follow-up questions over HTTP (issue 16 part 3): the staff API asks and shows them, a pull reviewer fetches
the sealed question from the reviewer API and uploads its sealed answer. Every refusal has its status and its
reason and writes nothing: a question before the opinion is filed, an empty one, one over the reviewer's limit,
a replayed answer, an answer to a question never asked. Against sekmet; what is written is read there.
"""
from __future__ import annotations

import re

import pytest

from fhirbridge.config import loader as config
from fhirbridge.demo.localehr import seed_patient
from fhirbridge.ehr import data_request
from fhirbridge.exchange import followup as wire
from fhirbridge.exchange.reviewer import open_package
from fhirbridge.loop import supplement
from fhirbridge.loop.followup import run_followups
from fhirbridge.loop.writeback import OPINION_ID_SYSTEM
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from fhirbridge.store.followups import FollowUps
from tests.kit.hospital import craft_opinion
from tests.loop.test_consent import consent_resource

pytestmark = pytest.mark.sekmet

ADMIN = "admin-token-0123456789abcdef"
REVIEWER = "static-reviewer-token-0123456789"


@pytest.fixture
def served(hospital, seeded):
    """A pull reviewer (static token) and a staff admin token; one Case delivered to the reviewer."""
    yield from _serve(hospital, seeded["patient"])


@pytest.fixture
def served_own(hospital, ehr, fhir):
    """As `served`, for a patient of the test's own (its Consents must not reach other tests' Cases)."""
    yield from _serve(hospital, seed_patient(ehr, fhir, profile="spine")["patient"])


def _serve(hospital, patient: str):
    h = hospital
    text = re.sub(r'type = "outbox"[^\n]*\npath = "[^"]*"\n', 'type = "pull"\n', h.config_path.read_text())
    text = text.replace('profiles = ["spine", "default"]',
                        f'profiles = ["spine", "default"]\napi_token = "{REVIEWER}"\nfollow_up_limit = 2', 1)
    text += f'\n[api]\ntokens = ["{ADMIN}"]\n[service]\npublic_url = "http://localhost"\n'
    h.config_path.write_text(text)
    svc = Service(config.load(h.config_path))
    h.app = svc.apps[0]
    case = h.delivered_case(patient)
    yield h, svc, create_app(svc=svc).test_client(), case
    svc.stop(wait=True)


def staff() -> dict:
    return {"Authorization": f"Bearer {ADMIN}"}


def reviewer() -> dict:
    return {"Authorization": f"Bearer {REVIEWER}"}


def error(resp) -> str:
    return resp.get_json()["error"]["message"]


def test_a_pull_reviewer_answers_a_follow_up_question_once(served, fhir):
    h, svc, client, case = served
    ask = f"/api/cases/{case.id}/follow-ups"
    r = client.post(ask, json={"question": "Is an MRI needed first?"}, headers=staff())
    assert r.status_code == 409 and "no filed opinion" in error(r)

    # The opinion, uploaded by the pull reviewer, and filed.
    r_keys = h.reviewers[case.reviewer]
    package = svc.config.data_dir / "cases" / case.id / "package" / str(case.package_id)
    opened = open_package(package, r_keys.key, r_keys.trusted)
    r = client.post("/reviewer/opinions", data=craft_opinion(h, case, opened=opened), headers=reviewer())
    assert r.status_code == 202, r.get_json()
    h.run(intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "done", case.last_error

    r = client.post(ask, json={"question": "  "}, headers=staff())
    assert r.status_code == 400 and "question is required" in error(r)
    r = client.post(ask, json={"question": "Is an MRI needed first?", "asked_by": h.physician()}, headers=staff())
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    assert body["seq"] == 1 and body["state"] == "asked" and body["remaining"] == 1
    assert "MRI" not in r.get_data(as_text=True)      # states and references only
    assert run_followups(h.app) == 1

    listed = client.get("/reviewer/follow-ups", headers=reviewer()).get_json()["follow_ups"]
    assert [q["id"] for q in listed] == [body["id"]]
    r = client.get(f"/reviewer/{listed[0]['message']}", headers=reviewer())
    assert r.status_code == 200
    question = wire.open_question_bytes(r.get_data(), r_keys.key, r_keys.trusted)
    assert question.text == "Is an MRI needed first?"
    sealed, claims = wire.seal_answer(question, "No: the CT is enough.", r_keys.key)
    r = client.post("/reviewer/opinions", data=sealed, headers=reviewer())
    assert r.status_code == 202 and r.get_json()["kind"] == "answer", r.get_json()
    r = client.post("/reviewer/opinions", data=sealed, headers=reviewer())
    assert r.status_code == 409 and "replay" in error(r)
    assert client.get("/reviewer/follow-ups", headers=reviewer()).get_json()["follow_ups"] == []

    # An answer to a question this hospital never asked.
    forged = wire.OpenedQuestion({**question.claims, "jti": "00000000-0000-4000-8000-000000000000"},
                                 question.communication, question.hospital)
    r = client.post("/reviewer/opinions", data=wire.seal_answer(forged, "?", r_keys.key)[0], headers=reviewer())
    assert r.status_code == 404 and "no follow-up question" in error(r)

    assert run_followups(h.app) == 1
    shown = client.get(ask, headers=staff()).get_json()
    assert shown["limit"] == 2 and shown["remaining"] == 1 and shown["open"] == 0
    [row] = shown["follow_ups"]
    assert row["state"] == "filed" and row["communication"].startswith("Communication/")
    ident = f"{OPINION_ID_SYSTEM}|urn:uuid:{claims['jti']}"
    [note] = [d for d in fhir.search("DocumentReference", {"identifier": ident})
              if d["resourceType"] == "DocumentReference"]
    assert row["note"] == f"DocumentReference/{note['id']}"
    assert note["relatesTo"][0] == {"code": "appends", "target": {"reference": case.document_reference}}

    # The limit (2 for this reviewer): the second question is taken, the third refused and nothing recorded.
    assert client.post(ask, json={"question": "And after surgery?"}, headers=staff()).status_code == 202
    r = client.post(ask, json={"question": "A third?"}, headers=staff())
    assert r.status_code == 409 and "the most its reviewer answers (2)" in error(r)
    assert len(client.get(ask, headers=staff()).get_json()["follow_ups"]) == 2
    # Another reviewer's question does not exist for this one; an unknown id neither.
    assert client.get("/reviewer/follow-ups/nope/message", headers=reviewer()).status_code == 404


def test_a_consent_recorded_after_the_opinion_withholds_the_follow_up_questions(served_own, fhir):
    """A question discloses as a package does: once the patient's Consent denies disclosure, the question
    already made available is no longer handed out (410, the Case left done), and a new one is not sent: it
    fails with the reason, and nothing reaches the reviewer."""
    h, svc, client, case = served_own
    r_keys = h.reviewers[case.reviewer]
    opened = open_package(svc.config.data_dir / "cases" / case.id / "package" / str(case.package_id),
                          r_keys.key, r_keys.trusted)
    assert client.post("/reviewer/opinions", data=craft_opinion(h, case, opened=opened),
                       headers=reviewer()).status_code == 202
    h.run(intake=False)
    assert h.app.store.get(case.id).step == "done"
    ask = f"/api/cases/{case.id}/follow-ups"
    assert client.post(ask, json={"question": "Is an MRI needed first?"}, headers=staff()).status_code == 202
    assert run_followups(h.app) == 1
    [listed] = client.get("/reviewer/follow-ups", headers=reviewer()).get_json()["follow_ups"]

    stored, _ = fhir.create(consent_resource(case.patient, {"type": "deny"}))
    r = client.get(f"/reviewer/{listed['message']}", headers=reviewer())
    assert r.status_code == 410 and "withdrawn" in error(r)
    assert h.app.store.get(case.id).step == "done"                 # the filed opinion stays filed
    denied = [e["detail"] for e in h.app.store.events(case.id) if e["kind"] == "consent.denied"]
    assert denied == [{"step": "follow-up fetch", "consent": f"Consent/{stored['id']}", "followup": listed["id"]}]

    assert client.post(ask, json={"question": "And after surgery?"}, headers=staff()).status_code == 202
    assert run_followups(h.app) == 1
    second = FollowUps(h.app.store).of_case(case.id, "question")[1]
    assert second["state"] == "failed" and f"Consent/{stored['id']}" in second["error"]
    assert second["communication"] is None and second["sent_at"] is None     # nothing written, nothing sent
    assert [q["id"] for q in client.get("/reviewer/follow-ups", headers=reviewer()).get_json()["follow_ups"]] \
        == [listed["id"]]
    assert [row["kind"] for row in h.app.store.list_audit(case_id=case.id)] == ["disclosure", "filed", "question"]


def test_an_opinion_uploaded_while_the_supplement_goes_is_a_503_with_retry_after(served_own):
    """Issue 16: the opinion crossing the supplement is not refused; the reviewer API says when to send it
    again (RFC 9110 503 + Retry-After), writes nothing, and takes the same bytes once the records have gone."""
    h, svc, client, case = served_own
    task = data_request.request_records(h.app, case, "The operative report of 2019, please.")
    supplement.answer_request(h.app, h.app.store.get(case.id), task, records=[], actor=h.physician(),
                              upload=supplement.Upload("Operative report", "application/pdf", b"%PDF-1.4\n%%EOF\n"))
    assert h.app.store.get(case.id).step == "supplement"
    r_keys = h.reviewers[case.reviewer]
    opened = open_package(svc.config.data_dir / "cases" / case.id / "package" / str(case.package_id),
                          r_keys.key, r_keys.trusted)
    sealed = craft_opinion(h, case, opened=opened)
    r = client.post("/reviewer/opinions", data=sealed, headers=reviewer())
    assert r.status_code == 503 and r.headers["Retry-After"] == "30", r.get_json()
    assert "sending you the records you asked for" in error(r)
    assert h.app.store.get(case.id).opinion_id is None
    h.run(intake=False)
    assert h.app.store.get(case.id).step == "await_opinion"
    r = client.post("/reviewer/opinions", data=sealed, headers=reviewer())
    assert r.status_code == 202, r.get_json()
    h.run(intake=False)
    assert h.app.store.get(case.id).step == "done"
