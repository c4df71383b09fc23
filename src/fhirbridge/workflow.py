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
import time
from dataclasses import dataclass, field

import requests

from . import ehr_task, jsonutil
from .collect import Collected, collect
from .context import App
from .crypto import jwe
from .deliver import deliver
from .envelope import write_atomic
from .errors import FhirbridgeError
from .intake import run_intake
from .seal import package_dir, seal_case
from .store import Case

log = logging.getLogger("fhirbridge.workflow")
NEXT = {"collect": "seal", "seal": "deliver", "deliver": "await_opinion", "file": "done"}
CANCELLING_STATUSES = ("revoked", "entered-in-error")
MAX_BACKOFF = 3600.0
COLLECTED_FILE = "collected.jwe"


@dataclass
class RunReport:
    opened: int = 0
    steps_done: int = 0
    errors: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)


def run_pending(app: App, *, intake: bool = True, case_id: str | None = None,
                ignore_backoff: bool = False) -> RunReport:
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
    while (case := app.store.claim(case_id=case_id)) is not None:
        ok = run_step(app, case)
        if ok:
            report.steps_done += 1
            fresh = app.store.get(case.id)
            if fresh.step in ("done", "await_opinion", "cancelled"):
                report.finished.append(case.id)
        else:
            report.errors.append(f"case {case.id[:8]} at {case.step}: {app.store.get(case.id).last_error}")
    return report


def run_step(app: App, case: Case) -> bool:
    step = case.step
    app.progress(f"case {case.id[:8]}: {step}")
    started = time.monotonic()
    try:
        if not case.task:
            case = _ensure_task(app, case)
        if step == "collect":
            detail = _collect(app, case)
        elif step == "seal":
            detail = _seal(app, case)
        elif step == "deliver":
            detail = _deliver(app, case)
        elif step == "file":
            from .writeback import file_opinion  # imported here: writeback imports workflow helpers
            detail = file_opinion(app, case)
        else:
            app.store.release(case.id)
            return True
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the Case, none is lost
        _record_failure(app, case, exc)
        return False
    if detail.get("cancelled"):
        return True
    nxt = detail.pop("next", NEXT[step])
    detail["seconds"] = round(time.monotonic() - started, 3)
    extra = detail.pop("columns", {})
    case = app.store.update(case.id, step=nxt, attempts=0, last_error=None, next_attempt_at=None,
                            claimed_by=None, claimed_until=None, event_kind=f"{step}.done", detail=detail,
                            **extra)
    _sync_task(app, case)
    return True


def _record_failure(app: App, case: Case, exc: Exception) -> None:
    transient = _is_transient(exc)
    message = str(exc) if isinstance(exc, FhirbridgeError) else f"unexpected {exc.__class__.__name__}: {exc}"
    if not isinstance(exc, (FhirbridgeError, OSError, requests.RequestException)):
        log.exception("case %s: unexpected error at %s", case.id, case.step)
    attempts = case.attempts + 1
    if transient:
        delay = min(30.0 * 2 ** (attempts - 1), MAX_BACKOFF)
        app.store.update(case.id, attempts=attempts, last_error=message, next_attempt_at=time.time() + delay,
                         claimed_by=None, claimed_until=None, event_kind="error",
                         detail={"step": case.step, "error": message, "transient": True, "retry_in": delay})
        app.progress(f"  will retry: {message}")
    else:
        failed = app.store.update(case.id, step="failed", attempts=attempts, last_error=message,
                                  claimed_by=None, claimed_until=None, data={"failed_step": case.step},
                                  event_kind="failed", detail={"step": case.step, "error": message})
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
    except Exception as exc:  # noqa: BLE001
        app.store.add_event(case.id, "task.sync_failed", {"error": str(exc)})


def _ensure_task(app: App, case: Case) -> Case:
    sr = app.ehr.read_ref(case.service_request)
    task = ehr_task.ensure_task(app, case, sr)
    return app.store.update(case.id, task=task, event_kind="task.created", detail={"task": task})


def _collect(app: App, case: Case) -> dict:
    sr = app.ehr.read_ref(case.service_request)
    if sr.get("status") in CANCELLING_STATUSES:
        cancel(app, case, f"the order is {sr['status']} in the EHR")
        return {"cancelled": True}
    _sync_task(app, case)
    collected = collect(app, sr, app.profile(case.profile))
    path = app.case_dir(case.id) / COLLECTED_FILE
    # Clinical content at rest is encrypted to the hospital's own key.
    write_atomic(path, jwe.encrypt_bytes(jsonutil.dumps(collected.as_dict()),
                                         app.hospital_keys.encryption_keys(), typ="fhirbridge-collected+jwe"))
    for w in collected.withheld:
        if w["reason"].startswith("invalid FHIR"):
            app.store.add_event(case.id, "invalid_resource", w)
    return {"counts": collected.counts(), "withheld": len(collected.withheld),
            "attachments": len(collected.attachments)}


def load_collected(app: App, case: Case) -> Collected:
    data = (app.case_dir(case.id) / COLLECTED_FILE).read_bytes()
    return Collected.from_dict(jsonutil.loads(jwe.decrypt_bytes(data, app.hospital_keys)))


def _seal(app: App, case: Case) -> dict:
    _sync_task(app, case)
    package_id, summary = seal_case(app, case, load_collected(app, case))
    summary["columns"] = {"package_id": package_id}
    return summary


def _deliver(app: App, case: Case) -> dict:
    _sync_task(app, case)
    return deliver(app.config.reviewer(case.reviewer), package_dir(app, case), case.package_id)


def cancel(app: App, case: Case, reason: str) -> Case:
    case = app.store.update(case.id, step="cancelled", last_error=reason, claimed_by=None, claimed_until=None,
                            event_kind="cancelled", detail={"reason": reason})
    try:
        ehr_task.set_task_status(app, case, "cancelled", reason=reason)
    except Exception as exc:  # noqa: BLE001
        app.store.add_event(case.id, "task.sync_failed", {"error": str(exc)})
    return case


def retry(app: App, case: Case) -> Case:
    """Put a failed Case back at the step that failed (after the cause is fixed)."""
    if case.step != "failed":
        return app.store.update(case.id, next_attempt_at=None, event_kind="retry", detail={"step": case.step})
    step = case.data.get("failed_step") or "collect"
    return app.store.update(case.id, step=step, next_attempt_at=None, attempts=0, event_kind="retry",
                            detail={"step": step})
