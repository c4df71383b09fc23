"""Logs worth alerting on (issue 17, part 2): a Case that failed for good is one ERROR line with its id and the
reason; a step that will be retried is a WARNING; each transition of a Case is one INFO line; a scheduler tick
that did nothing logs nothing at INFO (APScheduler's "Running job" chatter is DEBUG). Against the real EHR."""
from __future__ import annotations

import io
import logging
import time

import pytest

from fhirbridge.config import loader as config
from fhirbridge.demo.localehr import seed_patient
from fhirbridge.loop.actions import cancel, retry
from fhirbridge.loop.consent import ACT_CODE, SCOPE_SYSTEM
from fhirbridge.loop.receive import receive_file
from fhirbridge.ops import logs
from fhirbridge.service.scheduler import Service
from tests.kit.hospital import SEEDED_FAMILY, SEEDED_GIVEN
from tests.kit.logcapture import captured_logs, lines

pytestmark = pytest.mark.sekmet


@pytest.fixture
def captured():
    """Our handler on the root logger at INFO (as `serve` and `worker` run), JSON into a buffer."""
    with captured_logs("INFO") as buf:
        yield buf


def about(got: list[dict], case_id: str) -> list[dict]:
    return [line for line in got if line.get("case_id") == case_id]


def deny_all(fhir, patient: str) -> None:
    fhir.create({"resourceType": "Consent", "status": "active",
                 "scope": {"coding": [{"system": SCOPE_SYSTEM, "code": "patient-privacy"}]},
                 "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                 "patient": {"reference": patient}, "dateTime": "2024-01-01",
                 "policyRule": {"coding": [{"system": ACT_CODE, "code": "OPTIN"}]}, "provision": {"type": "deny"}})


def test_a_permanent_failure_is_one_error_line_with_the_case_and_the_reason(captured, hospital, ehr, fhir):
    patient = seed_patient(ehr, fhir, profile="spine")["patient"]
    deny_all(fhir, patient)
    sr = hospital.order(patient)
    hospital.run()
    case = hospital.case_for(sr)
    assert case.step == "failed"
    mine = about(lines(captured), case.id)
    errors = [line for line in mine if line["level"] == "error"]
    assert len(errors) == 1, mine
    error = errors[0]
    assert case.id in error["message"] and "collect" in error["message"]
    assert "denies disclosure" in error["message"] and error["reason"] == case.last_error
    assert error["step"] == "collect" and error["to_step"] == "failed"
    # Not also an INFO "collect: error -> failed" line with no reason.
    assert not [line for line in mine if line["level"] == "info" and "failed" in line["message"]]
    text = captured.getvalue()
    for phi in (SEEDED_FAMILY, SEEDED_GIVEN, "Is surgery indicated now?"):
        assert phi not in text


def test_a_step_that_will_be_retried_is_a_warning_with_the_reason(captured, hospital, seeded):
    h = hospital
    sr = h.order(seeded["patient"])
    app = h.new_app(FHIRBRIDGE_HOSPITAL__FHIR_BASE_URL="http://127.0.0.1:9/fhir",
                    FHIRBRIDGE_HOSPITAL__HTTP__RETRIES="0")
    h.run()                          # intake and collect run against the EHR...
    case = h.case_for(sr)
    h.app.store.update(case.id, step="collect")   # ...then collect again, with the EHR gone
    h.run(app, intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "collect" and case.last_error
    warnings = [line for line in about(lines(captured), case.id) if line["level"] == "warning"]
    assert warnings and case.id in warnings[-1]["message"] and "will retry in" in warnings[-1]["message"]
    assert warnings[-1]["reason"] == case.last_error and "connection refused" in case.last_error


def test_each_transition_of_a_case_is_one_info_line(captured, hospital, seeded):
    sr = hospital.order(seeded["patient"])
    hospital.run()
    case = hospital.case_for(sr)
    receive_file(hospital.app, hospital.answer(case))
    hospital.run(intake=False)
    assert hospital.app.store.get(case.id).step == "done"
    info = [line["message"] for line in about(lines(captured), case.id) if line["level"] == "info"]
    assert len(info) == 6, info
    assert info[0].startswith(f"case {case.id} opened")
    assert info[1:] == ["collect: ok -> seal", "seal: ok -> deliver", "deliver: ok -> await_opinion",
                        f"case {case.id}: await_opinion -> file (opinion received)", "file: ok -> done"]


def test_cancel_and_retry_from_outside_are_one_info_line_each(captured, hospital, ehr, fhir):
    patient = seed_patient(ehr, fhir, profile="spine")["patient"]
    deny_all(fhir, patient)
    sr = hospital.order(patient)
    hospital.run()
    case = hospital.case_for(sr)
    retried = retry(hospital.app, case)
    cancel(hospital.app, retried, "the patient withdrew")
    info = [line["message"] for line in about(lines(captured), case.id) if line["level"] == "info"]
    assert info[-2:] == [f"case {case.id}: failed -> collect (retried)",
                         f"case {case.id}: collect -> cancelled (cancelled)"]


def test_an_idle_scheduler_logs_nothing_at_info(captured, hospital):
    env = {f"FHIRBRIDGE_SERVICE__{k}": "0.2" for k in ("POLL_SECONDS", "WORK_SECONDS", "INBOX_SECONDS",
                                                        "OVERDUE_SECONDS")}
    svc = Service(config.load(hospital.config_path, environ=env))
    before = len(lines(captured))     # creating the store (its migrations) is not a tick
    svc.start()
    try:
        time.sleep(2.5)               # about a dozen ticks of each kind, with nothing to do
    finally:
        svc.stop(wait=True)
    got = lines(captured)[before:]
    assert sum(line["message"].startswith("service ") for line in got) == 2     # started, stopped
    chatter = [line for line in got if line["level"] == "info" and not line["message"].startswith("service ")]
    assert chatter == [], chatter[:5]


def test_an_idle_scheduler_says_at_debug_that_it_ticked(hospital):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buf = io.StringIO()
    logs.setup(level="DEBUG", fmt="json", stream=buf)
    env = {"FHIRBRIDGE_SERVICE__WORK_SECONDS": "0.2"}
    svc = Service(config.load(hospital.config_path, environ=env))
    try:
        svc.start()
        time.sleep(1.0)
    finally:
        svc.stop(wait=True)
        for h in list(root.handlers):
            if getattr(h, "_fhirbridge", False):
                root.removeHandler(h)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    debug = [line["message"] for line in lines(buf) if line["level"] == "debug"]
    assert any(m.startswith("work tick for ") for m in debug)
    assert any("Running job" in m for m in debug)     # APScheduler's line, demoted from INFO


def test_a_case_that_fails_at_intake_is_an_error_line_too(captured, hospital, seeded):
    """An order naming a performer no reviewer here is (routing.py: to that reviewer or to nobody): failed at
    intake, one ERROR line."""
    sr = hospital.order(seeded["patient"])
    sr = hospital.app.ehr.read_ref(f"ServiceRequest/{sr['id']}")
    sr["performer"] = [{"identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.0.404"}}]
    hospital.app.ehr.update(sr)
    hospital.run()
    case = hospital.case_for(sr)
    assert case.step == "failed" and case.data["failed_step"] == "intake"
    errors = [line for line in about(lines(captured), case.id) if line["level"] == "error"]
    assert len(errors) == 1 and errors[0]["reason"] == case.last_error
    assert errors[0]["message"].startswith(f"case {case.id} failed at intake: ")
