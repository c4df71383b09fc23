"""The Case list in SQL: filters, a sort, and a keyset cursor, so one page costs the same at 100 or 100,000 Cases.

A page is `limit` rows of the filtered Cases in the order asked for, with the id as tie-breaker; the cursor is
the position after its last row, (sort key, id), base64url-encoded JSON. It is not signed: it carries no right
(the same filters and the caller's hospitals apply to every page) and a forged one only moves the start. The
filters go into the WHERE clause (never filtered in Python after reading), and every sort has an index
(tables.CASE_LIST_INDEX_COLUMNS, migration 0006): the database reads one page of the index, not every Case.

Why keyset and not OFFSET: OFFSET reads and drops every row before the page (page 1,000 of 100 rows reads
100,000), and a Case that moves while someone pages makes OFFSET skip or repeat rows.
"""
from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta, tzinfo
from datetime import time as dt_time

import orjson
from sqlalchemy import and_, or_
from sqlalchemy.sql.elements import ColumnElement

from fhirbridge.errors import CaseError
from fhirbridge.steps import ALL_STEPS, WORK_STEPS, Step
from fhirbridge.store.tables import cases

# sort name -> column. Both are never null, so the keyset comparison needs no NULL handling.
SORTS = {"updated": cases.c.updated_at, "created": cases.c.created_at}
DEFAULT_LIMIT = 50
MAX_LIMIT = 200


@dataclass(frozen=True)
class CaseFilter:
    """What a list asks for; every field left at its default does not filter. Values are exact (a Case id
    may be its first characters)."""

    case_id: str | None = None               # a Case id or its first characters
    service_request: str | None = None       # "ServiceRequest/<id>"
    patient: str | None = None               # "Patient/<id>"
    reviewer: str | None = None              # the reviewer's configured name
    steps: tuple[str, ...] = ()              # any of these steps
    hospitals: tuple[str, ...] | None = None  # hospital keys the caller may see (None: every hospital)
    created_from: float | None = None        # created at or after (epoch seconds)
    created_to: float | None = None          # created before
    overdue: bool = False                    # awaiting an opinion past its due time (flagged overdue)
    failed: bool = False                     # failed, or at a work step with an error and retrying
    needs_review: bool = False               # a person must check the chart

    def where(self) -> ColumnElement[bool] | None:
        c = cases.c
        parts: list[ColumnElement[bool]] = []
        if self.case_id:
            parts.append(c.id.startswith(self.case_id, autoescape=True))
        if self.service_request:
            parts.append(c.service_request == self.service_request)
        if self.patient:
            parts.append(c.patient == self.patient)
        if self.reviewer:
            parts.append(c.reviewer == self.reviewer)
        if self.steps:
            parts.append(c.step.in_(self.steps))
        if self.hospitals is not None:
            parts.append(c.hospital.in_(self.hospitals))
        if self.created_from is not None:
            parts.append(c.created_at >= self.created_from)
        if self.created_to is not None:
            parts.append(c.created_at < self.created_to)
        if self.overdue:
            # overdue_at is set once (Store.newly_overdue) and kept; only Cases still waiting are overdue now.
            parts.append(and_(c.step == Step.AWAIT_OPINION.value, c.overdue_at.is_not(None)))
        if self.failed:
            parts.append(or_(c.step == Step.FAILED.value,
                             and_(c.step.in_(WORK_STEPS), c.last_error.is_not(None))))
        if self.needs_review:
            parts.append(c.step == Step.NEEDS_REVIEW.value)
        return and_(*parts) if parts else None

    def narrowed_to(self, hospitals: Iterable[str] | None) -> CaseFilter:
        """The same filter limited to these hospital keys too (a sign-in that sees only some hospitals)."""
        if hospitals is None:
            return self
        allowed = tuple(hospitals)
        if self.hospitals is not None:
            allowed = tuple(h for h in self.hospitals if h in allowed)
        return replace(self, hospitals=allowed)


@dataclass(frozen=True)
class CasePage:
    cases: list = field(default_factory=list)   # store.Case rows, in the order asked for
    next: str | None = None                      # the cursor of the next page; None: this is the last page


