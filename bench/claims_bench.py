"""Claims: Cases claimed per second on PostgreSQL by 4 worker processes, every claim checked for duplicates.

Contenders, interleaved, on the same table (every claim released between repetitions):

* fhirbridge: `Store.claim` (SQLAlchemy, one atomic UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP
  LOCKED) RETURNING *), 4 processes, each with its own Store, claiming until nothing is left;
* bound: the same claim as one hand-written statement through psycopg (no SQLAlchemy, returning only
  the id), 4 processes: the database's own speed at handing out rows;
* fhirbridge, 1 worker: how far 4 workers scale;
* diagnostic: fhirbridge, 4 workers, with SQLAlchemy's pool pre-ping off (one of the causes measured).

Workers connect and warm up first, then wait for one start signal; the time runs from the signal to the
last worker finding nothing left. Each worker returns the ids it claimed, so a Case handed out twice is
counted (it must never happen).
"""
from __future__ import annotations

import multiprocessing as mp
import time
import uuid
from collections import Counter

from sqlalchemy import create_engine, text

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _schema_url(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


def _worker(kind: str, url: str, name: str, ready, go, out) -> None:
    ids: list[str] = []
    if kind.startswith("fhirbridge"):
        from fhirbridge.store.store import Store
        store = Store(url, create=False)
        if kind == "fhirbridge-no-ping":
            # Diagnostic only: the same Store with SQLAlchemy's pre-ping (a SELECT 1 on every checkout) off.
            from sqlalchemy import create_engine as _ce
            store.engine.dispose()
            store.engine = _ce(url, pool_pre_ping=False)
        store.claim(worker=name, case_id="warm-up-none", lease_seconds=600)   # connects; claims nothing
        claim = lambda: store.claim(worker=name, lease_seconds=600)  # noqa: E731
        ready.put(name)
        go.wait()
        while (case := claim()) is not None:
            ids.append(case.id)
        store.close()
    else:
        import psycopg
        dsn, _, query = url.replace("postgresql+psycopg://", "postgresql://").partition("?")
        opts = query.split("options=", 1)[1].replace("%3D", "=") if "options=" in query else ""
        with psycopg.connect(dsn, options=opts, autocommit=True) as conn:
            sql = ("UPDATE cases SET claimed_by = %(w)s, claimed_until = %(until)s WHERE id = ("
                   "SELECT id FROM cases WHERE step = ANY(%(steps)s)"
                   " AND (claimed_until IS NULL OR claimed_until < %(now)s)"
                   " AND (next_attempt_at IS NULL OR next_attempt_at <= %(now)s) ORDER BY updated_at LIMIT 1"
                   " FOR UPDATE SKIP LOCKED) AND (claimed_until IS NULL OR claimed_until < %(now)s) RETURNING id")
            steps = ["collect", "seal", "deliver", "file"]
            conn.execute("SELECT 1")
            ready.put(name)
            go.wait()
            while True:
                now = time.time()
                row = conn.execute(sql, {"w": name, "until": now + 600, "now": now, "steps": steps}).fetchone()
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


def statements_per_claim(url: str) -> dict:
    """What one Store.claim sends to PostgreSQL: statements SQLAlchemy executes, pre-ping checks and
    transaction ends, counted with engine events over 20 claims (a fresh schema, so nothing is claimable
    after the table is gone: run before it is dropped)."""
    from sqlalchemy import event

    from fhirbridge.store.store import Store

    store = Store(url, create=False)
    counts = Counter()
    event.listen(store.engine, "before_cursor_execute", lambda *a, **k: counts.update(["statement"]))
    event.listen(store.engine, "commit", lambda *a, **k: counts.update(["commit"]))
    event.listen(store.engine, "checkout", lambda *a, **k: counts.update(["checkout"]))
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE cases SET claimed_by = NULL, claimed_until = NULL"))
    counts.clear()
    n = 20
    for _ in range(n):
        store.claim(worker="count", lease_seconds=600)
    # pool_pre_ping sends its own "SELECT 1" on checkout, outside before_cursor_execute: one per checkout.
    pings = counts["checkout"] if getattr(store.engine.pool, "_pre_ping", False) else 0
    per = {k: v / n for k, v in counts.items()}
    per["pre_ping"] = pings / n
    per["round_trips"] = per.get("statement", 0) + per.get("commit", 0) + per["pre_ping"]
    store.close()
    return per


def run(cases: int, repeats: int, url: str = DEFAULT_URL, log=print) -> dict:
    from fhirbridge.store.store import Store

    from .common import side_by_side

    schema = f"fb_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    surl = _schema_url(url, schema)
    try:
        store = Store(surl)
        now = time.time()
        with store.engine.begin() as conn:
            conn.execute(text("INSERT INTO cases (id, hospital, service_request, patient, reviewer, profile, step, "
                              "attempts, created_at, updated_at, data) VALUES (:id, 'h', :sr, 'Patient/1', 'r', "
                              "'default', 'collect', 0, :t, :t, '{}')"),
                         [{"id": str(uuid.uuid4()), "sr": f"ServiceRequest/{i}", "t": now + i * 1e-6}
                          for i in range(cases)])

        def reset() -> None:
            with store.engine.begin() as conn:
                conn.execute(text("UPDATE cases SET claimed_by = NULL, claimed_until = NULL"))

        contenders = {"fhirbridge 4 workers": lambda: _one_run("fhirbridge", surl, 4),
                      "bound 4 workers (raw SQL)": lambda: _one_run("raw", surl, 4),
                      "fhirbridge 1 worker": lambda: _one_run("fhirbridge", surl, 1),
                      "diagnostic: fhirbridge 4 workers, pre-ping off": lambda: _one_run("fhirbridge-no-ping", surl, 4)}
        t = side_by_side(contenders, repeats, warmup=0, setup=reset)
        spc = statements_per_claim(surl)
        store.close()
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    rows = {}
    for n in contenders:
        res = t.results[n]
        rows[n] = {"claims_per_second": round(cases / t.median(n)), "median_s": round(t.median(n), 3),
                   "spread": round(t.spread(n), 3),
                   "duplicates": sum(r["duplicates"] for r in res),
                   "missed": sum(cases - r["distinct"] for r in res),
                   "per_worker_last": res[-1]["per_worker"]}
    out = {"cases": cases, "rows": rows, "statements_per_claim": spc,
           "fhirbridge_vs_bound": round(t.ratio("fhirbridge 4 workers", "bound 4 workers (raw SQL)"), 2),
           "scaling_4_over_1": round(t.ratio("fhirbridge 1 worker", "fhirbridge 4 workers"), 2)}
    log("  claims: " + ", ".join(f"{n} {r['claims_per_second']}/s (dup {r['duplicates']}, missed {r['missed']})"
                                 for n, r in rows.items())
        + f"; fhirbridge/bound time {out['fhirbridge_vs_bound']}, 4 workers vs 1: {out['scaling_4_over_1']}x;"
        f" per claim {spc}")
    return out
