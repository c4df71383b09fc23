"""The outcomes table (tables.outcomes, migration 0010): one row per filed opinion, following what became of
the planned treatment it was about (loop/outcomes.py writes it, ops/outcome_figures.py counts it).

Opening a row is idempotent (keyed by the Case), and a row is checked by one worker at a time: `claim_due`
moves a due row's `next_check_at` forward with a compare-and-set, so two replicas ticking together never read
the same order twice, and a worker that dies mid-check leaves the row due again after `lease` seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from fhirbridge.store.tables import cases, outcomes

UNRESOLVED, OPEN, CLOSED = "unresolved", "open", "closed"
STATES = (UNRESOLVED, OPEN, CLOSED)


@dataclass(frozen=True)
class Outcome:
    case_id: str
    hospital: str
    reviewer: str
    profile: str
    patient: str
    order_ref: str
    filed_at: float
    window_ends: float
    recommendation: str | None
    concordance: str | None
    plan: str | None
    plan_code: str | None
    state: str
    result: str | None
    result_ref: str | None
    decided_at: float | None
    checks: int
    checked_at: float | None
    next_check_at: float | None
    last_error: str | None


def _outcome(row) -> Outcome:
    return Outcome(**{str(k): v for k, v in row._mapping.items()})


class OutcomeStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    def open(self, *, case_id: str, hospital: str, reviewer: str, profile: str, patient: str, order_ref: str,
             filed_at: float, window_ends: float, recommendation: str | None, concordance: str | None) -> bool:
        """Open the row of a filed opinion unless it exists (a repeated file step): True when opened now."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(outcomes).values(
                    case_id=case_id, hospital=hospital, reviewer=reviewer, profile=profile, patient=patient,
                    order_ref=order_ref, filed_at=filed_at, window_ends=window_ends, recommendation=recommendation,
                    concordance=concordance, state=UNRESOLVED, checks=0, next_check_at=filed_at))
            return True
        except IntegrityError:
            return False

    def get(self, case_id: str) -> Outcome | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(outcomes).where(outcomes.c.case_id == case_id)).first()
        return _outcome(row) if row else None

    def claim_due(self, hospital: str, *, now: float, lease: float, limit: int) -> list[Outcome]:
        """Up to `limit` of a hospital's rows not closed whose check is due, soonest first; each claimed by moving
        its next check `lease` seconds on (compare-and-set on the value read: a row another worker claimed
        meanwhile is skipped)."""
        o = outcomes.c
        q = (select(outcomes).where(and_(o.hospital == hospital, o.state != CLOSED,
                                         or_(o.next_check_at.is_(None), o.next_check_at <= now)))
             .order_by(o.next_check_at).limit(limit))
        claimed = []
        with self.engine.begin() as conn:
            for row in conn.execute(q).all():
                got = conn.execute(update(outcomes).where(and_(
                    o.case_id == row.case_id,
                    o.next_check_at.is_(None) if row.next_check_at is None else o.next_check_at == row.next_check_at))
                    .values(next_check_at=now + lease))
                if got.rowcount == 1:
                    claimed.append(_outcome(row))
        return claimed

    def set_codes(self, case_id: str, *, recommendation: str | None, concordance: str | None) -> None:
        """A corrected opinion's codes replace the first version's (the row, its checks and window stay)."""
        with self.engine.begin() as conn:
            conn.execute(update(outcomes).where(outcomes.c.case_id == case_id)
                         .values(recommendation=recommendation, concordance=concordance))

    def record(self, case_id: str, *, now: float, next_check_at: float | None, error: str | None = None,
               **values) -> None:
        """The result of one check: the columns it found (plan, state, result...), when to look again."""
        with self.engine.begin() as conn:
            conn.execute(update(outcomes).where(outcomes.c.case_id == case_id).values(
                checks=outcomes.c.checks + 1, checked_at=now, next_check_at=next_check_at, last_error=error,
                **values))

    def rows(self, *, hospitals: tuple[str, ...] | None = None) -> list[Outcome]:
        """Every row (of these hospitals' keys): the figures' input. Small columns only, one query."""
        q = select(outcomes).order_by(outcomes.c.filed_at)
        if hospitals is not None:
            q = q.where(outcomes.c.hospital.in_(hospitals))
        with self.engine.connect() as conn:
            return [_outcome(r) for r in conn.execute(q)]

    def done_without_outcome(self, hospital: str, *, limit: int) -> list[str]:
        """Ids of a hospital's filed Cases that have no row (filed before outcomes were followed): the backfill."""
        q = (select(cases.c.id).select_from(cases.outerjoin(outcomes, outcomes.c.case_id == cases.c.id))
             .where(and_(cases.c.hospital == hospital, cases.c.step == "done", outcomes.c.case_id.is_(None)))
             .order_by(cases.c.updated_at).limit(limit))
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(q)]
