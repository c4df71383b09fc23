"""Subscription intake (R4 Subscriptions Backport, rest-hook) against the real EHR (sekmet) and the real
app, served on a loopback port so the EHR's notifications really arrive.

sekmet seeds only a "new order" ServiceRequest topic (create only, filters patient/category): it cannot
filter by our order code and never reports a revocation. Hospitals publish their own topics; the module
fixture publishes one that fires on create and on status changes and can filter by code, as an EHR would.
"""
from __future__ import annotations

import threading
import time
import uuid

import pytest
import requests
from werkzeug.serving import make_server

from fhirbridge.cli.main import main
from fhirbridge.config import loader as config
from fhirbridge.config.model import env_name
from fhirbridge.demo.localehr import ORDER_TOPIC as TOPIC
from fhirbridge.ehr.subscriptions import (
    PROFILE,
    discover_topic,
    load_state,
    subscribe,
    turn_off,
)
from fhirbridge.loop.intake import poll
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service

pytestmark = pytest.mark.sekmet

SEKMET_NEW_ORDER = "http://sekmet.dev/fhir/SubscriptionTopic/servicerequest-new"
WAIT = 15.0


@pytest.fixture(scope="module")
def sr_topic(ehr):
    """The order topic the demo EHR publishes (fhirbridge.demo.localehr.publish_order_topic)."""
    from fhirbridge.demo.localehr import publish_order_topic
    from fhirbridge.fhir.client import FhirClient
    with FhirClient(ehr.base_url) as client:
        return publish_order_topic(client)


