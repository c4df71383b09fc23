"""The referral Task speaks BSeR (issue 13, C4): its businessStatus carries BSeR's Task Business Status code
where that code system has one (2.0 created, 4.0 declined, 6.0 cancelled, 7.0 completed) and fhirbridge's own
referral-step code (a CodeSystem it serves) for the steps BSeR lacks; its FILL identifier has the hospital as
`assigner` (1..1); and Tasks written by earlier releases, with the `urn:fhirbridge:codes:referral-step` codes,
are still read."""
from __future__ import annotations

import pytest

from fhirbridge.config.terminology import REFERRAL_STEP
from fhirbridge.ehr import task as ehr_task
from fhirbridge.ehr.task import BSER_SYSTEM, business_step
from fhirbridge.loop import actions, intake
from fhirbridge.loop.receive import receive_file

pytestmark = pytest.mark.sekmet

BSER = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"   # written out: not from the code under test
OLD = "urn:fhirbridge:codes:referral-step"


def status(fhir, case) -> tuple[str, str, str]:
    task = fhir.read_ref(case.task)
    [coding] = task["businessStatus"]["coding"]
    return task["status"], coding["system"], coding["code"]


def test_business_status_is_bsers_code_where_it_has_one_and_ours_elsewhere(hospital, seeded, fhir):
    assert BSER_SYSTEM == BSER and REFERRAL_STEP.startswith("http://")
    sr = hospital.order(seeded["patient"])
    intake.poll(hospital.app, worker="test")
    case = hospital.case_for(sr)
    assert status(fhir, case) == ("requested", BSER, "2.0")           # Service Request Created
    task = fhir.read_ref(case.task)
    assert task["businessStatus"]["coding"][0]["display"] == "Service Request Created"
    assert task["businessStatus"]["text"] == "Order received by the second-opinion service"
    assert task["requester"] == {"reference": hospital.physician()}

    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert status(fhir, case) == ("in-progress", REFERRAL_STEP, "sent-to-reviewer")   # no BSeR code for it

    receive_file(hospital.app, hospital.answer(case))
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "done", case.last_error
    assert status(fhir, case) == ("completed", BSER, "7.0")           # Service Request Fulfillment Completed


def test_a_cancelled_and_a_declined_referral_show_bsers_codes(hospital, seeded, fhir):
    cancelled = hospital.delivered_case(seeded["patient"])
    actions.cancel(hospital.app, cancelled, "the patient changed her mind")
    assert status(fhir, cancelled) == ("cancelled", BSER, "6.0")      # Service Request Fulfillment Cancelled
    declined = hospital.delivered_case(seeded["patient"])
    actions.decline(hospital.app, declined, "outside our specialty")
    assert status(fhir, declined) == ("rejected", BSER, "4.0")        # Service Request Declined


def test_the_filler_identifier_is_assigned_by_the_hospital(hospital, seeded, fhir):
    case = hospital.delivered_case(seeded["patient"])
    task = fhir.read_ref(case.task)
    [filler] = [i for i in task["identifier"] if i["type"]["coding"][0]["code"] == "FILL"]
    assert filler["value"] == case.id
    assert filler["assigner"] == {"identifier": {"system": hospital.app.hospital.identifier_system,
                                                 "value": hospital.app.hospital.identifier_value},
                                  "display": hospital.app.hospital.name}
    [placer] = [i for i in task["identifier"] if i["type"]["coding"][0]["code"] == "PLAC"]
    assert placer["assigner"] == filler["assigner"]


def test_tasks_written_with_the_old_codes_are_still_read(hospital, seeded, fhir):
    """A Task an earlier release left at `sent-to-reviewer` under the old urn is still recognised: the overdue
    flag (a conditional update from that step) applies to it, in the new codes."""
    for code, step in (("received", "received"), ("sent-to-reviewer", "sent-to-reviewer"),
                       ("opinion-filed", "opinion-filed")):
        assert business_step({"businessStatus": {"coding": [{"system": OLD, "code": code}]}}) == step
    for code, step in (("2.0", "received"), ("4.0", "declined"), ("6.0", "cancelled"), ("7.0", "opinion-filed")):
        assert business_step({"businessStatus": {"coding": [{"system": BSER, "code": code}]}}) == step
    assert business_step({"businessStatus": {"coding": [{"system": "urn:someone:else", "code": "2.0"}]}}) is None

    case = hospital.delivered_case(seeded["patient"])
    task = fhir.read_ref(case.task)
    task["businessStatus"] = {"coding": [{"system": OLD, "code": "sent-to-reviewer"}], "text": "old"}
    for ident in task["identifier"]:
        ident.pop("assigner", None)                  # as an earlier release wrote it
    fhir.update(task)
    ehr_task.set_task_status(hospital.app, case, "overdue", only_from=("sent-to-reviewer",))
    assert status(fhir, case) == ("in-progress", REFERRAL_STEP, "overdue")
    # Its next write brings the FILL identifier up to BSeR too.
    [filler] = [i for i in fhir.read_ref(case.task)["identifier"] if i["system"] == ehr_task.CASE_ID_SYSTEM]
    assert filler["assigner"] == hospital.app.hospital.organization_ref()
