"""Claims: Cases claimed per second by 1 and 4 worker processes, on the realistic mix, on SQLite and
PostgreSQL, every claim checked for duplicates (issue 19 goal 3).

The mix is that of a running service: most Cases wait for an opinion or are done, a few are due at a work
step, and some at a work step are backing off (not due yet), for two hospitals; the workers are one
hospital's, as `run_pending` claims. Contenders, interleaved, on the same table (every claim released
between repetitions):

* fhirbridge: `Store.claim` (one UPDATE ... WHERE id = (SELECT ... [FOR UPDATE SKIP LOCKED]) RETURNING
  every column), each process with its own Store, claiming until nothing is left;
* bound: the same statement, hand-written, through the driver itself (psycopg in autocommit; sqlite3), so
  the database's own speed at handing out the same rows.

Workers connect and warm up first, then wait for one start signal; the time runs from the signal to the
last worker finding nothing left. Each worker returns the ids it claimed, so a Case handed out twice is
counted (it must never happen).
"""
from __future__ import annotations

import multiprocessing as mp
import time
import uuid
from collections import Counter
from pathlib import Path

from sqlalchemy import create_engine, text

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
WORK = ("collect", "seal", "deliver", "file")
OTHERS_PER_DUE = 15        # Cases waiting, done or backing off per Case due: 64,000 Cases for 4,000 due
COLUMNS = ("id, hospital, service_request, patient, reviewer, profile, step, task, package_id, opinion_id, "
           "document_reference, attempts, last_error, next_attempt_at, claimed_by, claimed_until, created_at, "
           "updated_at, data, due_at, overdue_at, concordance, recommendation, filed_at, turnaround_seconds")


