"""Routing: which reviewer and which collection profile an order gets (and again, after a fix, `reroute`).

An order that names a performer goes to that reviewer or to nobody; otherwise the profile (from the
order's orderDetail or specialty) picks a reviewer serving it, else the configured default.
"""
from __future__ import annotations

from fhirbridge.config.mappings import profile_names
from fhirbridge.config.terminology import same_system
from fhirbridge.ehr import task as ehr_task
from fhirbridge.ehr.context import App
from fhirbridge.errors import FhirError
from fhirbridge.steps import Step
from fhirbridge.store.store import Case

# Statuses in which an order still wants a second opinion (FHIR request-status).
ACTIVE = ("active",)


def route_and_check(app: App, sr: dict, profile: str) -> tuple[str | None, list[str]]:
    ref = f"ServiceRequest/{sr['id']}"
    problems = []
    if not sr.get("subject", {}).get("reference", "").startswith("Patient/"):
        problems.append(f"{ref} has no Patient subject")
    if profile not in profile_names(app.config.mappings_dir):
        problems.append(f"{ref} asks for collection profile {profile!r}, which is not in "
                        f"{app.config.mappings_dir / 'collect'}")
    reviewer, route_error = route(app, sr, profile)
    if route_error:
        problems.append(route_error)
    return reviewer, problems


def reroute(app: App, case: Case) -> Case:
    """Route a Case that failed at intake again (after the config was fixed) and send it on its way."""
    sr = app.ehr.read_ref(case.service_request)
    profile = profile_for(app, sr)
    reviewer, problems = route_and_check(app, sr, profile)
    if problems:
        return app.store.update(case.id, last_error="; ".join(problems), event_kind="retry.failed",
                                detail={"error": "; ".join(problems)})
    assert reviewer is not None  # route names one whenever it reports no error
    case = app.store.update(case.id, step=Step.COLLECT.value, reviewer=reviewer, profile=profile, attempts=0,
                            last_error=None, next_attempt_at=None, event_kind="retry",
                            detail={"step": Step.COLLECT.value, "reviewer": reviewer})
    if case.task:
        task = app.ehr.read_ref(case.task)
        task["owner"] = app.config.reviewer(reviewer).organization_ref()
        app.ehr.update(task, if_match=task.get("meta", {}).get("versionId"))
        ehr_task.set_task_status(app, case, "opened")
    return case


def profile_for(app: App, sr: dict) -> str:
    codes = app.order_codes
    for detail in sr.get("orderDetail", []):
        for c in detail.get("coding", []):
            # Orders placed before the profile code system had its canonical url carry the legacy urn.
            if same_system(c.get("system"), codes.profile_system) and c.get("code"):
                return c["code"]
    for ptype in [sr.get("performerType", {})]:
        for c in ptype.get("coding", []):
            profile = codes.profile_by_specialty.get((c.get("system"), c.get("code")))
            if profile:
                return profile
    return "default"


def route(app: App, sr: dict, profile: str) -> tuple[str | None, str | None]:
    """The reviewer named on the order, else one serving the profile, else the configured default.
    Returns (reviewer name, error).

    An order that names a performer goes to that reviewer or to nobody: falling back to routing by profile
    would send a patient's records to an organisation the physician did not choose."""
    cfg = app.config
    ref = f"ServiceRequest/{sr['id']}"
    for performer in sr.get("performer", []):
        identifiers = [performer["identifier"]] if performer.get("identifier") else []
        target = performer.get("reference", "")
        if target.startswith("Organization/") and not identifiers:
            try:
                identifiers = app.ehr.read_ref(target).get("identifier", [])
            except FhirError as exc:
                if exc.transient:
                    raise
                return None, f"{ref} names performer {target}, which the EHR cannot return ({exc.status})"
        for ident in identifiers:
            named = cfg.reviewer_by_identifier(ident.get("system"), ident.get("value"))
            if named:
                return named.name, None
        who = target or performer.get("display") or (identifiers[0].get("value") if identifiers else "?")
        return None, (f"{ref} names performer {who!r}, which is not a configured reviewer "
                      "(match is by organisation identifier in [[reviewers]].identifier)")
    serving = [r.name for r in cfg.reviewers.values() if profile in r.profiles]
    if serving:
        return serving[0], None
    if cfg.default_reviewer:
        return cfg.default_reviewer, None
    if len(cfg.reviewers) == 1:
        return next(iter(cfg.reviewers)), None
    return None, (f"no reviewer serves profile {profile!r} and routing.default_reviewer is not set in "
                  f"{cfg.file}")
