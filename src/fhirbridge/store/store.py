"""The Case store: one row per referral, an append-only event log, and the opinions already seen.

SQLAlchemy Core over SQLite (the embedded default) or PostgreSQL. Timestamps are UTC epoch seconds
(floats) so lease arithmetic and comparisons are the same on both engines.

Nothing clinical is stored here: Cases hold references (Patient/123), step names, counts and error
messages that name resources by type/id. Clinical content lives only in encrypted files under the
Case's work directory (App.case_dir).
"""
from __future__ import annotations

import functools
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Float, and_, bindparam, create_engine, event, func, insert, or_, select, text, update
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from fhirbridge.crypto import files
from fhirbridge.errors import CaseError
from fhirbridge.steps import FINAL_STEPS, WORK_STEPS, Step
from fhirbridge.store import migrations
from fhirbridge.store.case_query import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    SORTS,
    CaseFilter,
    CasePage,
    encode_cursor,
    page_query,
)
from fhirbridge.store.outcomes import OutcomeStore
from fhirbridge.store.tables import (
    AUDIT_ACCOUNTING,
    audit_events,
    cases,
    cds_cards,
    claimable,
    cursors,
    events,
    seen_messages,
    write_ledger,
)

# A claims connection idle longer than this is replaced rather than trusted: a firewall or PostgreSQL's
# idle_session_timeout may have closed it, and the claims pool does not ping.
_CLAIMS_RECYCLE_SECONDS = 600
SIGNED_OUT = "session:signed-out"       # seen_messages.case_id of the rows of signed-out page sessions


@dataclass
class Case:
    id: str
    hospital: str
    service_request: str
    patient: str
    reviewer: str
    profile: str
    step: str
    task: str | None
    package_id: str | None
    opinion_id: str | None
    document_reference: str | None
    attempts: int
    last_error: str | None
    next_attempt_at: float | None
    claimed_by: str | None
    claimed_until: float | None
    created_at: float
    updated_at: float
    data: dict[str, Any]
    due_at: float | None = None
    overdue_at: float | None = None
    concordance: str | None = None            # the filed opinion's summary (tables.cases, migration 0006)
    recommendation: str | None = None
    filed_at: float | None = None
    turnaround_seconds: float | None = None


def _plain(row) -> dict[str, Any]:
    """A row as a dict with plain str keys: SQLAlchemy's keys are `quoted_name` (a str subclass), which
    orjson refuses as dict keys (`fhirbridge status CASE --json` crashed on them)."""
    return {str(k): v for k, v in row._mapping.items()}


def _case(row) -> Case:
    values = _plain(row)
    values["data"] = values.get("data") or {}
    return Case(**values)


def _claim_statement(dialect: str, steps: tuple[str, ...] | None, by_case: bool, by_hospital: bool):
    """The claim (see Store.claim); `steps` None: the work steps, as the partial index states them."""
    now = bindparam("b_now", type_=Float)
    free = or_(cases.c.claimed_until.is_(None), cases.c.claimed_until < now)
    due = or_(cases.c.next_attempt_at.is_(None), cases.c.next_attempt_at <= now)
    cond = and_(claimable(cases.c.step) if steps is None else cases.c.step.in_(steps), free, due)
    if by_case:
        cond = and_(cond, cases.c.id == bindparam("b_case"))
    if by_hospital:
        cond = and_(cond, cases.c.hospital == bindparam("b_hospital"))
    pick = select(cases.c.id).where(cond).order_by(cases.c.updated_at).limit(1)
    if dialect == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    return (update(cases).where(and_(cases.c.id == pick.scalar_subquery(), free))
            .values(claimed_by=bindparam("b_worker"), claimed_until=bindparam("b_until")).returning(*cases.c))


@functools.cache
def _claim_sql(dialect: Dialect, by_case: bool, by_hospital: bool) -> tuple[str, tuple[str, ...] | None, dict]:
    """The claim of the work steps compiled for `dialect`: its text, for a positional paramstyle the order
    of its parameters (None: named), and the values compiled in (the LIMIT)."""
    compiled = _claim_statement(dialect.name, None, by_case, by_hospital).compile(dialect=dialect)
    names = tuple(compiled.positiontup) if compiled.positiontup else None
    fixed = {k: v for k, v in compiled.params.items() if not k.startswith("b_")}
    return str(compiled), names, fixed


def _case_from_text(row: dict) -> Case:
    """A Case from a row read by driver SQL: the JSON column decoded as the typed read would (SQLite keeps it
    as text; psycopg decodes it itself)."""
    values = dict(row)
    if isinstance(values.get("data"), str | bytes):
        values["data"] = orjson.loads(values["data"])
    values["data"] = values.get("data") or {}
    return Case(**values)


def _pid_namespace() -> str:
    """Containers can share a hostname and reuse pids; the pid namespace tells them apart."""
    try:
        return os.readlink("/proc/self/ns/pid").split("[")[-1].rstrip("]")
    except OSError:
        return "0"


LOCAL_PREFIX = f"{socket.gethostname()}:{_pid_namespace()}:"


def worker_id() -> str:
    return f"{LOCAL_PREFIX}{os.getpid()}"


