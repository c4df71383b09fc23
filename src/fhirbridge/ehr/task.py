"""The Task in the EHR that shows where a referral stands (HL7 BSeR / FHIR Workflow "fulfill" Task).

Task: intent order, code fulfill (http://hl7.org/fhir/CodeSystem/task-code), focus -> the ServiceRequest,
for -> the Patient, owner -> the reviewer organisation (logical reference by identifier: the reviewer need
not exist as an Organization in the hospital's EHR), requester -> the ordering practitioner.
`status` follows FHIR task-status; `businessStatus` names the finer step (BSeR uses it the same way).
"""
from __future__ import annotations

from datetime import UTC, datetime

from fhirbridge.ehr.context import App
from fhirbridge.errors import FhirError
from fhirbridge.steps import FLOW
from fhirbridge.store.store import Case

TASK_CODE = {"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill",
             "display": "Fulfill the focal request"}
CASE_ID_SYSTEM = "urn:fhirbridge:case"
BUSINESS_SYSTEM = "urn:fhirbridge:codes:referral-step"

# Case step (and two moments that are not steps) -> (Task.status, businessStatus code, display). The steps'
# come from the one table, steps.FLOW.
STATUS: dict[str, tuple[str, str, str]] = {
    "opened": ("requested", "received", "Order received by the second-opinion service"),
    **{step.value: (flow.task_status, flow.business, flow.display) for step, flow in FLOW.items()},
    "overdue": ("in-progress", "overdue", "Awaiting opinion, past the reviewer's turnaround target"),
}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def case_identifier(case_id: str) -> dict:
    return {"system": CASE_ID_SYSTEM, "value": case_id,
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "FILL",
                                 "display": "Filler Identifier"}]}}


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
        "identifier": [case_identifier(case.id)] + [i for i in service_request.get("identifier", [])
                                                    if _is_placer(i)],
        "basedOn": [{"reference": case.service_request}],
        "status": status,
        "businessStatus": _business(code, display),
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


def _business(code: str, display: str) -> dict:
    return {"coding": [{"system": BUSINESS_SYSTEM, "code": code, "display": display}], "text": display}


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
        coding: dict = next(iter(task.get("businessStatus", {}).get("coding", [])), {})
        current_code = coding.get("code")
        if task.get("status") == status and current_code == code and not reason and not output:
            return task
        # A completed Task (the opinion is filed) is never reopened by a late sync or flag; a conditional
        # update (only_from) applies only while the Task still shows one of those finer steps.
        if task.get("status") == "completed" and status != "completed":
            return task
        if only_from is not None and current_code not in only_from:
            return task
        _apply(task, status, code, display, reason, output)
        try:
            return app.ehr.update(task, if_match=task.get("meta", {}).get("versionId"))
        except FhirError as exc:
            if exc.status not in (409, 412) or attempt == 2:
                raise
    return None


def _apply(task: dict, status: str, code: str, display: str, reason: str | None, output: list | None) -> None:
    task["status"] = status
    task["businessStatus"] = _business(code, display)
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
