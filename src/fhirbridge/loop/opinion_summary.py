"""The filed opinion's summary in the Case row (tables.cases, migration 0006): its coded concordance and
recommendation, when it was filed, and delivery to filing in seconds.

Written by the file step with the step's move, so the dashboard and its figures count in SQL and never decrypt
opinions per view (at 100,000 Cases that took about 15 s per worker). Codes of our own CodeSystems only, never
the opinion's text. Cases filed before 0006 are summarised by `backfill`, a few per call.
"""
from __future__ import annotations

import logging

from fhirbridge.ehr.context import App
from fhirbridge.errors import FhirbridgeError
from fhirbridge.exchange.conclusions import conclusions_of
from fhirbridge.loop.writeback import open_opinion
from fhirbridge.store.store import Case

log = logging.getLogger("fhirbridge.loop.opinion_summary")


def summary_columns(app: App, case: Case, document: dict | None, filed_at: float) -> dict:
    """The summary columns for a Case whose opinion (this document) is filed at `filed_at`."""
    found = conclusions_of(document) if document is not None else {}
    reviewer = app.config.reviewers.get(case.reviewer)
    turnaround = None
    if case.due_at is not None and reviewer is not None:
        # due_at = delivery + the reviewer's target (config Reviewer.due_at): the delivery time, as the
        # dashboard has always counted it.
        turnaround = max(0.0, filed_at - (case.due_at - reviewer.turnaround_days * 86400))
    return {"concordance": found.get("concordance"), "recommendation": found.get("recommendation"),
            "filed_at": filed_at, "turnaround_seconds": turnaround}


def opinion_document(app: App, case: Case) -> dict | None:
    """The opinion document as accepted, or None when it cannot be read (the Case still counts as filed,
    without its codes)."""
    try:
        _claims, document = open_opinion(app, case)
    except (FhirbridgeError, ValueError, KeyError, OSError) as exc:
        log.warning("cannot read the opinion of Case %s for its summary: %s", case.id, type(exc).__name__)
        return None
    return document


def read_summary(app: App, case: Case, filed_at: float) -> dict:
    """summary_columns from the opinion file as accepted; without the codes when it cannot be read."""
    return summary_columns(app, case, opinion_document(app, case), filed_at)


def backfill(apps: dict[str, App], store, limit: int = 20) -> int:
    """Summarise up to `limit` Cases filed before the summary existed (their updated_at taken as the filing
    time); returns how many. Bounded, so no view ever decrypts every opinion."""
    done = 0
    for case in store.unsummarised(limit):
        app = apps.get(case.hospital)
        columns = (read_summary(app, case, case.updated_at) if app is not None else
                   {"concordance": None, "recommendation": None, "filed_at": case.updated_at,
                    "turnaround_seconds": None})
        store.set_summary(case.id, **columns)
        done += 1
    return done
