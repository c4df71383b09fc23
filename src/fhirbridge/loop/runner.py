"""The Case state machine and the loop that works it.

    collect -> seal -> deliver -> await_opinion -> file -> done        (or failed / cancelled)

Each step is claimed (store.claim: atomic, leased), done, and recorded with an event in one store
transaction that also advances the step; the Task in the EHR is brought in line before each step. Every
step is safe to repeat: a worker that dies mid-step loses its lease and the step runs again from its
start (collect re-reads the EHR, seal rebuilds its staging directory, deliver is atomic/idempotent,
file is guarded by the Task version and identifiers; see writeback.py).

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

from fhirbridge import jsonutil

from fhirbridge.ehr import audit

from fhirbridge.loop import consent

from fhirbridge.ehr import task as ehr_task

from fhirbridge.ops import logs

from fhirbridge.ops import metrics
from fhirbridge.loop.collect import Collected, collect
from fhirbridge.ehr.context import App
from fhirbridge.crypto import jwe
from fhirbridge.exchange.transport import deliver
from fhirbridge.exchange.envelope import write_atomic
from fhirbridge.errors import CaseError, ConsentDenied, FhirbridgeError, FhirError
from fhirbridge.loop.intake import run_intake
from fhirbridge.loop.seal import package_dir, seal_case
from fhirbridge.store.store import FINAL_STEPS, Case, worker_id
from fhirbridge.ops.crashpoints import crash_point

log = logging.getLogger("fhirbridge.loop.runner")
NEXT = {"collect": "seal", "seal": "deliver", "deliver": "await_opinion", "file": "done"}
CANCELLING_STATUSES = ("revoked", "entered-in-error")
MAX_BACKOFF = 3600.0
LEASE_SECONDS = 300.0
COLLECTED_FILE = "collected.jwe"


def lease_seconds(app: App) -> float:
    """The lease on a claimed step: `[service] lease_seconds`, else LEASE_SECONDS."""
    return app.config.service.lease_seconds or LEASE_SECONDS


@dataclass
class RunReport:
    opened: int = 0
    steps_done: int = 0
    errors: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)


def run_pending(app: App, *, intake: bool = True, case_id: str | None = None,
                ignore_backoff: bool = False, stop: threading.Event | None = None,
                max_steps: int | None = None) -> RunReport:
    """Take in new orders (unless intake=False) and run every due step once. `stop`, when set, ends the loop
    after the step in hand (a service shutting down finishes what it started and takes nothing new)."""
    report = RunReport()
    if intake:
        app.progress("intake: looking for second-opinion orders in the EHR")
        try:
            result = run_intake(app)
            report.opened = len(result.opened)
            for case in result.opened:
                app.progress(f"  opened case {case.id[:8]} for {case.service_request}")
        except FhirbridgeError as exc:
            report.errors.append(f"intake: {exc}")
            app.progress(f"  intake failed: {exc}")
    for freed in app.store.release_dead_local_claims():
        app.progress(f"case {freed[:8]}: resuming after an interrupted run")
        app.store.add_event(freed, "resumed", {"reason": "the run holding it had stopped"})
    if ignore_backoff:
        app.store.clear_backoff(case_id)
    try:
        audit.send_pending(app)   # AuditEvents an earlier run could not write to the EHR
    except Exception as exc:  # noqa: BLE001 - the audit copy in the EHR never holds up the Cases
        log.warning("audit: could not send pending AuditEvents: %s", exc)
    worker = worker_id()
    while not (stop and stop.is_set()) and (max_steps is None or report.steps_done + len(report.errors) < max_steps) \
            and (case := app.store.claim(
            case_id=case_id, worker=worker, lease_seconds=lease_seconds(app), hospital=app.hospital.key)) is not None:
        started = time.monotonic()
        with logs.case_context(case.id):
            ok = run_step(app, case)
        fresh = app.store.get(case.id)
        metrics.step_finished(app, case, fresh, ok, time.monotonic() - started)
        log.info("%s: %s -> %s", case.step, "ok" if ok else "error", fresh.step,
                 extra={"case_id": case.id, "seconds": round(time.monotonic() - started, 3)})
        if ok:
            report.steps_done += 1
            if fresh.step in ("done", "await_opinion", "cancelled"):
                report.finished.append(case.id)
        else:
            report.errors.append(f"case {case.id[:8]} at {case.step}: {fresh.last_error}")
    return report


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
                if not self.app.store.renew(self.case.id, self.case.claimed_by, self.lease):
                    return
            except Exception:  # noqa: BLE001 - a store hiccup: the next tick tries again
                log.warning("case %s: could not renew its lease", self.case.id, extra={"case_id": self.case.id})

    def __enter__(self) -> "_LeaseKeeper":
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


class _Withdrawn(Exception):
    """The order was revoked, or the Task cancelled or rejected, in the EHR: the Case must stop."""


def run_step(app: App, case: Case) -> bool:
    step = case.step
    app.progress(f"case {case.id[:8]}: {step}")
    started = time.monotonic()
    try:
        with _LeaseKeeper(app, case):
            crash_point(f"{step}.begin")
            if not case.task:
                case = _ensure_task(app, case)
            if step == "collect":
                detail = _collect(app, case)
            elif step == "seal":
                detail = _seal(app, case)
            elif step == "deliver":
                detail = _deliver(app, case)
            elif step == "file":
                from fhirbridge.loop.writeback import file_opinion  # imported here: writeback imports workflow helpers
                detail = file_opinion(app, case)
                # The accounting of the write-back, before the step is recorded: once per opinion.
                audit.record_filed(app, case, detail.get("document_reference"))
            else:
                app.store.release(case.id, case.claimed_by)
                return True
    except _Withdrawn as exc:
        cancel(app, case, str(exc), worker=case.claimed_by)
        return True
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the Case, none is lost
        _record_failure(app, case, exc)
        return False
    # The write-back transaction completed the Task itself: reading it back to sync would cost a round trip.
    task_current = bool(detail.pop("task_completed", False))
    crash_point(f"{step}.end")
    nxt = detail.pop("next", NEXT[step])
    detail["seconds"] = round(time.monotonic() - started, 3)
    extra = detail.pop("columns", {})
    kind = f"{step}.done" if nxt == NEXT[step] else f"{step}.back"  # sent back a step (a work file was gone)
    done = app.store.finish_step(case.id, worker=case.claimed_by, expect_step=step, event_kind=kind,
                                 detail=detail, step=nxt, attempts=0, last_error=None, next_attempt_at=None, **extra)
    if done is None:
        # Someone else moved the Case on (our lease lapsed, or it was cancelled): our result is dropped.
        app.store.add_event(case.id, "step.discarded", {"step": step, "reason": "the claim was lost meanwhile"})
        return True
    crash_point(f"{step}.recorded")
    if not task_current:
        _sync_task(app, done)
    return True


def _record_failure(app: App, case: Case, exc: Exception) -> None:
    transient = _is_transient(exc)
    message = str(exc) if isinstance(exc, FhirbridgeError) else f"unexpected {exc.__class__.__name__}: {exc}"
    if not isinstance(exc, (FhirbridgeError, OSError, requests.RequestException)):
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
                                       step="failed", attempts=attempts, last_error=message)
        if failed:
            app.progress(f"  failed: {message}")
            _sync_task(app, failed)


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, FhirbridgeError):
        return bool(getattr(exc, "transient", False))
    return isinstance(exc, (OSError, requests.RequestException))


def _sync_task(app: App, case: Case, **kw) -> None:
    """Keep the EHR Task in line; a failure here is logged on the Case and repaired at the next step."""
    try:
        ehr_task.set_task_status(app, case, case.step, reason=case.last_error if case.step == "failed" else None,
                                 **kw)
    except ehr_task.TaskClosed as exc:
        cancel(app, case, str(exc))
    except Exception as exc:  # noqa: BLE001
        app.store.add_event(case.id, "task.sync_failed", {"error": str(exc)})


def _check_order(app: App, case: Case) -> dict:
    """Re-read the order before each outbound step: a revoked order must not be sent (BSeR: revoking the
    ServiceRequest cancels the referral)."""
    sr = app.ehr.read_ref(case.service_request)
    if sr.get("status") in CANCELLING_STATUSES:
        raise _Withdrawn(f"the order is {sr['status']} in the EHR")
    return sr


def _ensure_task(app: App, case: Case) -> Case:
    sr = app.ehr.read_ref(case.service_request)
    task = ehr_task.ensure_task(app, case, sr)
    return app.store.update(case.id, task=task, event_kind="task.created", detail={"task": task})


def _sync_before_step(app: App, case: Case) -> None:
    """Show the step on the Task; a Task cancelled or rejected in the EHR stops the Case instead."""
    try:
        ehr_task.set_task_status(app, case, case.step)
    except ehr_task.TaskClosed as exc:
        raise _Withdrawn(str(exc)) from None
    except FhirError as exc:
        if exc.transient:
            raise
        app.store.add_event(case.id, "task.sync_failed", {"error": str(exc)})


def _collect(app: App, case: Case) -> dict:
    sr = _check_order(app, case)
    _sync_before_step(app, case)
    consents = _check_consent(app, case, sr)
    collected = collect(app, sr, app.profile(case.profile), consents=consents)
    path = app.case_dir(case.id) / COLLECTED_FILE
    # Clinical content at rest is encrypted to the hospital's own key.
    write_atomic(path, jwe.encrypt_bytes(jsonutil.dumps(collected.as_dict()),
                                         app.hospital_keys.encryption_keys(), typ="fhirbridge-collected+jwe"))
    for w in collected.withheld:
        if w["reason"].startswith("invalid FHIR"):
            app.store.add_event(case.id, "invalid_resource", w)
    detail = {"counts": collected.counts(), "withheld": len(collected.withheld),
              "attachments": len(collected.attachments)}
    if consents.refs:
        detail["consents"] = consents.refs
    return detail


def _check_consent(app: App, case: Case, sr: dict) -> consent.Consents:
    """The patient's Consents for sending to this Case's reviewer. A whole denial (or a Consent that cannot be
    evaluated) is logged as `consent.denied` and raised: a permanent failure, so the Case ends failed with
    the reason on the Task, and nothing is sent."""
    try:
        return consent.check(app, sr["subject"]["reference"], app.config.reviewer(case.reviewer))
    except ConsentDenied as exc:
        app.store.add_event(case.id, "consent.denied", {"step": case.step, "consent": exc.consent})
        raise


def load_collected(app: App, case: Case) -> Collected:
    data = (app.case_dir(case.id) / COLLECTED_FILE).read_bytes()
    return Collected.from_dict(jsonutil.loads(jwe.decrypt_bytes(data, app.hospital_keys)))


def _seal(app: App, case: Case) -> dict:
    _check_order(app, case)
    if not (app.case_dir(case.id) / COLLECTED_FILE).exists():
        # Its work file is gone (a restored volume, a replica not on the shared data_dir): collect again.
        return {"next": "collect", "reason": "collected records missing from data_dir; collecting again"}
    _sync_before_step(app, case)
    package_id, summary = seal_case(app, case, load_collected(app, case))
    summary["columns"] = {"package_id": package_id}
    return summary


def _deliver(app: App, case: Case) -> dict:
    sr = _check_order(app, case)
    _sync_before_step(app, case)
    reviewer = app.config.reviewer(case.reviewer)
    if not (package_dir(app, case) / "package.jwe").exists():
        return {"next": "seal", "reason": "sealed package missing from data_dir; sealing again"}
    # A Consent recorded since collect must still stop the disclosure, or keep records back: one search,
    # and the collected records are only opened when the patient has a Consent that concerns this reviewer.
    consents = _check_consent(app, case, sr)
    if consents.rules and (not (app.case_dir(case.id) / COLLECTED_FILE).exists()
                           or consents.denies_any(load_collected(app, case).resources)):
        return {"next": "collect", "reason": "a patient Consent now keeps back records in the package; "
                                             "collecting again", "consents": consents.refs}
    detail = deliver(reviewer, package_dir(app, case), case.package_id)
    # The accounting of this disclosure (BALP), recorded before the step is: once per package, even when
    # the step is repeated; written to the EHR too when [audit] write_to_ehr (a failure there is retried).
    audit.record_disclosure(app, case, detail)
    detail["columns"] = {"due_at": time.time() + reviewer.turnaround_days * 86400}
    return detail


def flag_overdue(app: App) -> list[Case]:
    """Cases past their reviewer's turnaround target: flagged once, in the store and on the Task."""
    flagged = app.store.newly_overdue(app.hospital.key)
    for case in flagged:
        try:
            ehr_task.set_task_status(app, case, "overdue", only_from=("sent-to-reviewer",))
        except Exception as exc:  # noqa: BLE001 - the flag is in the store; the Task catches up later
            app.store.add_event(case.id, "task.sync_failed", {"error": str(exc)})
    return flagged


