"""The service's HTTP API and scheduler ticks, against the real app and the real EHR (sekmet).

Staff API (orders, cases, retry, cancel), reviewer pull API (list, fetch sealed files, submit opinions,
decline), polling intake with its claimed cursor, turnaround targets and overdue flags.
"""
from __future__ import annotations

import re
import time

import pytest

from fhirbridge.config import loader as config
from fhirbridge.errors import FhirError
from fhirbridge.exchange.reviewer import open_package
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service

pytestmark = pytest.mark.sekmet

STAFF = "staff-token-0123456789abcdef"
REVIEWER = "reviewer-token-0123456789abcdef"
OTHER = "other-reviewer-token-0123456789"


def _configure(h, *, pull: bool = False, turnaround_days: float | None = None) -> None:
    text = h.config_path.read_text()
    if pull:
        # spine-center fetches from our API instead of an outbox; other-center too (its own token).
        text = re.sub(r'type = "outbox"[^\n]*\npath = "[^"]*"\n', 'type = "pull"\n', text)
        text = text.replace('profiles = ["spine", "default"]',
                            f'profiles = ["spine", "default"]\napi_token = "{REVIEWER}"', 1)
        text = text.replace('profiles = []', f'profiles = []\napi_token = "{OTHER}"', 1)
    if turnaround_days is not None:
        text = text.replace('profiles = ["spine", "default"]',
                            f'profiles = ["spine", "default"]\nturnaround_days = {turnaround_days}', 1)
    if pull:   # pull reviewers need the audience of their tokens: <public_url>/reviewer
        text += '\n[service]\npublic_url = "http://localhost"\n'
    h.config_path.write_text(text + f'\n[api]\ntokens = ["{STAFF}"]\n')


@pytest.fixture
def served(two_reviewers):
    _configure(two_reviewers, pull=True)
    svc = Service(config.load(two_reviewers.config_path))
    client = create_app(svc=svc).test_client()
    yield two_reviewers, svc, client
    svc.stop(wait=True)


def staff(**kw):
    return {"Authorization": f"Bearer {STAFF}", **kw}


def as_reviewer(token=REVIEWER):
    return {"Authorization": f"Bearer {token}"}


# --- staff API ---------------------------------------------------------------------------------------

def test_staff_api_needs_a_token_and_answers_json_errors(served):
    _h, _svc, client = served
    for headers in ({}, {"Authorization": "Bearer wrong-token-but-long-enough"}):
        r = client.get("/api/cases", headers=headers)
        assert r.status_code == 401 and "bearer token" in r.get_json()["error"]["message"]
    r = client.post("/api/orders", headers=staff(), json={"patient": "x"})
    assert r.status_code == 400 and r.get_json()["error"]["message"] == "question is required (a non-empty string)"
    r = client.post("/api/orders", headers=staff(), data="not json")
    assert r.status_code == 400 and "JSON object" in r.get_json()["error"]["message"]
    r = client.get("/api/cases/nope", headers=staff())
    assert r.status_code == 404 and r.get_json() == {"error": {"status": 404, "message": "no Case nope"}}
    r = client.get("/api/nowhere", headers=staff())
    assert r.status_code == 404 and r.is_json


def test_order_through_the_api_is_carried_to_the_reviewer_by_the_scheduler_ticks(served, seeded, fhir):
    h, svc, client = served
    r = client.post("/api/orders", headers=staff(), json={
        "patient": seeded["patient"], "question": "Is the fusion needed?", "profile": "spine",
        "requester": seeded["physician"]})
    assert r.status_code == 201, r.get_json()
    body = r.get_json()
    case_id = body["case"]["id"]
    assert body["case"]["step"] == "collect" and body["service_request"].startswith("ServiceRequest/")
    assert fhir.read_ref(body["service_request"])["note"][0]["text"] == "Is the fusion needed?"
    svc.tick_work()
    case = client.get(f"/api/cases/{case_id}", headers=staff()).get_json()
    assert case["step"] == "await_opinion" and case["due_at"] > time.time()
    kinds = [e["kind"] for e in case["events"]]
    assert kinds[:2] == ["opened", "task.created"] and "deliver.done" in kinds
    listed = client.get("/api/cases?step=await_opinion", headers=staff()).get_json()["cases"]
    assert case_id in [c["id"] for c in listed]


