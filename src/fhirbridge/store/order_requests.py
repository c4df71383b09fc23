"""Orders the API accepted and the workers place in the EHR (tables.order_requests; loop/accepted_orders.py).

A row is the order's identity and state, never its content: `id` becomes the ServiceRequest's placer
identifier value, so whoever finds the row pending can ask the EHR whether the order is already there before
writing it. Claims work like the Cases' (one atomic UPDATE ... RETURNING, a lease), so two workers never
place the same order at once.
"""
from __future__ import annotations

import time
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from fhirbridge.store.store import Store
from fhirbridge.store.tables import order_requests as table

PENDING, PLACED, FAILED = "pending", "placed", "failed"


def _row(row) -> dict[str, Any]:
    return dict(row._mapping)


class OrderRequests:
    def __init__(self, store: Store):
        self.engine = store.engine

    def add(self, request_id: str, *, hospital: str, fingerprint: str) -> tuple[dict, bool]:
        """Insert a pending order unless one with this id exists: (row, created)."""
        now = time.time()
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(table).values(id=request_id, hospital=hospital, state=PENDING,
                                                  fingerprint=fingerprint, created_at=now, updated_at=now))
            created = True
        except IntegrityError:
            created = False
        row = self.get(request_id)
        assert row is not None
        return row, created

    def get(self, request_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(table).where(table.c.id == request_id)).first()
        return _row(row) if row else None

    def claim(self, *, hospital: str, worker: str, lease_seconds: float, request_id: str | None = None) -> dict | None:
        """Claim one pending order that is due (or the one named), with a lease."""
        now = time.time()
        free = or_(table.c.claimed_until.is_(None), table.c.claimed_until < now)
        due = or_(table.c.next_attempt_at.is_(None), table.c.next_attempt_at <= now)
        cond = and_(table.c.hospital == hospital, table.c.state == PENDING, free, due)
        if request_id is not None:
            cond = and_(cond, table.c.id == request_id)
        pick = select(table.c.id).where(cond).order_by(table.c.created_at).limit(1)
        if self.engine.dialect.name == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        # The condition again in the outer WHERE: under READ COMMITTED a blocked second claimer re-checks it
        # against the committed row (as Store.claim does).
        stmt = (update(table).where(and_(table.c.id == pick.scalar_subquery(), table.c.state == PENDING, free))
                .values(claimed_by=worker, claimed_until=now + lease_seconds).returning(*table.c))
        with self.engine.begin() as conn:
            row = conn.execute(stmt).first()
        return _row(row) if row else None

    def _finish(self, request_id: str, worker: str, **values) -> bool:
        with self.engine.begin() as conn:
            done = conn.execute(update(table).where(and_(table.c.id == request_id, table.c.claimed_by == worker,
                                                         table.c.state == PENDING))
                                .values(updated_at=time.time(), claimed_by=None, claimed_until=None, **values))
        return done.rowcount == 1

    def placed(self, request_id: str, *, worker: str, service_request: str) -> bool:
        return self._finish(request_id, worker, state=PLACED, service_request=service_request, error=None)

    def failed(self, request_id: str, *, worker: str, error: str) -> bool:
        return self._finish(request_id, worker, state=FAILED, error=error)

    def later(self, request_id: str, *, worker: str, error: str, delay: float) -> bool:
        """A transient failure: release the claim and try again after `delay` seconds."""
        return self._finish(request_id, worker, error=error, attempts=table.c.attempts + 1,
                            next_attempt_at=time.time() + delay)

    def release_worker(self, worker: str) -> int:
        """Give up every claim of a worker that is stopping: another one places those orders at once."""
        with self.engine.begin() as conn:
            done = conn.execute(update(table).where(and_(table.c.claimed_by == worker, table.c.state == PENDING))
                                .values(claimed_by=None, claimed_until=None))
        return done.rowcount

    def set_case(self, request_id: str, case_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(table).where(table.c.id == request_id).values(case_id=case_id))

    def pending_count(self, hospital: str | None = None) -> int:
        cond = table.c.state == PENDING
        if hospital is not None:
            cond = and_(cond, table.c.hospital == hospital)
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table).where(cond)).scalar_one())
