"""Outcomes: the store's part of one follow-up tick (loop/outcomes.py) does not grow with the closed rows.

Two SQLite stores with the same 100 open outcome rows; the second also holds `closed` closed rows (what years of
filed opinions leave). Contenders, interleaved: one tick's store work on each (claim a page of 50 due rows with
the compare-and-set, record a check on each; the EHR is left out, it is the same in both), and, as what a
tick without the index and the state filter would cost, reading every row of the large store and picking
the due ones in Python. Goal: the large store's tick within 1.5x of the small one's.
"""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import insert

from fhirbridge.store.store import Store
from fhirbridge.store.tables import outcomes

from .common import side_by_side

OPEN = 100
PAGE = 50


def _fill(store: Store, closed: int) -> None:
    rows = [dict(case_id=f"c{i:06d}", hospital="h", reviewer="r", profile="spine", patient=f"Patient/{i}",
                 order_ref=f"ServiceRequest/{i}", filed_at=1.0, window_ends=10.0**10,
                 recommendation="non-surgical-care",
                 concordance="concordant", checks=0, state="open" if i < OPEN else "closed",
                 result=None if i < OPEN else "revoked", next_check_at=0.0 if i < OPEN else None)
            for i in range(OPEN + closed)]
    with store.engine.begin() as conn:
        conn.execute(insert(outcomes), rows)


def _due_again(*stores: Store) -> None:
    for s in stores:
        with s.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE outcomes SET next_check_at = 0 WHERE state != 'closed'")


def _tick(store: Store) -> int:
    claimed = store.outcomes.claim_due("h", now=100.0, lease=600, limit=PAGE)
    for row in claimed:
        store.outcomes.record(row.case_id, now=100.0, next_check_at=3700.0, state="open")
    return len(claimed)


def _scan(store: Store) -> int:
    return len([r for r in store.outcomes.rows() if r.state != "closed" and (r.next_check_at or 0) <= 100.0][:PAGE])


def run(root: Path, closed: int, repeats: int, *, log) -> dict:
    small, large = Store(f"sqlite:///{root / 'small.db'}"), Store(f"sqlite:///{root / 'large.db'}")
    try:
        log(f"  filling: {OPEN} open rows, and {OPEN} open + {closed} closed")
        _fill(small, 0)
        _fill(large, closed)
        t = side_by_side({"tick, open rows only": lambda: _tick(small),
                          f"tick, + {closed} closed": lambda: _tick(large),
                          f"scan of all {OPEN + closed} rows": lambda: _scan(large)},
                         repeats, setup=lambda: _due_again(small, large))
        assert all(n == PAGE for runs in t.results.values() for n in runs)
        return {"closed": closed, "open": OPEN, "page": PAGE,
                "median_s": {n: round(t.median(n), 5) for n in t.runs},
                "large_vs_small": round(t.ratio(f"tick, + {closed} closed", "tick, open rows only"), 3),
                "scan_vs_tick": round(t.ratio(f"scan of all {OPEN + closed} rows", f"tick, + {closed} closed"), 3)}
    finally:
        small.close()
        large.close()