def test_cancel_and_retry_through_the_api(served, seeded, fhir):
    h, svc, client = served
    case_id = client.post("/api/orders", headers=staff(), json={
        "patient": seeded["patient"], "question": "?", "profile": "spine",
        "requester": seeded["physician"]}).get_json()["case"]["id"]
    r = client.post(f"/api/cases/{case_id}/cancel", headers=staff(), json={})
    assert r.status_code == 400 and "reason is required" in r.get_json()["error"]["message"]
    r = client.post(f"/api/cases/{case_id}/cancel", headers=staff(), json={"reason": "patient declined"})
    assert r.status_code == 200 and r.get_json()["step"] == "cancelled"
    task = fhir.read_ref(r.get_json()["task"])
    assert task["status"] == "cancelled" and task["statusReason"]["text"] == "patient declined"
    r = client.post(f"/api/cases/{case_id}/cancel", headers=staff(), json={"reason": "again"})
    assert r.status_code == 409 and "already cancelled" in r.get_json()["error"]["message"]
    assert client.post("/api/cases/nope/retry", headers=staff()).status_code == 404


# --- reviewer pull API -------------------------------------------------------------------------------

def test_reviewer_pulls_the_package_answers_and_the_opinion_is_filed(served, seeded, fhir, tmp_path):
    h, svc, client = served
    case_id = client.post("/api/orders", headers=staff(), json={
        "patient": seeded["patient"], "question": "?", "profile": "spine",
        "requester": seeded["physician"]}).get_json()["case"]["id"]
    svc.tick_work()
    assert client.get("/reviewer/cases").status_code == 401
    mine = client.get("/reviewer/cases", headers=as_reviewer()).get_json()["cases"]
    entry = next(c for c in mine if c["id"] == case_id)
    assert "package.jwe" in entry["files"] and any(f.startswith("attachments/") for f in entry["files"])
    # Download every file into a local package directory, as a reviewer's tool would, and open it.
    local = tmp_path / "pkg"
    for name in entry["files"]:
        r = client.get(f"/reviewer/cases/{case_id}/package/{name}", headers=as_reviewer())
        assert r.status_code == 200
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(r.data)
    r = h.reviewers["spine-center"]
    opened = open_package(local, r.key, r.trusted)
    assert opened.claims["case_id"] == case_id
    # The other reviewer neither sees nor fetches this Case.
    other = client.get("/reviewer/cases", headers=as_reviewer(OTHER)).get_json()["cases"]
    assert case_id not in [c["id"] for c in other]
    assert client.get(f"/reviewer/cases/{case_id}/package/package.jwe", headers=as_reviewer(OTHER)).status_code == 404
    assert client.get(f"/reviewer/cases/{case_id}/package/../../x", headers=as_reviewer()).status_code == 404

    h.package_path = lambda case: local  # answer from the downloaded copy
    opinion = h.answer(h.app.store.get(case_id)).read_bytes()
    r = client.post("/reviewer/opinions", headers=as_reviewer(), data=opinion)
    assert r.status_code == 202 and r.get_json()["case"] == case_id
    r = client.post("/reviewer/opinions", headers=as_reviewer(), data=opinion)
    assert r.status_code == 409 and "nothing written" in r.get_json()["error"]["message"]
    r = client.post("/reviewer/opinions", headers=as_reviewer(), data=b"garbage")
    assert r.status_code == 400 and r.is_json
    svc.tick_work()
    case = client.get(f"/api/cases/{case_id}", headers=staff()).get_json()
    assert case["step"] == "done" and fhir.read_ref(case["task"])["status"] == "completed"


