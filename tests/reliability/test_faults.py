"""EHR fault suite: the fault proxy (tests/kit/faultproxy.py, on 127.0.0.1) in front of the real sekmet injects
429 with Retry-After, bursts of 503, answers slower than the read timeout, connection resets, truncated
bodies and lost answers to writes, at random (seeded) across whole loops; then one fault at a time where
it hurts most: the write-back transaction, a SMART token that expires while a request is on its way, and
a transaction the real server rejects. Every Case completes, or ends failed with its reason and completes
once the cause is gone and it is retried; the EHR, searched directly, holds nothing twice.

tests/loop/test_ehr_faults.py has the single-fault cases of the outbound steps (EHR down, slow searches, 403,
400, a lost write-back answer, a 500 on the write-back); this suite does not repeat them.
"""
from __future__ import annotations

import time

import orjson
import pytest

from fhirbridge.crypto.keys import generate_jwks, write_private_jwks
from fhirbridge.demo.localehr import seed_patient
from fhirbridge.fhir.client import FhirClient
from fhirbridge.loop.actions import retry
from fhirbridge.loop.receive import receive_file
from tests.kit.ehrproxy import PROFILES, EhrProxy
from tests.kit.faultproxy import FaultProxy
from tests.kit.hospital import TestHospital, docrefs, start_smart_ehr
from tests.reliability.relkit import duplicates, ehr_copies, review, size

pytestmark = pytest.mark.sekmet

CASES = size(6, 30)
SEED = 8
MAX_PASSES = 60
ENV = {"FHIRBRIDGE_HOSPITAL__HTTP__RETRIES": "2", "FHIRBRIDGE_HOSPITAL__HTTP__MAX_RETRY_AFTER": "1",
       "FHIRBRIDGE_HOSPITAL__HTTP__TIMEOUT_READ": "2"}
TX = r"^/fhir/?$"
# Each request meets at most one of these (the first that fires, by its chance).
CHAOS = [
    {"kind": "429 with Retry-After", "action": "status", "status": 429, "headers": {"Retry-After": "1"},
     "chance": 0.04},
    {"kind": "burst of 503", "action": "status", "status": 503, "chance": 0.015, "burst": 4},
    {"kind": "answer slower than the timeout", "action": "slow-response", "delay": 2.5, "chance": 0.015},
    {"kind": "connection reset", "action": "drop", "chance": 0.03},
    {"kind": "truncated body", "action": "truncate", "chance": 0.03},
    {"kind": "lost answer to a write", "method": "POST", "action": "lose-response", "chance": 0.06},
    {"kind": "lost answer to a write", "method": "PUT", "action": "lose-response", "chance": 0.06},
]


@pytest.fixture
def hospital(tmp_path, proxy):
    h = TestHospital(tmp_path, proxy.base_url, env=ENV)
    try:
        yield h
    finally:
        h.close()


def _filed_case(hospital, patient):
    """A Case whose opinion has been received and waits for the file step."""
    case = hospital.delivered_case(patient)
    return receive_file(hospital.app, hospital.answer(case)).case


# --- random faults across whole loops --------------------------------------------------------------------

# Write plan -> the EHR's capability profile (tests/kit/ehrproxy.py); atomic: sekmet as it is (issue 14).
PLANS = {"atomic": None, "ledger": "post-only", "once": "post-only-no-search"}


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_random_ehr_faults_across_whole_loops_lose_and_duplicate_nothing(tmp_path, ehr, own_patient, fhir, figures,
                                                                         plan):
    profile = PROFILES[PLANS[plan]] if PLANS[plan] else None
    proxy = EhrProxy(ehr.base_url, profile.behaviour) if profile else FaultProxy(ehr.base_url)
    hospital = TestHospital(tmp_path, proxy.base_url, env=ENV, ehr_pins=profile.pins if profile else None)
    try:
        assert hospital.app.write_plan.kind.name == plan.upper()
        _random_faults(hospital, proxy, own_patient, fhir, figures, plan)
    finally:
        hospital.close()
        proxy.close()


