"""The Task in the EHR that shows where a referral stands (HL7 BSeR / FHIR Workflow "fulfill" Task).

Task: intent order, code fulfill (http://hl7.org/fhir/CodeSystem/task-code), focus -> the ServiceRequest,
for -> the Patient, owner -> the reviewer organisation (logical reference by identifier: the reviewer need
not exist as an Organization in the hospital's EHR), requester -> the ordering practitioner.
`status` follows FHIR task-status; `businessStatus` names the finer step, as BSeR uses it: BSeR's Task Business
Status code (BSER_SYSTEM, an extensible binding) where that code system has one, ours (REFERRAL_STEP, a CodeSystem
served at /fhir/CodeSystem/referral-step) for the steps it lacks. The FILL identifier is assigned by the hospital
(BSeR ReferralTask: identifier.assigner 1..1).
"""
from __future__ import annotations

from datetime import UTC, datetime

from fhirbridge.config.terminology import LEGACY, REFERRAL_STEP
from fhirbridge.ehr.context import App
from fhirbridge.errors import FhirError
from fhirbridge.steps import FLOW
from fhirbridge.store.store import Case

TASK_CODE = {"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill",
             "display": "Fulfill the focal request"}
CASE_ID_SYSTEM = "urn:fhirbridge:case"
BUSINESS_SYSTEM = REFERRAL_STEP
# HL7 BSeR (STU1 and the 2.0 ballot), CodeSystem TaskBusinessStatusCS: 2.0 "Service Request Created", 4.0
# "Service Request Declined", 6.0 "Service Request Fulfillment Cancelled", 7.0 "Service Request Fulfillment
# Completed". Our `received` is the referral Task created for the order; `opinion-filed` completes it. BSeR's
# 3.0 "Accepted" has no moment here (a reviewer accepts by answering); 5.x "Fulfillment Initiated" is gone from
# the 2.0 ballot, so our finer in-progress steps keep our own codes.
BSER_SYSTEM = "http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS"
BSER_CODES: dict[str, tuple[str, str]] = {
    "received": ("2.0", "Service Request Created"),
    "declined": ("4.0", "Service Request Declined"),
    "cancelled": ("6.0", "Service Request Fulfillment Cancelled"),
    "opinion-filed": ("7.0", "Service Request Fulfillment Completed"),
}

# Case step (and two moments that are not steps) -> (Task.status, businessStatus code, display). The steps'
# come from the one table, steps.FLOW.
STATUS: dict[str, tuple[str, str, str]] = {
    "opened": ("requested", "received", "Order received by the second-opinion service"),
    **{step.value: (flow.task_status, flow.business, flow.display) for step, flow in FLOW.items()},
    "overdue": ("in-progress", "overdue", "Awaiting opinion, past the reviewer's turnaround target"),
}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def case_identifier(case_id: str, assigner: dict | None = None) -> dict:
    """The filler identifier (v2-0203 FILL): our Case id, assigned by the hospital (`assigner`, its
    Organization by identifier; BSeR ReferralTask identifier.assigner 1..1)."""
    ident = {"system": CASE_ID_SYSTEM, "value": case_id,
             "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "FILL",
                                  "display": "Filler Identifier"}]}}
    if assigner:
        ident["assigner"] = assigner
    return ident


def business_status(code: str, display: str) -> dict:
    """Task.businessStatus for our step code `code` (a STATUS value): BSeR's code where it has one, else ours.
    The text stays our display, which says more than BSeR's generic one."""
    system, (bser_code, bser_display) = (BSER_SYSTEM, BSER_CODES[code]) if code in BSER_CODES \
        else (BUSINESS_SYSTEM, (code, display))
    return {"coding": [{"system": system, "code": bser_code, "display": bser_display}], "text": display}


def business_step(task: dict) -> str | None:
    """Our step code (a STATUS code: received, collecting, ... opinion-filed) that a Task's businessStatus shows,
    whoever wrote it: BSeR's code, ours, or the `urn:fhirbridge:codes:referral-step` code of a Task written by
    an earlier release (those Tasks stay in the EHR, and intake and the Task sync must still read them)."""
    from_bser = {bser: ours for ours, (bser, _display) in BSER_CODES.items()}
    for coding in task.get("businessStatus", {}).get("coding", []):
        system, code = coding.get("system"), coding.get("code")
        if system == BSER_SYSTEM and code in from_bser:
            return from_bser[code]
        if system == BUSINESS_SYSTEM or LEGACY.get(system or "") == BUSINESS_SYSTEM:
            return code
    return None


class TaskClosed(Exception):
    """Someone closed the Task in the EHR (cancelled or rejected it): the referral must stop, not be revived."""


# Statuses only a person (or the reviewer, later) puts on the Task; we never overwrite them.
CLOSED_ELSEWHERE = ("cancelled", "rejected")


