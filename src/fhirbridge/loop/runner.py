"""The runner: take in new orders, then claim each due step, run it, and record what it did.

    collect -> seal -> deliver -> await_opinion -> file -> done        (or failed / cancelled / declined)

One pass of `run_pending` reads top to bottom: intake, claims of runs that died, AuditEvents still owed
to the EHR, then the due steps one by one. Each step is claimed (store.claim: atomic, leased), run by its
function from `loop.table`, and recorded with an event in one store transaction that also advances the
step; the Task in the EHR is brought in line before (by the step's guards) and after. Every step is safe
to repeat: a worker that dies mid-step loses its lease and the step runs again from its start (collect
re-reads the EHR, seal rebuilds its staging directory, deliver is atomic/idempotent, file is guarded by
the Task version and identifiers; see loop/writeback.py).

Errors: a transient one (EHR down, 5xx, 429, timeout, full disk) leaves the Case at its step with
`last_error` and a backoff; the next run resumes it. A permanent one (bad key, invalid config, an
order the EHR says is invalid) marks the Case failed with the reason; `fhirbridge retry` resumes it.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import requests

from fhirbridge.ehr import audit
from fhirbridge.ehr.context import App
from fhirbridge.errors import FhirbridgeError
from fhirbridge.loop import guards
from fhirbridge.loop.actions import cancel, sync_task
from fhirbridge.loop.intake import run_intake
from fhirbridge.loop.result import StepResult
from fhirbridge.loop.table import RUN, next_of
from fhirbridge.ops import logs, metrics
from fhirbridge.ops.crashpoints import crash_point
from fhirbridge.steps import WORK_STEPS, Step, is_before
from fhirbridge.store.store import Case, worker_id

log = logging.getLogger("fhirbridge.loop.runner")
MAX_BACKOFF = 3600.0
LEASE_SECONDS = 300.0
# After these the Case leaves the runner's hands for now (the reviewer's turn, or the end).
HANDED_ON = (Step.DONE, Step.AWAIT_OPINION, Step.CANCELLED, Step.NEEDS_REVIEW)


def lease_seconds(app: App) -> float:
    """The lease on a claimed step: `[service] lease_seconds`, else LEASE_SECONDS."""
    return app.config.service.lease_seconds or LEASE_SECONDS


@dataclass
class RunReport:
    opened: int = 0                                      # Cases intake opened
    steps_done: int = 0                                  # step runs that ended without an error
    errors: list[str] = field(default_factory=list)      # "case 1234abcd at seal: why" (and intake's)
    finished: list[str] = field(default_factory=list)    # Case ids handed on (awaiting an opinion, done, cancelled)


def run_pending(app: App, *, intake: bool = True, case_id: str | None = None,
                ignore_backoff: bool = False, stop: threading.Event | None = None,
                max_steps: int | None = None) -> RunReport:
    """Take in new orders (unless intake=False) and run every due step once. `stop`, when set, ends the loop
    after the step in hand (a service shutting down finishes what it started and takes nothing new)."""
    report = RunReport()
    if intake:
        _take_in_orders(app, report)
    _resume_interrupted(app)
    if ignore_backoff:
        app.store.clear_backoff(case_id)
    _send_owed_audit_events(app, ignore_backoff=ignore_backoff)
    worker = worker_id()
    while not (stop and stop.is_set()) and (max_steps is None or report.steps_done + len(report.errors) < max_steps):
        case = app.store.claim(case_id=case_id, worker=worker, lease_seconds=lease_seconds(app),
                               hospital=app.hospital.key)
        if case is None:
            break
        _run_one(app, case, report)
    return report


def _take_in_orders(app: App, report: RunReport) -> None:
    app.progress("intake: looking for second-opinion orders in the EHR")
    try:
        result = run_intake(app)
    except FhirbridgeError as exc:
        report.errors.append(f"intake: {exc}")
        app.progress(f"  intake failed: {exc}")
        return
    report.opened = len(result.opened)
    for case in result.opened:
        app.progress(f"  opened case {case.id[:8]} for {case.service_request}")


def _resume_interrupted(app: App) -> None:
    """Claims held by a run of this machine that no longer exists are freed now, not when the lease ends."""
    for freed in app.store.release_dead_local_claims():
        app.progress(f"case {freed[:8]}: resuming after an interrupted run")
        app.store.add_event(freed, "resumed", {"reason": "the run holding it had stopped"})


def _send_owed_audit_events(app: App, *, ignore_backoff: bool) -> None:
    """AuditEvents an earlier write could not put in the EHR, whose retry time has come (all of them with
    `ignore_backoff`: `fhirbridge run --now`). A refusal stays owed, counted and shown; never a Case's error."""
    try:
        audit.send_pending(app, ignore_backoff=ignore_backoff)
    except Exception as exc:  # noqa: BLE001 - the audit copy in the EHR never holds up the Cases
        log.warning("audit: could not send pending AuditEvents: %s", exc)