def _random_faults(hospital, proxy, own_patient, fhir, figures, plan):
    started = time.monotonic()
    store = hospital.app.store
    reviewed: list[str | bool | None] = []
    orders = {f"ServiceRequest/{hospital.order(own_patient['patient'])['id']}" for _ in range(CASES)}
    proxy.random.seed(SEED)
    for fault in CHAOS:
        proxy.add(**fault)
    answered: dict[str, str] = {}
    passes = 0
    while passes < MAX_PASSES:
        passes += 1
        hospital.run(ignore_backoff=True)
        for case in store.list_cases(steps=("await_opinion",)):
            if case.id not in answered:
                answered[case.id] = receive_file(hospital.app, hospital.answer(case)).opinion_id
        for case in store.list_cases(steps=("needs_review",)):     # plan once: a person checks the chart
            answer = review(hospital.app, fhir, case)
            if answer is not False:                               # False: try again on the next pass
                reviewed.append(answer)
        cases = store.list_cases()
        if len(cases) == CASES and all(c.step in ("done", "failed") for c in cases):
            break
    cases = store.list_cases()
    assert len(cases) == CASES and all(c.step in ("done", "failed") for c in cases), \
        f"not settled in {MAX_PASSES} passes: {sorted((c.step, c.last_error or '') for c in cases)}"
    # A Case that failed says why, in the store and in its event log.
    failed = [c for c in cases if c.step == "failed"]
    for c in failed:
        assert c.last_error and [e for e in store.events(c.id) if e["kind"] == "failed"][-1]["detail"]["error"]
    injected = dict(proxy.injected)
    transient_errors = sum(1 for c in cases for e in store.events(c.id) if e["kind"] == "error")

    # The faults stop; failed Cases are retried (as a person would, once the cause is fixed) and complete.
    proxy.clear()
    for c in failed:
        retry(hospital.app, c)
    for _ in range(5):
        hospital.run(ignore_backoff=True)
        for case in store.list_cases(steps=("await_opinion",)):
            if case.id not in answered:
                answered[case.id] = receive_file(hospital.app, hospital.answer(case)).opinion_id
        for case in store.list_cases(steps=("needs_review",)):
            answer = review(hospital.app, fhir, case)
            if answer is not False:
                reviewed.append(answer)
    cases = store.list_cases()
    assert {c.service_request for c in cases} == orders
    lost = [c.id[:8] for c in cases if c.step != "done" or c.opinion_id != answered.get(c.id)]
    assert not lost, [(c.step, c.last_error) for c in cases if c.step != "done"]
    copies = ehr_copies(fhir, cases)
    assert all(copies[kind][c.id] == 1 for kind in copies for c in cases), copies
    assert all(fhir.read_ref(c.task)["status"] == "completed" for c in cases)
    outbox = hospital.root / "outbox" / "spine-center"
    assert sorted(p.name for p in outbox.iterdir()) == sorted(c.package_id for c in cases)

    assert sum(injected.values()) >= CASES, injected    # the faults really happened
    if plan != "once":
        assert not reviewed, "only the once plan puts a question to a person"
    figures["ehr_faults" if plan == "atomic" else f"ehr_faults.{plan}"] = {
        "plan": plan, "needs_review": {"filed": sum(1 for r in reviewed if r), "not filed": reviewed.count(None)},
        "cases": CASES, "requests_through_proxy": len(proxy.log), "faults_injected": injected,
        "transient_errors_recorded": transient_errors, "passes": passes,
        "failed_with_reason": len(failed), "failure_reasons": sorted({(c.last_error or "")[:120] for c in failed}),
        "completed_after_retry": len(failed), "opinions_lost": len(lost), "ehr_duplicates": duplicates(copies),
        "seconds": round(time.monotonic() - started, 1)}


# --- one fault at a time, where it hurts most -------------------------------------------------------------

def test_429_with_retry_after_on_the_write_back_is_waited_out_and_files_once(hospital, proxy, own_patient, fhir):
    case = _filed_case(hospital, own_patient["patient"])
    proxy.add(method="POST", path=TX, status=429, headers={"Retry-After": "1"}, times=2)
    report = hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "done" and not report.errors
    assert [s for m, p, s in proxy.log if m == "POST" and p.rstrip("/") == "/fhir"] == [429, 429, 200]
    assert docrefs(fhir, case) == 1


@pytest.mark.parametrize("where", ["search", "transaction"])
def test_truncated_answer_is_transient_and_nothing_is_written_twice(hospital, proxy, own_patient, fhir, where):
    """A body cut off half-way (the connection reset before Content-Length bytes came) is a broken transfer:
    the Case waits with the reason and resumes; on the write-back the server had committed, and the next
    run finds the opinion filed instead of writing it again."""
    if where == "search":
        sr = hospital.order(own_patient["patient"])
        hospital.run(case_id="none")
        proxy.add(method="GET", path=r"/Procedure\?", action="truncate", times=3)   # more than the retries
        hospital.run()
        case = hospital.case_for(sr)
        assert case.step == "collect" and case.next_attempt_at, case.last_error
        assert "Procedure" in case.last_error and "broke off" in case.last_error
    else:
        case = _filed_case(hospital, own_patient["patient"])
        proxy.add(method="POST", path=TX, action="truncate", times=1)
        hospital.run(intake=False)
        case = hospital.app.store.get(case.id)
        assert case.step == "file" and case.next_attempt_at and "broke off" in case.last_error
        assert docrefs(fhir, case) == 1                # committed before the answer broke off
    proxy.clear()
    hospital.run(ignore_backoff=True)
    case = hospital.app.store.get(case.id)
    if where == "search":
        assert case.step == "await_opinion", case.last_error
    else:
        assert case.step == "done" and docrefs(fhir, case) == 1
        assert proxy.count("POST", TX) == 1             # found filed: no second transaction


