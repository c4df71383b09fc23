"""Accepted orders (loop/accepted_orders.py): `POST /api/orders` with `Prefer: respond-async` answers at once and
a worker places the order; an Idempotency-Key makes a retry the same order; a worker that died after writing
the ServiceRequest leaves nothing to write twice; an EHR that is down keeps the order pending, not lost."""
from __future__ import annotations

import stat
import time

import pytest

from fhirbridge.config import loader as config
from fhirbridge.ehr.order import PLACER_SYSTEM, place_order
from fhirbridge.loop.accepted_orders import OrderFields, accept, place
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from fhirbridge.store.order_requests import OrderRequests
from tests.kit.hospital import TestHospital

pytestmark = pytest.mark.sekmet

STAFF = "staff-token-0123456789abcdef"
ASYNC = {"Authorization": f"Bearer {STAFF}", "Prefer": "respond-async"}
SYNC = {"Authorization": f"Bearer {STAFF}"}


def _served(h: TestHospital):
    h.config_path.write_text(h.config_path.read_text() + f'\n[api]\ntokens = ["{STAFF}"]\n')
    svc = Service(config.load(h.config_path))
    return svc, create_app(svc=svc).test_client()


@pytest.fixture
def served(hospital):
    svc, client = _served(hospital)
    yield hospital, svc, client
    svc.stop(wait=True)


@pytest.fixture
def served_via_proxy(tmp_path, proxy):
    h = TestHospital(tmp_path, proxy.base_url)
    svc, client = _served(h)
    try:
        yield h, svc, client, proxy
    finally:
        svc.stop(wait=True)
        h.close()


def _order(h, seeded, **kw) -> dict:
    return {"patient": seeded["patient"], "question": "Is the fusion needed?", "profile": "spine",
            "requester": h.physician(), **kw}


def _placed_with(fhir, request_id: str) -> list[dict]:
    return list(fhir.search("ServiceRequest", {"identifier": f"{PLACER_SYSTEM}|{request_id}"}))