def encode_cursor(sort: str, descending: bool, key: float, case_id: str) -> str:
    raw = orjson.dumps([sort, "desc" if descending else "asc", key, case_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, sort: str, descending: bool) -> tuple[float, str]:
    """(sort key, id) after which the page starts. A cursor of another sort or direction, or not one of ours,
    is refused: reading on from it would silently show the wrong rows."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        name, direction, key, case_id = orjson.loads(raw)
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise CaseError("the cursor is not one this service gave out: start again from the first page") from None
    if not isinstance(key, int | float) or not isinstance(case_id, str):
        raise CaseError("the cursor is not one this service gave out: start again from the first page")
    if name != sort or direction != ("desc" if descending else "asc"):
        raise CaseError("the cursor belongs to another sort order: start again from the first page")
    return float(key), case_id


def page_query(q, flt: CaseFilter, *, sort: str, descending: bool, limit: int, cursor: str | None):
    """`q` (a select of cases) filtered, ordered and limited to one page plus one row (to know if more follow)."""
    col = SORTS[sort]
    cond = flt.where()
    if cond is not None:
        q = q.where(cond)
    if cursor:
        key, after_id = decode_cursor(cursor, sort, descending)
        # Row-value comparison spelled out: (col, id) < (key, after_id), which both engines serve from the index.
        if descending:
            q = q.where(or_(col < key, and_(col == key, cases.c.id < after_id)))
        else:
            q = q.where(or_(col > key, and_(col == key, cases.c.id > after_id)))
    order = (col.desc(), cases.c.id.desc()) if descending else (col.asc(), cases.c.id.asc())
    return q.order_by(*order).limit(limit + 1)


@dataclass(frozen=True)
class ListRequest:
    """A Case list asked for by query parameters (GET /api/cases, the dashboard's list): the same names and
    checks in both places, so a link copied from one works in the other."""

    filter: CaseFilter
    sort: str = "updated"
    descending: bool = True
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None

    @classmethod
    def from_args(cls, args: Mapping[str, str], *, tz: tzinfo = UTC, default_limit: int = DEFAULT_LIMIT) -> ListRequest:
        """Read the parameters; a bad one raises CaseError naming it (the API answers 400 with it). Dates are
        `YYYY-MM-DD` (the whole day, in `tz`) or ISO 8601 date-times; `created_to` is exclusive for a
        date-time and includes the whole day for a date."""
        unknown = sorted(set(args) - PARAMS)
        if unknown:
            raise CaseError(f"unknown parameter {unknown[0]!r} (known: {', '.join(sorted(PARAMS))})")

        def text(name: str) -> str | None:
            value = (args.get(name) or "").strip()
            return value or None

        steps = tuple(s for s in (text("step") or "").split(",") if s)
        bad = [s for s in steps if s not in ALL_STEPS]
        if bad:
            raise CaseError(f"step must be one of {', '.join(ALL_STEPS)} (several: comma-separated); got {bad[0]!r}")
        flags: dict[str, bool] = {}
        for name in ("overdue", "failed", "needs_review"):
            value = text(name)
            if value not in (None, "true", "false"):
                raise CaseError(f'{name} must be "true" or "false" (or left out)')
            flags[name] = value == "true"
        sort = text("sort") or "updated"
        if sort not in SORTS:
            raise CaseError(f"sort must be one of {', '.join(SORTS)}")
        direction = text("dir") or "desc"
        if direction not in ("asc", "desc"):
            raise CaseError('dir must be "asc" or "desc"')
        limit = default_limit
        if text("limit") is not None:
            try:
                limit = int(text("limit") or "")
            except ValueError:
                raise CaseError(f"limit must be a whole number from 1 to {MAX_LIMIT}") from None
            if not 1 <= limit <= MAX_LIMIT:
                raise CaseError(f"limit must be a whole number from 1 to {MAX_LIMIT}")
        patient, order = text("patient"), text("order")
        if patient and not patient.startswith("Patient/"):
            patient = f"Patient/{patient}"
        if order and not order.startswith("ServiceRequest/"):
            order = f"ServiceRequest/{order}"
        flt = CaseFilter(case_id=text("case"), service_request=order, patient=patient, reviewer=text("reviewer"),
                         steps=steps, created_from=_when("created_from", text("created_from"), tz, end=False),
                         created_to=_when("created_to", text("created_to"), tz, end=True),
                         overdue=flags["overdue"], failed=flags["failed"], needs_review=flags["needs_review"])
        cursor = text("cursor")
        if cursor:
            decode_cursor(cursor, sort, direction == "desc")     # refused now, with its reason, not later
        return cls(flt, sort, direction == "desc", limit, cursor)


# The query parameters of a Case list (ListRequest.from_args); `hospital` is read by the caller (it names a
# configured hospital, which this layer does not know).
PARAMS = frozenset({"case", "order", "patient", "reviewer", "step", "hospital", "created_from", "created_to",
                    "overdue", "failed", "needs_review", "sort", "dir", "limit", "cursor"})


def _when(name: str, value: str | None, tz: tzinfo, *, end: bool) -> float | None:
    if value is None:
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            start = datetime.combine(day, dt_time(), tzinfo=tz)
            return (start + timedelta(days=1)).timestamp() if end else start.timestamp()
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise CaseError(f"{name} must be a date (YYYY-MM-DD) or an ISO 8601 date-time; got {value!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=tz)).timestamp()
