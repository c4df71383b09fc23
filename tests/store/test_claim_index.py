"""The claim reads the partial index `ix_cases_claimable` with no sort (issue 19 goal 3), on SQLite and
PostgreSQL, and that index covers every work step of steps.FLOW: a new step with a `next` that is not in its
predicate would never be claimed along it, so this fails until a migration re-creates the index."""
from __future__ import annotations

import importlib.util
import os
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import event, text

from fhirbridge.steps import ALL_STEPS, FLOW, WORK_STEPS
from fhirbridge.store.store import Store, _claim_sql
from tests.kit.hospital import pg_schema

PG_URL = os.environ.get("FHIRBRIDGE_TEST_POSTGRES_URL")
needs_pg = pytest.mark.skipif(not PG_URL, reason="FHIRBRIDGE_TEST_POSTGRES_URL is not set (e.g. "
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test); .ci/run sets it")
MIGRATION = (Path(__file__).resolve().parents[2] / "src" / "fhirbridge" / "store" / "migrations" / "versions"
             / "0014_claimable_index.py")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_pg)])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'store.db'}")
        yield s
        s.close()
    else:
        with pg_schema("fb_claim") as url:
            s = Store(url)
            yield s
            s.close()


def _index_predicate(store: Store) -> str:
    with store.engine.connect() as conn:
        if store.engine.dialect.name == "sqlite":
            return conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'ix_cases_claimable'")).scalar_one()
        return conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_cases_claimable' "
                                 "AND schemaname = current_schema()")).scalar_one()


def test_every_flow_step_with_a_next_is_in_the_claim_index_predicate(store):
    with_next = {s.value for s, f in FLOW.items() if f.next is not None}
    assert with_next == set(WORK_STEPS)
    predicate = _index_predicate(store)
    assert "WHERE" in predicate.upper()
    where = predicate[predicate.upper().index("WHERE"):]
    named = {s for s in ALL_STEPS if f"'{s}'" in where}
    assert named == with_next, f"ix_cases_claimable covers {sorted(named)}; FLOW's work steps are {sorted(with_next)}"
    spec = importlib.util.spec_from_file_location("m0014", MIGRATION)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.STEPS) == with_next


def _realistic_mix(store: Store, n: int = 3000) -> None:
    """Most Cases waiting for an opinion or done, a few at a work step, some of those backing off."""
    now = time.time()
    rows = []
    for i in range(n):
        step = ("done", "await_opinion", "await_opinion", "done", "collect", "file", "seal", "deliver")[i % 8] \
            if i % 10 == 0 else ("await_opinion" if i % 3 else "done")
        rows.append({"id": str(uuid.uuid4()), "h": "h1" if i % 4 else "h2", "sr": f"ServiceRequest/{i}", "step": step,
                     "t": now - n + i, "next": now + 600 if i % 20 == 0 else None})
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO cases (id, hospital, service_request, patient, reviewer, profile, step, "
                          "attempts, created_at, updated_at, next_attempt_at, data) VALUES (:id, :h, :sr, "
                          "'Patient/1', 'r', 'default', :step, 0, :t, :t, :next, '{}')"), rows)
        conn.execute(text("ANALYZE"))


def _claim_plan(store: Store) -> str:
    """The database's plan of the very statement `Store.claim` sends for a hospital's worker."""
    sql, names, fixed = _claim_sql(store.engine.dialect, False, True)
    now = time.time()
    params = {"b_now": now, "b_until": now + 60, "b_worker": "w", "b_hospital": "h1", **fixed}
    args = tuple(params[n] for n in names) if names else params
    assert store.claim(worker="w", hospital="h1", lease_seconds=60) is not None
    with store.engine.connect() as conn:
        if store.engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, args).fetchall()
            return "\n".join(str(r[-1]) for r in rows)
        rows = conn.exec_driver_sql("EXPLAIN " + sql, args).fetchall()
        return "\n".join(r[0] for r in rows)


def test_the_claim_reads_the_claimable_index_without_sorting(store):
    _realistic_mix(store)
    plan = _claim_plan(store)
    assert "ix_cases_claimable" in plan, plan
    assert "TEMP B-TREE" not in plan.upper(), plan       # SQLite's sort
    assert "Sort" not in plan, plan                      # PostgreSQL's


def test_the_claim_takes_the_oldest_free_due_case_of_the_hospital_at_a_work_step(store):
    _realistic_mix(store, 400)
    with store.engine.connect() as conn:
        expected = conn.execute(text(
            "SELECT id FROM cases WHERE hospital = 'h1' AND step IN ('collect', 'seal', 'deliver', 'file') "
            "AND next_attempt_at IS NULL ORDER BY updated_at")).scalars().all()
    got = []
    while (case := store.claim(worker="w", hospital="h1", lease_seconds=60)) is not None:
        got.append(case.id)
    assert got == expected and got
    assert store.claim(worker="w2", hospital="h1", steps=("file",)) is None   # all claimed: none twice


@needs_pg
def test_one_round_trip_per_claim_on_postgresql():
    with pg_schema("fb_claim_rt") as url:
        store = Store(url)
        try:
            _realistic_mix(store)
            store.claim(worker="warm", hospital="h1", lease_seconds=60)
            claims = store._claims_engine()
            checkouts = []
            event.listen(claims, "checkout", lambda *a: checkouts.append(1))
            for _ in range(5):
                assert store.claim(worker="w", hospital="h1", lease_seconds=60) is not None
            assert len(checkouts) == 5               # one pooled connection per claim, in autocommit
            assert claims.pool._pre_ping is False   # no SELECT 1 before each claim
            with claims.connect() as conn:          # the statement alone: no BEGIN/COMMIT around it
                assert conn.connection.dbapi_connection.autocommit is True
        finally:
            store.close()