def _wait_for(client, url: str, state: str, headers=SYNC, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        order = client.get(url, headers=headers).get_json()["order"]
        if order["state"] == state:
            return order
        assert time.monotonic() < deadline, order
        time.sleep(0.1)


def test_an_async_order_is_accepted_then_placed_once_and_a_retry_with_its_key_is_the_same_order(served, seeded, fhir):
    h, _svc, client = served
    headers = {**ASYNC, "Idempotency-Key": "order-7f3a"}
    r = client.post("/api/orders", headers=headers, json=_order(h, seeded))
    assert r.status_code == 202, r.get_json()
    assert r.headers["Preference-Applied"] == "respond-async"
    order = r.get_json()["order"]
    assert order["state"] == "pending" and r.headers["Location"] == order["url"] == f"/api/orders/{order['id']}"
    placed = _wait_for(client, order["url"], "placed")
    assert placed["service_request"].startswith("ServiceRequest/") and placed["case"]
    assert client.get(f"/api/cases/{placed['case']}", headers=SYNC).get_json()["service_request"] == \
        placed["service_request"]
    # The client never heard the first answer and sends the order again with its key: the same order.
    again = client.post("/api/orders", headers=headers, json=_order(h, seeded))
    assert again.status_code == 201 and again.get_json()["order"]["id"] == order["id"]
    synchronous = client.post("/api/orders", headers={**SYNC, "Idempotency-Key": "order-7f3a"}, json=_order(h, seeded))
    assert synchronous.status_code == 201 and synchronous.get_json()["service_request"] == placed["service_request"]
    assert len(_placed_with(fhir, order["id"])) == 1
    # The key with other fields is another order: refused, nothing written.
    other = client.post("/api/orders", headers=headers, json=_order(h, seeded, question="And the other level?"))
    assert other.status_code == 422 and "already used for a different order" in other.get_json()["error"]["message"]
    assert len(_placed_with(fhir, order["id"])) == 1


def test_a_worker_that_died_after_writing_the_order_leaves_nothing_to_write_twice(served, seeded, fhir):
    """The crash point order.written: the ServiceRequest is in the EHR, the row still says pending."""
    h, svc, _client = served
    app = svc.apps[0]
    fields = OrderFields(patient=seeded["patient"], question="Fusion?", requester=h.physician(), profile="spine")
    row, created = accept(app, fields)
    assert created and row["state"] == "pending"
    pending_file = app.config.data_dir / "orders" / f"{row['id']}.jwe"
    assert stat.S_IMODE(pending_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(pending_file.parent.stat().st_mode) == 0o700
    assert b"Fusion?" not in pending_file.read_bytes()          # encrypted to the hospital's own key
    written = place_order(app, patient=fields.patient, question=fields.question, requester=fields.requester,
                          profile="spine", placer=row["id"])     # ...and the worker died here
    after = place(app, worker="the-next-worker", request_id=row["id"])
    assert after is not None and after["state"] == "placed"
    assert after["service_request"] == f"ServiceRequest/{written['id']}"
    assert len(_placed_with(fhir, row["id"])) == 1
    assert not pending_file.exists()
    assert app.store.find_by_order(app.hospital.key, after["service_request"]).id == after["case_id"]


def test_one_order_is_placed_by_one_worker(served, seeded):
    h, svc, _client = served
    app = svc.apps[0]
    row, _ = accept(app, OrderFields(patient=seeded["patient"], question="q", requester=h.physician()))
    requests = OrderRequests(app.store)
    first = requests.claim(hospital=app.hospital.key, worker="w1", lease_seconds=60, request_id=row["id"])
    assert first is not None
    assert requests.claim(hospital=app.hospital.key, worker="w2", lease_seconds=60, request_id=row["id"]) is None
    assert place(app, worker="w2", request_id=row["id"]) is None
    assert requests.release_worker("w1") == 1
    assert requests.claim(hospital=app.hospital.key, worker="w2", lease_seconds=60, request_id=row["id"]) is not None


def test_an_order_for_a_patient_the_ehr_does_not_have_fails_with_why(served, seeded, fhir):
    h, _svc, client = served
    r = client.post("/api/orders", headers=ASYNC, json=_order(h, seeded, patient="no-such-patient"))
    assert r.status_code == 202
    failed = _wait_for(client, r.headers["Location"], "failed")
    assert "Patient/no-such-patient does not exist in the EHR" in failed["error"]
    assert failed["service_request"] is None and not _placed_with(fhir, failed["id"])
    assert not (h.app.config.data_dir / "orders" / f"{failed['id']}.jwe").exists()
    r = client.post("/api/orders", headers=SYNC, json=_order(h, seeded, patient="no-such-patient"))
    assert r.status_code == 400 and "does not exist in the EHR" in r.get_json()["error"]["message"]


def test_an_order_is_kept_while_the_ehr_is_down_and_placed_when_it_answers(served_via_proxy, seeded, fhir):
    h, svc, client, proxy = served_via_proxy
    rule = proxy.add(method="POST", path=r"/ServiceRequest$", action="status", status=503, times=1_000)
    r = client.post("/api/orders", headers=SYNC, json=_order(h, seeded))
    assert r.status_code == 202, r.get_json()       # not an error: a client must not order again
    body = r.get_json()
    order = body["order"]
    assert order["state"] == "pending" and order["attempts"] == 1 and "503" in order["error"]
    assert body["service_request"] is None and "placed as soon as it does" in body["note"]
    assert not _placed_with(fhir, order["id"])
    rule.times = 0                                   # the EHR answers again
    with svc.apps[0].store.engine.begin() as conn:   # its retry delay passed
        conn.exec_driver_sql("UPDATE order_requests SET next_attempt_at = 0")
    svc.tick_work()
    placed = client.get(order["url"], headers=SYNC).get_json()["order"]
    assert placed["state"] == "placed" and placed["case"], placed
    assert len(_placed_with(fhir, order["id"])) == 1


def test_order_status_is_only_for_its_hospitals_staff(served):
    _h, _svc, client = served
    r = client.get("/api/orders/no-such-order", headers=SYNC)
    assert r.status_code == 404 and r.get_json()["error"]["message"] == "no order no-such-order"
    r = client.post("/api/orders", headers={**SYNC, "Idempotency-Key": "bad key with spaces"},
                    json={"patient": "p", "question": "q", "requester": "Practitioner/1"})
    assert r.status_code == 400 and "Idempotency-Key must be" in r.get_json()["error"]["message"]