def test_reviewer_declines_and_the_task_is_rejected_with_the_reason(served, seeded, fhir):
    h, svc, client = served
    case_id = client.post("/api/orders", headers=staff(), json={
        "patient": seeded["patient"], "question": "?", "profile": "spine",
        "requester": seeded["physician"]}).get_json()["case"]["id"]
    svc.tick_work()
    r = client.post(f"/reviewer/cases/{case_id}/decline", headers=as_reviewer(OTHER), json={"reason": "x"})
    assert r.status_code == 404
    r = client.post(f"/reviewer/cases/{case_id}/decline", headers=as_reviewer(), json={})
    assert r.status_code == 400
    r = client.post(f"/reviewer/cases/{case_id}/decline", headers=as_reviewer(),
                    json={"reason": "outside our specialty: please refer to a neurosurgeon"})
    assert r.status_code == 200 and r.get_json()["status"] == "declined"
    case = client.get(f"/api/cases/{case_id}", headers=staff()).get_json()
    task = fhir.read_ref(case["task"])
    assert case["step"] == "declined"
    assert task["status"] == "rejected" and "neurosurgeon" in task["statusReason"]["text"]
    r = client.post(f"/reviewer/cases/{case_id}/decline", headers=as_reviewer(), json={"reason": "again"})
    assert r.status_code == 409


# --- health and docs -----------------------------------------------------------------------------------

def test_health_readiness_and_openapi(served):
    _h, _svc, client = served
    assert client.get("/healthz").get_json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"]["store"] == "ok"
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.1")
    for path in ("/api/orders", "/api/cases", "/api/cases/{case_id}", "/api/cases/{case_id}/cancel",
                 "/reviewer/opinions", "/healthz", "/readyz"):
        assert path in spec["paths"]
    page = client.get("/docs")
    assert page.status_code == 200 and b"/api/orders" in page.data and b"<script" not in page.data


def test_readiness_says_which_ehr_is_down(two_reviewers):
    text = two_reviewers.config_path.read_text()
    two_reviewers.config_path.write_text(re.sub(r'fhir_base_url = "[^"]+"',
                                                'fhir_base_url = "http://127.0.0.1:9/fhir"', text))
    svc = Service(config.load(two_reviewers.config_path, environ={"FHIRBRIDGE_HOSPITAL__HTTP__RETRIES": "0"}))
    try:
        started = time.monotonic()
        r = create_app(svc=svc).test_client().get("/readyz")
        body = r.get_json()
        # Still ready (the store answers; other EHRs' work goes on), but says which EHR is down, quickly.
        assert r.status_code == 200 and body["status"] == "degraded" and body["checks"]["store"] == "ok"
        assert any(k.startswith("ehr:") and v.startswith("unreachable") for k, v in body["checks"].items())
        assert time.monotonic() - started < 10
    finally:
        svc.stop()


# --- polling intake ----------------------------------------------------------------------------------

def test_polling_opens_one_case_per_order_and_cancels_revoked_ones(hospital, seeded, fhir):
    from fhirbridge.loop.intake import CURSOR, poll
    app = hospital.app
    first = hospital.order(seeded["patient"])
    r1 = poll(app, worker="w1")
    assert r1.polled and [c.service_request for c in r1.opened] == [f"ServiceRequest/{first['id']}"]
    assert app.store.get_cursor(app.hospital.key, CURSOR) == r1.cursor
    second = hospital.order(seeded["patient"])
    r2 = poll(app, worker="w1")
    assert [c.service_request for c in r2.opened] == [f"ServiceRequest/{second['id']}"]
    assert poll(app, worker="w2").opened == []        # nothing new: no second Case for either order

    sr = fhir.read_ref(f"ServiceRequest/{first['id']}")
    sr["status"] = "revoked"
    fhir.update(sr)
    r3 = poll(app, worker="w2")
    assert [c.step for c in r3.cancelled] == ["cancelled"]
    case = hospital.case_for(first)
    assert case.step == "cancelled" and fhir.read_ref(case.task)["status"] == "cancelled"


def test_only_one_worker_polls_a_hospital_at_a_time(hospital):
    from fhirbridge.loop.intake import CURSOR, poll
    key = hospital.app.hospital.key
    claimed, _ = hospital.app.store.claim_cursor(key, CURSOR, worker="busy", lease_seconds=60)
    assert claimed
    result = poll(hospital.app, worker="other")
    assert not result.polled and result.opened == []
    hospital.app.store.release_cursor(key, CURSOR, worker="busy")
    assert poll(hospital.app, worker="other").polled


# --- turnaround ------------------------------------------------------------------------------------------

