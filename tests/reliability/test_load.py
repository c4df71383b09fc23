"""Load suite: the real served app (`fhirbridge serve`: gunicorn, two workers, each with its scheduler) on
127.0.0.1, in front of the real sekmet, with PostgreSQL as the store when FHIRBRIDGE_TEST_POSTGRES_URL is set.

A burst of orders through `POST /api/orders` and concurrent API clients reading for a fixed time (Case
reads, lists, health and readiness), then the reviewer answers every Case through the inbox and the served
process files every opinion. Every request is bounded (timeouts) and the run stops by itself. Asserts 0
errors (a non-2xx answer, a refused connection, a timeout, a traceback in the server's log), every Case done,
nothing twice in the EHR; reports p50/p95/p99 latency per kind of request and the time to complete.
"""
from __future__ import annotations

import contextlib
import os
import queue
import random
import shutil
import threading
import time
from collections import defaultdict

import pytest
import requests

from fhirbridge.demo.localehr import free_port
from tests.kit.hospital import PG_URL, Served, TestHospital, pg_schema
from tests.reliability.relkit import duplicates, ehr_copies, percentile, size

pytestmark = pytest.mark.sekmet

ORDERS = size(50, 1000)
CLIENTS = size(20, 200)
SECONDS = size(10, 60)           # the readers' time; the order burst is taken from the same clients first
SETTLE = size(300, 3600)         # bound on the time for every Case to be done
TOKEN = "load-token-" + "d" * 24
TIMEOUT = 120                    # per request: a request slower than this counts as an error


class Clients:
    """CLIENTS threads, each with its own connection pool: first the order burst (one shared queue), then reads
    until the time is up. Latency per kind of request, and every error with what it was."""

    def __init__(self, base: str, probes: str):
        self.base = base
        self.probes = probes   # the probe listener's port (service/probes.py): what a load balancer would ask
        self.orders: queue.Queue = queue.Queue()
        self.accepted: list[str] = []     # the URLs of the accepted orders (Location)
        self.case_ids: list[str] = []
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.auth = {"Authorization": f"Bearer {TOKEN}"}
        self.requester = ""   # the ordering Practitioner (required on every order)

    def _call(self, session: requests.Session, kind: str, method: str, path: str, expect: int, *,
              base: str | None = None, headers: dict | None = None, **kw):
        started = time.monotonic()
        try:
            r = session.request(method, (base or self.base) + path, headers={**self.auth, **(headers or {})},
                                timeout=TIMEOUT, **kw)
            ok = r.status_code == expect
        except requests.RequestException as exc:
            r, ok = None, False
            detail = type(exc).__name__
        elapsed = time.monotonic() - started
        with self.lock:
            self.latency[kind].append(elapsed)
            if not ok:
                self.errors.append(f"{kind}: {r.status_code if r is not None else detail}"
                                   f"{' ' + r.text[:200] if r is not None else ''}")
        return r if ok else None

    def run(self, patient: str, until: float, rng: random.Random) -> None:
        with requests.Session() as s:
            while True:
                try:
                    n = self.orders.get_nowait()
                except queue.Empty:
                    break
                # Accepted at once, placed in the EHR by the workers (loop/accepted_orders.py); the key makes a
                # client's retry the same order.
                r = self._call(s, "POST /api/orders", "POST", "/api/orders", 202,
                               headers={"Prefer": "respond-async", "Idempotency-Key": f"load-{n}"},
                               json={"patient": patient, "question": "Is surgery indicated?", "profile": "spine",
                                     "requester": self.requester})
                if r is not None:
                    with self.lock:
                        self.accepted.append(r.headers["Location"])
            while time.monotonic() < until:
                pick = rng.random()
                if pick < 0.1 and self.accepted:
                    self.follow(s, rng.choice(self.accepted))
                elif pick < 0.7 and self.case_ids:
                    self._call(s, "GET /api/cases/{id}", "GET", f"/api/cases/{rng.choice(self.case_ids)}", 200)
                elif pick < 0.8:
                    self._call(s, "GET /api/cases?step=", "GET", "/api/cases?step=await_opinion", 200)
                elif pick < 0.85:
                    self._call(s, "GET /healthz", "GET", "/healthz", 200)
                elif pick < 0.9:
                    self._call(s, "GET /readyz", "GET", "/readyz", 200)
                elif pick < 0.95:
                    self._probe(s, "GET /healthz (probe port)", "/healthz")
                else:
                    self._probe(s, "GET /readyz (probe port)", "/readyz")

    def follow(self, session: requests.Session, url: str) -> bool:
        """Ask for an accepted order; once placed and taken in, its Case is read like the others (True)."""
        r = self._call(session, "GET /api/orders/{id}", "GET", url, 200)
        order = r.json()["order"] if r is not None else {}
        if order.get("state") == "failed":
            with self.lock:
                self.errors.append(f"order {url} failed: {order.get('error')}")
        if order.get("state") != "placed" or not order.get("case"):
            return False
        with self.lock:
            if order["case"] not in self.case_ids:
                self.case_ids.append(order["case"])
        return True

    def _probe(self, session: requests.Session, kind: str, path: str) -> None:
        self._call(session, kind, "GET", path, 200, base=self.probes)


