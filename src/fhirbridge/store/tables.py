"""The Case store's schema: one table definition per concept, shared by the Store and the migrations.

Timestamps are UTC epoch seconds (floats), so lease arithmetic and comparisons are the same on SQLite and
PostgreSQL. Nothing clinical: references (Patient/123), step names, counts, errors naming resources; the one
exception is `outcomes`, the coded outcome of each filed opinion (codes, never text).
"""
from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    literal_column,
)
from sqlalchemy.sql.elements import ColumnElement

from fhirbridge.steps import WORK_STEPS

metadata = MetaData()

# The indexes of the Case list (migration 0006 creates the same; tables.cases declares them).
CASE_LIST_INDEX_COLUMNS: dict[str, tuple[str, ...]] = {
    # Pages in each sort, with the id as tie-breaker (the keyset cursor): across hospitals (status) and of the
    # hospitals a caller may see (the API and the dashboard always narrow to them).
    "ix_cases_updated": ("updated_at", "id"),
    "ix_cases_created": ("created_at", "id"),
    "ix_cases_hospital_updated": ("hospital", "updated_at", "id"),
    "ix_cases_hospital_created": ("hospital", "created_at", "id"),
    "ix_cases_step_updated": ("step", "updated_at", "id"),
    "ix_cases_patient": ("patient",),
    "ix_cases_order": ("service_request",),
    # The dashboard's figures, each answered from its index alone (covering): per reviewer and step, the
    # turnaround quantiles (nearest rank by OFFSET along the index), the conclusions, the Cases to summarise.
    "ix_cases_reviewer_figures": ("hospital", "reviewer", "step", "due_at", "overdue_at"),
    "ix_cases_turnaround": ("hospital", "reviewer", "turnaround_seconds"),
    "ix_cases_conclusion": ("hospital", "step", "concordance", "recommendation"),
    "ix_cases_unsummarised": ("step", "filed_at", "updated_at"),
}
CASE_LIST_INDEXES = [Index(name, *cols) for name, cols in CASE_LIST_INDEX_COLUMNS.items()]

