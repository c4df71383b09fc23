"""Orders the API accepts at once and a worker places in the EHR: `POST /api/orders` answers in milliseconds.

Placing an order is several EHR round trips (the patient and the requester read, the ServiceRequest written,
then intake's Task): under load the load suite measured `POST /api/orders` at p50 6.2 s with the writes inside
the request. An accepted order is instead recorded first, then placed by a worker, exactly once:

1. `accept`: the order's fields go to `data_dir/orders/<id>.jwe`, encrypted to the hospital's own key (they
   are clinical: the question), then a pending row (store/order_requests.py) names it. The id is the
   ServiceRequest's placer identifier value to be. With an `Idempotency-Key` the id is derived from the key
   (and the caller), so a client that retries after a lost answer gets the same order, not a second one; the
   same key with other fields is refused.
2. `place`: a worker claims the row (a lease), asks the EHR for a ServiceRequest with that placer identifier
   (a worker that died after writing it left one), writes it only if there is none, marks the row placed and
   deletes the file; then intake takes the order in as a poll would. Intake is keyed by the order itself, so
   the poll seeing the order first is harmless.

A patient or requester the EHR does not have fails the order (its row says why); an EHR that is down or
slow leaves it pending, retried with a growing delay.
"""
from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from fhirbridge import jsonutil
from fhirbridge.crypto import files, jwe
from fhirbridge.ehr.context import App
from fhirbridge.ehr.order import find_placed, place_order
from fhirbridge.errors import FhirbridgeError, FhirError
from fhirbridge.loop.intake import order_changed
from fhirbridge.loop.runner import lease_seconds
from fhirbridge.ops.crashpoints import crash_point
from fhirbridge.store.order_requests import FAILED, PENDING, PLACED, OrderRequests

log = logging.getLogger(__name__)

ORDER_TYP = "fhirbridge-order+jwe"
# Request ids from Idempotency-Keys: UUIDv5 in a namespace of ours, over the hospital, the caller and the key.
NAMESPACE = uuid.UUID("6f1c1d0e-59a3-5b7e-9a0e-0b8f3c2d4e61")
MAX_DELAY = 300.0
__all__ = ["FAILED", "PENDING", "PLACED", "IdempotencyConflict", "OrderFields", "accept", "place", "place_due"]


class IdempotencyConflict(FhirbridgeError):
    """An Idempotency-Key used again for a different order."""


@dataclass(frozen=True)
class OrderFields:
    patient: str
    question: str
    requester: str
    reviewer: str | None = None
    profile: str | None = None
    priority: str = "routine"

    def fingerprint(self) -> str:
        return hashlib.sha256(jsonutil.canonical(asdict(self))).hexdigest()


def _file(app: App, request_id: str) -> Path:
    return files.private_dir(app.config.data_dir / "orders") / f"{request_id}.jwe"


def request_id_for(app: App, key: str, caller: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{app.hospital.key}\n{caller}\n{key}"))


def accept(app: App, fields: OrderFields, *, key: str | None = None, caller: str = "") -> tuple[dict, bool]:
    """Record the order to be placed: (its row, created?). A known key with the same fields answers the
    order it made; with other fields, IdempotencyConflict."""
    requests = OrderRequests(app.store)
    request_id = request_id_for(app, key, caller) if key else str(uuid.uuid4())
    fingerprint = fields.fingerprint()
    row = requests.get(request_id)
    if row is None:
        # The file before the row: a pending row always has its order to place. A crash in between leaves an
        # orphan file, which the same key's retry overwrites.
        files.write_atomic(_file(app, request_id),
                           jwe.encrypt_bytes(jsonutil.dumps(asdict(fields)), app.hospital_keys.encryption_keys(),
                                             typ=ORDER_TYP))
        row, created = requests.add(request_id, hospital=app.hospital.key, fingerprint=fingerprint)
    else:
        created = False
    if row["fingerprint"] != fingerprint:
        raise IdempotencyConflict("this Idempotency-Key was already used for a different order; use a new key "
                                  "for a new order")
    return row, created


def _delay(attempts: int) -> float:
    return min(MAX_DELAY, 2.0 * 2 ** attempts)


def place(app: App, *, worker: str, request_id: str | None = None, fresh: bool = False) -> dict | None:
    """Place one due pending order (or the one named) in the EHR; returns its row afterwards, or None when
    there was none to claim (another worker has it, or nothing is due). `fresh`: the caller created the row
    just now and this is its first claim, so no worker can have written the order before: the EHR is not
    searched for it (the synchronous API path, one round trip fewer). The claim's lease is the Cases' one
    (`[service] lease_seconds`), well above an EHR request's timeout."""
    requests = OrderRequests(app.store)
    row = requests.claim(hospital=app.hospital.key, worker=worker, lease_seconds=lease_seconds(app),
                         request_id=request_id)
    if row is None:
        return None
    rid, path = row["id"], _file(app, row["id"])
    try:
        sr = None if fresh and row["attempts"] == 0 else _find_placed(app, rid)
        if sr is None:
            fields = OrderFields(**jsonutil.loads(jwe.decrypt_bytes(path.read_bytes(), app.hospital_keys)))
            sr = place_order(app, patient=fields.patient, question=fields.question, requester=fields.requester,
                             reviewer=fields.reviewer, profile=fields.profile, priority=fields.priority, placer=rid)
            crash_point("order.written")
    except FileNotFoundError:
        requests.failed(rid, worker=worker, error="the accepted order's content is missing from the data "
                                                  "directory (was it changed or cleaned?); place the order again")
        return requests.get(rid)
    except FhirError as exc:
        if exc.transient:
            requests.later(rid, worker=worker, error=str(exc), delay=_delay(row["attempts"]))
            log.warning("order %s not placed yet, the EHR will be asked again: %s", rid, exc)
            return requests.get(rid)
        return _failed(requests, rid, worker, path, exc)
    except FhirbridgeError as exc:   # e.g. the patient or the requester does not exist in the EHR
        return _failed(requests, rid, worker, path, exc)
    ref = f"ServiceRequest/{sr['id']}"
    requests.placed(rid, worker=worker, service_request=ref)
    path.unlink(missing_ok=True)
    log.info("order %s placed as %s", rid, ref)
    try:
        order_changed(app, sr)
    except Exception as exc:  # noqa: BLE001 - the order is in the EHR: the next poll takes it in
        log.warning("order %s placed as %s but not yet taken in: %s", rid, ref, exc)
    case = app.store.find_by_order(app.hospital.key, ref)
    if case is not None:
        requests.set_case(rid, case.id)
    return requests.get(rid)


def _find_placed(app: App, rid: str) -> dict | None:
    try:
        return find_placed(app, rid)
    except FhirError as exc:
        if exc.status == 400:   # handling=strict: the EHR does not support ServiceRequest?identifier=
            raise FhirError("the EHR cannot search ServiceRequest by identifier, which an accepted order needs to "
                            "be placed exactly once after a restart; place orders without `Prefer: respond-async`",
                            status=400) from None
        raise


def _failed(requests: OrderRequests, rid: str, worker: str, path: Path, exc: Exception) -> dict | None:
    requests.failed(rid, worker=worker, error=str(exc))
    path.unlink(missing_ok=True)
    log.warning("order %s failed and was not placed: %s", rid, exc)
    return requests.get(rid)


def place_due(app: App, *, worker: str, limit: int = 20) -> int:
    """Place up to `limit` due pending orders of this hospital; returns how many were claimed."""
    done = 0
    while done < limit and place(app, worker=worker) is not None:
        done += 1
    return done