def _schema_url(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


def _raw_sql(param: str) -> str:
    steps = ", ".join(f"'{s}'" for s in WORK)
    p = (lambda n: f"%({n})s") if param == "pyformat" else (lambda n: f":{n}")
    lock = " FOR UPDATE SKIP LOCKED" if param == "pyformat" else ""
    free = f"(claimed_until IS NULL OR claimed_until < {p('now')})"
    return (f"UPDATE cases SET claimed_by = {p('w')}, claimed_until = {p('until')} WHERE id = ("
            f"SELECT id FROM cases WHERE step IN ({steps}) AND {free}"
            f" AND (next_attempt_at IS NULL OR next_attempt_at <= {p('now')}) AND hospital = {p('h')}"
            f" ORDER BY updated_at LIMIT 1{lock}) AND {free} RETURNING {COLUMNS}")


def _worker(kind: str, url: str, name: str, ready, go, out) -> None:
    ids: list[str] = []
    if kind == "fhirbridge":
        from fhirbridge.store.store import Store
        store = Store(url, create=False)
        store.claim(worker=name, case_id="warm-up-none", hospital="h1", lease_seconds=600)   # connects
        ready.put(name)
        go.wait()
        while (case := store.claim(worker=name, hospital="h1", lease_seconds=600)) is not None:
            ids.append(case.id)
        store.close()
    elif url.startswith("sqlite"):
        import sqlite3
        conn = sqlite3.connect(url[len("sqlite:///"):], timeout=30, isolation_level=None)
        conn.execute("PRAGMA synchronous=FULL")
        sql = _raw_sql("named")
        ready.put(name)
        go.wait()
        while True:
            now = time.time()
            row = conn.execute(sql, {"w": name, "until": now + 600, "now": now, "h": "h1"}).fetchone()
            if row is None:
                break
            ids.append(row[0])
        conn.close()
    else:
        import psycopg
        dsn, _, query = url.replace("postgresql+psycopg://", "postgresql://").partition("?")
        opts = query.split("options=", 1)[1].replace("%3D", "=") if "options=" in query else ""
        with psycopg.connect(dsn, options=opts, autocommit=True) as conn:
            sql = _raw_sql("pyformat")
            conn.execute("SELECT 1")
            ready.put(name)
            go.wait()
            while True:
                now = time.time()
                row = conn.execute(sql, {"w": name, "until": now + 600, "now": now, "h": "h1"}).fetchone()
                if row is None:
                    break
                ids.append(row[0])
    out.put((name, time.monotonic(), ids))


def _one_run(kind: str, url: str, workers: int) -> dict:
    ctx = mp.get_context("spawn")   # a fresh interpreter per worker: no engine or connection crosses a fork
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_worker, args=(kind, url, f"{kind}-{i}", ready, go, out)) for i in range(workers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    started = time.monotonic()
    go.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    ended = max(r[1] for r in results)
    claimed = [i for r in results for i in r[2]]
    counts = Counter(claimed)
    return {"seconds": ended - started, "claims": len(claimed),
            "duplicates": sum(n - 1 for n in counts.values() if n > 1), "distinct": len(counts),
            "per_worker": [len(r[2]) for r in results]}


def _load_mix(store, due: int) -> int:
    """`due` Cases due at a work step for hospital h1, and OTHERS_PER_DUE times as many others: waiting for an
    opinion (most), done, failed, at a work step but backing off, or the other hospital's."""
    now = time.time()
    rows = []
    total = due * (OTHERS_PER_DUE + 1)
    for i in range(total):
        hospital, step, backoff = "h1", "await_opinion", None
        if i % (OTHERS_PER_DUE + 1) == 0:
            step = WORK[(i // (OTHERS_PER_DUE + 1)) % len(WORK)]
        else:
            kind = i % 10
            if kind < 5:
                step = "await_opinion"
            elif kind < 8:
                step = "done"
            elif kind == 8:
                step, backoff = WORK[i % len(WORK)], now + 3600
            else:
                hospital, step = "h2", WORK[i % len(WORK)]
        rows.append({"id": str(uuid.uuid4()), "h": hospital, "sr": f"ServiceRequest/{i}", "step": step,
                     "t": now - total + i, "next": backoff})
    with store.engine.begin() as conn:
        for start in range(0, len(rows), 5000):
            conn.execute(text("INSERT INTO cases (id, hospital, service_request, patient, reviewer, profile, step, "
                              "attempts, created_at, updated_at, next_attempt_at, data) VALUES (:id, :h, :sr, "
                              "'Patient/1', 'r', 'default', :step, 0, :t, :t, :next, '{}')"), rows[start:start + 5000])
    with store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("VACUUM ANALYZE cases" if store.engine.dialect.name == "postgresql" else "SELECT 1"))
    return total


def _run_engine(name: str, url: str, due: int, repeats: int, log) -> dict:
    from fhirbridge.store.store import Store

    from .common import side_by_side

    store = Store(url)
    total = _load_mix(store, due)

    def reset() -> None:
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE cases SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by IS NOT NULL"))

    contenders = {f"fhirbridge {w} worker{'s' if w > 1 else ''}": (lambda w=w: _one_run("fhirbridge", url, w))
                  for w in (4, 1)}
    contenders.update({f"raw SQL {w} worker{'s' if w > 1 else ''}": (lambda w=w: _one_run("raw", url, w))
                       for w in (4, 1)})
    t = side_by_side(contenders, repeats, warmup=0, setup=reset)
    store.close()
    rows = {}
    for n in contenders:
        res = t.results[n]
        rows[n] = {"claims_per_second": round(due / t.median(n)), "median_s": round(t.median(n), 3),
                   "spread": round(t.spread(n), 3), "duplicates": sum(r["duplicates"] for r in res),
                   "missed": sum(due - r["distinct"] for r in res), "per_worker_last": res[-1]["per_worker"]}
    out = {"engine": name, "due": due, "cases": total, "rows": rows,
           # claims/s of fhirbridge over the raw statement's = the raw time over fhirbridge's
           "fhirbridge_over_raw": {w: round(1 / t.ratio(f"fhirbridge {w}", f"raw SQL {w}"), 2)
                                   for w in ("4 workers", "1 worker")}}
    log(f"  claims {name}: " + ", ".join(f"{n} {r['claims_per_second']}/s (dup {r['duplicates']}, missed "
                                         f"{r['missed']})" for n, r in rows.items())
        + f"; fhirbridge/raw claims/s {out['fhirbridge_over_raw']}")
    return out


def run(root: Path, due: int, repeats: int, url: str = DEFAULT_URL, log=print) -> dict:
    out: dict = {"engines": {}}
    out["engines"]["sqlite"] = _run_engine("sqlite", f"sqlite:///{root / 'claims.db'}", due, repeats, log)
    schema = f"fb_bench_{uuid.uuid4().hex[:10]}"
    try:
        admin = create_engine(url)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # noqa: BLE001 - no PostgreSQL here: the SQLite figures stand alone
        out["engines"]["postgresql"] = {"skipped": f"PostgreSQL unreachable at {url}: {type(exc).__name__}"}
        return out
    try:
        out["engines"]["postgresql"] = _run_engine("postgresql", _schema_url(url, schema), due, repeats, log)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    return out