class Served:
    """The hospital's fhirbridge app on a real 127.0.0.1 port, its `[service] public_url` pointing there."""

    def __init__(self, hospital):
        self.h = hospital
        self._app = None
        # The port is needed in the config before the app can be made: the server forwards to it once set.
        self.server = make_server("127.0.0.1", 0, self._wsgi, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.svc = None
        try:   # a setup failing half-way closes what it opened
            hospital.config_path.write_text(hospital.config_path.read_text()
                                            + f'\n[service]\npublic_url = "{self.url}"\n')
            hospital.app.close()
            hospital.app = hospital.new_app()
            self.svc = Service(config.load(hospital.config_path))
            self._app = create_app(svc=self.svc)
        except BaseException:
            self.server.server_close()
            if self.svc is not None:
                self.svc.stop(wait=True)
            raise
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"{self.url}/fhir/notify/{env_name(hospital.app.hospital.name)}"

    def _wsgi(self, environ, start_response):
        # "/moved/..." is served too: the same app at a second public_url.
        if environ.get("PATH_INFO", "").startswith("/moved/"):
            environ["PATH_INFO"] = environ["PATH_INFO"][len("/moved"):]
        return self._app(environ, start_response)

    def close(self):
        try:
            turn_off(self.h.app)  # or the EHR keeps sending heartbeats to a closed port
        finally:
            self.server.shutdown()
            self.server.server_close()
            self.svc.stop(wait=True)

    def post(self, body: dict, token: str | None) -> requests.Response:
        headers = {"Content-Type": "application/fhir+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return requests.post(self.endpoint, json=body, headers=headers, timeout=30)

    def token(self, fhir, sub_ref: str) -> str:
        """What the EHR sends (sekmet shows channel.header on read; we keep only its hash)."""
        header = fhir.read_ref(sub_ref)["channel"]["header"][0]
        assert header.startswith("Authorization: Bearer ")
        return header.split("Bearer ", 1)[1]


@pytest.fixture
def served(hospital, sr_topic):
    s = Served(hospital)
    try:
        yield s
    finally:
        s.close()


def wait_for(what, fn, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def cases_for(h, sr) -> list:
    ref = f"ServiceRequest/{sr['id']}"
    return [c for c in h.app.store.list_cases() if c.service_request == ref]


def notification(sub_id: str, kind: str, count: int, events=(), resources=(), base="http://ehr.example/fhir"):
    params = [{"name": "subscription", "valueReference": {"reference": f"{base}/Subscription/{sub_id}"}},
              {"name": "topic", "valueCanonical": TOPIC}, {"name": "status", "valueCode": "active"},
              {"name": "type", "valueCode": kind},
              {"name": "events-since-subscription-start", "valueString": str(count)}]
    for number, focus in events:
        params.append({"name": "notification-event", "part": [
            {"name": "event-number", "valueString": str(number)},
            {"name": "focus", "valueReference": {"reference": f"{base}/{focus}"}}]})
    entries = [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": {"resourceType": "Parameters", "parameter": params}}]
    entries += [{"fullUrl": f"{base}/ServiceRequest/{r['id']}", "resource": r} for r in resources]
    return {"resourceType": "Bundle", "type": "history", "entry": entries}


def diagnostics(resp) -> str:
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome", body
    return " | ".join(i["diagnostics"] for i in body["issue"])


# --- the flow --------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", ["id-only", "full-resource"])
def test_an_order_arrives_by_notification_once_and_its_revocation_cancels_it(served, seeded, fhir, capsys, payload):
    h = served.h
    argv = ["--config", str(h.config_path), "subscribe", "--payload", payload, "--heartbeat", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    sub_ref = out.split(":", 1)[0]
    assert sub_ref.startswith("Subscription/") and ": active (created;" in out, out
    sub = fhir.read_ref(sub_ref)
    assert sub["criteria"] == TOPIC and PROFILE in sub["meta"]["profile"]
    assert sub["channel"]["endpoint"] == served.endpoint
    assert sub["_criteria"]["extension"][0]["valueString"] == f"ServiceRequest?code=urn:test:orders|{h.order_code}"
    assert sub["channel"]["_payload"]["extension"][0]["valueCode"] == payload

    # Twice: the same Subscription, still the only active one for our endpoint.
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"{sub_ref}: active (unchanged;")
    mine = [s for s in fhir.search("Subscription", {"url": served.endpoint}) if s["status"] == "active"]
    assert [s["id"] for s in mine] == [sub["id"]]

    ehr = served.svc.apps[0].ehr
    reads, read_ref = [], ehr.read_ref
    ehr.read_ref = lambda ref, **kw: (reads.append(ref), read_ref(ref, **kw))[1]
    sr = h.order(seeded["patient"])
    case = wait_for("the Case", lambda: cases_for(h, sr))[0]
    assert case.step == "collect"
    # Either payload: the order is read back from the EHR; a full-resource entry is never trusted (S2).
    assert reads == [f"ServiceRequest/{sr['id']}"]
    # A poll afterwards (and a repeated notification) opens no second Case.
    poll(h.app, worker="test-poll")
    again = served.post(notification(sub["id"], "event-notification", 1, [(1, f"ServiceRequest/{sr['id']}")],
                                     [sr] if payload == "full-resource" else []), served.token(fhir, sub_ref))
    assert again.status_code == 200 and "0 Case(s) opened" in diagnostics(again)
    assert len(cases_for(h, sr)) == 1

    sr = fhir.read_ref(f"ServiceRequest/{sr['id']}")
    sr["status"] = "revoked"
    fhir.update(sr)
    cancelled = wait_for("the cancellation", lambda: [c for c in cases_for(h, sr) if c.step == "cancelled"])
    assert "revoked" in cancelled[0].last_error and len(cases_for(h, sr)) == 1

    # The EHR's handshake, events and heartbeats were all taken; the count matches the EHR's two events.
    state = wait_for("a heartbeat", lambda: (s := load_state(h.app.store, h.app.hospital.key)).last_kind == "heartbeat"
                     and s)
    assert state.subscription == sub["id"] and state.events == 2


def test_a_forged_full_resource_notification_opens_no_case(served, seeded, fhir, capsys):
    """S2: the notification's bearer token is readable in the EHR's Subscription; a forged full-resource
    notification reusing an ordinary order's id, dressed up as a second opinion for a chosen performer,
    must open nothing: only the EHR's own copy of the order counts."""
    h = served.h
    assert main(["--config", str(h.config_path), "subscribe", "--payload", "full-resource", "--heartbeat", "0"]) == 0
    sub_ref = capsys.readouterr().out.split(":", 1)[0]
    ordinary, _ = fhir.create({
        "resourceType": "ServiceRequest", "status": "completed", "intent": "order",
        "code": {"coding": [{"system": "http://loinc.org", "code": "36801-9", "display": "MR lumbar spine"}]},
        "subject": {"reference": seeded["patient"]}})
    forged = dict(ordinary, status="active",
                  code={"coding": [{"system": "urn:test:orders", "code": h.order_code}]},
                  performer=[{"identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.9.1"}}])
    resp = served.post(notification(sub_ref.split("/")[1], "event-notification", 1,
                                    [(1, f"ServiceRequest/{ordinary['id']}")], [forged]), served.token(fhir, sub_ref))
    assert resp.status_code == 200
    assert "is not a second-opinion order" in diagnostics(resp) and "0 Case(s) opened" in diagnostics(resp)
    assert cases_for(h, ordinary) == []


def test_notifications_need_the_subscription_token_and_get_operation_outcomes(served, fhir):
    result = subscribe(served.h.app, heartbeat=None)
    assert result.status == "active"
    token = served.token(fhir, result.subscription)
    heartbeat = notification(result.subscription.split("/")[1], "heartbeat", 0)
    for bad in (None, "wrong-token", token[:-1]):
        r = served.post(heartbeat, bad)
        assert r.status_code == 401 and r.headers["Content-Type"].startswith("application/fhir+json")
        assert "bearer token" in diagnostics(r) and r.json()["issue"][0]["code"] == "login"
    r = requests.post(f"{served.url}/fhir/notify/nobody", json=heartbeat, timeout=10)
    assert r.status_code == 404 and "no hospital" in diagnostics(r)
    r = served.post({"resourceType": "Bundle", "type": "searchset"}, token)
    assert r.status_code == 400 and "history" in diagnostics(r)
    r = served.post(dict(heartbeat, entry=[{"resource": {"resourceType": "Parameters", "parameter": [
        {"name": "type", "valueCode": "heartbeat"}]}}]), token)
    assert r.status_code == 400 and "subscription reference" in diagnostics(r)
    r = requests.get(served.endpoint, timeout=10)
    assert r.status_code == 405 and r.json()["resourceType"] == "OperationOutcome"
    r = served.post(heartbeat, token)
    assert r.status_code == 200 and "heartbeat received" in diagnostics(r)
    r = served.post(notification(result.subscription.split("/")[1], "handshake", 0), token)
    assert r.status_code == 200 and "handshake received" in diagnostics(r)

    # A second Subscription to our endpoint (made by hand, say) is turned off; a changed payload updates
    # ours in place, keeping its token.
    duplicate = {k: v for k, v in fhir.read_ref(result.subscription).items() if k not in ("id", "meta")}
    duplicate, _ = fhir.create(dict(duplicate, status="requested"))
    # sekmet quirk: a handshake still under way would set a Subscription turned off meanwhile back to active.
    wait_for("the duplicate's handshake",
             lambda: fhir.read_ref(f"Subscription/{duplicate['id']}")["status"] == "active")
    again = subscribe(served.h.app, payload="full-resource", heartbeat=None)
    assert (again.subscription, again.action, again.status) == (result.subscription, "updated", "active")
    assert again.turned_off == [f"Subscription/{duplicate['id']}"]
    assert fhir.read_ref(again.turned_off[0])["status"] == "off"
    assert served.token(fhir, result.subscription) == token

    # public_url changed: a new Subscription for the new endpoint, and the old one is turned off.
    moved = served.h.new_app(FHIRBRIDGE_SERVICE__PUBLIC_URL=f"{served.url}/moved")
    try:
        third = subscribe(moved, heartbeat=None)
        assert third.action == "created" and third.status == "active" \
            and third.endpoint.startswith(f"{served.url}/moved/")
        assert third.turned_off == [result.subscription] and fhir.read_ref(result.subscription)["status"] == "off"
        assert load_state(moved.store, moved.hospital.key).subscription == third.subscription.split("/")[1]
    finally:
        turn_off(moved)
        moved.close()


def test_missed_events_make_the_service_catch_up_by_polling(served, seeded, fhir):
    h = served.h
    # Placed before the subscription exists: no notification will ever name them.
    missed, named = h.order(seeded["patient"]), h.order(seeded["patient"])
    result = subscribe(h.app, heartbeat=None)
    sub_id, token = result.subscription.split("/")[1], served.token(fhir, result.subscription)

    # A heartbeat that shows no more events than seen: nothing to catch up.
    r = served.post(notification(sub_id, "heartbeat", 0), token)
    assert r.status_code == 200 and "catching up" not in diagnostics(r)
    # Event 3 arrives, 1 and 2 never did: the named order is taken in at once, the rest by a poll.
    r = served.post(notification(sub_id, "event-notification", 3, [(3, f"ServiceRequest/{named['id']}")]), token)
    assert r.status_code == 200
    assert "1 Case(s) opened" in diagnostics(r) and "2 event(s) between 0 and 3 never arrived" in diagnostics(r)
    wait_for("the catch-up poll", lambda: cases_for(h, missed))
    assert len(cases_for(h, named)) == 1 and len(cases_for(h, missed)) == 1
    # A heartbeat ahead of the count seen means events were lost too.
    r = served.post(notification(sub_id, "heartbeat", 5), token)
    assert "2 event(s) between 3 and 5 never arrived" in diagnostics(r)
    # An order that is not ours (another code) is ignored even when a notification names it.
    other = {k: v for k, v in fhir.read_ref(f"ServiceRequest/{named['id']}").items() if k not in ("id", "meta")}
    other, _ = fhir.create(dict(other, code={"coding": [{"system": "urn:test:orders", "code": "not-ours"}]}))
    r = served.post(notification(sub_id, "event-notification", 6, [(6, f"ServiceRequest/{other['id']}")], [other]),
                    token)
    assert "not a second-opinion order" in diagnostics(r) and not cases_for(h, other)
    assert "catching up" not in diagnostics(r)


# --- subscribe's checks ---------------------------------------------------------------------------------

def test_subscribe_needs_public_url_and_a_topic_that_filters_by_code(hospital, sr_topic, capsys):
    assert main(["--config", str(hospital.config_path), "subscribe"]) == 2
    err = capsys.readouterr().err
    assert "service.public_url: is not set" in err and "/fhir/notify/" in err
    hospital.config_path.write_text(hospital.config_path.read_text() + '\n[service]\npublic_url = "http://127.0.0.1:9"\n')
    app = hospital.new_app()
    try:
        topic, warnings = discover_topic(app)
        assert topic.url == TOPIC and topic.covers_updates and not warnings
        # sekmet's own topic cannot filter by code: every order in the hospital would come to us.
        with pytest.raises(Exception, match="cannot filter by code"):
            discover_topic(app, SEKMET_NEW_ORDER)
        with pytest.raises(Exception, match="does not offer topic"):
            discover_topic(app, "http://example.org/no-such-topic")
    finally:
        app.close()
    # Nobody listens at the endpoint: the EHR's handshake fails and says so.
    assert main(["--config", str(hospital.config_path), "subscribe", "--heartbeat", "0"]) == 1
    captured = capsys.readouterr()
    assert ": error (created;" in captured.out and "Is fhirbridge serving" in captured.err
    app = hospital.new_app()
    try:
        assert len(turn_off(app)) == 1
    finally:
        app.close()