cases = Table(
    "cases", metadata,
    Column("id", String(64), primary_key=True),
    Column("hospital", String(200), nullable=False),
    Column("service_request", String(200), nullable=False),   # "ServiceRequest/<id>" on the hospital's EHR
    Column("patient", String(200), nullable=False),
    Column("reviewer", String(200), nullable=False),
    Column("profile", String(100), nullable=False),
    Column("step", String(40), nullable=False),
    Column("task", String(200)),                               # "Task/<id>" in the EHR
    Column("package_id", String(64)),
    Column("opinion_id", String(200)),
    Column("document_reference", String(200)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("next_attempt_at", Float),
    Column("claimed_by", String(200)),
    Column("claimed_until", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("data", JSON, nullable=False, default=dict),         # step outputs: ids, counts, no PHI
    Column("due_at", Float),                                   # delivery + the reviewer's turnaround target
    Column("overdue_at", Float),                               # when it was flagged overdue
    # The filed opinion's summary, written once when it is filed (migration 0006), so the dashboard counts in
    # SQL instead of decrypting every opinion per view: the coded concordance and recommendation (codes of our
    # own CodeSystems, never free text), when it was filed, and delivery-to-filing in seconds.
    Column("concordance", String(40)),
    Column("recommendation", String(60)),
    Column("filed_at", Float),
    Column("turnaround_seconds", Float),
    UniqueConstraint("hospital", "service_request", name="uq_case_per_order"),
    # The claim query: a hospital's Cases at a work step, oldest update first (migration 0003). Without it
    # every claim scanned every Case, done ones included (docs/performance.md, claims).
    Index("ix_cases_claim", "hospital", "step", "updated_at"),
    # The Case list (store/case_query.py, migration 0006): each sort with the id as tie-breaker (the keyset
    # cursor), per step for the filtered lists, and the columns searched for exactly.
    *CASE_LIST_INDEXES,
)


def claimable(step_column) -> ColumnElement[bool]:
    """`step IN ('collect', ...)` over the work steps (steps.FLOW: a step with a `next`), written with literals:
    the claim query must state the very predicate of the partial index below for SQLite to use it (a bound
    parameter never matches a partial index's WHERE), and PostgreSQL proves the implication from literals."""
    return step_column.in_([literal_column(f"'{s}'") for s in WORK_STEPS])


# The claim (issue 19 goal 3): a hospital's claimable Cases, oldest update first, read along one index with no
# sort, and only Cases at a work step are in it, so the many waiting for an opinion or done cost nothing
# (ix_cases_claim had them in its range and sorted every claimable Case per claim). Migration 0014 creates it
# with the work steps of its day; tests/store/test_claim_index.py fails when a FLOW step with a `next` is not
# in its predicate (a new work step needs a migration that re-creates it).
CLAIMABLE_INDEX = Index("ix_cases_claimable", cases.c.hospital, cases.c.updated_at,
                        sqlite_where=claimable(cases.c.step), postgresql_where=claimable(cases.c.step))

# Polling cursors (one per hospital and source), claimed like work so one replica polls at a time.
cursors = Table(
    "cursors", metadata,
    Column("hospital", String(200), primary_key=True),
    Column("name", String(80), primary_key=True),
    Column("value", String(64)),
    Column("claimed_by", String(200)),
    Column("claimed_until", Float),
    Column("updated_at", Float),
)

events = Table(
    "events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("case_id", String(64), nullable=False, index=True),
    Column("at", Float, nullable=False),
    Column("kind", String(80), nullable=False),
    Column("detail", JSON, nullable=False, default=dict),
)

# jti of every opinion envelope accepted, so a replayed file is refused even after the Case is gone.
seen_messages = Table(
    "seen_messages", metadata,
    Column("jti", String(200), primary_key=True),
    Column("case_id", String(64), nullable=False),
    Column("at", Float, nullable=False),
)

# One row per disclosure (a package delivered) and per opinion filed: the accounting of disclosures
# (ehr/audit.py). `resource` is the BALP AuditEvent; it names the patient by reference only. The id is the
# AuditEvent's id, derived from the Case and the package/opinion, so recording twice keeps one row.
audit_events = Table(
    "audit_events", metadata,
    Column("id", String(64), primary_key=True),
    Column("at", Float, nullable=False),
    Column("hospital", String(200), nullable=False),
    Column("patient", String(200), nullable=False, index=True),
    Column("case_id", String(64), nullable=False, index=True),
    Column("kind", String(20), nullable=False),                 # disclosure | filed
    Column("recipient", String(200), nullable=False),           # system|value of the receiving organisation
    Column("resource", JSON, nullable=False),
    Column("sent_to_ehr", Boolean, nullable=False, default=False),
    Column("ehr_error", Text),                                  # why the last write to the EHR failed
    # The copy owed to the EHR (migration 0004): refused writes so far, the last one, when to try again.
    Column("ehr_attempts", Integer, nullable=False, server_default="0"),
    Column("ehr_tried_at", Float),
    Column("ehr_retry_at", Float),
)
# The columns of the accounting itself (migration 0002), which `Store.list_audit` reads.
AUDIT_ACCOUNTING = ("id", "at", "hospital", "patient", "case_id", "kind", "recipient", "resource", "sent_to_ehr",
                    "ehr_error")

# The write ledger (migration 0005; loop/post_writes.py): each write of the POST-only plans, recorded with its
# business identifier BEFORE it is sent, so a lost answer or a crash is reconciled by searching that identifier
# (or put to a person), never by a blind second POST. One row per Case and kind of write.
# state: intended (known not in the chart: sending is safe) | sent (committed just before the POST: may have
# landed, reconcile first) | confirmed (server_id).
write_ledger = Table(
    "write_ledger", metadata,
    Column("case_id", String(64), primary_key=True),
    Column("kind", String(40), primary_key=True),               # DocumentReference | Provenance | Task
    Column("identifier", String(300), nullable=False),          # system|value searched for, or the target
    Column("state", String(20), nullable=False),
    Column("server_id", String(200)),                           # "DocumentReference/<id>" once confirmed
    Column("attempts", Integer, nullable=False, server_default="0"),   # times it was sent
    Column("updated_at", Float, nullable=False),
)

# The CDS Hooks cards fhirbridge showed (migration 0009; ehr/cds.py, service/cds_hooks.py): one row per card, so
# the feedback endpoint knows which draft order a card was about and the outcome (accepted / overridden) is
# counted. References and codes only: the draft order by reference, the rule by its id, an override reason
# by its code (never the user's comment).
cds_cards = Table(
    "cds_cards", metadata,
    Column("card_id", String(64), primary_key=True),            # card.uuid
    Column("hospital", String(200), nullable=False),
    Column("service", String(64), nullable=False),              # fhirbridge-order-sign | fhirbridge-order-select
    Column("hook_instance", String(64), nullable=False),
    Column("patient", String(200), nullable=False),
    Column("ordered_by", String(200), nullable=False),          # context.userId: the ordering clinician
    Column("draft_order", String(300), nullable=False),         # "ServiceRequest/<id>" (or "#<fullUrl>" without id)
    Column("draft_code", String(300), nullable=False),          # system|code of the draft order
    Column("rule", String(100), nullable=False),
    Column("issued_at", Float, nullable=False),
    Column("outcome", String(20)),                              # accepted | overridden (the first feedback)
    Column("outcome_at", Float),
    Column("override_reason", String(200)),                     # system|code of the overrideReason
    Column("second_opinion_order", String(200)),                # "ServiceRequest/<id>": the second-opinion order
    Column("case_id", String(64), index=True),
)

# Orders accepted by `POST /api/orders` and not yet placed in the EHR (loop/accepted_orders.py). The order's
# content (patient, question, requester) is not here: it waits encrypted in the data dir until placed.
order_requests = Table(
    "order_requests", metadata,
    Column("id", String(64), primary_key=True),                 # the ServiceRequest's placer identifier value
    Column("hospital", String(200), nullable=False),
    Column("state", String(20), nullable=False),                # pending | placed | failed
    Column("fingerprint", String(64), nullable=False),          # SHA-256 of the order's fields: a replayed key
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("claimed_by", String(200)),
    Column("claimed_until", Float),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Float),
    Column("service_request", String(200)),                     # "ServiceRequest/<id>" once placed
    Column("case_id", String(64)),
    Column("error", Text),
    Index("ix_order_requests_due", "hospital", "state", "next_attempt_at"),
)

# What became of the planned treatment each filed opinion was about (migration 0010; loop/outcomes.py,
# docs/outcomes.md). One row per filed opinion, opened when it is filed. Codes and references only, never text:
# the opinion's coded recommendation and concordance (so the figures never decrypt an opinion per view), the
# planned order or Procedure by reference and its code (system|code), what the chart showed and when.
# state: unresolved (the plan not yet read from the order) | open (followed until the window ends) | closed.
outcomes = Table(
    "outcomes", metadata,
    Column("case_id", String(64), primary_key=True),
    Column("hospital", String(200), nullable=False),
    Column("reviewer", String(200), nullable=False),
    Column("profile", String(100), nullable=False),
    Column("patient", String(200), nullable=False),
    Column("order_ref", String(200), nullable=False),           # the second-opinion ServiceRequest
    Column("filed_at", Float, nullable=False),
    Column("window_ends", Float, nullable=False),
    Column("recommendation", String(60)),                        # recommendation CodeSystem code
    Column("concordance", String(60)),                           # concordance CodeSystem code
    Column("plan", String(200)),                                 # "ServiceRequest/<id>" | "Procedure/<id>"
    Column("plan_code", String(300)),                            # system|code of the planned treatment
    Column("state", String(20), nullable=False),
    Column("result", String(30)),                                # outcome-result code (closed rows)
    Column("result_ref", String(200)),                           # the Procedure or replacing order found
    Column("decided_at", Float),                                 # when the chart shows the decision
    Column("checks", Integer, nullable=False, server_default="0"),
    Column("checked_at", Float),
    Column("next_check_at", Float),
    Column("last_error", Text),                                  # why the last check failed (no PHI)
    # The follow-up tick: a hospital's open rows due for a check, soonest first.
    Index("ix_outcomes_due", "hospital", "state", "next_check_at"),
)

# The conversation after the opinion (migration 0013; loop/followup.py, store/followups.py, docs/reviewers.md):
# one row per follow-up question the referring physician asks, and per corrected opinion the reviewer sends.
# References, ids and states only: the question's and the answer's text wait encrypted in the Case directory
# (and are in the EHR as the Communication and the addendum note). `seq` numbers a Case's questions 1, 2, 3...:
# the unique (case, kind, seq) makes the per-reviewer limit hold even when two askers race.
# state (question): asked (recorded, not yet sent) | sent (the Communication in the EHR, the sealed message with
# the reviewer) | answered (the answer accepted, not yet filed) | filed (the addendum note in the chart)
# | needs_review (plan ONCE: a write's outcome is unknown; a person checks) | failed.
# state (correction): answered | filed | needs_review | failed.
followups = Table(
    "followups", metadata,
    Column("id", String(64), primary_key=True),                 # a UUID: the question's message id
    Column("case_id", String(64), nullable=False),
    Column("hospital", String(200), nullable=False),
    Column("reviewer", String(200), nullable=False),
    Column("kind", String(20), nullable=False),                 # question | correction
    Column("seq", Integer, nullable=False),
    Column("state", String(20), nullable=False),
    Column("asked_by", String(200)),                            # "Practitioner/<id>" (or the API caller's name)
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("communication", String(200)),                       # "Communication/<id>" once written
    Column("sent_at", Float),
    Column("answer_id", String(64)),                            # the answer's (or correction's) message jti
    Column("answered_at", Float),
    Column("note", String(200)),                                # "DocumentReference/<id>": the addendum/correction
    Column("filed_at", Float),
    Column("claimed_by", String(200)),
    Column("claimed_until", Float),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Float),
    Column("error", Text),                                      # why the last attempt failed (no PHI)
    UniqueConstraint("case_id", "kind", "seq", name="uq_followup_seq"),
    Index("ix_followups_due", "hospital", "state", "next_attempt_at"),
    Index("ix_followups_case", "case_id"),
)
