"""The Case store on SQLite: one Case per order, leases, backoff, replay guard, events, id prefixes."""
from __future__ import annotations

import threading
import time

import pytest

from fhirbridge.errors import CaseError
from fhirbridge.store.store import Store, new_id

HOSPITAL = "urn:ietf:rfc:3986|urn:oid:2.999.1.1"


@pytest.fixture
def store(tmp_path):
    s = Store("sqlite:///" + str(tmp_path / "s.db"))
    yield s
    s.close()


def open_case(store: Store, n: int | str, *, case_id: str | None = None, hospital: str = HOSPITAL):
    return store.open_case(case_id=case_id or new_id(), hospital=hospital, service_request=f"ServiceRequest/{n}",
                           patient=f"Patient/p{n}", reviewer="spine-center", profile="spine",
                           data={"n": str(n)})


# --- one Case per order ----------------------------------------------------------------------------

def test_open_case_creates_a_case_at_collect(store):
    case, created = open_case(store, 1, case_id="c-1")
    assert created is True
    assert case.id == "c-1" and case.step == "collect" and case.attempts == 0
    assert (case.service_request, case.patient, case.reviewer, case.profile) == (
        "ServiceRequest/1", "Patient/p1", "spine-center", "spine")
    assert case.data == {"n": "1"}
    assert case.claimed_by is None and case.next_attempt_at is None
    assert store.get("c-1") == case


def test_open_case_twice_for_the_same_order_gives_one_case(store):
    first, created1 = open_case(store, 7, case_id="first")
    second, created2 = open_case(store, 7, case_id="second")
    assert (created1, created2) == (True, False)
    assert second.id == "first"
    assert [c.id for c in store.list_cases()] == ["first"]
    assert store.find("second") is None
    assert [e["kind"] for e in store.events("first")] == ["opened"]
    assert store.events("second") == []


def test_same_order_number_at_another_hospital_is_another_case(store):
    _, a = open_case(store, 7)
    _, b = open_case(store, 7, hospital="urn:ietf:rfc:3986|urn:oid:2.999.1.99")
    assert a and b and len(store.list_cases()) == 2


def test_get_unknown_case(store):
    with pytest.raises(CaseError):
        store.get("nope")
    assert store.find("nope") is None


def test_store_persists_across_instances(tmp_path):
    url = "sqlite:///" + str(tmp_path / "sub" / "dir" / "s.db")  # parent directories are created
    s1 = Store(url)
    open_case(s1, 1, case_id="keep")
    s1.close()
    s2 = Store(url)
    try:
        assert s2.get("keep").service_request == "ServiceRequest/1"
    finally:
        s2.close()


# --- claiming --------------------------------------------------------------------------------------

def test_claim_gives_a_lease_and_a_second_claim_gets_nothing_until_it_expires(store):
    open_case(store, 1, case_id="c")
    first = store.claim(worker="w1", lease_seconds=0.05)
    assert first is not None and first.id == "c"
    assert first.claimed_by == "w1"
    assert first.claimed_until == pytest.approx(time.time() + 0.05, abs=1.0)
    assert store.claim(worker="w2", lease_seconds=0.05) is None
    assert store.claim(worker="w1", lease_seconds=0.05) is None  # even the holder: one lease at a time
    time.sleep(0.1)
    second = store.claim(worker="w2", lease_seconds=60)
    assert second is not None and second.id == "c" and second.claimed_by == "w2"
    assert store.get("c").claimed_by == "w2"


def test_release_makes_the_case_claimable_again_only_by_its_holder(store):
    open_case(store, 1, case_id="c")
    assert store.claim(worker="w1", lease_seconds=60).id == "c"
    store.release("c", worker="w2")  # not the holder: no effect
    assert store.claim(worker="w2", lease_seconds=60) is None
    store.release("c", worker="w1")
    assert store.get("c").claimed_by is None
    assert store.claim(worker="w2", lease_seconds=60).id == "c"


def test_claim_only_cases_in_work_steps(store):
    open_case(store, 1, case_id="waiting")
    open_case(store, 2, case_id="done")
    open_case(store, 3, case_id="filing")
    store.update("waiting", step="await_opinion")
    store.update("done", step="done")
    store.update("filing", step="file")
    assert store.claim(worker="w", lease_seconds=60).id == "filing"
    assert store.claim(worker="w", lease_seconds=60) is None
    assert store.claim(worker="w", steps=("await_opinion",), lease_seconds=60).id == "waiting"


def test_claim_a_given_case(store):
    open_case(store, 1, case_id="a")
    open_case(store, 2, case_id="b")
    assert store.claim(worker="w", case_id="b", lease_seconds=60).id == "b"
    assert store.claim(worker="w", case_id="b", lease_seconds=60) is None
    assert store.claim(worker="w", case_id="zzz", lease_seconds=60) is None