def test_reset_before_the_transaction_reaches_the_server_is_not_resent_blindly(hospital, proxy, own_patient, fhir):
    """A reset after the request left us: a POST is not repeated by the HTTP layer (it might have been
    applied); the next run looks for the opinion first, finds nothing, and files it once."""
    case = _filed_case(hospital, own_patient["patient"])
    proxy.add(method="POST", path=TX, action="drop", times=1)
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "file" and "could not reach the EHR" in case.last_error
    assert proxy.count("POST", TX) == 1 and docrefs(fhir, case) == 0
    hospital.run(intake=False, ignore_backoff=True)
    case = hospital.app.store.get(case.id)
    assert case.step == "done" and docrefs(fhir, case) == 1


def test_slow_transaction_committed_after_we_gave_up_is_not_filed_twice(hospital, proxy, own_patient, fhir):
    """The transaction reaches the server only after our read timeout (a congested server), while the next
    attempt is already on its way: one of the two wins, the other fails whole on the Task's If-Match, and
    exactly one note is filed."""
    case = _filed_case(hospital, own_patient["patient"])
    proxy.add(method="POST", path=TX, action="delay", delay=3.0, times=1)   # read timeout is 2 s
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "file" and "in time" in case.last_error
    hospital.run(intake=False, ignore_backoff=True)   # races the delayed first transaction
    time.sleep(3.5)                                   # the delayed one has reached the server by now
    hospital.run(intake=False, ignore_backoff=True)
    case = hospital.app.store.get(case.id)
    assert case.step == "done" and docrefs(fhir, case) == 1
    statuses = [s for m, p, s in proxy.log if m == "POST" and p.rstrip("/") == "/fhir"]
    assert len(statuses) == 2 and sorted(statuses, key=str)[0] == 200, statuses   # both reached the server


def test_transaction_rejected_by_the_server_fails_the_case_with_its_reason_then_files_once(hospital, proxy,
                                                                                           own_patient, fhir):
    """The real server refuses the transaction (here: an entry made invalid on the way): nothing is written,
    the Case fails with the server's reason on the Task, and `retry` files it once the cause is gone."""
    case = _filed_case(hospital, own_patient["patient"])

    def invalid_docref(body: bytes) -> bytes:
        tx = orjson.loads(body)
        del tx["entry"][1]["resource"]["content"]     # DocumentReference.content is required (1..*)
        return orjson.dumps(tx)

    proxy.add(method="POST", path=TX, action="forward", rewrite_request=invalid_docref, times=1)
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "failed" and case.last_error.startswith("EHR answered 4"), case.last_error
    assert docrefs(fhir, case) == 0
    task = fhir.read_ref(case.task)
    assert task["status"] == "failed" and task["statusReason"]["text"] == case.last_error
    retry(hospital.app, case)
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "done" and docrefs(fhir, case) == 1
    assert fhir.read_ref(case.task)["status"] == "completed"


def test_smart_token_expiring_while_a_request_is_on_its_way_is_renewed_and_the_loop_completes(tmp_path):
    """SMART enforced by the real server, tokens living 3 s. One search is held by the proxy until the token it
    carries has expired: the server answers 401, fhirbridge mints a new token and repeats the request once,
    and the Case goes on to its filed opinion without an error."""
    lifetime, client_id = 3, "fhirbridge-faults"
    keys = tmp_path / "client.private.jwks.json"
    write_private_jwks(keys, generate_jwks())
    ehr = start_smart_ehr(tmp_path / "smart-ehr", client_id, keys, lifetime)
    proxy = hospital = None
    try:   # whatever fails from here on, the EHR started above is stopped
        proxy = FaultProxy(ehr.base_url)
        hospital = TestHospital(tmp_path / "h", proxy.base_url, env={"FHIRBRIDGE_HOSPITAL__HTTP__TIMEOUT_READ": "15"})
        with FhirClient(ehr.direct_url, auth=ehr.admin) as seeder:   # the hospital's own systems seed the chart
            patient = seed_patient(ehr.ehr, seeder, profile="spine")["patient"]
        # The token endpoint is asked directly: a client assertion's aud must be the endpoint's own URL.
        hospital.use_smart(client_id, keys, token_url=ehr.token_url)
        auth = hospital.app.ehr._session.auth
        sr = hospital.order(patient)
        held = proxy.add(method="GET", path=r"/Procedure\?", action="forward",
                         before=lambda _p: time.sleep(lifetime + 0.5), times=1)
        report = hospital.run()
        case = hospital.case_for(sr)
        assert case.step == "await_opinion" and not report.errors, (case.last_error, report.errors)
        assert held.hits == 1
        procedure = [s for m, p, s in proxy.log if m == "GET" and "/Procedure?" in p]
        assert procedure[:2] == [401, 200], procedure     # the server refused the expired token; renewed once
        receive_file(hospital.app, hospital.answer(case))
        hospital.run(intake=False)
        case = hospital.app.store.get(case.id)
        assert case.step == "done", case.last_error
        assert auth.token_requests >= 2
    finally:
        if hospital is not None:
            hospital.close()
        if proxy is not None:
            proxy.close()
        ehr.stop()
