"""What people and the EHR do to a Case from outside its steps: cancel, decline, retry, resolve, flag it overdue;
and the Task sync that follows each of them (and each recorded step)."""
from __future__ import annotations

import logging

from fhirbridge.ehr import task as ehr_task
from fhirbridge.ehr.context import App
from fhirbridge.errors import CaseError, FhirError
from fhirbridge.loop import checklist
from fhirbridge.loop.routing import reroute
from fhirbridge.steps import FINAL_STEPS, Step
from fhirbridge.store.store import Case

log = logging.getLogger("fhirbridge.loop.actions")


def _moved(before: Case, after: Case, why: str) -> None:
    """The one INFO line of a transition made from outside the steps (the runner logs the steps')."""
    log.info("case %s: %s -> %s (%s)", after.id, before.step, after.step, why,
             extra={"case_id": after.id, "from_step": before.step, "to_step": after.step})


def sync_task(app: App, case: Case) -> None:
    """Keep the EHR Task in line; a failure here is logged on the Case and repaired at the next step."""
    try:
        ehr_task.set_task_status(app, case, case.step,
                                 reason=case.last_error if case.step == Step.FAILED else None)
    except ehr_task.TaskClosed as exc:
        cancel(app, case, str(exc))
    except Exception as exc:  # noqa: BLE001 - the Task is a mirror; the Case in the store is the record
        app.store.add_event(case.id, "task.sync_failed", {"error": str(exc)})


def _mirror(app: App, case: Case, step: str, reason: str) -> None:
    try:
        ehr_task.set_task_status(app, case, step, reason=reason)
    except Exception as exc:  # noqa: BLE001 - the Task is a mirror; the Case in the store is the record
        app.store.add_event(case.id, "task.sync_failed", {"error": str(exc)})


def cancel(app: App, case: Case, reason: str, *, worker: str | None = None, by: str | None = None) -> Case:
    """Cancel a Case that is not finished. From a worker (order revoked, Task cancelled in the EHR) only if it
    still holds the Case; from a person, whoever holds it: the holder's result is then dropped (finish_step)."""
    if worker:
        cancelled = app.store.finish_step(case.id, worker=worker, expect_step=case.step, event_kind="cancelled",
                                          detail={"reason": reason}, step=Step.CANCELLED.value, last_error=reason)
    else:
        cancelled = app.store.cancel(case.id, reason, by=by)
    if cancelled is None:
        current = app.store.get(case.id)
        if current.step in FINAL_STEPS:
            raise CaseError(f"Case {case.id[:8]} is already {current.step}; nothing to cancel")
        return current
    if not worker:   # a worker's cancel is the step's outcome: the runner logs that transition
        _moved(case, cancelled, "cancelled")
    _mirror(app, cancelled, Step.CANCELLED, reason)
    return cancelled


def decline(app: App, case: Case, reason: str) -> Case:
    """The reviewer will not give this opinion: the Case ends and the Task becomes `rejected` with the
    reason (FHIR task-status: the potential performer refused), so the physician can refer elsewhere."""
    if case.step not in (Step.AWAIT_OPINION, Step.DELIVER):
        raise CaseError(f"Case {case.id[:8]} is {case.step}; only a Case awaiting an opinion can be declined")
    declined = app.store.finish_step(case.id, worker=case.claimed_by, expect_step=case.step, event_kind="declined",
                                     detail={"reason": reason}, step=Step.DECLINED.value,
                                     last_error=f"declined: {reason}")
    if declined is None:
        raise CaseError(f"Case {case.id[:8]} changed meanwhile; try again")
    _moved(case, declined, "declined by the reviewer")
    _mirror(app, declined, Step.DECLINED, reason)
    return declined