def _run_one(app: App, case: Case, report: RunReport) -> None:
    started = time.monotonic()
    with logs.case_context(case.id):
        ok = run_step(app, case)
    seconds = time.monotonic() - started
    fresh = app.store.get(case.id)
    metrics.step_finished(app.hospital.name, case.reviewer, case.step, outcome(case.step, fresh.step, ok), seconds)
    _log_outcome(case, fresh, ok, seconds)
    if ok:
        report.steps_done += 1
        if fresh.step in HANDED_ON:
            report.finished.append(case.id)
    else:
        report.errors.append(f"case {case.id[:8]} at {case.step}: {fresh.last_error}")


def _log_outcome(case: Case, fresh: Case, ok: bool, seconds: float) -> None:
    """One line per step run, at the level an operator alerts on: a Case that moved is INFO (one line per
    transition), a failure that will be retried WARNING, a Case that failed for good ERROR. A failure names
    the Case and the reason (last_error: written to name resources by type/id, never their content)."""
    extra = {"case_id": case.id, "step": case.step, "seconds": round(seconds, 3)}
    if ok:
        level = logging.INFO if fresh.step != case.step else logging.DEBUG
        log.log(level, "%s: ok -> %s", case.step, fresh.step, extra=extra)
    elif fresh.step == Step.FAILED:
        log.error("case %s failed at %s: %s (fix the cause, then `fhirbridge retry %s`)", case.id, case.step,
                  fresh.last_error, case.id[:8], extra={**extra, "reason": fresh.last_error, "to_step": fresh.step})
    else:
        wait = round(fresh.next_attempt_at - time.time()) if fresh.next_attempt_at else None
        log.warning("case %s: %s failed, will retry%s: %s", case.id, case.step,
                    f" in {wait} s" if wait is not None else "", fresh.last_error,
                    extra={**extra, "reason": fresh.last_error, "attempts": fresh.attempts, "retry_in": wait})


def outcome(step: str, now_at: str, ok: bool) -> str:
    """How one run of `step` ended, as metrics label it (ops.metrics.OUTCOMES)."""
    if step in WORK_STEPS and now_at == next_of(step):
        return "done"
    if now_at in (Step.FAILED, Step.CANCELLED, Step.NEEDS_REVIEW):
        return now_at
    if not ok:
        return "retry"
    if is_before(now_at, step):
        return "back"
    return "other"


