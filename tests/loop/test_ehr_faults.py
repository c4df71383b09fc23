"""The EHR down, slow, or answering errors mid-run: the Case waits and resumes; nothing is lost or doubled.

A fault-injecting proxy (tests/kit/faultproxy.py) sits between fhirbridge and the real sekmet server.
"""
from __future__ import annotations

import pytest

from fhirbridge.loop.receive import receive_file
from tests.kit.hospital import TestHospital, docrefs

pytestmark = pytest.mark.sekmet

# Few, fast retries so each fault is seen quickly; the timeouts tests lower the read timeout further.
FAST = {"FHIRBRIDGE_HOSPITAL__HTTP__RETRIES": "2", "FHIRBRIDGE_HOSPITAL__HTTP__MAX_RETRY_AFTER": "0.2",
        "FHIRBRIDGE_HOSPITAL__HTTP__TIMEOUT_READ": "5"}


@pytest.fixture
def hospital(tmp_path, proxy):
    h = TestHospital(tmp_path, proxy.base_url, env=FAST)
    yield h
    h.close()


def test_ehr_down_mid_run_then_case_resumes(hospital, proxy, seeded):
    sr = hospital.order(seeded["patient"])
    hospital.run(case_id="none")                       # intake only: the Case waits at collect
    proxy.add(action="drop")                           # the EHR goes away
    report = hospital.run()
    case = hospital.case_for(sr)
    assert case.step == "collect" and report.errors
    assert case.next_attempt_at is not None and case.attempts == 1
    assert "ServiceRequest" in case.last_error or "EHR" in case.last_error
    kinds = [e["kind"] for e in hospital.app.store.events(case.id)]
    assert kinds[-1] == "error"

    proxy.clear()                                      # the EHR is back
    assert hospital.run().steps_done == 0              # still in its backoff: not retried early
    hospital.run(ignore_backoff=True)
    case = hospital.app.store.get(case.id)
    assert case.step == "await_opinion" and case.last_error is None


def test_slow_ehr_times_out_then_resumes(hospital, proxy, seeded):
    sr = hospital.order(seeded["patient"])
    hospital.run(case_id="none")
    proxy.add(method="GET", path=r"/DiagnosticReport\?", action="delay", delay=2.0, times=10)
    slow = hospital.new_app(FHIRBRIDGE_HOSPITAL__HTTP__TIMEOUT_READ="0.5", FHIRBRIDGE_HOSPITAL__HTTP__RETRIES="0")
    try:
        hospital.run(app=slow)
    finally:
        slow.close()
    case = hospital.case_for(sr)
    assert case.step == "collect" and "timed out" in case.last_error.lower()
    proxy.clear()
    hospital.run(ignore_backoff=True)
    assert hospital.app.store.get(case.id).step == "await_opinion"


def test_burst_of_503_with_retry_after_is_absorbed_by_retries(hospital, proxy, seeded):
    sr = hospital.order(seeded["patient"])
    proxy.add(method="GET", path=r"/Procedure\?", status=503, headers={"Retry-After": "1"}, times=2)
    report = hospital.run()
    case = hospital.case_for(sr)
    assert case.step == "await_opinion" and not report.errors
    assert proxy.count("GET", r"/Procedure\?") >= 3   # two refusals, then the answer


def test_access_refused_mid_run_keeps_the_case_waiting_then_it_resumes(hospital, proxy, seeded, fhir):
    """A 403 (a scope removed, a token expired) is the hospital's to fix, not the Case's fault: the Case
    waits with the reason and resumes by itself once access is back."""
    sr = hospital.order(seeded["patient"])
    proxy.add(method="GET", path=r"/MedicationStatement\?", status=403)
    hospital.run()
    case = hospital.case_for(sr)
    assert case.step == "collect" and case.next_attempt_at
    assert "403" in case.last_error and "MedicationStatement" in case.last_error
    proxy.clear()                                      # hospital IT fixes the permission
    hospital.run(ignore_backoff=True)
    case = hospital.app.store.get(case.id)
    assert case.step == "await_opinion"
    assert fhir.read_ref(case.task)["status"] == "in-progress"


