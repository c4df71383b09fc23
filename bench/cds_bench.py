"""CDS Hooks (issue 18): the latency of `order-sign` under load, the EHR's time budget being the goal (p95 < 100 ms
with prefetch; no EHR call on that path).

Set-up (untimed): the bench's sekmet with one synthetic patient; fhirbridge's app (`service.app.create_app`,
the real blueprint, store and rules) served over loopback HTTP by werkzeug's threaded server in this process;
a CDS client playing the EHR (tests/kit/cds_client.py: its JWK Set on a loopback port). Every call's JWT is
signed before the clock starts (one per call: a `jti` is used once), so the client's signing is not timed.

Timed: `threads` client threads for `seconds`, each with its own `requests` Session, each call a new
hookInstance. The contenders are interleaved (thread t's i-th call is contender (t + i) mod 3), so they run
under the same load at the same time:
* card, prefetch: a spine-fusion draft, Patient and prior orders prefetched: one card (one store write);
* no card, prefetch: a lab draft: authentication, parsing and the rules only (the floor of any answer);
* card, no prefetch: the spine-fusion draft without prefetch: the Patient read and the prior-order search go
  to the EHR.
Reported per contender: calls, p50/p95/p99 (ms); the ratio of p95s to the floor.
"""
from __future__ import annotations

import logging
import socket
import statistics
import threading
import time
import uuid

import requests
from sqlalchemy import create_engine, text
from werkzeug.serving import make_server

from fhirbridge.config import loader as config
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from tests.kit.cds_client import SPINE_FUSION, EhrCdsClient

from . import synth
from .common import Bench

