"""What the chart says about a planned treatment: the order (or Procedure) a second opinion was about, and what
became of it. Reads only; the loop decides what to record (loop/outcomes.py, docs/outcomes.md).

The planned treatment is named on the second-opinion order itself: its `reasonReference` (HL7 FHIR Workflow:
the reason for the request, where a CDS Hooks `order-sign` Case puts the draft order it was started for) or its
`supportingInfo` (R4 ServiceRequest: "additional clinical information about the patient or specimen that may
influence the services or their results"), the first that points at a ServiceRequest or a Procedure.

What counts as a decision (R4 request-status and event-status):
- a Procedure `basedOn` the planned order (R4 Procedure.basedOn: "a reference to a resource that contains
  details of the request for this procedure"), or one with the planned code for the patient performed after the
  opinion and based on no other order, status `completed` or `stopped` (begun, so the operation was done):
  `performed`; `performed-other` when a Procedure basedOn the order carries a different code (a changed
  operation under the same order);
- a ServiceRequest whose `replaces` names the plan (R4 "the request takes the place of the referenced completed
  or terminated request(s)"): `replaced`, unless it orders the same code, which is the same plan re-ordered and
  is followed in its place;
- the order's status `completed` without a Procedure found (`completed`), `revoked` (`revoked`),
  `entered-in-error` (not a decision: left out of the figures); a planned Procedure `not-done` (`not-done`).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from fhirbridge.fhir.client import FhirClient
from fhirbridge.fhir.elements import parse_fhir_date

PLAN_TYPES = ("ServiceRequest", "Procedure")
PERFORMED_STATUSES = ("completed", "stopped")


@dataclass(frozen=True)
class Finding:
    """What one look at the chart found. `result` None: nothing decided yet."""
    result: str | None = None
    ref: str | None = None          # the Procedure or replacing order that shows it
    at: float | None = None         # when the chart says it happened (epoch seconds)
    follow: str | None = None       # a re-order of the same plan: follow this reference instead
    follow_code: str | None = None


def planned_treatment(order: dict) -> str | None:
    """The planned treatment a second-opinion order is about: "ServiceRequest/<id>" or "Procedure/<id>"."""
    own = f"ServiceRequest/{order.get('id')}"
    for element in ("reasonReference", "supportingInfo"):
        for ref in order.get(element) or []:
            value = ref.get("reference") if isinstance(ref, dict) else None
            if isinstance(value, str) and value.split("/", 1)[0] in PLAN_TYPES and value != own \
                    and value.count("/") == 1:
                return value
    return None


def code_of(resource: dict) -> str | None:
    """The first coding of the resource's `code` as "system|code" (how a token search names it)."""
    for c in (resource.get("code") or {}).get("coding") or []:
        if c.get("system") and c.get("code"):
            return f"{c['system']}|{c['code']}"
    return None


def epoch(value: object) -> float | None:
    parsed = parse_fhir_date(value) if isinstance(value, str) else None
    return parsed.timestamp() if parsed else None


def _performed_at(procedure: dict) -> float | None:
    return (epoch(procedure.get("performedDateTime")) or epoch((procedure.get("performedPeriod") or {}).get("start"))
            or epoch((procedure.get("meta") or {}).get("lastUpdated")))


def _changed_at(resource: dict) -> float | None:
    # R4 keeps no status history in the resource: the version that set the status is its last update.
    return epoch((resource.get("meta") or {}).get("lastUpdated"))


def _fhir_date(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")


def what_happened(ehr: FhirClient, plan_ref: str, plan: dict, *, patient: str, since: float) -> Finding:
    """One look at the chart for the planned treatment `plan` (as just read): the earliest decision found."""
    kind = plan_ref.split("/", 1)[0]
    status = plan.get("status")
    if kind == "Procedure":
        if status in PERFORMED_STATUSES:
            return Finding("performed", plan_ref, _performed_at(plan))
        if status == "not-done":
            return Finding("not-done", plan_ref, _changed_at(plan))
        if status == "entered-in-error":
            return Finding("entered-in-error", plan_ref, _changed_at(plan))
        return Finding()
    planned_code = code_of(plan)
    found: list[Finding] = []
    for proc in ehr.search("Procedure", {"based-on": plan_ref}):
        if proc.get("resourceType") == "Procedure" and proc.get("status") in PERFORMED_STATUSES:
            same = planned_code is None or code_of(proc) in (None, planned_code)
            found.append(Finding("performed" if same else "performed-other", f"Procedure/{proc['id']}",
                                 _performed_at(proc)))
    if planned_code is not None and not found:
        # The operation charted without its order named: the same code for the patient, on or after the opinion's
        # day (a date search is by day; the exact instant is compared below).
        for proc in ehr.search("Procedure", {"patient": patient, "code": planned_code,
                                             "date": f"ge{_fhir_date(since)}"}):
            at = _performed_at(proc)
            # One basedOn another order is that order's operation (the same code done twice, say for two
            # levels), not this plan's.
            other_order = any(isinstance(b, dict) and b.get("reference") not in (None, plan_ref)
                              for b in proc.get("basedOn") or [])
            if proc.get("resourceType") == "Procedure" and proc.get("status") in PERFORMED_STATUSES \
                    and at is not None and at >= since and not other_order:
                found.append(Finding("performed", f"Procedure/{proc['id']}", at))
    for sr in ehr.search("ServiceRequest", {"replaces": plan_ref}):
        if sr.get("resourceType") != "ServiceRequest" or sr.get("status") in ("entered-in-error", "draft"):
            continue
        at = epoch(sr.get("authoredOn")) or _changed_at(sr)
        if planned_code is not None and code_of(sr) == planned_code:
            return Finding(follow=f"ServiceRequest/{sr['id']}", follow_code=planned_code)
        found.append(Finding("replaced", f"ServiceRequest/{sr['id']}", at))
    if found:
        return min(found, key=lambda f: f.at if f.at is not None else float("inf"))
    if status == "completed":
        return Finding("completed", plan_ref, _changed_at(plan))
    if status in ("revoked", "entered-in-error"):
        return Finding(status, plan_ref, _changed_at(plan))
    return Finding()
