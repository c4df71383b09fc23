"""FhirClient: edge cases against a tiny scripted HTTP server, then real interactions against sekmet."""
from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import pytest

from fhirbridge.demo.localehr import _demo_pdf, free_port
from fhirbridge.errors import FhirError, InvalidResource
from fhirbridge.fhir.auth import make_auth
from fhirbridge.fhir.client import FhirClient

# ---------------------------------------------------------------------- scripted server


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict | None = None
    headers: dict = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Seen:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict
    body: bytes
    at: float


class Scripted:
    """Routes (method, path) to a list of replies, served in order; the last one repeats."""

    def __init__(self):
        self.routes: dict[tuple[str, str], list[Reply] | Callable[[Seen], Reply]] = {}
        self.seen: list[Seen] = []
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"

    def on(self, method: str, path: str, *replies: Reply | Callable[[Seen], Reply]) -> None:
        self.routes[(method, "/fhir/" + path)] = replies[0] if callable(replies[0]) else list(replies)

    def calls(self, method: str, path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path == "/fhir/" + path]

    def reply_for(self, seen: Seen) -> Reply:
        route = self.routes.get((seen.method, seen.path))
        if route is None:
            return Reply(404, outcome("no route in test server"))
        if callable(route):
            return route(seen)
        return route.pop(0) if len(route) > 1 else route[0]


def outcome(text: str, code: str = "processing") -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


def bundle(resources: list[dict], next_url: str | None = None, modes: list[str] | None = None) -> dict:
    entries = [{"resource": r, "search": {"mode": (modes[i] if modes else "match")}} for i, r in enumerate(resources)]
    out = {"resourceType": "Bundle", "type": "searchset", "entry": entries, "link": []}
    if next_url:
        out["link"].append({"relation": "next", "url": next_url})
    return out


def obs(oid: str) -> dict:
    return {"resourceType": "Observation", "id": oid, "status": "final", "code": {"text": "test"}}


