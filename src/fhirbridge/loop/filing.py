"""The file step: the received opinion filed in the chart by the write plan chosen for this EHR
(ehr/write_plan.py): ATOMIC (loop/writeback.py: one transaction) or LEDGER / ONCE (loop/post_writes.py: POSTs
recorded in the write ledger). Its accounting (BALP) is recorded before the step is: once per opinion, and so is
the row that follows the planned treatment the opinion was about (loop/outcomes.py)."""
from __future__ import annotations

import logging
import time

from fhirbridge.ehr import audit
from fhirbridge.ehr.context import App
from fhirbridge.ehr.write_plan import Kind
from fhirbridge.errors import FhirbridgeError
from fhirbridge.loop.opinion_summary import opinion_document, summary_columns
from fhirbridge.loop.outcomes import record_filed
from fhirbridge.loop.post_writes import Review, file_by_post
from fhirbridge.loop.result import StepResult, needs_review
from fhirbridge.loop.writeback import file_opinion
from fhirbridge.store.store import Case

log = logging.getLogger("fhirbridge.loop.filing")


def file_step(app: App, case: Case) -> StepResult:
    plan = app.write_plan
    if plan.kind is Kind.ATOMIC:
        filed = file_opinion(app, case)
    else:
        outcome = file_by_post(app, case)
        if isinstance(outcome, Review):
            return needs_review(outcome.question, write=outcome.kind, plan=plan.kind.name)
        filed = outcome
    audit.record_filed(app, case, filed.document_reference)
    # The coded conclusion is read once, here, for both its copies: the Case row's summary (what the dashboard
    # and the Case list count, opinion_summary.py) and the outcome row (the follow-up queue's figures,
    # outcomes.py). The write plans open the opinion inside their own code; one more decryption per filed
    # opinion is cheap next to one per view.
    now = time.time()
    document = opinion_document(app, case)
    try:
        record_filed(app, case, document if document is not None else {}, now=now)
    except FhirbridgeError as exc:
        # The opinion is in the chart: its outcome row is opened by the next follow-up tick's backfill instead.
        log.warning("Case %s: the outcome row was not opened at filing (%s); the follow-up tick opens it",
                    case.id, type(exc).__name__)
    return StepResult({**filed.detail(), "plan": plan.kind.name}, document_reference=filed.document_reference,
                      task_current=filed.task_completed or not plan.task_write,
                      summary=summary_columns(app, case, document, now))
