"""Before each outbound step (collect, seal, deliver): the order still stands, the Task shows the step, and
the patient's Consents still allow the disclosure. A guard that fails raises; the runner records it."""
from __future__ import annotations

from fhirbridge.ehr import task as ehr_task
from fhirbridge.ehr.context import App
from fhirbridge.errors import ConsentDenied, FhirError
from fhirbridge.loop import consent
from fhirbridge.loop.routing import ACTIVE, profile_for, route
from fhirbridge.store.store import Case

# FHIR request-status values that end a referral: BSeR, revoking the ServiceRequest cancels it.
CANCELLING_STATUSES = ("revoked", "entered-in-error")


class Withdrawn(Exception):
    """The order was revoked, or the Task cancelled or rejected, in the EHR: the Case must stop."""


def check_order(app: App, case: Case) -> dict:
    """Re-read the order before each outbound step; it must still be the order this Case was opened for.

    Whatever opened the Case (a poll, or a Subscription notification whose content an attacker may have
    forged), nothing is sent unless the EHR's own copy of the order, read now, is an active second-opinion
    order for the Case's patient that still routes to the Case's reviewer and profile. Anything else stops
    the Case with the reason (BSeR: revoking the ServiceRequest cancels the referral)."""
    sr = app.ehr.read_ref(case.service_request)
    if sr.get("status") in CANCELLING_STATUSES:
        raise Withdrawn(f"the order is {sr['status']} in the EHR")
    problem = order_mismatch(app, case, sr)
    if problem:
        raise Withdrawn(f"the order no longer matches this referral: {problem}; nothing was sent")
    return sr


def order_mismatch(app: App, case: Case, sr: dict) -> str | None:
    """Why the EHR's order `sr` is not (or no longer) the one the Case was opened for; None when it is."""
    if sr.get("resourceType") != "ServiceRequest":
        return f"{case.service_request} is a {sr.get('resourceType')}"
    if sr.get("status") not in ACTIVE:
        return f"it is {sr.get('status')!r}, not active"
    if not app.order_codes.matches(sr):
        return "it is not a second-opinion order (its code is not in mappings/codes/orders.toml)"
    subject = (sr.get("subject") or {}).get("reference")
    if subject != case.patient:
        return "its subject is not the Case's patient"
    profile = profile_for(app, sr)
    if profile != case.profile:
        return f"it asks for profile {profile!r}, the Case was collected for {case.profile!r}"
    reviewer, _error = route(app, sr, profile)
    if reviewer != case.reviewer:
        return "it now names another reviewer (or none that is configured)"
    return None


def ensure_task(app: App, case: Case) -> Case:
    """The Task intake could not create (the EHR was down then): created now, conditionally."""
    sr = app.ehr.read_ref(case.service_request)
    task = ehr_task.ensure_task(app, case, sr)
    return app.store.update(case.id, task=task, event_kind="task.created", detail={"task": task})


def show_step_on_task(app: App, case: Case) -> None:
    """Show the step on the Task; a Task cancelled or rejected in the EHR stops the Case instead."""
    try:
        ehr_task.set_task_status(app, case, case.step)
    except ehr_task.TaskClosed as exc:
        raise Withdrawn(str(exc)) from None
    except FhirError as exc:
        if exc.transient:
            raise
        app.store.add_event(case.id, "task.sync_failed", {"error": str(exc)})


def check_consent(app: App, case: Case, sr: dict) -> consent.Consents:
    """The patient's Consents for sending to this Case's reviewer. A whole denial (or a Consent that cannot be
    evaluated) is logged as `consent.denied` and raised: a permanent failure, so the Case ends failed with
    the reason on the Task, and nothing is sent."""
    try:
        return consent.check(app, sr["subject"]["reference"], app.config.reviewer(case.reviewer))
    except ConsentDenied as exc:
        app.store.add_event(case.id, "consent.denied", {"step": case.step, "consent": exc.consent})
        raise