SIGN = "fhirbridge-order-sign"
LAB = {"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}
CONTENDERS = ("card, prefetch", "no card, prefetch", "card, no prefetch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(bench: Bench, seconds: float, threads: int, log=print, postgres_url: str | None = None) -> dict:
    """The load run on the default SQLite store, and again on PostgreSQL when `postgres_url` answers (a fresh
    schema, dropped afterwards): each answer commits once (the jti and the cards), and that commit is most of an
    answer's time on SQLite with FULL sync."""
    setup = bench.app()
    hospital = setup.hospital.name
    patient = setup.ehr.read_ref(synth.load(setup.ehr, 10, order=False).ref)
    setup.close()
    out = {"sqlite": _load(bench, hospital, patient, None, seconds, threads, log)}
    if postgres_url:
        try:
            admin = create_engine(postgres_url)
            schema = f"fb_cds_bench_{uuid.uuid4().hex[:10]}"
            with admin.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        except Exception as exc:  # noqa: BLE001 - no PostgreSQL here: the SQLite figures stand alone
            out["postgresql"] = {"skipped": f"PostgreSQL not reachable ({exc.__class__.__name__})"}
            return out
        try:
            sep = "&" if "?" in postgres_url else "?"
            out["postgresql"] = _load(bench, hospital, patient, f"{postgres_url}{sep}options=-csearch_path%3D{schema}",
                                      seconds, threads, log)
        finally:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()
    return out


def _load(bench: Bench, hospital: str, patient: dict, store_url: str | None, seconds: float, threads: int,
          log) -> dict:
    ehr_client = EhrCdsClient()
    port = _free_port()
    public = f"http://127.0.0.1:{port}"
    path = bench.config_path.with_name("fhirbridge-cds.toml")
    path.write_text(bench.config_path.read_text() + f'\n[service]\npublic_url = "{public}"\n'
                    + ehr_client.config_block(hospital))
    env = {"FHIRBRIDGE_FHIRBRIDGE__STORE_URL": store_url} if store_url else {}
    svc = Service(config.load(path, environ=env))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)    # one access-log line per call would be timed too
    server = make_server("127.0.0.1", port, create_app(svc=svc), threaded=True)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    pid = patient["id"]
    prefetch = {"patient": patient, "priorSecondOpinions": {"resourceType": "Bundle", "type": "searchset",
                                                            "entry": []}}
    bodies = {
        "card, prefetch": lambda: ehr_client.order_sign(pid, "Practitioner/bench", [
            ehr_client.draft(SPINE_FUSION, id="bench-fusion", patient=pid)], prefetch=prefetch),
        "no card, prefetch": lambda: ehr_client.order_sign(pid, "Practitioner/bench", [
            ehr_client.draft(LAB, id="bench-lab", patient=pid)], prefetch=prefetch),
        "card, no prefetch": lambda: ehr_client.order_sign(pid, "Practitioner/bench", [
            ehr_client.draft(SPINE_FUSION, id="bench-fusion", patient=pid)]),
    }
    url = f"{public}/cds-services/{SIGN}"
    expected = {"card, prefetch": 1, "no card, prefetch": 0, "card, no prefetch": 1}
    times: dict[str, list[float]] = {n: [] for n in CONTENDERS}
    errors: list[str] = []
    lock = threading.Lock()
    try:
        # Warm-up (untimed): the first JWKS fetch, the rules, the store's first writes.
        with requests.Session() as s:
            for name in CONTENDERS:
                r = s.post(url, json=bodies[name](), headers={"Authorization": f"Bearer {ehr_client.jwt(url)}"},
                           timeout=30)
                assert r.status_code == 200 and len(r.json()["cards"]) == expected[name], (name, r.text[:500])
        # Enough signed tokens for the run, made before it (a generous upper bound of calls per thread).
        per_thread = max(50, int(seconds * 400))
        tokens = [[ehr_client.jwt(url, exp_in=max(120, int(seconds) + 120)) for _ in range(per_thread)]
                  for _ in range(threads)]
        ready = [[bodies[CONTENDERS[(t + i) % len(CONTENDERS)]]() for i in range(per_thread)]
                 for t in range(threads)]
        stop_at = time.perf_counter() + seconds

        def client(t: int) -> None:
            mine: dict[str, list[float]] = {n: [] for n in CONTENDERS}
            with requests.Session() as s:
                for i in range(per_thread):
                    if time.perf_counter() >= stop_at:
                        break
                    name = CONTENDERS[(t + i) % len(CONTENDERS)]
                    t0 = time.perf_counter()
                    r = s.post(url, json=ready[t][i], headers={"Authorization": f"Bearer {tokens[t][i]}"},
                               timeout=30)
                    took = time.perf_counter() - t0
                    if r.status_code != 200 or len(r.json()["cards"]) != expected[name]:
                        with lock:
                            errors.append(f"{name}: {r.status_code} {r.text[:200]}")
                        continue
                    mine[name].append(took)
            with lock:
                for n, v in mine.items():
                    times[n].extend(v)

        workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - started
    finally:
        server.shutdown()
        serving.join(timeout=10)
        svc.stop(wait=True)
        ehr_client.close()
    if errors:
        raise RuntimeError(f"{len(errors)} CDS calls failed, e.g. {errors[0]}")
    row = {"threads": threads, "seconds": round(elapsed, 1),
           "calls": {n: len(v) for n, v in times.items()},
           "calls_per_second": round(sum(len(v) for v in times.values()) / elapsed, 1),
           "p50_ms": {n: round(statistics.median(v) * 1000, 1) for n, v in times.items()},
           "p95_ms": {n: round(_percentile(v, 0.95) * 1000, 1) for n, v in times.items()},
           "p99_ms": {n: round(_percentile(v, 0.99) * 1000, 1) for n, v in times.items()}}
    floor = row["p95_ms"]["no card, prefetch"]
    row["p95_vs_floor"] = {n: round(v / floor, 2) for n, v in row["p95_ms"].items() if n != "no card, prefetch"}
    row["store"] = "postgresql" if store_url else "sqlite"
    log(f"  order-sign, {row['store']} store, {threads} threads, {elapsed:.0f} s: " + ", ".join(
        f"{n} p95 {row['p95_ms'][n]} ms ({row['calls'][n]} calls)" for n in CONTENDERS))
    return row
