"""Intake: find active second-opinion ServiceRequests in the EHR and open exactly one Case per order.

Idempotent by construction: the Case id is derived from (the hospital's organisation identifier,
ServiceRequest id) (so moving the EHR's URL or renaming the hospital reopens nothing), the store has a
unique constraint on the order, and the Task is created conditionally on the Case identifier. Running
intake twice, or on two machines, opens no second Case and no second Task.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from fhirbridge.ehr import task as ehr_task
from fhirbridge.ehr.context import App, log
from fhirbridge.loop.actions import cancel
from fhirbridge.loop.routing import ACTIVE, profile_for, route_and_check
from fhirbridge.ops.crashpoints import crash_point
from fhirbridge.steps import FINAL_STEPS, Step
from fhirbridge.store.store import Case


@dataclass
class IntakeResult:
    opened: list[Case]
    existing: int
    skipped: list[str]  # "ServiceRequest/x: why"


def case_id_for(app: App, service_request_ref: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{app.hospital.key}/{service_request_ref}"))


def run_intake(app: App) -> IntakeResult:
    result = IntakeResult(opened=[], existing=0, skipped=[])
    params = {"status": ",".join(ACTIVE), "code": app.order_codes.search_token()}
    for sr in app.ehr.search("ServiceRequest", params):
        if sr.get("resourceType") != "ServiceRequest":
            continue
        ref = f"ServiceRequest/{sr['id']}"
        # A server that ignores an unsupported search parameter returns everything: check again here.
        if sr.get("status") not in ACTIVE or not app.order_codes.matches(sr):
            continue
        if sr.get("intent") not in ("order", "original-order", "instance-order", "filler-order"):
            result.skipped.append(f"{ref}: intent {sr.get('intent')!r} is not an order")
            continue
        case, created = open_case(app, sr)
        if created:
            result.opened.append(case)
        else:
            result.existing += 1
    return result


CURSOR = "service-requests"
POLL_OVERLAP = 120.0  # seconds the cursor stays behind the newest stamp seen (see _next_cursor)
INTAKE_HOLD = 60.0    # seconds a just-opened Case is kept from workers while intake finishes with it
WITHDRAWN = ("revoked", "entered-in-error")


@dataclass
class PollResult:
    polled: bool                      # False: another worker holds this hospital's poll
    opened: list[Case]
    cancelled: list[Case]
    seen: int
    cursor: str | None
    errors: list[str] = field(default_factory=list)


def poll(app: App, *, worker: str, lease_seconds: float = 300.0) -> PollResult:
    """Incremental intake: second-opinion ServiceRequests changed since the last poll (`_lastUpdated`
    cursor per hospital, claimed so only one replica polls it at a time). New active orders open a Case;
    a revoked or entered-in-error order cancels its Case (BSeR). The first poll takes every active order.

    `ge` rather than `gt` on the cursor: two orders can share a timestamp, and intake is idempotent, so
    seeing the newest one again costs nothing while skipping its twin would lose an order."""
    key = app.hospital.key
    claimed, cursor = app.store.claim_cursor(key, CURSOR, worker=worker, lease_seconds=lease_seconds)
    if not claimed:
        return PollResult(False, [], [], 0, cursor)
    result = PollResult(True, [], [], 0, cursor)
    failed_at: str | None = None
    try:
        params = {"code": app.order_codes.search_token(), "_sort": "_lastUpdated"}
        if cursor:
            params["_lastUpdated"] = f"ge{cursor}"
        else:
            params["status"] = ",".join(ACTIVE)
        newest = cursor
        for sr in app.ehr.search("ServiceRequest", params):
            if sr.get("resourceType") != "ServiceRequest" or not app.order_codes.matches(sr):
                continue
            result.seen += 1
            stamp = sr.get("meta", {}).get("lastUpdated")
            if stamp and (newest is None or stamp > newest):
                newest = stamp
            try:
                handled = order_changed(app, sr)
            except Exception as exc:  # noqa: BLE001 - one bad order must not stop intake of the others
                log.warning("intake of ServiceRequest/%s failed: %s", sr.get("id"), exc)
                result.errors.append(f"ServiceRequest/{sr.get('id')}: {exc}")
                if stamp and (failed_at is None or stamp < failed_at):
                    failed_at = stamp
                continue
            if handled is not None:
                (result.opened if handled[1] == "opened" else result.cancelled).append(handled[0])
        result.cursor = _next_cursor(cursor, newest, failed_at)
    except BaseException:
        app.store.release_cursor(key, CURSOR, worker=worker)
        raise
    app.store.save_cursor(key, CURSOR, worker=worker, value=result.cursor)
    return result


def _next_cursor(old: str | None, newest: str | None, failed_at: str | None) -> str | None:
    """Where the next poll starts: a safety window behind the newest stamp seen, because a server may stamp
    an order when its transaction starts and make it visible only when it commits, after a later-stamped
    one was already seen; never past an order that failed (it is seen again next time); never backwards."""
    if newest is None:
        return old
    candidate = _minus(newest, POLL_OVERLAP)
    if failed_at is not None and failed_at < candidate:
        candidate = failed_at
    return candidate if old is None or candidate > old else old


def _minus(stamp: str, seconds: float) -> str:
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (parsed - timedelta(seconds=seconds)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def order_changed(app: App, sr: dict) -> tuple[Case, str] | None:
    """One order seen by polling or by a subscription notification: the same idempotent step for both."""
    status = sr.get("status")
    if status in ACTIVE and sr.get("intent") in ("order", "original-order", "instance-order", "filler-order"):
        case, created = open_case(app, sr)
        return (case, "opened") if created else None
    if status in WITHDRAWN:
        known = app.store.find_by_order(app.hospital.key, f"ServiceRequest/{sr['id']}")
        if known and known.step not in FINAL_STEPS:
            return cancel(app, known, f"the order is {status} in the EHR"), "cancelled"
    return None


def open_case(app: App, sr: dict) -> tuple[Case, bool]:
    ref = f"ServiceRequest/{sr['id']}"
    hospital = app.hospital.key
    existing = app.store.find_by_order(hospital, ref)
    if existing:
        return existing, False
    case_id = case_id_for(app, ref)
    patient = sr.get("subject", {}).get("reference", "")
    profile = profile_for(app, sr)
    reviewer, problems = route_and_check(app, sr, profile)
    prior = _existing_task(app, case_id)
    case, created = app.store.open_case(case_id=case_id, hospital=hospital, service_request=ref,
                                        patient=patient or "unknown", reviewer=reviewer or "", profile=profile,
                                        # One lease at most: if intake dies here, the Case waits no longer
                                        # than a claimed step would.
                                        hold_seconds=min(INTAKE_HOLD, app.config.service.lease_seconds or INTAKE_HOLD))
    if not created:
        return case, False
    crash_point("intake.opened")
    log.info("case %s opened for %s (reviewer %s, profile %s)", case.id, ref, reviewer, profile,
             extra={"case_id": case.id})
    if prior is not None:
        return _adopt(app, case, prior), True
    if problems:
        message = "; ".join(problems)
        case = app.store.update(case.id, step=Step.FAILED.value, last_error=message, data={"failed_step": "intake"},
                                event_kind="failed", detail={"error": message})
        log.error("case %s failed at intake: %s (fix the configuration, then `fhirbridge retry %s`)", case.id,
                  message, case.id[:8], extra={"case_id": case.id, "step": "intake", "reason": message,
                                               "to_step": Step.FAILED.value})
    # The Task is created here when the EHR is reachable; if this fails the collect step creates it. An EHR
    # that allows no Task write (write plan task_write False) gets none: the Case's status lives in fhirbridge
    # (issue 14: there the POST Task answered 405 and the Case never started).
    if not app.write_plan.task_write:
        app.store.add_event(case.id, "task.none", {"reason": "the EHR allows no Task write; status is kept here"})
    else:
        _create_task(app, case, sr)
        case = app.store.get(case.id)
    if case.step == Step.COLLECT:
        case = app.store.update(case.id, next_attempt_at=None)  # intake is done with it: workers may start
    return case, True


def _create_task(app: App, case: Case, sr: dict) -> None:
    try:
        task = ehr_task.ensure_task(app, case, sr)
        case = app.store.update(case.id, task=task, event_kind="task.created", detail={"task": task})
        if case.step == Step.FAILED:
            ehr_task.set_task_status(app, case, Step.FAILED, reason=case.last_error)
    except Exception as exc:  # noqa: BLE001 - recorded; the next run retries through the collect step
        app.store.add_event(case.id, "task.deferred", {"error": str(exc)})


def _existing_task(app: App, case_id: str) -> dict | None:
    """A referral Task for this order that the store does not know: the store was lost or restored from an
    older backup. Found by the Case identifier (deterministic), so nothing already sent is sent again."""
    for task in app.ehr.search("Task", {"identifier": f"{ehr_task.CASE_ID_SYSTEM}|{case_id}"}):
        if task.get("resourceType") == "Task":
            if ehr_task.business_step(task) not in (None, "received", "collecting", "packaging"):
                return task
    return None


def _adopt(app: App, case: Case, task: dict) -> Case:
    code = ehr_task.business_step(task)
    task_ref = f"Task/{task['id']}"
    if task.get("status") == "completed":
        output = next((o.get("valueReference", {}).get("reference") for o in task.get("output", [])), None)
        return app.store.update(case.id, step=Step.DONE.value, task=task_ref, document_reference=output,
                                event_kind="adopted", detail={"task": task_ref, "task_status": "completed"})
    if task.get("status") in ("cancelled", "rejected"):
        return app.store.update(case.id, step=Step.CANCELLED.value, task=task_ref,
                                last_error=f"Task {task['status']} in the EHR",
                                event_kind="adopted", detail={"task": task_ref, "task_status": task["status"]})
    message = (f"the EHR already has this referral's {task_ref} at {code!r} but this service has no record of it "
               "(was the store lost or restored from an old backup?); nothing was sent again. Check with the "
               "reviewer, then `fhirbridge retry` to send it anew or `fhirbridge cancel`")
    log.error("case %s failed at intake: %s", case.id, message,
              extra={"case_id": case.id, "step": "intake", "reason": message, "to_step": Step.FAILED.value})
    return app.store.update(case.id, step=Step.FAILED.value, task=task_ref, last_error=message,
                            data={"failed_step": Step.COLLECT.value},
                            event_kind="adopted", detail={"task": task_ref, "task_status": task.get("status")})