def test_other_4xx_mid_run_fails_the_case_with_the_reason_and_retry_resumes(hospital, proxy, seeded, fhir):
    sr = hospital.order(seeded["patient"])
    proxy.add(method="GET", path=r"/MedicationStatement\?", status=400)
    hospital.run()
    case = hospital.case_for(sr)
    assert case.step == "failed"
    assert "400" in case.last_error and "MedicationStatement" in case.last_error
    task = fhir.read_ref(case.task)
    assert task["status"] == "failed" and "400" in task["statusReason"]["text"]

    proxy.clear()
    from fhirbridge.loop.actions import retry
    retry(hospital.app, case)
    hospital.run()
    case = hospital.app.store.get(case.id)
    assert case.step == "await_opinion"
    task = fhir.read_ref(case.task)
    assert task["status"] == "in-progress" and "statusReason" not in task


def test_lost_response_on_write_back_files_exactly_once(hospital, proxy, seeded, fhir):
    """The EHR commits the transaction but the answer never arrives: the next run must find the filed
    opinion and complete without writing it again."""
    case = hospital.delivered_case(seeded["patient"])
    receive_file(hospital.app, hospital.answer(case))
    proxy.add(method="POST", path=r"^/fhir/?$", action="lose-response", times=1)
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "file" and case.last_error     # we don't know yet that it was filed
    assert docrefs(fhir, case) == 1                  # ... but the EHR has it

    hospital.run(intake=False, ignore_backoff=True)
    case = hospital.app.store.get(case.id)
    assert case.step == "done" and case.document_reference
    assert docrefs(fhir, case) == 1
    assert proxy.count("POST", r"^/fhir/?$") == 1     # no second transaction was sent
    assert fhir.read_ref(case.task)["status"] == "completed"


def test_write_back_rejected_by_server_leaves_case_waiting_and_nothing_written(hospital, proxy, seeded, fhir):
    case = hospital.delivered_case(seeded["patient"])
    receive_file(hospital.app, hospital.answer(case))
    proxy.add(method="POST", path=r"^/fhir/?$", status=500, times=10)
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "file" and "500" in case.last_error
    assert docrefs(fhir, case) == 0
    proxy.clear()
    hospital.run(intake=False, ignore_backoff=True)
    case = hospital.app.store.get(case.id)
    assert case.step == "done" and docrefs(fhir, case) == 1


def test_invalid_resource_from_the_ehr_is_reported_not_sent_and_not_fatal(hospital, proxy, seeded):
    """A DiagnosticReport arrives with an element R4 does not have: the Case goes on, the report is listed as
    withheld with the reason, and the Case's event log names it."""
    import orjson

    def corrupt_first_report(body: bytes) -> bytes:
        bundle = orjson.loads(body)
        for entry in bundle.get("entry", []):
            if entry["resource"]["resourceType"] == "DiagnosticReport":
                entry["resource"]["conclusionn"] = "typo element"
                break
        return orjson.dumps(bundle)

    sr = hospital.order(seeded["patient"])
    proxy.add(method="GET", path=r"/DiagnosticReport\?", action="rewrite", rewrite=corrupt_first_report)
    report = hospital.run()
    case = hospital.case_for(sr)
    assert case.step == "await_opinion" and not report.errors
    withheld = [w for w in hospital.open(case).manifest["withheld"] if w["reason"].startswith("invalid FHIR")]
    assert len(withheld) == 1 and withheld[0]["reference"].startswith("DiagnosticReport/")
    assert "conclusionn" in withheld[0]["reason"]
    events = [e for e in hospital.app.store.events(case.id) if e["kind"] == "invalid_resource"]
    assert events and events[0]["detail"]["reference"] == withheld[0]["reference"]
