"""Follow-up questions and corrected opinions of filed Cases (tables.followups; loop/followup.py).

A row is a question's (or a correction's) identity and state, never its text. Asking takes the next `seq` of
the Case in one INSERT guarded by the unique (case, kind, seq): two physicians asking at once cannot both get
the last place under the reviewer's limit. Claims work like the Cases' (one atomic UPDATE ... RETURNING with a
lease), so two workers never send the same question or file the same answer at once, and every move is a
compare-and-set on the state it leaves: a replayed answer finds the row `answered` or `filed` and changes
nothing.
"""
from __future__ import annotations

import time
from typing import Any

from sqlalchemy import ColumnElement, and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from fhirbridge.store.store import Store
from fhirbridge.store.tables import followups as table

QUESTION, CORRECTION = "question", "correction"
ASKED, SENT, ANSWERED, FILED, NEEDS_REVIEW, FAILED = "asked", "sent", "answered", "filed", "needs_review", "failed"
# What a worker does something about: a question to send, an answer or a correction to file.
WORK_STATES = (ASKED, ANSWERED)
OPEN_STATES = (ASKED, SENT, ANSWERED, NEEDS_REVIEW)


class OverLimit(Exception):
    """The Case has as many questions as its reviewer answers."""


def _row(row) -> dict[str, Any]:
    return dict(row._mapping)


class FollowUps:
    def __init__(self, store: Store):
        self.engine = store.engine

    def add(self, followup_id: str, *, case_id: str, hospital: str, reviewer: str, kind: str, state: str,
            limit: int | None = None, asked_by: str | None = None, answer_id: str | None = None) -> dict:
        """Insert the Case's next question (or correction) with the next `seq`; OverLimit when `limit` of
        this kind are there already. A lost race for a `seq` is retried with the next one."""
        for _ in range(5):
            now = time.time()
            with self.engine.connect() as conn:
                count = int(conn.execute(select(func.count()).select_from(table).where(
                    and_(table.c.case_id == case_id, table.c.kind == kind))).scalar_one())
            if limit is not None and count >= limit:
                raise OverLimit(f"this Case has {count} follow-up question(s), the most its reviewer answers "
                                f"({limit}); nothing was sent")
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(table).values(
                        id=followup_id, case_id=case_id, hospital=hospital, reviewer=reviewer, kind=kind,
                        seq=count + 1, state=state, asked_by=asked_by, answer_id=answer_id,
                        answered_at=now if state == ANSWERED else None, created_at=now, updated_at=now))
            except IntegrityError:
                existing = self.get(followup_id)
                if existing is not None:
                    return existing
                continue   # another question took this seq meanwhile: count again
            row = self.get(followup_id)
            assert row is not None
            return row
        raise OverLimit("this Case's follow-up questions are being asked too fast; ask again")

    def get(self, followup_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(table).where(table.c.id == followup_id)).first()
        return _row(row) if row else None

    def by_answer(self, answer_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(table).where(table.c.answer_id == answer_id)).first()
        return _row(row) if row else None

    def of_case(self, case_id: str, kind: str | None = None) -> list[dict]:
        cond: ColumnElement[bool] = table.c.case_id == case_id
        if kind is not None:
            cond = and_(cond, table.c.kind == kind)
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(select(table).where(cond).order_by(table.c.kind, table.c.seq))]

    def open_rows(self, *, hospital: str | None = None, reviewer: str | None = None,
                  states: tuple[str, ...] = OPEN_STATES) -> list[dict]:
        cond: ColumnElement[bool] = table.c.state.in_(states)
        if hospital is not None:
            cond = and_(cond, table.c.hospital == hospital)
        if reviewer is not None:
            cond = and_(cond, table.c.reviewer == reviewer)
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(select(table).where(cond).order_by(table.c.created_at))]

    def claim(self, *, hospital: str, worker: str, lease_seconds: float, followup_id: str | None = None) -> dict | None:
        """Claim one due row with work to do (a question to send, an answer to file), with a lease."""
        now = time.time()
        free = or_(table.c.claimed_until.is_(None), table.c.claimed_until < now)
        due = or_(table.c.next_attempt_at.is_(None), table.c.next_attempt_at <= now)
        cond = and_(table.c.hospital == hospital, table.c.state.in_(WORK_STATES), free, due)
        if followup_id is not None:
            cond = and_(cond, table.c.id == followup_id)
        pick = select(table.c.id).where(cond).order_by(table.c.updated_at).limit(1)
        if self.engine.dialect.name == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        stmt = (update(table).where(and_(table.c.id == pick.scalar_subquery(), table.c.state.in_(WORK_STATES), free))
                .values(claimed_by=worker, claimed_until=now + lease_seconds).returning(*table.c))
        with self.engine.begin() as conn:
            row = conn.execute(stmt).first()
        return _row(row) if row else None

    def finish(self, followup_id: str, *, worker: str | None, expect: str, **values) -> bool:
        """Move a claimed row on from state `expect` (compare-and-set), releasing the claim."""
        cond = and_(table.c.id == followup_id, table.c.state == expect)
        if worker is not None:
            cond = and_(cond, table.c.claimed_by == worker)
        with self.engine.begin() as conn:
            done = conn.execute(update(table).where(cond).values(updated_at=time.time(), claimed_by=None,
                                                                  claimed_until=None, **values))
        return done.rowcount == 1

    def later(self, followup_id: str, *, worker: str, error: str, delay: float) -> bool:
        """A transient failure: release the claim, try again after `delay` seconds."""
        with self.engine.begin() as conn:
            done = conn.execute(update(table).where(and_(table.c.id == followup_id, table.c.claimed_by == worker))
                                .values(updated_at=time.time(), claimed_by=None, claimed_until=None, error=error,
                                        attempts=table.c.attempts + 1, next_attempt_at=time.time() + delay))
        return done.rowcount == 1

    def answered(self, followup_id: str, *, answer_id: str) -> bool:
        """The reviewer's answer accepted: only from `sent`, only once (a replay finds it answered)."""
        return self.finish(followup_id, worker=None, expect=SENT, state=ANSWERED, answer_id=answer_id,
                           answered_at=time.time(), error=None)

    def release_worker(self, worker: str) -> int:
        with self.engine.begin() as conn:
            done = conn.execute(update(table).where(table.c.claimed_by == worker)
                                .values(claimed_by=None, claimed_until=None))
        return done.rowcount
