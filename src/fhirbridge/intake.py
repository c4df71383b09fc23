"""Intake: find active second-opinion ServiceRequests in the EHR and open exactly one Case per order.

Idempotent by construction: the Case id is derived from (EHR base URL, ServiceRequest id), the store has
a unique constraint on the order, and the Task is created conditionally on the Case identifier. Running
intake twice, or on two machines, opens no second Case and no second Task.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from . import ehr_task
from .context import App, log
from .mappings_load import profile_names
from .store import Case

# Statuses in which an order still wants a second opinion (FHIR request-status).
ACTIVE = ("active",)


@dataclass
class IntakeResult:
    opened: list[Case]
    existing: int
    skipped: list[str]  # "ServiceRequest/x: why"


def case_id_for(app: App, service_request_ref: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{app.config.hospital.key}/{service_request_ref}"))


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


def open_case(app: App, sr: dict) -> tuple[Case, bool]:
    ref = f"ServiceRequest/{sr['id']}"
    existing = app.store.find_by_order(app.config.hospital.key, ref)
    if existing:
        return existing, False
    patient = sr.get("subject", {}).get("reference", "")
    profile = profile_for(app, sr)
    reviewer, route_error = route(app, sr, profile)
    problems = []
    if not patient.startswith("Patient/"):
        problems.append(f"{ref} has no Patient subject")
    if profile not in profile_names(app.config.mappings_dir):
        problems.append(f"{ref} asks for collection profile {profile!r}, which is not in "
                        f"{app.config.mappings_dir / 'collect'}")
    if route_error:
        problems.append(route_error)
    case, created = app.store.open_case(case_id=case_id_for(app, ref), hospital=app.config.hospital.key,
                                        service_request=ref, patient=patient or "unknown", reviewer=reviewer or "",
                                        profile=profile)
    if not created:
        return case, False
    log.info("case %s opened for %s (reviewer %s, profile %s)", case.id, ref, reviewer, profile)
    if problems:
        case = app.store.update(case.id, step="failed", last_error="; ".join(problems), event_kind="failed",
                                detail={"error": "; ".join(problems)})
        return case, True
    # The Task is created here when the EHR is reachable; if this fails the collect step creates it.
    try:
        task = ehr_task.ensure_task(app, case, sr)
        case = app.store.update(case.id, task=task, event_kind="task.created", detail={"task": task})
    except Exception as exc:  # noqa: BLE001 - recorded; the next run retries through the collect step
        app.store.add_event(case.id, "task.deferred", {"error": str(exc)})
    return case, True


def profile_for(app: App, sr: dict) -> str:
    codes = app.order_codes
    for detail in sr.get("orderDetail", []):
        for c in detail.get("coding", []):
            if c.get("system") == codes.profile_system and c.get("code"):
                return c["code"]
    for ptype in [sr.get("performerType", {})]:
        for c in ptype.get("coding", []):
            profile = codes.profile_by_specialty.get((c.get("system"), c.get("code")))
            if profile:
                return profile
    return "default"


def route(app: App, sr: dict, profile: str) -> tuple[str | None, str | None]:
    """The reviewer named on the order (performer identifier), else one serving the profile, else the
    configured default. Returns (reviewer name, error)."""
    cfg = app.config
    for performer in sr.get("performer", []):
        ident = performer.get("identifier") or {}
        if ident.get("value"):
            named = cfg.reviewer_by_identifier(ident.get("system"), ident.get("value"))
            if named is None:
                return None, (f"ServiceRequest/{sr['id']} names reviewer {ident.get('value')!r}, "
                              "which is not configured in [[reviewers]]")
            return named.name, None
    serving = [r.name for r in cfg.reviewers.values() if profile in r.profiles]
    if serving:
        return serving[0], None
    if cfg.default_reviewer:
        return cfg.default_reviewer, None
    if len(cfg.reviewers) == 1:
        return next(iter(cfg.reviewers)), None
    return None, (f"no reviewer serves profile {profile!r} and routing.default_reviewer is not set in "
                  f"{cfg.file}")
