"""The Case store on PostgreSQL: the same claims, exclusive under concurrency (the scale-out store)."""
from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
from sqlalchemy import create_engine, text

from fhirbridge.store.store import Store

PG_URL = os.environ.get("FHIRBRIDGE_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not PG_URL, reason="FHIRBRIDGE_TEST_POSTGRES_URL is not set (e.g. "
                                "postgresql+psycopg://postgres@127.0.0.1:5432/test); .ci/run sets it")


@pytest.fixture
def pg_store():
    schema = f"fb_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    store = Store(f"{PG_URL}{sep}options=-csearch_path%3D{schema}")
    try:
        yield store
    finally:
        store.close()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _open(store: Store, n: int) -> list[str]:
    ids = []
    for i in range(n):
        case, created = store.open_case(case_id=str(uuid.uuid4()), hospital="h", service_request=f"ServiceRequest/{i}",
                                        patient="Patient/1", reviewer="r", profile="default")
        assert created
        ids.append(case.id)
    return ids


def test_one_case_per_order_on_postgres(pg_store):
    first, created = pg_store.open_case(case_id="a", hospital="h", service_request="ServiceRequest/x",
                                        patient="Patient/1", reviewer="r", profile="default")
    again, created_again = pg_store.open_case(case_id="b", hospital="h", service_request="ServiceRequest/x",
                                              patient="Patient/1", reviewer="r", profile="default")
    assert created and not created_again and again.id == first.id


def test_concurrent_claims_never_hand_out_a_case_twice(pg_store):
    ids = _open(pg_store, 60)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (case := pg_store.claim(worker=name, lease_seconds=600)) is not None:
            with lock:
                claimed.append(case.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)   # every Case claimed, none twice


def test_live_lease_blocks_and_expired_lease_is_claimable_again(pg_store):
    (case_id,) = _open(pg_store, 1)
    assert pg_store.claim(worker="alive", lease_seconds=600).id == case_id
    assert pg_store.claim(worker="other", lease_seconds=600) is None
    pg_store.release(case_id, worker="alive")
    assert pg_store.claim(worker="dead", lease_seconds=0.01).id == case_id
    time.sleep(0.05)
    taken = pg_store.claim(worker="survivor", lease_seconds=600)
    assert taken is not None and taken.id == case_id and taken.claimed_by == "survivor"


def test_replay_guard_on_postgres(pg_store):
    assert pg_store.remember_message("jti-1", "c")
    assert not pg_store.remember_message("jti-1", "c")
