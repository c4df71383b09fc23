"""Outcomes from the chart (issue 18 part 2): for each filed opinion, follow the planned treatment it was about
and record what the chart shows became of it (docs/outcomes.md).

- **When the opinion is filed** (`record_filed`, called by the file step): a row is opened with the opinion's
  coded recommendation and concordance, read from the opinion document in hand, so no figure ever decrypts an
  opinion. No EHR call: filing is not held up by it. Opening twice (a repeated file step) keeps one row.
- **The follow-up tick** (`follow_outcomes`, service/scheduler.py every `service.outcomes_seconds`): a bounded
  page of one hospital's rows that are not closed and due, each claimed with a compare-and-set
  (store/outcomes.py), so replicas never check one twice at once. The first check reads the second-opinion
  order for the planned treatment (ehr/treatment.py); then each check reads the plan and searches the
  Procedures and replacing orders for a decision. A decision dated within the window closes the row; a row
  whose window (`outcomes.window_days` after filing) has passed with none closes as `none-in-window`.
- **Backfill**: Cases filed before this existed (or whose row could not be opened at filing) get their row from
  the accepted opinion file, a few per tick.

Why polling and not a subscription: a decision on a planned operation comes days to months after the opinion,
so an hourly look at only the open rows is cheap; an R4 Subscription would need one criteria per patient's
Procedures (or every Procedure of the hospital) and a reachable public URL, and a missed notification would be
lost without the poll anyway. sekmet serves R4 Subscriptions, but nothing here needs the latency they buy.

Nothing clinical is logged: the tick logs counts only; an error is recorded as its kind and HTTP status.
"""
from __future__ import annotations

import logging
import time

from fhirbridge.ehr.context import App
from fhirbridge.ehr.treatment import Finding, code_of, planned_treatment, what_happened
from fhirbridge.errors import FhirbridgeError, FhirError
from fhirbridge.exchange.conclusions import conclusions_of
from fhirbridge.loop.writeback import open_opinion
from fhirbridge.store.outcomes import CLOSED, OPEN, UNRESOLVED, Outcome
from fhirbridge.store.store import Case

log = logging.getLogger("fhirbridge.outcomes")
BATCH = 50              # rows checked per hospital per tick: a backlog is worked off over several ticks
BACKFILL = 10           # filed Cases without a row opened per hospital per tick
MAX_CLAIM = 600.0       # a worker that dies mid-check leaves its rows due again after this


def record_filed(app: App, case: Case, document: dict | None = None, *, now: float | None = None) -> bool:
    """Open the outcome row of a Case whose opinion is being filed (True when opened now). `document`: the
    opinion document, else read from the accepted opinion file."""
    now = time.time() if now is None else now
    if document is None:
        _claims, document = open_opinion(app, case)
    found = conclusions_of(document)
    return app.store.outcomes.open(
        case_id=case.id, hospital=case.hospital, reviewer=case.reviewer, profile=case.profile, patient=case.patient,
        order_ref=case.service_request, filed_at=now, window_ends=now + app.config.outcomes.window_days * 86400,
        recommendation=found.get("recommendation"), concordance=found.get("concordance"))


def follow_outcomes(app: App, *, now: float | None = None, limit: int = BATCH) -> dict[str, int]:
    """One tick for one hospital: backfill, then check up to `limit` due rows. Returns counts (no content)."""
    now = time.time() if now is None else now
    counts = {"opened": 0, "checked": 0, "closed": 0, "failed": 0}
    for case_id in app.store.outcomes.done_without_outcome(app.hospital.key, limit=BACKFILL):
        case = app.store.get(case_id)
        try:
            counts["opened"] += record_filed(app, case, now=case.updated_at)
        except FhirbridgeError as exc:
            # Opened without its codes rather than tried again every tick: the chart is still followed, and the
            # figures count the opinion as one without a coded recommendation.
            counts["opened"] += record_filed(app, case, {}, now=case.updated_at)
            log.warning("outcomes: the opinion of Case %s could not be read for its coded outcome (%s); followed "
                        "without it", case.id, type(exc).__name__)
    interval = app.config.service.outcomes_seconds
    for row in app.store.outcomes.claim_due(app.hospital.key, now=now, lease=min(interval, MAX_CLAIM), limit=limit):
        counts["checked"] += 1
        try:
            closed = check(app, row, now=now)
        except FhirbridgeError as exc:
            counts["failed"] += 1
            status = getattr(exc, "status", None)
            app.store.outcomes.record(row.case_id, now=now, next_check_at=now + interval,
                                      error=f"{type(exc).__name__} (HTTP {status or 'none'})")
            continue
        counts["closed"] += closed
    if counts["checked"] or counts["opened"]:
        log.debug("outcomes tick for %s: %s", app.hospital.name, counts)
    return counts


def check(app: App, row: Outcome, *, now: float) -> bool:
    """Look at the chart once for this row and record what was found; True when the row is closed now."""
    interval = app.config.service.outcomes_seconds
    store = app.store.outcomes
    plan, plan_code = row.plan, row.plan_code
    if row.state == UNRESOLVED:
        try:
            plan = planned_treatment(app.ehr.read_ref(row.order_ref))
        except FhirError as exc:
            if exc.status not in (404, 410):
                raise
            plan = None    # the order itself is gone: nothing names a plan any more
        if plan is None:
            # The order names no planned treatment: nothing to follow (counted apart in the figures).
            store.record(row.case_id, now=now, next_check_at=None, state=CLOSED, result="no-plan")
            return True
    assert plan is not None
    for _hop in range(5):   # re-orders of the same plan, followed (bounded: a loop of `replaces` ends)
        try:
            resource = app.ehr.read_ref(plan)
        except FhirError as exc:
            if exc.status in (404, 410):
                store.record(row.case_id, now=now, next_check_at=None, state=CLOSED, plan=plan, plan_code=plan_code,
                             result="plan-gone")
                return True
            raise
        plan_code = code_of(resource) or plan_code
        found = what_happened(app.ehr, plan, resource, patient=row.patient, since=row.filed_at)
        if found.follow is None:
            break
        plan, plan_code = found.follow, found.follow_code or plan_code
    else:
        found = Finding()
    decided = found.result is not None and (found.at is None or found.at <= row.window_ends)
    if decided:
        store.record(row.case_id, now=now, next_check_at=None, state=CLOSED, plan=plan, plan_code=plan_code,
                     result=found.result, result_ref=found.ref, decided_at=found.at if found.at is not None else now)
        return True
    if now >= row.window_ends:
        store.record(row.case_id, now=now, next_check_at=None, state=CLOSED, plan=plan, plan_code=plan_code,
                     result="none-in-window")
        return True
    store.record(row.case_id, now=now, next_check_at=min(now + interval, row.window_ends), state=OPEN, plan=plan,
                 plan_code=plan_code)
    return False