def _make_handler(script: Scripted):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            seen = Seen(self.command, parts.path, parse_qsl(parts.query, keep_blank_values=True),
                        {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length) if length else b"",
                        time.monotonic())
            script.seen.append(seen)
            reply = script.reply_for(seen)
            if reply.delay:
                time.sleep(reply.delay)
            body = reply.body
            if isinstance(body, dict):
                body = json.dumps(body).encode()
            body = body or b""
            try:
                self.send_response(reply.status)
                headers = {"Content-Type": "application/fhir+json", **reply.headers}
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass  # the client gave up (timeout tests)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def server():
    script = Scripted()
    script.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(script))
    script.httpd.daemon_threads = True
    thread = threading.Thread(target=script.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield script
    script.httpd.shutdown()
    script.httpd.server_close()


def client_for(server: Scripted, **kw) -> FhirClient:
    kw.setdefault("retries", 2)
    kw.setdefault("backoff", 0)
    kw.setdefault("timeout", (2.0, 5.0))
    return FhirClient(server.url, **kw)


# ---------------------------------------------------------------------- retries and errors


def test_429_waits_for_retry_after_then_succeeds(server):
    server.on("GET", "Patient/p1", Reply(429, outcome("slow down"), {"Retry-After": "1"}),
              Reply(200, {"resourceType": "Patient", "id": "p1"}))
    with client_for(server) as client:
        assert client.read("Patient", "p1")["id"] == "p1"
    first, second = server.calls("GET", "Patient/p1")
    assert 0.9 <= second.at - first.at < 2.0


def test_huge_retry_after_is_capped(server):
    server.on("GET", "Patient/p1", Reply(503, outcome("maintenance"), {"Retry-After": "100"}),
              Reply(200, {"resourceType": "Patient", "id": "p1"}))
    started = time.monotonic()
    with client_for(server, max_retry_after=0.2) as client:
        client.read("Patient", "p1")
    first, second = server.calls("GET", "Patient/p1")
    assert 0.15 <= second.at - first.at < 1.0
    assert time.monotonic() - started < 2.0


def test_503_beyond_retries_is_transient_error(server):
    server.on("GET", "Observation/o1", Reply(503, outcome("database unavailable")))
    with client_for(server, retries=2) as client, pytest.raises(FhirError) as err:
        client.read("Observation", "o1")
    assert err.value.transient and err.value.status == 503
    assert "503" in str(err.value) and "database unavailable" in str(err.value)
    assert len(server.calls("GET", "Observation/o1")) == 3  # first try + 2 retries


def test_404_is_permanent_and_quotes_diagnostics(server):
    server.on("GET", "ServiceRequest/abc", Reply(404, outcome("ServiceRequest/abc is not known", "not-found")))
    with client_for(server) as client, pytest.raises(FhirError) as err:
        client.read("ServiceRequest", "abc")
    assert str(err.value) == "EHR answered 404 Not Found to GET ServiceRequest/abc: ServiceRequest/abc is not known"
    assert not err.value.transient and err.value.status == 404
    assert err.value.outcome["resourceType"] == "OperationOutcome"
    assert len(server.calls("GET", "ServiceRequest/abc")) == 1


def test_error_message_truncates_diagnostics_and_never_quotes_other_bodies(server):
    server.on("GET", "Patient/a", Reply(400, outcome("x" * 500)))
    server.on("GET", "Patient/b", Reply(400, b"<html>Jane Doe, born 1970</html>", {"Content-Type": "text/html"}))
    with client_for(server) as client:
        with pytest.raises(FhirError) as long_err:
            client.read("Patient", "a")
        with pytest.raises(FhirError) as html_err:
            client.read("Patient", "b")
    assert len(str(long_err.value).split(": ", 1)[1]) == 200
    assert "Jane" not in str(html_err.value) and html_err.value.outcome is None


def test_read_timeout_is_transient(server):
    server.on("GET", "Patient/slow", Reply(200, {"resourceType": "Patient", "id": "slow"}, delay=1.0))
    with client_for(server, timeout=(1.0, 0.2), retries=1) as client, pytest.raises(FhirError) as err:
        client.read("Patient", "slow")
    assert err.value.transient and err.value.status is None
    assert len(server.calls("GET", "Patient/slow")) == 2  # GET is idempotent: retried once


def test_unreachable_server_is_transient():
    with FhirClient(f"http://127.0.0.1:{free_port()}/fhir", retries=1, backoff=0) as client:
        with pytest.raises(FhirError) as err:
            client.capabilities()
    assert err.value.transient and "could not reach" in str(err.value)


def test_post_is_not_retried_on_502(server):
    server.on("POST", "Patient", Reply(502, outcome("bad gateway")))
    with client_for(server, retries=3) as client, pytest.raises(FhirError) as err:
        client.create({"resourceType": "Patient"})
    assert err.value.transient and err.value.status == 502
    assert len(server.calls("POST", "Patient")) == 1


def test_post_is_retried_on_503(server):
    server.on("POST", "Patient", Reply(503, outcome("busy")), Reply(201, {"resourceType": "Patient", "id": "n1"}))
    with client_for(server) as client:
        stored, created = client.create({"resourceType": "Patient"})
    assert (stored["id"], created) == ("n1", True)
    assert len(server.calls("POST", "Patient")) == 2


def test_post_read_timeout_is_not_retried(server):
    server.on("POST", "Patient", Reply(201, {"resourceType": "Patient", "id": "n1"}, delay=1.0))
    with client_for(server, timeout=(1.0, 0.2), retries=3) as client, pytest.raises(FhirError) as err:
        client.create({"resourceType": "Patient"})
    assert err.value.transient
    assert len(server.calls("POST", "Patient")) == 1


# ---------------------------------------------------------------------- search


def test_search_follows_next_links_across_three_pages(server):
    def pages(seen: Seen) -> Reply:
        page = dict(seen.query).get("page", "1")
        if page == "1":
            return Reply(200, bundle([obs("a"), obs("b")], f"{server.url}/Observation?page=2"))
        if page == "2":  # relative next link: resolved against the base
            return Reply(200, bundle([obs("c"), {"resourceType": "Patient", "id": "p"}, outcome("x")],
                                     "Observation?page=3", modes=["match", "include", "outcome"]))
        return Reply(200, bundle([obs("d")]))

    server.on("GET", "Observation", pages)
    with client_for(server) as client:
        got = [f"{r['resourceType']}/{r['id']}" for r in client.search("Observation", {"subject": "Patient/p"},
                                                                      count=2)]
    assert got == ["Observation/a", "Observation/b", "Observation/c", "Patient/p", "Observation/d"]
    first, second, third = server.calls("GET", "Observation")
    assert ("subject", "Patient/p") in first.query and ("_count", "2") in first.query
    assert second.query == [("page", "2")] and third.query == [("page", "3")]
    assert first.headers["prefer"] == "handling=strict"


def test_search_uses_page_size_unless_count_given(server):
    server.on("GET", "Condition", Reply(200, bundle([])))
    with client_for(server, page_size=7) as client:
        list(client.search("Condition", [("patient", "Patient/1"), ("category", "a"), ("category", "b")]))
        list(client.search("Condition", {"_count": "3"}))
    first, second = server.calls("GET", "Condition")
    assert first.query == [("patient", "Patient/1"), ("category", "a"), ("category", "b"), ("_count", "7")]
    assert second.query == [("_count", "3")]


def test_broken_json_page_raises(server):
    def pages(seen: Seen) -> Reply:
        if dict(seen.query).get("page") == "2":
            return Reply(200, b'{"resourceType": "Bundle", "entry": [')
        return Reply(200, bundle([obs("a")], "Observation?page=2"))

    server.on("GET", "Observation", pages)
    got = []
    with client_for(server) as client, pytest.raises(FhirError) as err:
        for resource in client.search("Observation"):
            got.append(resource["id"])
    assert got == ["a"]
    assert "not valid JSON" in str(err.value) and not err.value.transient


def test_next_link_to_another_server_is_refused(server):
    server.on("GET", "Observation", Reply(200, bundle([obs("a")], "https://elsewhere.example/fhir/Observation?p=2")))
    with client_for(server) as client, pytest.raises(FhirError) as err:
        list(client.search("Observation"))
    assert "another server" in str(err.value)


def test_invalid_resource_is_recorded_and_still_yielded(server):
    bad = {"resourceType": "Observation", "id": "bad1", "code": {"text": "x"}, "valueString": "Jane Doe"}
    server.on("GET", "Observation", Reply(200, bundle([obs("ok1"), bad])))
    with client_for(server) as client:
        got = list(client.search("Observation"))
    assert [r["id"] for r in got] == ["ok1", "bad1"] and got[1] == bad
    (invalid,) = client.invalid
    assert isinstance(invalid, InvalidResource) and invalid.where == "Observation/bad1"
    assert "Observation.status: field required" in invalid.reasons
    assert "Jane" not in str(invalid)


def test_read_strict_raises_invalid_resource(server):
    server.on("GET", "Observation/bad1", Reply(200, {"resourceType": "Observation", "id": "bad1"}))
    with client_for(server) as client:
        assert client.read("Observation", "bad1")["id"] == "bad1"
        with pytest.raises(InvalidResource):
            client.read("Observation", "bad1", strict=True)
    assert [e.where for e in client.invalid] == ["Observation/bad1", "Observation/bad1"]


def test_validation_can_be_switched_off(server):
    server.on("GET", "Observation/bad1", Reply(200, {"resourceType": "Observation", "id": "bad1"}))
    with client_for(server, validate=False) as client:
        client.read("Observation", "bad1", strict=True)
    assert client.invalid == []


# ---------------------------------------------------------------------- writes


def test_create_with_empty_body_reads_location(server):
    server.on("POST", "Patient", Reply(201, b"", {"Location": f"{server.url}/Patient/n7/_history/1"}))
    server.on("GET", "Patient/n7", Reply(200, {"resourceType": "Patient", "id": "n7"}))
    with client_for(server) as client:
        stored, created = client.create({"resourceType": "Patient"}, if_none_exist="identifier=urn:x|1")
    assert (stored["id"], created) == ("n7", True)
    (post,) = server.calls("POST", "Patient")
    assert post.headers["if-none-exist"] == "identifier=urn:x|1"
    assert post.headers["content-type"] == "application/fhir+json"


def test_conditional_create_match_is_not_created(server):
    server.on("POST", "Patient", Reply(200, {"resourceType": "Patient", "id": "old"}))
    with client_for(server) as client:
        assert client.create({"resourceType": "Patient"}, if_none_exist="identifier=urn:x|1") == (
            {"resourceType": "Patient", "id": "old"}, False)


def test_update_sends_if_match_as_weak_etag(server):
    server.on("PUT", "Patient/p1", Reply(200, {"resourceType": "Patient", "id": "p1"}))
    with client_for(server) as client:
        client.update({"resourceType": "Patient", "id": "p1"}, if_match="3")
        client.update({"resourceType": "Patient", "id": "p1"}, if_match='W/"4"')
    assert [c.headers["if-match"] for c in server.calls("PUT", "Patient/p1")] == ['W/"3"', 'W/"4"']


def test_bearer_auth_is_sent_and_hidden(server):
    server.on("GET", "metadata", Reply(200, {"resourceType": "CapabilityStatement"}))
    auth = make_auth({"type": "bearer", "token": "s3cret-token"})
    with client_for(server, auth=auth) as client:
        client.capabilities()
    assert server.seen[0].headers["authorization"] == "Bearer s3cret-token"
    assert "s3cret" not in repr(auth)
    basic = make_auth({"type": "basic", "username": "svc", "password": "pw-123"})
    assert "pw-123" not in repr(basic) and "svc" not in repr(basic)
    assert make_auth({"type": "none"}) is None and make_auth(None) is None
    with pytest.raises(ValueError, match="unknown auth type"):
        make_auth({"type": "kerberos"})
    with pytest.raises(ValueError, match="token"):
        make_auth({"type": "bearer"})


def test_ids_that_would_rewrite_the_path_are_refused(server):
    with client_for(server) as client, pytest.raises(FhirError):
        client.read("Patient", "../metadata")
    assert server.seen == []


# ---------------------------------------------------------------------- binaries


def test_download_binary_streams_raw_content(server):
    payload = bytes(range(256)) * 4000
    server.on("GET", "Binary/b1", Reply(200, payload, {"Content-Type": "application/pdf"}))
    dst = io.BytesIO()
    with client_for(server) as client:
        info = client.download_binary(f"{server.url}/Binary/b1", dst, max_bytes=len(payload))
    assert info == {"content_type": "application/pdf", "size": len(payload),
                    "sha256": hashlib.sha256(payload).hexdigest()}
    assert dst.getvalue() == payload
    assert server.seen[0].headers["accept"] == "*/*"


def test_download_binary_over_limit_is_refused(server):
    payload = b"x" * 5000
    server.on("GET", "Binary/raw", Reply(200, payload, {"Content-Type": "application/pdf"}))
    server.on("GET", "Binary/json", Reply(200, {"resourceType": "Binary", "contentType": "application/pdf",
                                                "data": "eHh4" * 2000}))
    with client_for(server) as client:
        for ref in ("Binary/raw", "Binary/json"):
            with pytest.raises(FhirError) as err:
                client.download_binary(ref, io.BytesIO(), max_bytes=1000)
            assert "larger than the limit of 1000 bytes" in str(err.value) and not err.value.transient


def test_download_binary_outside_base_is_refused(server):
    with client_for(server) as client, pytest.raises(FhirError, match="outside"):
        client.download_binary("https://elsewhere.example/fhir/Binary/1", io.BytesIO(), max_bytes=10)
    assert server.seen == []


# ====================================================================== against sekmet


@pytest.mark.sekmet
def test_sekmet_search_pages_with_count(fhir: FhirClient):
    system = f"urn:fhirbridge-test:{uuid.uuid4()}"
    made = {fhir.create({"resourceType": "Basic", "code": {"text": "paging"},
                         "identifier": [{"system": system, "value": str(i)}]})[0]["id"] for i in range(5)}
    bundles = list(fhir.search_bundles("Basic", {"identifier": f"{system}|"}, count=2))
    assert [len(b.get("entry", [])) for b in bundles] == [2, 2, 1]
    assert {r["id"] for r in fhir.search("Basic", {"identifier": f"{system}|"}, count=2)} == made


@pytest.mark.sekmet
def test_sekmet_include_is_yielded(fhir: FhirClient, seeded: dict):
    lab_report = seeded["diagnostic_reports"][-1]
    got = list(fhir.search("DiagnosticReport", {"_id": lab_report.split("/")[1],
                                                "_include": "DiagnosticReport:result"}))
    assert {f"Observation/{r['id']}" for r in got if r["resourceType"] == "Observation"} == set(seeded["observations"])


@pytest.mark.sekmet
def test_sekmet_unknown_search_parameter_fails_instead_of_widening(fhir: FhirClient):
    with pytest.raises(FhirError) as err:
        list(fhir.search("Observation", {"subjekt": "Patient/x"}))
    assert err.value.status == 400 and not err.value.transient


@pytest.mark.sekmet
def test_sekmet_conditional_create(fhir: FhirClient):
    ident = {"system": "urn:fhirbridge-test", "value": str(uuid.uuid4())}
    resource = {"resourceType": "Basic", "code": {"text": "conditional"}, "identifier": [ident]}
    query = f"identifier={ident['system']}|{ident['value']}"
    first, created_first = fhir.create(resource, if_none_exist=query)
    second, created_second = fhir.create(resource, if_none_exist=query)
    assert (created_first, created_second) == (True, False)
    assert first["id"] == second["id"]


@pytest.mark.sekmet
def test_sekmet_transaction_is_atomic(fhir: FhirClient):
    existing, _ = fhir.create({"resourceType": "Basic", "code": {"text": "versioned"}})
    marker = {"system": "urn:fhirbridge-test", "value": str(uuid.uuid4())}
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{uuid.uuid4()}",
         "resource": {"resourceType": "Basic", "code": {"text": "must roll back"}, "identifier": [marker]},
         "request": {"method": "POST", "url": "Basic"}},
        {"resource": {**existing, "code": {"text": "stale write"}},
         "request": {"method": "PUT", "url": f"Basic/{existing['id']}", "ifMatch": 'W/"99"'}},
    ]}
    with pytest.raises(FhirError) as err:
        fhir.transaction(tx)
    assert err.value.status in (409, 412) and not err.value.transient
    assert err.value.outcome and err.value.outcome["resourceType"] == "OperationOutcome"
    assert list(fhir.search("Basic", {"identifier": f"{marker['system']}|{marker['value']}"})) == []
    assert fhir.read("Basic", existing["id"])["code"]["text"] == "versioned"