def cancel(app: App, case: Case, reason: str, *, worker: str | None = None) -> Case:
    """Cancel a Case that is not finished. From a worker (order revoked, Task cancelled in the EHR) only if it
    still holds the Case; from a person, whoever holds it: the holder's result is then dropped (finish_step)."""
    if worker:
        cancelled = app.store.finish_step(case.id, worker=worker, expect_step=case.step, event_kind="cancelled",
                                          detail={"reason": reason}, step="cancelled", last_error=reason)
    else:
        cancelled = app.store.cancel(case.id, reason)
    if cancelled is None:
        current = app.store.get(case.id)
        if current.step in FINAL_STEPS:
            raise CaseError(f"Case {case.id[:8]} is already {current.step}; nothing to cancel")
        return current
    try:
        ehr_task.set_task_status(app, cancelled, "cancelled", reason=reason)
    except Exception as exc:  # noqa: BLE001
        app.store.add_event(case.id, "task.sync_failed", {"error": str(exc)})
    return cancelled


def decline(app: App, case: Case, reason: str) -> Case:
    """The reviewer will not give this opinion: the Case ends and the Task becomes `rejected` with the
    reason (FHIR task-status: the potential performer refused), so the physician can refer elsewhere."""
    if case.step not in ("await_opinion", "deliver"):
        raise CaseError(f"Case {case.id[:8]} is {case.step}; only a Case awaiting an opinion can be declined")
    declined = app.store.finish_step(case.id, worker=case.claimed_by, expect_step=case.step, event_kind="declined",
                                     detail={"reason": reason}, step="declined", last_error=f"declined: {reason}")
    if declined is None:
        raise CaseError(f"Case {case.id[:8]} changed meanwhile; try again")
    try:
        ehr_task.set_task_status(app, declined, "declined", reason=reason)
    except Exception as exc:  # noqa: BLE001
        app.store.add_event(case.id, "task.sync_failed", {"error": str(exc)})
    return declined


def retry(app: App, case: Case) -> Case:
    """Put a failed Case back at the step that failed (after the cause is fixed)."""
    if case.step != "failed":
        return app.store.update(case.id, next_attempt_at=None, event_kind="retry", detail={"step": case.step})
    step = case.data.get("failed_step") or "collect"
    if step == "intake":
        # It failed before it could be routed (unknown reviewer or profile): route it again now.
        from fhirbridge.loop.intake import reroute
        return reroute(app, case)
    return app.store.update(case.id, step=step, next_attempt_at=None, attempts=0, event_kind="retry",
                            detail={"step": step})