def test_case_past_its_turnaround_target_is_flagged_once(hospital, seeded, fhir):
    _configure(hospital, turnaround_days=0.00001)            # under a second
    svc = Service(config.load(hospital.config_path))
    try:
        hospital.order(seeded["patient"])
        svc.tick_poll()
        svc.tick_work()
        case = next(c for c in svc.store.list_cases(steps=("await_opinion",)) if c.hospital == svc.apps[0].hospital.key)
        time.sleep(1.2)
        svc.tick_overdue()
        flagged = svc.store.get(case.id)
        assert flagged.overdue_at is not None
        task = fhir.read_ref(flagged.task)
        assert task["businessStatus"]["coding"][0]["code"] == "overdue" and task["status"] == "in-progress"
        svc.tick_overdue()
        assert [e["kind"] for e in svc.store.events(case.id)].count("overdue") == 1
    finally:
        svc.stop()


def test_one_failing_order_does_not_stop_polling_of_the_others(hospital, seeded, monkeypatch):
    import fhirbridge.loop.intake as intake
    bad = hospital.order(seeded["patient"])
    good = hospital.order(seeded["patient"])
    real = intake.order_changed

    def poisoned(app, sr):
        if sr["id"] == bad["id"]:
            raise FhirError("EHR answered 403 Forbidden to GET Organization/x", status=403, transient=True)
        return real(app, sr)

    monkeypatch.setattr(intake, "order_changed", poisoned)
    first = intake.poll(hospital.app, worker="w")
    assert [c.service_request for c in first.opened] == [f"ServiceRequest/{good['id']}"]
    assert len(first.errors) == 1 and "403" in first.errors[0]
    assert first.cursor <= bad["meta"]["lastUpdated"]          # not past the order that failed
    monkeypatch.setattr(intake, "order_changed", real)         # the cause is fixed
    second = intake.poll(hospital.app, worker="w")
    assert [c.service_request for c in second.opened] == [f"ServiceRequest/{bad['id']}"]


def test_order_fields_are_checked_before_anything_is_written(served):
    _h, _svc, client = served
    cases = [({"patient": "p", "question": "q", "reviewer": ["x"]}, "reviewer must be a string"),
             ({"patient": "Patient/a b", "question": "q"}, "patient must be a Patient id"),
             ({"patient": "Practitioner/1", "question": "q"}, "patient must be a Patient id"),
             ({"patient": "p", "question": "q", "requester": "not a ref"}, "requester must be"),
             ({"patient": "p", "question": "q", "reviewer": "nobody"}, "no reviewer 'nobody'"),
             ({"patient": "p", "question": "q", "surprise": 1}, "unknown field 'surprise'")]
    for body, message in cases:
        r = client.post("/api/orders", headers=staff(), json=body)
        assert r.status_code == 400 and message in r.get_json()["error"]["message"], (body, r.get_json())


def test_an_order_without_requester_is_refused_by_the_api(served, seeded, fhir):
    """Issue 13, C4: BSeR's referral request has `requester` 1..1; the API wrote orders naming nobody."""
    _h, _svc, client = served
    before = len(list(fhir.search("ServiceRequest", {"subject": seeded["patient"]})))
    r = client.post("/api/orders", headers=staff(), json={"patient": seeded["patient"], "question": "Fusion?"})
    assert r.status_code == 400
    assert r.get_json()["error"]["message"] == ("requester is required: the ordering clinician, Practitioner/<id> "
                                                "or PractitionerRole/<id>")
    r = client.post("/api/orders", headers=staff(), json={"patient": seeded["patient"], "question": "Fusion?",
                                                          "requester": "Practitioner/no-such-doctor"})
    assert r.status_code == 400 and "the requester Practitioner/no-such-doctor does not exist" in r.get_json()[
        "error"]["message"]
    assert len(list(fhir.search("ServiceRequest", {"subject": seeded["patient"]}))) == before


def test_case_list_filters_are_checked(served):
    """Found by the bad-input suite: a mistyped filter answered as if it had filtered (?overdue=yes listed every
    Case, ?step=awaiting none), so a person could read the wrong list as the answer."""
    _h, _svc, client = served
    for query, message in (("overdue=yes", 'overdue must be "true"'), ("step=awaiting", "step must be one of")):
        r = client.get(f"/api/cases?{query}", headers=staff())
        assert r.status_code == 400 and message in r.get_json()["error"]["message"], r.get_json()
    assert client.get("/api/cases?step=await_opinion&overdue=true", headers=staff()).status_code == 200