@pytest.mark.sekmet
def test_sekmet_transaction_commits(fhir: FhirClient):
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": {"resourceType": "Basic", "code": {"text": "t"}},
         "request": {"method": "POST", "url": "Basic"}}]}
    response = fhir.transaction(tx)
    assert response["type"] == "transaction-response"
    assert response["entry"][0]["response"]["status"].startswith("201")


@pytest.mark.sekmet
def test_sekmet_update_with_stale_if_match_fails(fhir: FhirClient):
    stored, _ = fhir.create({"resourceType": "Basic", "code": {"text": "v1"}})
    updated = fhir.update({**stored, "code": {"text": "v2"}}, if_match=stored["meta"]["versionId"])
    assert updated["meta"]["versionId"] != stored["meta"]["versionId"]
    with pytest.raises(FhirError) as err:
        fhir.update({**stored, "code": {"text": "v3"}}, if_match=stored["meta"]["versionId"])
    assert err.value.status == 412 and not err.value.transient


@pytest.mark.sekmet
def test_sekmet_read_and_errors(fhir: FhirClient, seeded: dict):
    patient = fhir.read_ref(seeded["patient"])
    assert patient["name"][0]["family"] == "Zeltwanger-Testpatient"
    assert fhir.read_ref(f"{fhir.base_url}/{seeded['patient']}")["id"] == patient["id"]
    with pytest.raises(FhirError) as err:
        fhir.read("Patient", "does-not-exist")
    assert err.value.status == 404 and not err.value.transient
    assert "Patient/does-not-exist" in str(err.value)
    assert fhir.capabilities()["resourceType"] == "CapabilityStatement"