def build_task(app: App, case: Case, service_request: dict) -> dict:
    status, code, display = STATUS["opened"]
    task = {
        "resourceType": "Task",
        # Filler identifier = our Case id; the placer identifiers of the order are copied so the referral
        # is findable from either side (BSeR: PLAC/FILL).
        "identifier": [case_identifier(case.id, app.hospital.organization_ref())]
                      + [i for i in service_request.get("identifier", []) if _is_placer(i)],
        "basedOn": [{"reference": case.service_request}],
        "status": status,
        "businessStatus": business_status(code, display),
        "intent": "order",
        "priority": service_request.get("priority", "routine"),
        "code": {"coding": [TASK_CODE]},
        "focus": {"reference": case.service_request},
        "for": {"reference": case.patient},
        "authoredOn": now_iso(),
        "lastModified": now_iso(),
        "description": "Second opinion referral",
    }
    if case.reviewer in app.config.reviewers:  # unrouted Cases (failed at intake) have no owner yet
        task["owner"] = app.config.reviewer(case.reviewer).organization_ref()
    if service_request.get("requester"):
        task["requester"] = {"reference": service_request["requester"]["reference"]} \
            if service_request["requester"].get("reference") else service_request["requester"]
    return task


def _is_placer(identifier: dict) -> bool:
    codings = identifier.get("type", {}).get("coding", [])
    return any(c.get("code") == "PLAC" for c in codings)


def ensure_task(app: App, case: Case, service_request: dict) -> str:
    """Create the Task unless it exists (conditional create on our Case identifier): safe to repeat."""
    task = build_task(app, case, service_request)
    query = f"identifier={CASE_ID_SYSTEM}|{case.id}"
    if not app.capabilities.conditional_create:
        # An EHR that ignores If-None-Exist (issue 14) would create a second Task after a crash between its
        # POST and our record of it: look for ours by the Case identifier first.
        for found in app.ehr.search("Task", {"identifier": f"{CASE_ID_SYSTEM}|{case.id}"}):
            if found.get("resourceType") == "Task":
                return f"Task/{found['id']}"
    stored, _created = app.ehr.create(task, if_none_exist=query)
    return f"Task/{stored['id']}"


def set_task_status(app: App, case: Case, step: str, *, reason: str | None = None,
                    output: list | None = None, only_from: tuple[str, ...] | None = None) -> dict | None:
    """Bring the Task in line with the Case step. Reads the Task, writes only if it differs, and writes with
    If-Match on the version read (FHIR R4 http.html#concurrency) so an edit made in the EHR meanwhile is
    never overwritten: on a conflict it reads again once. A Task cancelled or rejected in the EHR raises
    TaskClosed unless we are cancelling too."""
    if not case.task:
        return None
    status, code, display = STATUS[step]
    for attempt in (1, 2):
        task = app.ehr.read_ref(case.task)
        if task.get("status") in CLOSED_ELSEWHERE and status != task.get("status"):
            raise TaskClosed(f"the Task was {task['status']} in the EHR"
                             + (f": {task['statusReason'].get('text')}" if task.get("statusReason", {}).get("text")
                                else ""))
        current_code = business_step(task)
        if task.get("status") == status and current_code == code and not reason and not output:
            return task
        # A completed Task (the opinion is filed) is never reopened by a late sync or flag; a conditional
        # update (only_from) applies only while the Task still shows one of those finer steps.
        if task.get("status") == "completed" and status != "completed":
            return task
        if only_from is not None and current_code not in only_from:
            return task
        _apply(task, status, code, display, reason, output)
        _assign_filler(task, app.hospital.organization_ref())   # a Task from before the assigner was written
        try:
            return app.ehr.update(task, if_match=task.get("meta", {}).get("versionId"))
        except FhirError as exc:
            if exc.status not in (409, 412) or attempt == 2:
                raise
    return None


def _assign_filler(task: dict, assigner: dict) -> None:
    for ident in task.get("identifier", []):
        if ident.get("system") == CASE_ID_SYSTEM and not ident.get("assigner"):
            ident["assigner"] = assigner


def _apply(task: dict, status: str, code: str, display: str, reason: str | None, output: list | None) -> None:
    task["status"] = status
    task["businessStatus"] = business_status(code, display)
    task["lastModified"] = now_iso()
    if reason:
        task["statusReason"] = {"text": reason}
    else:
        task.pop("statusReason", None)
    if output:
        task["output"] = output
    period = task.setdefault("executionPeriod", {})
    if status == "in-progress":
        period.setdefault("start", now_iso())
    if status in ("completed", "failed", "cancelled"):
        period.setdefault("start", now_iso())
        period["end"] = now_iso()
    elif "end" in period:
        del period["end"]  # resumed after a failure
