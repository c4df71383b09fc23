"""Replicas on PostgreSQL: three `fhirbridge worker` processes share one store and one EHR; one is killed
(SIGKILL) while work is in flight. Every order still becomes exactly one Case, worked to await_opinion once,
with one package in the outbox; the survivors stop cleanly on SIGTERM.
"""
from __future__ import annotations

import signal
import time

import pytest

from tests.kit.hospital import PG_URL, TestHospital, Worker, pg_schema

pytestmark = pytest.mark.skipif(not PG_URL, reason="FHIRBRIDGE_TEST_POSTGRES_URL is not set (e.g. "
                                "postgresql+psycopg://postgres@127.0.0.1:5432/test); .ci/run sets it")

ORDERS = 12
WORKERS = 3
DONE_KINDS = ("collect.done", "seal.done", "deliver.done")
SETTLE_SECONDS = 120      # every Case at await_opinion within this
GRACEFUL_SECONDS = 30     # a worker told to stop finishes its step and exits within this


def _holders(store) -> dict[str, tuple[str, str]]:
    """Case id -> (worker id holding a live lease on it, the step)."""
    now = time.time()
    return {c.id: (c.claimed_by, c.step) for c in store.list_cases() if c.claimed_by and (c.claimed_until or 0) > now}


def _done_steps(store) -> int:
    return sum(1 for c in store.list_cases() for e in store.events(c.id) if e["kind"] in DONE_KINDS)


def test_replicas_survive_a_killed_worker_and_work_every_case_once(tmp_path, ehr, seeded):
    with pg_schema("fb_rep") as store_url:
        env = {"FHIRBRIDGE_FHIRBRIDGE__STORE_URL": store_url,
               "FHIRBRIDGE_SERVICE__WORK_SECONDS": "0.5", "FHIRBRIDGE_SERVICE__POLL_SECONDS": "1",
               "FHIRBRIDGE_SERVICE__INBOX_SECONDS": "5",
               # A killed replica's claims lapse in seconds, not the default five minutes.
               "FHIRBRIDGE_SERVICE__LEASE_SECONDS": "3"}
        hospital = TestHospital(tmp_path, ehr.base_url, env=env)
        workers: list[Worker] = []
        try:
            _run(hospital, env, workers, seeded)
        except BaseException:
            for w in workers:
                w.kill()
                print(w.tail())
            raise
        finally:
            for w in workers:
                w.kill()
            hospital.close()


def _run(hospital: TestHospital, env: dict[str, str], workers: list, seeded: dict) -> None:
    store = hospital.app.store
    orders = {f"ServiceRequest/{hospital.order(seeded['patient'])['id']}" for _ in range(ORDERS)}
    workers.extend(Worker(hospital, env, n) for n in range(WORKERS))
    deadline = time.monotonic() + SETTLE_SECONDS

    # Kill a worker that holds a Case mid-step, once some steps are done (the workers are really working).
    # It is frozen first (SIGSTOP), so the step it is seen holding is the one it dies in.
    victim = victim_case = held_step = None
    while victim is None:
        assert time.monotonic() < deadline, "the workers did not start working"
        assert all(w.proc.poll() is None for w in workers), "a worker exited on its own"
        if _done_steps(store) >= 3:
            for holder in {h for h, _step in _holders(store).values()}:
                w = next((w for w in workers if holder.endswith(f":{w.pid}")), None)
                if w is None:
                    continue
                w.proc.send_signal(signal.SIGSTOP)
                time.sleep(0.2)   # a statement it had already sent completes meanwhile
                held = [(cid, step) for cid, (h, step) in _holders(store).items() if h == holder]
                if held:
                    victim, (victim_case, held_step) = w, held[0]
                    break
                w.proc.send_signal(signal.SIGCONT)
        if victim is None:
            time.sleep(0.05)
    victim.kill()
    killed_at = time.time()
    survivors = [w for w in workers if w is not victim]

    # Wait (bounded) until every order is a Case awaiting its opinion.
    while True:
        cases = store.list_cases()
        failed = [(c.id[:8], c.step, c.last_error) for c in cases if c.step not in ("collect", "seal", "deliver",
                                                                                      "await_opinion")]
        assert not failed, failed
        if len(cases) == ORDERS and all(c.step == "await_opinion" for c in cases):
            break
        assert all(w.proc.poll() is None for w in survivors), "a surviving worker exited"
        assert time.monotonic() < deadline, \
            f"not settled in {SETTLE_SECONDS} s: {sorted((c.step, c.last_error or '') for c in cases)}"
        time.sleep(0.25)

    # One Case per order, each worked through each step exactly once (the killed worker's step was redone
    # by another worker; it never recorded its own), and one package each in the outbox.
    assert {c.service_request for c in cases} == orders
    # The step the victim held was taken over and done by a survivor after the kill (on one host the survivors
    # free a dead process's claims at once; from another host they would wait for its 3 s lease to lapse).
    assert [e for e in store.events(victim_case) if e["kind"] == f"{held_step}.done"][0]["at"] > killed_at
    for c in cases:
        kinds = [e["kind"] for e in store.events(c.id)]
        assert [k for k in kinds if k in DONE_KINDS] == list(DONE_KINDS), (c.id[:8], kinds)
        assert c.claimed_by is None
    outbox = hospital.root / "outbox" / "spine-center"
    names = sorted(p.name for p in outbox.iterdir())
    assert not [n for n in names if n.startswith(".partial-")], names
    assert names == sorted(c.package_id for c in cases)
    assert all((outbox / c.package_id / "package.jwe").is_file() for c in cases)

    # The survivors stop on SIGTERM within the graceful window, exiting 0.
    for w in survivors:
        w.proc.send_signal(signal.SIGTERM)
    for w in survivors:
        assert w.proc.wait(timeout=GRACEFUL_SECONDS) == 0, w.tail()
