"""/metrics (metrics.py): a whole referral against the real EHR shows up in the figures; the store's gauges
(Cases by step, queue, oldest pending step, overdue) are computed at scrape time; the endpoint's guard."""
from __future__ import annotations

import time

import pytest

from fhirbridge.config import loader as config
from fhirbridge.demo.localehr import free_port
from fhirbridge.errors import ConfigError, FhirError
from fhirbridge.fhir.client import FhirClient
from fhirbridge.loop.receive import receive_file
from fhirbridge.ops import metrics
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from tests.kit.metrics import parse, total, value

pytestmark = pytest.mark.sekmet


def scrape(client, **headers) -> dict[tuple[str, tuple], float]:
    resp = client.get("/metrics", headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.content_type.startswith("text/plain")
    return parse(resp.get_data(as_text=True))


@pytest.fixture
def served(hospital):
    # A scrape network of our own: the tests' client is the only one that reaches it.
    hospital.config_path.write_text(hospital.config_path.read_text() + "\n[metrics]\nunauthenticated = true\n")
    svc = Service(config.load(hospital.config_path))
    yield hospital, svc, create_app(svc=svc).test_client()
    svc.stop(wait=True)


def test_a_referral_shows_in_the_metrics(served, seeded):
    hospital, _svc, client = served
    name = hospital.app.hospital.name
    before = scrape(client)
    assert value(before, "fhirbridge_store_up") == 1
    assert value(before, "fhirbridge_info", version=__import__("fhirbridge").__version__) == 1

    sr = hospital.order(seeded["patient"])
    report = hospital.run()
    assert not report.errors
    case = hospital.case_for(sr)
    mid = scrape(client)
    assert value(mid, "fhirbridge_cases", hospital=name, step="await_opinion") == 1
    assert value(mid, "fhirbridge_cases", hospital=name, step="done") == 0

    receive_file(hospital.app, hospital.answer(case))
    hospital.run(intake=False)
    assert hospital.app.store.get(case.id).step == "done"
    after = scrape(client)

    assert value(after, "fhirbridge_cases", hospital=name, step="done") == 1
    assert value(after, "fhirbridge_cases", hospital=name, step="await_opinion") == 0
    for state in ("due", "running", "backoff"):
        assert value(after, "fhirbridge_queue_depth", hospital=name, state=state) == 0
    assert value(after, "fhirbridge_oldest_pending_step_age_seconds", hospital=name) == 0

    def delta(metric, **labels):
        return total(after, metric, **labels) - total(before, metric, **labels)

    for step in ("collect", "seal", "deliver", "file"):
        assert delta("fhirbridge_step_duration_seconds_count", hospital=name, step=step, outcome="done") == 1, step
    assert delta("fhirbridge_step_duration_seconds_sum", hospital=name, step="collect") > 0
    assert delta("fhirbridge_packages_sent_total", hospital=name, reviewer="spine-center") == 1
    assert delta("fhirbridge_opinions_filed_total", hospital=name, reviewer="spine-center") == 1
    # Intake searched orders, collection searched the chart, the write-back was one transaction.
    assert delta("fhirbridge_ehr_requests_total", hospital=name, resource_type="ServiceRequest", method="GET",
                 status="200") >= 2
    assert delta("fhirbridge_ehr_requests_total", hospital=name, resource_type="DiagnosticReport",
                 method="GET", status="200") >= 1
    assert delta("fhirbridge_ehr_requests_total", hospital=name, resource_type="transaction", method="POST") == 1
    assert delta("fhirbridge_ehr_request_duration_seconds_count", hospital=name, resource_type="ServiceRequest",
                 method="GET") >= 2
    # No label value anywhere is more than a name, a type, a method, a status or a step.
    text = client.get("/metrics").get_data(as_text=True)
    assert seeded["patient"].split("/")[1] not in text and "Zeltwanger" not in text


def test_store_gauges_show_the_queue_and_the_oldest_pending_step(served):
    hospital, svc, client = served
    store, key, name = svc.store, hospital.app.hospital.key, hospital.app.hospital.name
    now = time.time()
    ids = []
    for i in range(4):
        case, created = store.open_case(case_id=f"metrics-{i}-{key[-6:]}-{now}", hospital=key,
                                        service_request=f"ServiceRequest/m{i}", patient="Patient/m",
                                        reviewer="spine-center", profile="spine")
        assert created
        ids.append(case.id)
    from sqlalchemy import update

    from fhirbridge.store.tables import cases, events
    with store.engine.begin() as conn:
        # One has waited ten minutes at collect, one is running, one backs off after an error, one is due.
        conn.execute(update(events).where(events.c.case_id == ids[0]).values(at=now - 600))
        conn.execute(update(cases).where(cases.c.id == ids[0]).values(created_at=now - 600))
        conn.execute(update(cases).where(cases.c.id == ids[1]).values(claimed_by="w", claimed_until=now + 60))
        conn.execute(update(cases).where(cases.c.id == ids[2]).values(next_attempt_at=now + 60))
    # An error recorded on the oldest Case does not make its step look fresh.
    store.add_event(ids[0], "error", {"step": "collect", "error": "EHR down"})
    store.update(ids[0], attempts=1, last_error="EHR down")
    got = scrape(client)
    assert value(got, "fhirbridge_cases", hospital=name, step="collect") == 4
    assert value(got, "fhirbridge_queue_depth", hospital=name, state="due") == 2
    assert value(got, "fhirbridge_queue_depth", hospital=name, state="running") == 1
    assert value(got, "fhirbridge_queue_depth", hospital=name, state="backoff") == 1
    assert 590 <= value(got, "fhirbridge_oldest_pending_step_age_seconds", hospital=name) <= 700

    # A step recorded as done moves the Case on: its age counts from then.
    store.update(ids[0], step="seal", event_kind="collect.done")
    with store.engine.begin() as conn:
        conn.execute(update(cases).where(cases.c.id.in_(ids[1:])).values(step="done"))
    got = scrape(client)
    assert value(got, "fhirbridge_oldest_pending_step_age_seconds", hospital=name) < 30

    with store.engine.begin() as conn:
        conn.execute(update(cases).where(cases.c.id == ids[0]).values(step="await_opinion", overdue_at=now))
    assert value(scrape(client), "fhirbridge_cases_overdue", hospital=name) == 1


def test_a_store_that_does_not_answer_is_a_gauge_not_an_error(served):
    _hospital, svc, _client = served
    broken = metrics.StoreCollector(type("S", (), {"engine": None})(), {})
    assert [m.name for m in broken.collect()] == ["fhirbridge_store_up"]
    assert list(broken.collect())[0].samples[0].value == 0


def test_metrics_token_and_switch(hospital):
    token = "metrics-token-0123456789"
    text = hospital.config_path.read_text()
    hospital.config_path.write_text(text + f'\n[metrics]\ntoken = "{token}"\n')
    svc = Service(config.load(hospital.config_path))
    try:
        client = create_app(svc=svc).test_client()
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
        assert client.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        svc.stop(wait=True)
    hospital.config_path.write_text(text + "\n[metrics]\nenabled = false\n")
    svc = Service(config.load(hospital.config_path))
    try:
        assert create_app(svc=svc).test_client().get("/metrics").status_code == 404
    finally:
        svc.stop(wait=True)


def test_unanswered_ehr_requests_count_as_errors_with_their_retries():
    seen = []
    base = f"http://127.0.0.1:{free_port()}/fhir"
    with FhirClient(base, retries=0, observer=lambda *a: seen.append(a)) as client, pytest.raises(FhirError):
        client.read("Patient", "x")
    assert [(m, s, r) for m, _u, s, _t, r in seen] == [("GET", None, 0)]
    before = metrics.EHR_REQUESTS.labels("h-err", "Patient", "GET", "error")._value.get()
    metrics.ehr_observer("h-err", base)(*seen[0])
    assert metrics.EHR_REQUESTS.labels("h-err", "Patient", "GET", "error")._value.get() == before + 1


def test_retries_are_counted(ehr):
    """A 503 answered twice, then the request goes through: two retries on one request."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer
    answers = [503, 503, 200]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            code = answers.pop(0)
            body = b'{"resourceType":"Patient","id":"p1"}' if code == 200 else b""
            self.send_response(code)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    seen = []
    try:
        with FhirClient(f"http://127.0.0.1:{server.server_port}/fhir", backoff=0, observer=lambda *a: seen.append(a),
                        validate=False) as client:
            client.read("Patient", "p1")
    finally:
        server.shutdown()
    assert [(m, s, r) for m, _u, s, _t, r in seen] == [("GET", 200, 2)]


@pytest.mark.parametrize("url, label", [
    ("http://h/fhir/Patient/1", "Patient"),
    ("http://h/fhir/ServiceRequest?code=x", "ServiceRequest"),
    ("http://h/fhir/Task/1/_history/2", "Task"),
    ("http://h/fhir", "transaction"),
    ("http://h/fhir/", "transaction"),
    ("http://h/fhir/metadata", "metadata"),
    ("http://h/fhir/$export", "other"),
    ("http://h/fhir/patient-lowercase", "other"),
])
def test_resource_type_labels_stay_few(url, label):
    assert metrics.resource_type_of("/fhir", url) == label


def test_metrics_need_a_token_unless_opened_on_purpose(hospital):
    """S10: the figures name the hospitals and reviewers served here; by default nobody reads them without
    the token (before, /metrics answered anyone who reached the port)."""
    svc = Service(config.load(hospital.config_path))
    try:
        resp = create_app(svc=svc).test_client().get("/metrics")
        assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
        assert "[metrics] token" in resp.get_data(as_text=True)
        assert hospital.app.hospital.name not in resp.get_data(as_text=True)
    finally:
        svc.stop(wait=True)
    hospital.config_path.write_text(hospital.config_path.read_text()
                                    + '\n[metrics]\ntoken = "metrics-token-0123456789"\nunauthenticated = true\n')
    with pytest.raises(ConfigError) as err:
        config.load(hospital.config_path)
    assert err.value.key == "metrics.unauthenticated"