@pytest.mark.sekmet
def test_sekmet_download_binary(fhir: FhirClient, seeded: dict):
    expected = _demo_pdf("spine")
    dst = io.BytesIO()
    info = fhir.download_binary(seeded["binaries"][0], dst, max_bytes=1024 * 1024)
    assert info == {"content_type": "application/pdf", "size": len(expected),
                    "sha256": hashlib.sha256(expected).hexdigest()}
    assert dst.getvalue() == expected
    with pytest.raises(FhirError, match="larger than the limit"):
        fhir.download_binary(seeded["binaries"][0], io.BytesIO(), max_bytes=100 * 1024)


# --- map_parallel ------------------------------------------------------------------------------------

def test_map_parallel_keeps_item_order_uses_sibling_clients_and_merges_invalid_in_order():
    client = FhirClient("http://127.0.0.1:9/fhir")
    used: set[int] = set()

    def fn(c: FhirClient, i: int) -> int:
        used.add(id(c))
        time.sleep(0.01 * (5 - i % 5))           # later items finish first
        c.invalid.append(InvalidResource(f"Observation/{i}", ["bad"]))
        return i * 2

    try:
        assert client.map_parallel(fn, range(10), threads=4) == [i * 2 for i in range(10)]
        assert [e.where for e in client.invalid] == [f"Observation/{i}" for i in range(10)]
        assert id(client) not in used and 1 < len(used) <= 4   # one client per thread, never the caller's
        client.invalid.clear()
        assert client.map_parallel(fn, range(3), threads=4) == [0, 2, 4]   # siblings reused
        assert len(used) <= 4
    finally:
        client.close()


def test_map_parallel_raises_the_first_error_after_every_item_ran():
    client = FhirClient("http://127.0.0.1:9/fhir")
    ran: list[int] = []

    def fn(_c: FhirClient, i: int) -> int:
        ran.append(i)
        if i in (2, 5):
            raise FhirError(f"item {i}", transient=True)
        return i

    try:
        with pytest.raises(FhirError, match="item 2"):
            client.map_parallel(fn, range(8), threads=3)
        assert sorted(ran) == list(range(8))
    finally:
        client.close()