class Store:
    def __init__(self, url: str, *, create: bool = True):
        """Open the store; unless create=False, bring its schema to the newest revision first (Alembic,
        safe when several replicas start at once: see fhirbridge.store.migrations)."""
        self.url = url
        self.engine: Engine = _engine(url)
        self._claims: Engine | None = None
        if create:
            try:
                self.upgrade()
            except BaseException:
                self.engine.dispose()
                raise

    def upgrade(self, revision: str = "head") -> tuple[str | None, str | None]:
        """Migrate the schema to `revision`; returns (before, after)."""
        return migrations.upgrade(self.engine, revision)

    def schema_revision(self) -> str | None:
        """The schema revision the database is at (None: empty, or made before migrations)."""
        return migrations.current(self.engine)

    def close(self) -> None:
        self.engine.dispose()
        if self._claims is not None:
            self._claims.dispose()

    @property
    def outcomes(self) -> OutcomeStore:
        """The outcomes of filed opinions (store/outcomes.py)."""
        return OutcomeStore(self.engine)

    # --- cases -------------------------------------------------------------------------------------

    def open_case(self, *, case_id: str, hospital: str, service_request: str, patient: str, reviewer: str,
                  profile: str, data: dict | None = None, hold_seconds: float = 0.0) -> tuple[Case, bool]:
        """Insert the Case for an order unless one exists: (case, created). The unique constraint on
        (hospital, service_request) makes this safe when two intakes race."""
        now = time.time()
        # hold_seconds: not claimable until intake has finished with it (its Task, or adopting an older one).
        row = dict(id=case_id, hospital=hospital, service_request=service_request, patient=patient,
                   reviewer=reviewer, profile=profile, step=Step.COLLECT.value, attempts=0, created_at=now,
                   updated_at=now, data=data or {}, next_attempt_at=(now + hold_seconds) if hold_seconds else None)
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(cases).values(**row))
                conn.execute(insert(events).values(case_id=case_id, at=now, kind="opened",
                                                   detail={"service_request": service_request,
                                                           "reviewer": reviewer, "profile": profile}))
            return self.get(case_id), True
        except IntegrityError:
            existing = self.find_by_order(hospital, service_request)
            if existing is None:
                raise
            return existing, False

    def load_cases(self, rows: list[dict[str, Any]]) -> None:
        """Insert many Cases at once, each in any state, with its `opened` event (one executemany each): how
        benches and tests build a store as a long-running service holds it (bench/cases_bench.py). Each row
        has open_case's fields and may set any other column (step, created_at, due_at, ...)."""
        now = time.time()
        full = [{"step": Step.COLLECT.value, "attempts": 0, "created_at": now, "updated_at": now, "data": {},
                 **r} for r in rows]
        given = {k for r in full for k in r}      # one executemany needs the same columns in every row
        full = [{**dict.fromkeys(given), **r} for r in full]
        with self.engine.begin() as conn:
            conn.execute(insert(cases), full)
            conn.execute(insert(events), [{"case_id": r["id"], "at": r["created_at"], "kind": "opened",
                                           "detail": {"service_request": r["service_request"]}} for r in full])

    def get(self, case_id: str) -> Case:
        with self.engine.connect() as conn:
            row = conn.execute(select(cases).where(cases.c.id == case_id)).first()
        if row is None:
            raise CaseError(f"no Case {case_id}")
        return _case(row)

    def find(self, case_id: str) -> Case | None:
        try:
            return self.get(case_id)
        except CaseError:
            return None

    def find_by_order(self, hospital: str, service_request: str) -> Case | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(cases).where(and_(cases.c.hospital == hospital,
                                                        cases.c.service_request == service_request))).first()
        return _case(row) if row else None

    def find_by_prefix(self, prefix: str) -> Case:
        """Resolve a Case id or an unambiguous prefix of one (what a person types from `status`)."""
        if not prefix:
            raise CaseError("give a Case id (or the first characters of one)")
        with self.engine.connect() as conn:
            # startswith() escapes LIKE wildcards: "abc_" must not match "abc1...".
            rows = conn.execute(select(cases).where(cases.c.id.startswith(prefix, autoescape=True)).limit(2)).all()
        if not rows:
            raise CaseError(f"no Case with id {prefix}")
        if len(rows) > 1:
            raise CaseError(f"Case id prefix {prefix} is ambiguous; type more of it")
        return _case(rows[0])

    def list_cases(self, *, steps: tuple[str, ...] | None = None, hospital: str | None = None,
             patient: str | None = None) -> list[Case]:
        q = select(cases).order_by(cases.c.created_at)
        if steps:
            q = q.where(cases.c.step.in_(steps))
        if hospital is not None:
            q = q.where(cases.c.hospital == hospital)
        if patient is not None:
            q = q.where(cases.c.patient == patient)
        with self.engine.connect() as conn:
            return [_case(r) for r in conn.execute(q)]

    # --- the Case list (store/case_query.py): pages, counts and figures computed in SQL ----------------------

    def page_cases(self, flt: CaseFilter | None = None, *, sort: str = "updated", descending: bool = True,
                   limit: int = DEFAULT_LIMIT, cursor: str | None = None) -> CasePage:
        """One page of the Cases `flt` selects, in the order asked for; `next` continues after its last row."""
        if sort not in SORTS:
            raise CaseError(f"sort must be one of {', '.join(SORTS)}")
        if not 1 <= limit <= MAX_LIMIT:
            raise CaseError(f"limit must be between 1 and {MAX_LIMIT}")
        q = page_query(select(cases), flt or CaseFilter(), sort=sort, descending=descending, limit=limit,
                       cursor=cursor)
        with self.engine.connect() as conn:
            rows = [_case(r) for r in conn.execute(q)]
        more, rows = len(rows) > limit, rows[:limit]
        last = rows[-1] if rows else None
        nxt = (encode_cursor(sort, descending, getattr(last, SORTS[sort].name), last.id)
               if more and last is not None else None)
        return CasePage(rows, nxt)

    def count_cases(self, flt: CaseFilter | None = None) -> int:
        """How many Cases `flt` selects (one COUNT in the database)."""
        q = select(func.count()).select_from(cases)
        cond = (flt or CaseFilter()).where()
        if cond is not None:
            q = q.where(cond)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def fingerprint(self, hospitals: tuple[str, ...] | None = None) -> tuple[float | None, int]:
        """(newest updated_at, how many Cases): changes whenever a Case is opened or moves (pages poll it)."""
        q = select(func.max(cases.c.updated_at), func.count()).select_from(cases)
        if hospitals is not None:
            q = q.where(cases.c.hospital.in_(hospitals))
        with self.engine.connect() as conn:
            newest, n = conn.execute(q).one()
        return newest, int(n)

    def count_by_step(self, hospitals: tuple[str, ...] | None = None) -> dict[str, int]:
        """Cases per step (GROUP BY in the database), of these hospitals (None: every hospital)."""
        q = select(cases.c.step, func.count()).group_by(cases.c.step)
        if hospitals is not None:
            q = q.where(cases.c.hospital.in_(hospitals))
        with self.engine.connect() as conn:
            return {step: int(n) for step, n in conn.execute(q)}

    def reviewer_counts(self, hospitals: tuple[str, ...] | None = None) -> dict[str, dict[str, int]]:
        """Per reviewer, Cases per step, and how many were sent (sealed: due_at set, past deliver) and are
        overdue. Three GROUP BYs by plain columns, each read along the index (hospital, reviewer, step, due_at,
        overdue_at) without a sort; one GROUP BY over the expressions sorted all 100,000 rows (50 ms)."""
        c = cases.c
        where = c.hospital.in_(hospitals) if hospitals is not None else None

        def grouped(q):
            return q.where(where) if where is not None else q

        out: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for reviewer, step, n in conn.execute(grouped(
                    select(c.reviewer, c.step, func.count()).group_by(c.reviewer, c.step))):
                out.setdefault(reviewer, {})[step] = int(n)
            for name, cond in (("sent", and_(c.due_at.is_not(None), c.step != Step.DELIVER.value)),
                               ("overdue", and_(c.overdue_at.is_not(None), c.step == Step.AWAIT_OPINION.value))):
                for reviewer, n in conn.execute(grouped(
                        select(c.reviewer, func.count()).where(cond).group_by(c.reviewer))):
                    out.setdefault(reviewer, {})[name] = int(n)
        return out

    def turnaround_quantiles(self, reviewer: str, quantiles: tuple[float, ...],
                             hospitals: tuple[str, ...] | None = None) -> list[float | None]:
        """The delivery-to-filing seconds of the reviewer's filed opinions at these quantiles (nearest rank),
        read from the index on (reviewer, turnaround_seconds): one COUNT and one row per quantile."""
        c = cases.c
        # turnaround_seconds is written when the opinion is filed, and a filed Case stays done: no step test,
        # so the index (hospital, reviewer, turnaround_seconds) answers it alone.
        cond = and_(c.reviewer == reviewer, c.turnaround_seconds.is_not(None))
        if hospitals is not None:
            cond = and_(cond, c.hospital.in_(hospitals))
        with self.engine.connect() as conn:
            n = int(conn.execute(select(func.count()).select_from(cases).where(cond)).scalar_one())
            if not n:
                return [None for _ in quantiles]
            return [conn.execute(select(c.turnaround_seconds).where(cond).order_by(c.turnaround_seconds)
                                 .offset(max(0, int(n * q + 0.5) - 1)).limit(1)).scalar() for q in quantiles]

    def conclusion_counts(self, hospitals: tuple[str, ...] | None = None) -> dict[tuple[str | None, str | None], int]:
        """Filed opinions per (concordance, recommendation), from the summary written at filing."""
        c = cases.c
        q = (select(c.concordance, c.recommendation, func.count()).where(c.step == Step.DONE.value)
             .group_by(c.concordance, c.recommendation))
        if hospitals is not None:
            q = q.where(c.hospital.in_(hospitals))
        with self.engine.connect() as conn:
            return {(conc, rec): int(n) for conc, rec, n in conn.execute(q)}

    def unsummarised(self, limit: int) -> list[Case]:
        """Filed Cases without their opinion's summary (filed before migration 0006), oldest first."""
        q = (select(cases).where(and_(cases.c.step == Step.DONE.value, cases.c.filed_at.is_(None)))
             .order_by(cases.c.updated_at).limit(limit))
        with self.engine.connect() as conn:
            return [_case(r) for r in conn.execute(q)]

    def set_summary(self, case_id: str, *, concordance: str | None, recommendation: str | None, filed_at: float,
                    turnaround_seconds: float | None) -> None:
        """Record a filed opinion's summary; leaves updated_at alone (nothing happened to the Case)."""
        with self.engine.begin() as conn:
            conn.execute(update(cases).where(cases.c.id == case_id)
                         .values(concordance=concordance, recommendation=recommendation, filed_at=filed_at,
                                 turnaround_seconds=turnaround_seconds))

    def set_conclusion(self, case_id: str, *, concordance: str | None, recommendation: str | None) -> None:
        """A corrected opinion's codes in the summary; when and how fast the opinion was first filed stay."""
        with self.engine.begin() as conn:
            conn.execute(update(cases).where(cases.c.id == case_id)
                         .values(concordance=concordance, recommendation=recommendation))

    def update(self, case_id: str, *, event_kind: str | None = None, detail: dict | None = None,
               data: dict | None = None, **values) -> Case:
        """Update columns (and merge `data`), appending an event in the same transaction."""
        now = time.time()
        with self.engine.begin() as conn:
            if data is not None:
                current = conn.execute(select(cases.c.data).where(cases.c.id == case_id)).scalar_one()
                values["data"] = {**(current or {}), **data}
            conn.execute(update(cases).where(cases.c.id == case_id).values(updated_at=now, **values))
            if event_kind:
                conn.execute(insert(events).values(case_id=case_id, at=now, kind=event_kind, detail=detail or {}))
        return self.get(case_id)

    def add_event(self, case_id: str, kind: str, detail: dict | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(events).values(case_id=case_id, at=time.time(), kind=kind, detail=detail or {}))

    def events(self, case_id: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(events).where(events.c.case_id == case_id).order_by(events.c.id)).all()
        return [_plain(r) for r in rows]

    # --- work claiming -----------------------------------------------------------------------------

    def claim(self, *, steps: tuple[str, ...] = WORK_STEPS, lease_seconds: float = 300.0,
              worker: str | None = None, case_id: str | None = None, hospital: str | None = None) -> Case | None:
        """Claim one Case that has work due, with a lease, in ONE atomic UPDATE ... RETURNING.

        The claim condition appears in the outer WHERE as well as the subquery: under PostgreSQL READ
        COMMITTED a second worker blocked on the same row re-evaluates only the outer WHERE against the
        committed row, so without it both would "win". SKIP LOCKED lets workers pass over rows another is
        claiming instead of queueing on them (SQLite serialises writers and ignores it).

        The work steps are written as the partial index's own predicate (`tables.claimable`), so a claim
        reads `ix_cases_claimable` in `updated_at` order and stops at the first free, due Case: no sort
        (issue 19 goal 3). On PostgreSQL the statement is its own transaction on a connection of the claims
        pool, which does not ping before use: one round trip per claim, where BEGIN, a pre-ping and COMMIT
        made it four. A connection found dead is replaced and the claim sent once more; if the first one had
        in fact claimed a Case, that Case waits for its lease to lapse, as after a worker's crash.
        """
        now = time.time()
        # Named b_*: a bind named after a column is reserved by SQLAlchemy in an UPDATE.
        params = {"b_now": now, "b_until": now + lease_seconds, "b_worker": worker or worker_id(),
                  "b_case": case_id, "b_hospital": hospital}
        if tuple(steps) != WORK_STEPS:   # another set of steps (a command's narrower claim): the general form
            row = self._claim_general(tuple(steps), params)
            return _case(row) if row else None
        sql, names, fixed = _claim_sql(self.engine.dialect, case_id is not None, hospital is not None)
        params.update(fixed)
        # The statement is compiled once per form and sent as text: building and compiling it per claim was
        # most of a claim's own CPU (issue 19 goal 3: ~2 ms against the database's 3 ms on a loaded machine).
        args = tuple(params[n] for n in names) if names else params
        # One statement, its own transaction (as the raw statement is), through the driver's own cursor:
        # SQLAlchemy's result machinery per claim cost as much as the database's work. On SQLite a BEGIN
        # before it made 4 workers half as fast as one, queueing on the write lock in the busy handler.
        engine = self._claims_engine() if self.engine.dialect.name == "postgresql" else self.engine
        for attempt in (1, 2):
            try:
                return self._claim_raw(engine, sql, args)
            except DBAPIError as exc:
                if attempt == 2 or not exc.connection_invalidated:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _claim_raw(engine: Engine, sql: str, args) -> Case | None:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]  # open while conn is
            try:
                try:
                    cursor.execute(sql, args)
                    row = cursor.fetchone()
                except engine.dialect.loaded_dbapi.Error as exc:
                    # As SQLAlchemy would report it (a dropped connection marks the pool for renewal).
                    conn._handle_dbapi_exception(exc, sql, args, cursor, None)
                    raise
                names = [d[0] for d in cursor.description]
            finally:
                cursor.close()
        return _case_from_text(dict(zip(names, row, strict=True))) if row else None

    def _claim_general(self, steps: tuple[str, ...], params: dict):
        stmt = _claim_statement(self.engine.dialect.name, steps, params["b_case"] is not None,
                                params["b_hospital"] is not None)
        with self.engine.begin() as conn:
            return conn.execute(stmt, {k: v for k, v in params.items() if v is not None}).first()

    def _claims_engine(self) -> Engine:
        """PostgreSQL claims' own small pool: autocommit, no pre-ping (see `claim`)."""
        if self._claims is None:
            self._claims = create_engine(self.url, pool_pre_ping=False, isolation_level="AUTOCOMMIT",
                                         pool_recycle=_CLAIMS_RECYCLE_SECONDS, json_serializer=_json_dumps)
        return self._claims

    def finish_step(self, case_id: str, *, worker: str | None, expect_step: str, event_kind: str,
                    detail: dict | None = None, data: dict | None = None, **values) -> Case | None:
        """Record a step's outcome only if this worker still holds the Case at that step (compare-and-set).

        A worker whose lease lapsed, or whose Case was cancelled meanwhile, gets None and its result is
        dropped: the newer state wins and nothing is sent or filed twice."""
        now = time.time()
        with self.engine.begin() as conn:
            if data is not None:
                current = conn.execute(select(cases.c.data).where(cases.c.id == case_id)).scalar_one()
                values["data"] = {**(current or {}), **data}
            result = conn.execute(update(cases).where(and_(cases.c.id == case_id, cases.c.claimed_by == worker,
                                                           cases.c.step == expect_step))
                                  .values(updated_at=now, claimed_by=None, claimed_until=None, **values))
            if result.rowcount != 1:
                return None
            conn.execute(insert(events).values(case_id=case_id, at=now, kind=event_kind, detail=detail or {}))
        return self.get(case_id)

    def cancel(self, case_id: str, reason: str, *, by: str | None = None) -> Case | None:
        """Cancel unless finished; clears any claim so the holder's late result is dropped. `by`: who asked."""
        now = time.time()
        with self.engine.begin() as conn:
            result = conn.execute(update(cases).where(and_(cases.c.id == case_id, cases.c.step.not_in(FINAL_STEPS)))
                                  .values(step="cancelled", last_error=reason, updated_at=now, claimed_by=None,
                                          claimed_until=None))
            if result.rowcount != 1:
                return None
            conn.execute(insert(events).values(case_id=case_id, at=now, kind="cancelled",
                                               detail={"reason": reason, **({"by": by} if by else {})}))
        return self.get(case_id)

    def renew(self, case_id: str, worker: str, lease_seconds: float) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(update(cases).where(and_(cases.c.id == case_id, cases.c.claimed_by == worker))
                                  .values(claimed_until=time.time() + lease_seconds))
        return result.rowcount == 1

    def accept_opinion(self, case_id: str, *, jti: str, package_id: str, detail: dict) -> Case | None:
        """Atomically: record the message id (replay guard) and move the Case from awaiting (or still
        delivering: the reviewer can answer before we recorded the delivery) to `file`. None if the Case
        was not in such a state or the id was seen: nothing is recorded then."""
        now = time.time()
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(seen_messages).values(jti=jti, case_id=case_id, at=now))
                result = conn.execute(update(cases).where(and_(
                    cases.c.id == case_id, cases.c.step.in_((Step.AWAIT_OPINION.value, Step.DELIVER.value)),
                    cases.c.package_id == package_id))
                    .values(step=Step.FILE.value, opinion_id=jti, updated_at=now, attempts=0, last_error=None,
                            next_attempt_at=None, claimed_by=None, claimed_until=None))
                if result.rowcount != 1:
                    raise _NotAccepted()
                conn.execute(insert(events).values(case_id=case_id, at=now, kind="opinion.received", detail=detail))
        except (_NotAccepted, IntegrityError):
            return None
        return self.get(case_id)

    def release_worker(self, worker: str) -> int:
        """Drop every claim `worker` holds (it is stopping); returns how many were released."""
        with self.engine.begin() as conn:
            n = conn.execute(update(cases).where(cases.c.claimed_by == worker)
                             .values(claimed_by=None, claimed_until=None)).rowcount
            n += conn.execute(update(cursors).where(cursors.c.claimed_by == worker)
                              .values(claimed_by=None, claimed_until=None)).rowcount
        return n

    def release(self, case_id: str, worker: str | None = None) -> None:
        worker = worker or worker_id()
        with self.engine.begin() as conn:
            conn.execute(update(cases).where(and_(cases.c.id == case_id, cases.c.claimed_by == worker))
                         .values(claimed_by=None, claimed_until=None))

    def release_dead_local_claims(self) -> list[str]:
        """Free Cases claimed by a process of this host that no longer exists (a `fhirbridge run` that was
        killed), so the next run on this machine resumes them at once instead of waiting out the lease."""
        now = time.time()
        with self.engine.connect() as conn:
            rows = conn.execute(select(cases.c.id, cases.c.claimed_by).where(and_(
                cases.c.claimed_by.startswith(LOCAL_PREFIX, autoescape=True), cases.c.claimed_until > now))).all()
        freed = []
        for case_id, worker in rows:
            pid = worker.rsplit(":", 1)[1]
            if pid.isdigit() and not pid_alive(int(pid)):
                with self.engine.begin() as conn:
                    conn.execute(update(cases).where(and_(cases.c.id == case_id, cases.c.claimed_by == worker))
                                 .values(claimed_by=None, claimed_until=None))
                freed.append(case_id)
        return freed

    def clear_backoff(self, case_id: str | None = None) -> None:
        stmt = update(cases).where(cases.c.next_attempt_at.is_not(None))
        if case_id:
            stmt = stmt.where(cases.c.id == case_id)
        with self.engine.begin() as conn:
            conn.execute(stmt.values(next_attempt_at=None))

    def iter_claims(self, **kw) -> Iterator[Case]:
        while (case := self.claim(**kw)) is not None:
            yield case

    # --- polling cursors ---------------------------------------------------------------------------

    def claim_cursor(self, hospital: str, name: str, *, worker: str, lease_seconds: float) -> tuple[bool, str | None]:
        """(claimed, value): only one worker at a time may poll a source; the value is where it left off."""
        now = time.time()
        with self.engine.begin() as conn:
            exists = conn.execute(select(cursors.c.name).where(and_(cursors.c.hospital == hospital,
                                                                    cursors.c.name == name))).first()
            if exists is None:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(cursors).values(hospital=hospital, name=name, value=None, updated_at=now))
                except IntegrityError:
                    pass  # another worker created it first
            row = conn.execute(update(cursors).where(and_(
                cursors.c.hospital == hospital, cursors.c.name == name,
                or_(cursors.c.claimed_until.is_(None), cursors.c.claimed_until < now, cursors.c.claimed_by == worker)))
                .values(claimed_by=worker, claimed_until=now + lease_seconds).returning(cursors.c.value)).first()
        return (row is not None), (row[0] if row else None)

    def save_cursor(self, hospital: str, name: str, *, worker: str, value: str | None) -> bool:
        """Store where polling got to and release the claim; False if the claim was lost meanwhile."""
        with self.engine.begin() as conn:
            result = conn.execute(update(cursors).where(and_(cursors.c.hospital == hospital, cursors.c.name == name,
                                                             cursors.c.claimed_by == worker))
                                  .values(value=value, claimed_by=None, claimed_until=None, updated_at=time.time()))
        return result.rowcount == 1

    def release_cursor(self, hospital: str, name: str, *, worker: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(cursors).where(and_(cursors.c.hospital == hospital, cursors.c.name == name,
                                                    cursors.c.claimed_by == worker))
                         .values(claimed_by=None, claimed_until=None))

    def get_cursor(self, hospital: str, name: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(cursors.c.value).where(and_(cursors.c.hospital == hospital,
                                                                   cursors.c.name == name))).scalar()

    # --- turnaround --------------------------------------------------------------------------------

    def newly_overdue(self, hospital: str | None = None) -> list[Case]:
        """Cases awaiting an opinion past their due time that were not flagged yet; flags them (once)."""
        now = time.time()
        cond = and_(cases.c.step == Step.AWAIT_OPINION.value, cases.c.due_at.is_not(None), cases.c.due_at < now,
                    cases.c.overdue_at.is_(None))
        if hospital:
            cond = and_(cond, cases.c.hospital == hospital)
        with self.engine.begin() as conn:
            rows = conn.execute(update(cases).where(cond).values(overdue_at=now).returning(*cases.c)).all()
            for r in rows:
                conn.execute(insert(events).values(case_id=r.id, at=now, kind="overdue",
                                                   detail={"due_at": r.due_at}))
        return [_case(r) for r in rows]

    # --- audit trail -------------------------------------------------------------------------------

    def add_audit(self, *, id: str, hospital: str, patient: str, case_id: str, kind: str, recipient: str,
                  resource: dict, at: float | None = None) -> bool:
        """Record an AuditEvent; False (and nothing changed) if one with this id is already recorded."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(audit_events).values(id=id, at=at or time.time(), hospital=hospital,
                                                         patient=patient, case_id=case_id, kind=kind,
                                                         recipient=recipient, resource=resource,
                                                         sent_to_ehr=False))
            return True
        except IntegrityError:
            return False

    def list_audit(self, *, patient: str | None = None, case_id: str | None = None,
                     hospital: str | None = None, unsent: bool = False) -> list[dict]:
        """Recorded AuditEvents, oldest first, filtered by patient reference, Case, hospital, or not yet in
        the EHR."""
        q = (select(*(audit_events.c[name] for name in AUDIT_ACCOUNTING))
             .order_by(audit_events.c.at, audit_events.c.id))
        if patient is not None:
            q = q.where(audit_events.c.patient == patient)
        if case_id is not None:
            q = q.where(audit_events.c.case_id == case_id)
        if hospital is not None:
            q = q.where(audit_events.c.hospital == hospital)
        if unsent:
            q = q.where(audit_events.c.sent_to_ehr.is_(False))
        with self.engine.connect() as conn:
            return [_plain(r) for r in conn.execute(q)]

    def mark_audit(self, audit_id: str, *, sent: bool, error: str | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(audit_events).where(audit_events.c.id == audit_id)
                         .values(sent_to_ehr=sent, ehr_error=None if sent else error))

    def audit_refused(self, audit_id: str, *, error: str, now: float, backoff: Callable[[int], float]) -> int:
        """The EHR refused this AuditEvent's copy: count the attempt, keep the error, and set when to try
        again (`backoff(attempts)` seconds from now). Returns the attempts so far."""
        row = audit_events.c
        with self.engine.begin() as conn:
            attempts = conn.execute(update(audit_events).where(row.id == audit_id)
                                    .values(sent_to_ehr=False, ehr_error=error, ehr_tried_at=now,
                                            ehr_attempts=row.ehr_attempts + 1)
                                    .returning(row.ehr_attempts)).scalar() or 0
            conn.execute(update(audit_events).where(row.id == audit_id)
                         .values(ehr_retry_at=now + backoff(attempts)))
        return attempts

    def audit_due(self, *, hospital: str, now: float | None) -> list[dict]:
        """AuditEvents of a hospital owed to the EHR whose next attempt is due at `now` (None: all owed),
        oldest first."""
        row = audit_events.c
        q = select(audit_events).where(and_(row.hospital == hospital, row.sent_to_ehr.is_(False)))
        if now is not None:
            q = q.where(or_(row.ehr_retry_at.is_(None), row.ehr_retry_at <= now))
        with self.engine.connect() as conn:
            return [_plain(r) for r in conn.execute(q.order_by(row.at, row.id))]

    def audit_owed(self, *, hospital: str | None = None, limit: int = 20) -> dict:
        """What is owed to the EHR (a hospital's, or every one's): how many AuditEvents, the oldest, the last
        refusal (its error and time), the next attempt, and the `limit` oldest rows (no resource)."""
        row = audit_events.c
        cond: ColumnElement[bool] = row.sent_to_ehr.is_(False)
        if hospital is not None:
            cond = and_(cond, row.hospital == hospital)
        with self.engine.connect() as conn:
            count, oldest, next_at = conn.execute(
                select(func.count(), func.min(row.at), func.min(row.ehr_retry_at)).where(cond)).one()
            last = conn.execute(select(row.ehr_error, row.ehr_tried_at)
                                .where(and_(cond, row.ehr_tried_at.is_not(None)))
                                .order_by(row.ehr_tried_at.desc()).limit(1)).first()
            rows = [_plain(r) for r in conn.execute(
                select(row.id, row.hospital, row.case_id, row.kind, row.at, row.ehr_error, row.ehr_attempts,
                       row.ehr_tried_at, row.ehr_retry_at).where(cond).order_by(row.at, row.id).limit(limit))]
        return {"count": count, "oldest_at": oldest, "next_attempt_at": next_at,
                "last_error": last[0] if last else None, "last_tried_at": last[1] if last else None,
                "rows": rows}

    # --- replay guard ------------------------------------------------------------------------------

    # --- the write ledger (tables.write_ledger; loop/post_writes.py) ---------------------------------------

    def ledger(self, case_id: str) -> dict[str, dict]:
        """The Case's recorded writes, by kind."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(write_ledger).where(write_ledger.c.case_id == case_id)).all()
        return {r.kind: _plain(r) for r in rows}

    def ledger_record(self, case_id: str, kind: str, *, identifier: str, state: str,
                      server_id: str | None = None, sent: bool = False) -> dict:
        """Record the state of one write (inserting its row the first time); `sent` counts a sending.
        Committed before the caller goes on: the row must be in the store before the write leaves."""
        assert state in LEDGER_STATES
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(select(write_ledger).where(write_ledger.c.case_id == case_id,
                                                          write_ledger.c.kind == kind)).first()
            values = dict(identifier=identifier, state=state, server_id=server_id, updated_at=now)
            if row is None:
                conn.execute(insert(write_ledger).values(case_id=case_id, kind=kind, attempts=int(sent), **values))
            else:
                conn.execute(update(write_ledger).where(write_ledger.c.case_id == case_id,
                                                        write_ledger.c.kind == kind)
                             .values(attempts=write_ledger.c.attempts + int(sent), **values))
        return self.ledger(case_id)[kind]

    def remember_message(self, jti: str, case_id: str) -> bool:
        """Record a message id; False if it was seen before (a replay)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(seen_messages).values(jti=jti, case_id=case_id, at=time.time()))
            return True
        except IntegrityError:
            return False

    def remember_token(self, jti: str, who: str, *, keep_seconds: float = 900.0) -> bool:
        """Record the jti of a short-lived API token (a reviewer's signed JWT); False if it was used before.
        Rows of tokens that have long expired are dropped as new ones arrive: the table never grows with the
        API traffic, only with the opinions it guards."""
        now = time.time()
        key = f"token:{jti}"[:200]
        try:
            with self.engine.begin() as conn:
                self._sweep_tokens(conn, now, keep_seconds)
                conn.execute(insert(seen_messages).values(jti=key, case_id=f"token:{who}"[:64], at=now))
            return True
        except IntegrityError:
            return False

    def _sweep_tokens(self, conn, now: float, keep_seconds: float) -> None:
        # The sweep of expired token rows runs at most once a minute per process, not on every API call.
        if now < getattr(self, "_token_sweep_at", 0.0):
            return
        self._token_sweep_at = now + 60
        conn.execute(seen_messages.delete().where(and_(seen_messages.c.case_id.like("token:%"),
                                                       seen_messages.c.at < now - keep_seconds)))

    # Signed-out page sessions: rows `session:<sid>` in seen_messages, kept as long as such a session could
    # otherwise live, so a replayed cookie is refused by every worker and replica, not only the one signed out at.
    def revoke_session(self, sid: str, *, keep_seconds: float) -> None:
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(seen_messages.delete().where(and_(seen_messages.c.case_id == SIGNED_OUT,
                                                           seen_messages.c.at < now - keep_seconds)))
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(seen_messages).values(jti=f"session:{sid}"[:200], case_id=SIGNED_OUT, at=now))
        except IntegrityError:
            pass                                            # signed out twice: once is enough

    def session_revoked(self, sid: str) -> bool:
        return self.message_seen(f"session:{sid}"[:200])

    # --- CDS Hooks cards (ehr/cds.py): what was shown, and the feedback on it -------------------------------
    def record_cds_call(self, jti: str, who: str, rows: list[dict], *, keep_seconds: float = 900.0) -> bool:
        """One CDS Hooks answer, in one transaction: the calling JWT's `jti` (as `remember_token` keeps it) and
        the cards shown (a card already recorded is kept as it is). False, with nothing recorded, when the jti
        was used before (a replay). One commit per call: on SQLite with FULL sync each commit is an fsync, the
        larger part of an answer's time (docs/performance.md, CDS Hooks)."""
        key = f"token:{jti}"[:200]
        for _attempt in range(2):
            now = time.time()
            try:
                with self.engine.begin() as conn:
                    self._sweep_tokens(conn, now, keep_seconds)
                    conn.execute(insert(seen_messages).values(jti=key, case_id=f"token:{who}"[:64], at=now))
                    if rows:
                        known = set(conn.execute(select(cds_cards.c.card_id).where(
                            cds_cards.c.card_id.in_([r["card_id"] for r in rows]))).scalars())
                        fresh = [{**r, "issued_at": now} for r in rows if r["card_id"] not in known]
                        if fresh:
                            conn.execute(insert(cds_cards), fresh)
                return True
            except IntegrityError:
                if self.message_seen(key):
                    return False
                # Not the jti: the same hook call answered at the same moment elsewhere recorded the card
                # first; once more, and the card is known now.
        return False

    def cds_card(self, card_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(cds_cards).where(cds_cards.c.card_id == card_id)).first()
        return dict(row._mapping) if row else None

    def cds_card_for(self, *, case_id: str | None = None, order: str | None = None) -> dict | None:
        """The card whose accepted suggestion opened this Case or placed this second-opinion order
        ("ServiceRequest/<id>"), or None: the outcomes (issue 18 part 2) follow its draft order."""
        k = cds_cards.c
        where = k.case_id == case_id if case_id is not None else k.second_opinion_order == order
        with self.engine.connect() as conn:
            row = conn.execute(select(cds_cards).where(where)).first()
        return dict(row._mapping) if row else None

    def cds_feedback(self, card_id: str, *, outcome: str, override_reason: str | None = None,
                     at: float | None = None) -> bool:
        """Record the outcome of a card; True when it changed. The first feedback is the outcome, except that an
        acceptance wins over an earlier override: its suggestion's order exists, so the card was followed. A
        repeated feedback changes nothing."""
        k = cds_cards.c
        open_to = or_(k.outcome.is_(None), k.outcome == "overridden") if outcome == "accepted" else k.outcome.is_(None)
        with self.engine.begin() as conn:
            done = conn.execute(update(cds_cards).where(and_(cds_cards.c.card_id == card_id, open_to))
                                .values(outcome=outcome, override_reason=override_reason,
                                        outcome_at=at or time.time()))
            return bool(done.rowcount)

    def cds_ordered(self, card_id: str, *, order: str, case_id: str | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(cds_cards).where(cds_cards.c.card_id == card_id)
                         .values(second_opinion_order=order, case_id=case_id))

    def message_seen(self, jti: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(seen_messages.c.jti).where(seen_messages.c.jti == jti)).first() is not None


class _NotAccepted(Exception):
    pass


LEDGER_STATES = ("intended", "sent", "confirmed")


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine (this PID namespace) still exists: a claim it holds is not abandoned."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def new_id() -> str:
    return str(uuid.uuid4())


def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # sqlite:///relative.db, sqlite:////absolute.db; "sqlite://" alone is an in-memory database.
        path = url[len("sqlite:///"):].split("?", 1)[0] if url.startswith("sqlite:///") else ""
        on_disk = bool(path) and path != ":memory:"
        if on_disk:
            _private_sqlite_file(path)
        engine = create_engine(url, connect_args={"timeout": 30}, json_serializer=_json_dumps)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # WAL: readers don't block the writer; FULL sync: no lost step
            cur = dbapi_conn.cursor()
            _wal(cur)
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
            if on_disk:
                # SQLite gives its -wal/-shm/-journal files the database file's mode (os_unix.c,
                # findCreateFileMode), so they are 0600 too; narrowed here should a build do otherwise.
                files.narrow_files(f"{path}{suffix}" for suffix in SQLITE_COMPANIONS)
        return engine
    return create_engine(url, pool_pre_ping=True, json_serializer=_json_dumps)


SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def _private_sqlite_file(path: str) -> None:
    """The database file made 0600 before SQLite opens it (SQLite would make it 0644 minus the umask, and
    the file holds every Case's patient reference and errors), in a folder made 0700; an older install's
    wider file and companions are narrowed, with a warning (issue 13, S11)."""
    files.private_dir(os.path.dirname(os.path.abspath(path)))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, files.PRIVATE_FILE)
    except FileExistsError:
        files.narrow_files([path, *(f"{path}{suffix}" for suffix in SQLITE_COMPANIONS)])
        return
    os.close(fd)   # an empty file is a new database to SQLite


def _wal(cur, wait: float = 30.0) -> None:
    """Switch to WAL, waiting for other processes. Switching a database that is not yet in WAL mode (a new
    file) fails at once with "database is locked" while another connection writes, whatever busy_timeout
    says: several replicas or gunicorn workers starting on a fresh file hit exactly that."""
    deadline = time.monotonic() + wait
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _json_dumps(obj) -> str:
    return orjson.dumps(obj).decode()


def ping(store: Store) -> None:
    with store.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
