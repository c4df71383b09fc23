"""The https transport on its own, against a scripted endpoint: a redirect is a permanent error, not a
delivery; Retry-After is honoured when short, ends the attempt when huge, and all waits of one delivery share
one budget. None of this needs the EHR."""
from __future__ import annotations

import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fhirbridge.config import model
from fhirbridge.exchange import envelope
from fhirbridge.exchange.transport import DeliveryError, deliver


class Endpoint:
    """Answers every POST with `status` and `headers`; GET /login answers 200 (what a redirect leads to)."""

    def __init__(self, status: int, headers: dict[str, str]):
        self.posts, self.gets = 0, 0
        me = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *_a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                me.posts += 1
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v.replace("{port}", str(me.port)))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                me.gets += 1
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}/fhirbridge/packages"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _deliver_within(seconds: float, url: str, tmp_path: Path):
    pkg = tmp_path / "pkg"
    (pkg / "attachments").mkdir(parents=True)
    (pkg / "attachments" / "att-001.jwe").write_bytes(b"{}")
    (pkg / envelope.ENVELOPE_FILE).write_bytes(b"{}")
    reviewer = model.Reviewer(name="spine-center", display="Spine Center", identifier_system="urn:ietf:rfc:3986",
                               identifier_value="urn:oid:2.999.1.2", jwks=tmp_path / "unused.jwks.json",
                               transport=model.Transport("https", url=url))
    result: dict = {}

    def work():
        try:
            result["ok"] = deliver(reviewer, pkg, "pkg")
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            result["error"] = exc

    t = threading.Thread(target=work, daemon=True)   # daemon: a run blocked for a day must not hang pytest
    started = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"delivery still blocked after {seconds} s"
    return result, time.monotonic() - started


def test_a_redirect_is_a_permanent_error_not_a_delivery(tmp_path):
    e = Endpoint(302, {"Location": "http://127.0.0.1:{port}/login?session=abc123"})
    try:
        result, _ = _deliver_within(20, e.url, tmp_path)
    finally:
        e.close()
    err = result.get("error")
    assert isinstance(err, DeliveryError), result
    assert not err.transient
    assert "redirects (302)" in str(err) and "/login" in str(err) and "abc123" not in str(err)
    assert e.gets == 0 and e.posts == 1


@pytest.mark.parametrize("retry_after", ["86400", formatdate(time.time() + 86400, usegmt=True)],
                         ids=["delta-seconds", "http-date"])
def test_a_huge_retry_after_ends_the_attempt_at_once(tmp_path, retry_after):
    e = Endpoint(503, {"Retry-After": retry_after})
    try:
        result, elapsed = _deliver_within(20, e.url, tmp_path)
    finally:
        e.close()
    err = result.get("error")
    assert isinstance(err, DeliveryError), result
    assert err.transient and "retry after" in str(err) and "later run" in str(err)
    assert elapsed < 5 and e.posts == 1


def test_a_short_retry_after_is_honoured_and_retries_are_bounded(tmp_path):
    e = Endpoint(503, {"Retry-After": "0"})
    try:
        result, _ = _deliver_within(30, e.url, tmp_path)
    finally:
        e.close()
    err = result.get("error")
    assert isinstance(err, DeliveryError) and err.transient and "503" in str(err)
    assert e.posts == 5   # the first attempt and RETRIES more, then the Case waits for a later run


def test_all_waits_of_one_delivery_share_a_budget(tmp_path, monkeypatch):
    import fhirbridge.exchange.transport as d
    monkeypatch.setattr(d, "MAX_TOTAL_WAIT", 1.5)    # e.g. Retry-After: 1 on every attempt
    e = Endpoint(503, {"Retry-After": "1"})
    try:
        result, elapsed = _deliver_within(20, e.url, tmp_path)
    finally:
        e.close()
    err = result.get("error")
    assert isinstance(err, DeliveryError) and err.transient and "later run" in str(err)
    assert e.posts == 2 and elapsed < 4                # waited once (1 s); the second wait would overdraw
