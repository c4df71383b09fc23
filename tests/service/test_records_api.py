"""Issue 16 part 2 over HTTP, against the real app and sekmet: the reviewer asks for records with a FHIR query
(reviewer API), staff see the open request with its proposed records (GET /api/cases/<id>/requests) and answer
it with a record and a document (POST .../answer); the worker sends the supplement and completes the request.
Bad answers are refused with a clear error and change nothing."""
from __future__ import annotations

import base64

import pytest

from fhirbridge.access.tokens import mint_reviewer_token
from fhirbridge.config import loader as config
from fhirbridge.demo.localehr import seed_patient
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from tests.loop.test_supplement import QUERY, discharge_summary

pytestmark = pytest.mark.sekmet

STAFF = "staff-token-0123456789abcdef"
AUD = "http://localhost/reviewer"


@pytest.fixture
def served(hospital):
    text = hospital.config_path.read_text()
    hospital.config_path.write_text(text + f'\n[api]\ntokens = ["{STAFF}"]\n[service]\npublic_url = "http://localhost"\n')
    svc = Service(config.load(hospital.config_path))
    yield hospital, svc, create_app(svc=svc).test_client()
    svc.stop(wait=True)


def staff() -> dict:
    return {"Authorization": f"Bearer {STAFF}"}


def test_request_list_answer_and_supplement_over_http(served, ehr, fhir):
    h, _svc, client = served
    own = seed_patient(ehr, fhir, profile="spine")
    case = h.delivered_case(own["patient"])
    r = h.reviewers[case.reviewer]
    token = mint_reviewer_token(r.key, issuer="urn:oid:2.999.9.1", audience=AUD)
    resp = client.post(f"/reviewer/cases/{case.id}/requests", headers={"Authorization": f"Bearer {token}"},
                       json={"text": "The discharge summary, please.", "query": QUERY})
    assert resp.status_code == 201, resp.get_json()
    task = resp.get_json()["task"]
    stored, _ = fhir.create(discharge_summary(own["patient"]))
    summary = f"DocumentReference/{stored['id']}"

    listed = client.get(f"/api/cases/{case.id}/requests", headers=staff())
    assert listed.status_code == 200, listed.get_json()
    [req] = listed.get_json()["requests"]
    assert (req["task"], req["status"], req["text"], req["query"]) == (task, "requested",
                                                                       "The discharge summary, please.", QUERY)
    assert [c["reference"] for c in req["candidates"] if c["proposed"]] == [summary]

    answer = f"/api/cases/{case.id}/requests/{task.split('/')[1]}/answer"
    for body, status, words in (
            ({}, 400, "tick at least one record"),
            ({"records": "DocumentReference/x"}, 400, "list of references"),
            ({"records": ["Condition/elsewhere"]}, 400, "not a record this Case can send"),
            ({"document": {"content_type": "application/pdf", "data": "!!"}}, 400, "not base64"),
            ({"document": {"content_type": "image/png", "data": base64.b64encode(b"x").decode()}}, 400, "PDF or")):
        resp = client.post(answer, headers=staff(), json=body)
        assert resp.status_code == status and words in resp.get_json()["error"]["message"], resp.get_json()
    assert h.app.store.get(case.id).step == "await_opinion"

    resp = client.post(answer, headers=staff(), json={
        "records": [summary],
        "document": {"title": "Letter from the GP", "content_type": "text/plain", "code": "http://loinc.org|18776-5",
                     "data": base64.b64encode(b"Plan: physiotherapy first (synthetic).").decode()}})
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["step"] == "supplement"
    again = client.post(answer, headers=staff(), json={"records": [summary]})
    assert again.status_code == 409 and "awaits the opinion" in again.get_json()["error"]["message"]

    h.run(intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "await_opinion", case.last_error
    [req] = client.get(f"/api/cases/{case.id}/requests", headers=staff()).get_json()["requests"]
    assert req["status"] == "completed" and summary in req["output"] and len(req["output"]) == 2
    assert "candidates" not in req