class _LeaseKeeper:
    """Renews the claim while a step runs, so a slow step (a slow EHR, a large attachment) is not taken
    over by another worker half-way; stops when the step ends or the claim is lost."""

    def __init__(self, app: App, case: Case):
        self.app, self.case, self.stop = app, case, threading.Event()
        self.lease = lease_seconds(app)
        self.thread = threading.Thread(target=self._run, name=f"lease-{case.id[:8]}", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.lease / 3):
            try:
                if not self.app.store.renew(self.case.id, str(self.case.claimed_by), self.lease):
                    return
            except Exception:  # noqa: BLE001 - a store hiccup: the next tick tries again
                log.warning("case %s: could not renew its lease", self.case.id, extra={"case_id": self.case.id})

    def __enter__(self) -> _LeaseKeeper:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def run_step(app: App, case: Case) -> bool:
    """Run the claimed Case's step once and record it. False: it failed (recorded on the Case)."""
    step = case.step
    app.progress(f"case {case.id[:8]}: {step}")
    started = time.monotonic()
    run = RUN.get(Step(step)) if step in WORK_STEPS else None
    if run is None:   # claimed at a step nothing of ours runs (a filter that let it through): hand it back
        app.store.release(case.id, case.claimed_by)
        return True
    try:
        with _LeaseKeeper(app, case):
            crash_point(f"{step}.begin")
            if not case.task and app.write_plan.task_write:
                case = guards.ensure_task(app, case)
            result = run(app, case)
    except guards.Withdrawn as exc:
        cancel(app, case, str(exc), worker=case.claimed_by)
        return True
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the Case, none is lost
        _record_failure(app, case, exc)
        return False
    crash_point(f"{step}.end")
    _record_success(app, case, result, seconds=time.monotonic() - started)
    return True


def _record_success(app: App, case: Case, result: StepResult, *, seconds: float) -> None:
    step = case.step
    nxt = result.back_to or next_of(step)
    kind = f"{step}.back" if result.back_to else f"{step}.done"   # back: a work file was gone
    if result.question and nxt == Step.NEEDS_REVIEW:
        kind = "needs_review"                                     # a person must check the chart
    elif nxt == Step.AWAIT_RECORDS:
        kind = "checklist.held"                                   # a profile waits for required records
    detail = {**result.detail, "seconds": round(seconds, 3)}
    done = app.store.finish_step(case.id, worker=case.claimed_by, expect_step=step, event_kind=kind,
                                 detail=detail, step=nxt.value, attempts=0, last_error=result.question,
                                 next_attempt_at=None, **result.columns())
    if done is None:
        # Someone else moved the Case on (our lease lapsed, or it was cancelled): our result is dropped.
        app.store.add_event(case.id, "step.discarded", {"step": step, "reason": "the claim was lost meanwhile"})
        return
    crash_point(f"{step}.recorded")
    # The write-back transaction completed the Task itself: reading it back to sync would cost a round trip.
    if not result.task_current:
        sync_task(app, done)


def _record_failure(app: App, case: Case, exc: Exception) -> None:
    transient = is_transient(exc)
    message = str(exc) if isinstance(exc, FhirbridgeError) else f"unexpected {exc.__class__.__name__}: {exc}"
    if not isinstance(exc, FhirbridgeError | OSError | requests.RequestException):
        log.exception("case %s: unexpected error at %s", case.id, case.step)
    attempts = case.attempts + 1
    if transient:
        delay = min(30.0 * 2 ** (attempts - 1), MAX_BACKOFF)
        recorded = app.store.finish_step(case.id, worker=case.claimed_by, expect_step=case.step, event_kind="error",
                                         detail={"step": case.step, "error": message, "transient": True,
                                                 "retry_in": delay},
                                         attempts=attempts, last_error=message, next_attempt_at=time.time() + delay)
        if recorded:
            app.progress(f"  will retry: {message}")
    else:
        failed = app.store.finish_step(case.id, worker=case.claimed_by, expect_step=case.step, event_kind="failed",
                                       detail={"step": case.step, "error": message}, data={"failed_step": case.step},
                                       step=Step.FAILED.value, attempts=attempts, last_error=message)
        if failed:
            app.progress(f"  failed: {message}")
            sync_task(app, failed)


def is_transient(exc: Exception) -> bool:
    if isinstance(exc, FhirbridgeError):
        return bool(getattr(exc, "transient", False))
    return isinstance(exc, OSError | requests.RequestException)