def test_claim_skips_cases_in_backoff_until_cleared(store):
    open_case(store, 1, case_id="later")
    store.update("later", next_attempt_at=time.time() + 3600, attempts=1, last_error="EHR down")
    assert store.claim(worker="w", lease_seconds=60) is None
    store.clear_backoff("other-case")  # a different id leaves it alone
    assert store.claim(worker="w", lease_seconds=60) is None
    store.clear_backoff("later")
    case = store.claim(worker="w", lease_seconds=60)
    assert case is not None and case.id == "later"
    assert case.next_attempt_at is None and case.attempts == 1 and case.last_error == "EHR down"


def test_clear_backoff_for_all_cases(store):
    for n in range(3):
        open_case(store, n, case_id=f"c{n}")
        store.update(f"c{n}", next_attempt_at=time.time() + 3600)
    store.clear_backoff()
    assert sorted(c.id for c in store.iter_claims(worker="w", lease_seconds=60)) == ["c0", "c1", "c2"]


def test_claim_takes_a_case_whose_backoff_has_passed(store):
    open_case(store, 1, case_id="due")
    store.update("due", next_attempt_at=time.time() - 1)
    assert store.claim(worker="w", lease_seconds=60).id == "due"


def test_claim_prefers_the_least_recently_updated(store):
    open_case(store, 1, case_id="old")
    time.sleep(0.01)
    open_case(store, 2, case_id="new")
    time.sleep(0.01)
    store.update("old", data={"touched": True})  # now "old" is the most recently updated
    assert store.claim(worker="w", lease_seconds=60).id == "new"


def test_concurrent_claims_never_hand_out_a_case_twice(store):
    ids = {f"case-{n:02d}" for n in range(40)}
    for n, cid in enumerate(sorted(ids)):
        open_case(store, n, case_id=cid)
    claimed: dict[str, list[str]] = {f"w{i}": [] for i in range(4)}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(worker: str) -> None:
        try:
            start.wait()
            while (case := store.claim(worker=worker, lease_seconds=600)) is not None:
                claimed[worker].append(case.id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    everything = [cid for got in claimed.values() for cid in got]
    assert len(everything) == 40, {w: len(g) for w, g in claimed.items()}
    assert set(everything) == ids
    for worker, got in claimed.items():
        for cid in got:
            assert store.get(cid).claimed_by == worker


# --- replay guard ----------------------------------------------------------------------------------

def test_remember_message_refuses_a_replayed_jti(store):
    assert store.message_seen("jti-1") is False
    assert store.remember_message("jti-1", "case-a") is True
    assert store.message_seen("jti-1") is True
    assert store.remember_message("jti-1", "case-a") is False
    assert store.remember_message("jti-1", "case-b") is False  # whatever Case it claims to be for
    assert store.remember_message("jti-2", "case-a") is True


# --- events and updates ----------------------------------------------------------------------------

def test_events_are_appended_in_order(store):
    open_case(store, 1, case_id="c")
    store.add_event("c", "collected", {"resources": 12})
    store.update("c", step="seal", event_kind="step", detail={"to": "seal"})
    store.add_event("c", "sealed")
    store.update("c", step="deliver")  # no event_kind: no event
    store.add_event("c", "delivered", {"via": "outbox"})
    events = store.events("c")
    assert [e["kind"] for e in events] == ["opened", "collected", "step", "sealed", "delivered"]
    assert events[0]["detail"] == {"service_request": "ServiceRequest/1", "reviewer": "spine-center",
                                   "profile": "spine"}
    assert events[1]["detail"] == {"resources": 12}
    assert events[2]["detail"] == {"to": "seal"}
    assert events[3]["detail"] == {}
    assert all(e["case_id"] == "c" for e in events)
    ats = [e["at"] for e in events]
    assert ats == sorted(ats)
    open_case(store, 2, case_id="other")
    assert [e["kind"] for e in store.events("other")] == ["opened"]


def test_update_merges_data_and_bumps_updated_at(store):
    case, _ = open_case(store, 1, case_id="c")
    time.sleep(0.01)
    updated = store.update("c", data={"package": "pk-1"}, task="Task/9")
    assert updated.data == {"n": "1", "package": "pk-1"}
    assert updated.task == "Task/9"
    assert updated.updated_at > case.updated_at
    assert updated.created_at == case.created_at
    assert store.update("c", data={"n": "2"}).data == {"n": "2", "package": "pk-1"}


# --- id prefixes -----------------------------------------------------------------------------------

def test_find_by_prefix(store):
    open_case(store, 1, case_id="abc123-1111")
    open_case(store, 2, case_id="abc456-2222")
    assert store.find_by_prefix("abc1").id == "abc123-1111"
    assert store.find_by_prefix("abc456-2222").id == "abc456-2222"
    with pytest.raises(CaseError, match="ambiguous"):
        store.find_by_prefix("abc")
    with pytest.raises(CaseError, match="no Case"):
        store.find_by_prefix("zzz")
    with pytest.raises(CaseError, match="no Case"):
        store.find_by_prefix("bc1")  # a prefix, not a substring


def test_find_by_prefix_treats_underscore_literally(store):
    open_case(store, 1, case_id="abc123-1111")
    with pytest.raises(CaseError):
        store.find_by_prefix("abc_")