def retry(app: App, case: Case, *, by: str | None = None) -> Case:
    """Put a failed Case back at the step that failed (after the cause is fixed); a Case still under way
    only loses its backoff. A finished one (done, cancelled, declined) is refused: nothing would run it.
    `by`: who asked (a staff sign-in's name), kept in the event for the Case's timeline."""
    who = {"by": by} if by else {}
    if case.step in FINAL_STEPS:
        raise CaseError(f"Case {case.id[:8]} is {case.step}, a final state: there is nothing to retry "
                        "(place a new order to refer the patient again)")
    if case.step == Step.AWAIT_RECORDS:
        # Held for required records (issue 16 part 6): retrying reads the chart again.
        return checklist.collect_again(app, case, by=by or "retry")
    if case.step != Step.FAILED:
        return app.store.update(case.id, next_attempt_at=None, event_kind="retry", detail={"step": case.step, **who})
    step = case.data.get("failed_step") or Step.COLLECT.value
    if step == "intake":
        # It failed before it could be routed (unknown reviewer or profile): route it again now.
        after = reroute(app, case)
    else:
        after = app.store.update(case.id, step=step, next_attempt_at=None, attempts=0, event_kind="retry",
                                 detail={"step": step, **who})
    if after.step != case.step:
        _moved(case, after, "retried")
    return after


def flag_overdue(app: App) -> list[Case]:
    """Cases past their reviewer's turnaround target: flagged once, in the store and on the Task."""
    flagged = app.store.newly_overdue(app.hospital.key)
    for case in flagged:
        try:
            ehr_task.set_task_status(app, case, "overdue", only_from=(ehr_task.STATUS[Step.AWAIT_OPINION][1],))
        except Exception as exc:  # noqa: BLE001 - the flag is in the store; the Task catches up later
            app.store.add_event(case.id, "task.sync_failed", {"error": str(exc)})
    return flagged


def resolve(app: App, case: Case, *, filed: str | None) -> Case:
    """A person's answer to a Case at needs_review (loop/post_writes.py): the write in question is in the chart
    as `filed` ("DocumentReference/<id>", checked to be this Case's), or it is not (`filed` None: it is sent
    once more). Either way the Case goes back to `file`, which goes on from the write ledger."""
    if case.step != Step.NEEDS_REVIEW:
        raise CaseError(f"Case {case.id[:8]} is {case.step}; only a Case that needs review can be resolved")
    open_rows = {k: r for k, r in app.store.ledger(case.id).items() if r["state"] == "sent"}
    kind = next((k for k in ("DocumentReference", "Provenance") if k in open_rows), None)
    if kind is None:
        raise CaseError(f"Case {case.id[:8]} has no write whose outcome is unknown; `fhirbridge retry` it")
    row = open_rows[kind]
    if filed is not None:
        if not filed.startswith(f"{kind}/"):
            raise CaseError(f"the question is about a {kind}: give --filed {kind}/<id>")
        try:
            res = app.ehr.read_ref(filed)
        except FhirError as exc:
            raise CaseError(f"could not read {filed} in the EHR ({exc}); check the id") from None
        problem = _not_ours(case, kind, res, row["identifier"])
        if problem:
            raise CaseError(f"{filed} is not this Case's {kind}: {problem}")
        app.store.ledger_record(case.id, kind, identifier=row["identifier"], state="confirmed", server_id=filed)
    else:
        app.store.ledger_record(case.id, kind, identifier=row["identifier"], state="intended")
    return app.store.update(case.id, step=Step.FILE.value, last_error=None, next_attempt_at=None, attempts=0,
                            event_kind="resolved", detail={"write": kind, "filed": filed or False})


def _not_ours(case: Case, kind: str, res: dict, identifier: str) -> str | None:
    if res.get("resourceType") != kind:
        return f"it is a {res.get('resourceType')}"
    if kind == "DocumentReference":
        related = {r.get("reference") for r in (res.get("context") or {}).get("related", [])}
        if (res.get("subject") or {}).get("reference") != case.patient or case.service_request not in related:
            return "it is on another patient or order"
        system, _, value = identifier.partition("|")
        if not any(i.get("system") == system and i.get("value") == value for i in res.get("identifier", [])):
            return "it does not carry this opinion's identifier"
        return None
    target = identifier.partition("|")[0]
    if target not in {t.get("reference") for t in res.get("target", [])}:
        return f"it does not target {target}"
    return None