def _figures(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": round(percentile(values, 50) * 1000, 1),
            "p95_ms": round(percentile(values, 95) * 1000, 1), "p99_ms": round(percentile(values, 99) * 1000, 1),
            "max_ms": round(max(values, default=0) * 1000, 1)}


def test_a_burst_of_orders_and_concurrent_clients_without_an_error(tmp_path, ehr, seeded, fhir, figures):
    with (pg_schema("fb_load") if PG_URL else contextlib.nullcontext(None)) as store_url:
        env = {"FHIRBRIDGE_API__TOKENS": TOKEN, "FHIRBRIDGE_SERVICE__WORK_SECONDS": "0.5",
               "FHIRBRIDGE_SERVICE__POLL_SECONDS": "30", "FHIRBRIDGE_SERVICE__INBOX_SECONDS": "1",
               "FHIRBRIDGE_THREADS": "16", "FHIRBRIDGE_TIMEOUT": str(TIMEOUT),
               "FHIRBRIDGE_PROBE_BIND": f"127.0.0.1:{free_port()}"}
        if store_url:
            env["FHIRBRIDGE_FHIRBRIDGE__STORE_URL"] = store_url
        hospital = TestHospital(tmp_path, ehr.base_url, env=env)
        served = Served(hospital, env, workers=2)
        try:
            _run(hospital, served, seeded["patient"], fhir, figures, "postgresql" if store_url else "sqlite")
        except BaseException:
            print(served.tail())
            raise
        finally:
            served.kill()
            hospital.close()


def _run(hospital: TestHospital, served: Served, patient: str, fhir, figures: dict, store_kind: str) -> None:
    clients = Clients(served.base, "http://" + hospital.env["FHIRBRIDGE_PROBE_BIND"])
    clients.requester = hospital.physician()
    for i in range(ORDERS):
        clients.orders.put(i)
    started = time.monotonic()
    until = started + SECONDS
    threads = [threading.Thread(target=clients.run, args=(patient, until, random.Random(n)), daemon=True)
               for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SECONDS + ORDERS * TIMEOUT / CLIENTS + 60)
    assert not any(t.is_alive() for t in threads), "a client did not stop"
    api_seconds = time.monotonic() - started
    assert not clients.errors, (len(clients.errors), clients.errors[:10])
    assert len(set(clients.accepted)) == ORDERS
    # Every accepted order is placed and has its Case (the readers found most of them already).
    with requests.Session() as s:
        for url in clients.accepted:
            deadline = time.monotonic() + SETTLE
            while not clients.follow(s, url):
                assert time.monotonic() < deadline, f"order {url} not placed and taken in within {SETTLE} s"
                time.sleep(0.5)
    placed_seconds = time.monotonic() - started
    assert not clients.errors, (len(clients.errors), clients.errors[:10])
    assert len(set(clients.case_ids)) == ORDERS

    # The reviewer answers each Case as it becomes ready (inbox); the served process files them.
    store = hospital.app.store
    inbox = hospital.app.config.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    answered: dict[str, str] = {}
    deadline = started + SETTLE
    while True:
        cases = [c for c in store.list_cases() if c.id in set(clients.case_ids)]
        for case in cases:
            if case.step == "await_opinion" and case.id not in answered:
                sealed = hospital.answer(case)
                shutil.move(sealed, inbox / f".{sealed.name}.part")
                os.rename(inbox / f".{sealed.name}.part", inbox / sealed.name)
                answered[case.id] = sealed.stem.removeprefix("opinion-")
        stuck = [(c.step, c.last_error) for c in cases if c.step in ("failed", "cancelled")]
        assert not stuck, stuck[:5]
        if len(cases) == ORDERS and all(c.step == "done" for c in cases):
            break
        assert time.monotonic() < deadline, f"not done in {SETTLE} s: " \
            f"{sorted({c.step: sum(1 for d in cases if d.step == c.step) for c in cases}.items())}"
        time.sleep(1)
    complete_seconds = time.monotonic() - started
    log = served.log.read_text(errors="replace")
    assert "Traceback" not in log and "WORKER TIMEOUT" not in log, served.tail()

    assert all(c.opinion_id == answered[c.id] and c.document_reference for c in cases)
    copies = ehr_copies(fhir, cases)
    assert all(copies[kind][c.id] == 1 for kind in copies for c in cases), duplicates(copies)
    everything = [v for values in clients.latency.values() for v in values]
    figures["load"] = {
        "orders": ORDERS, "clients": CLIENTS, "reader_seconds": SECONDS, "store": store_kind, "gunicorn_workers": 2,
        "requests": len(everything), "errors": len(clients.errors),
        "requests_per_second": round(len(everything) / api_seconds, 1),
        "latency_all": _figures(everything),
        "latency_by_kind": {kind: _figures(values) for kind, values in sorted(clients.latency.items())},
        "seconds_api_phase": round(api_seconds, 1), "seconds_until_every_order_placed": round(placed_seconds, 1),
        "seconds_until_every_case_done": round(complete_seconds, 1),
        "cases_done": len(cases), "opinions_lost": 0, "ehr_duplicates": duplicates(copies)}
