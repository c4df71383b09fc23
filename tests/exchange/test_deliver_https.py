"""The https transport: each file POSTed with an Idempotency-Key, attachments before package.jwe, retried on
503; a reviewer endpoint that stores by key ends up with exactly one whole package."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fhirbridge.exchange.reviewer import open_package
from tests.kit.hospital import TestHospital

pytestmark = pytest.mark.sekmet


class ReviewerEndpoint:
    """A minimal reviewer inbox: stores each file once per Idempotency-Key; can refuse the first N posts."""

    def __init__(self, root: Path, fail_first: int = 0, status: int = 503, *, retry_after: str = "0",
                 redirect_to: str | None = None):
        self.root, self.fail_left, self.status = root, fail_first, status
        self.retry_after, self.redirect_to = retry_after, redirect_to
        self.gets = 0
        self.posts: list[dict] = []
        me = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *_a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                me.posts.append({k.lower(): v for k, v in self.headers.items()})
                if me.redirect_to:                     # e.g. an expired route sending clients to a login page
                    self.send_response(302)
                    self.send_header("Location", me.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if me.fail_left > 0:
                    me.fail_left -= 1
                    self.send_response(me.status)
                    self.send_header("Retry-After", me.retry_after)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                key = self.headers["Idempotency-Key"]
                pkg, rel = key.split("/", 1)
                dest = me.root / pkg / rel
                if dest.exists():
                    self.send_response(409)            # already have it: the sender treats that as delivered
                else:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(body)
                    self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):                          # the login page a redirect leads to: "200 OK"
                me.gets += 1
                self.send_response(200)
                self.send_header("Content-Length", "5")
                self.end_headers()
                self.wfile.write(b"login")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fhirbridge/packages"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint(tmp_path):
    e = ReviewerEndpoint(tmp_path / "received", fail_first=1)
    yield e
    e.close()


def _https_hospital(tmp_path, ehr, url, token="s3cret-token"):
    h = TestHospital(tmp_path / "h", ehr.base_url)
    cfg = h.config_path.read_text()
    cfg = cfg.replace('type = "outbox"                          # outbox (a directory) | https (url = "https://...")',
                      f'type = "https"\nurl = "{url}"\ntoken = "{token}"', 1)
    cfg = "\n".join(line for line in cfg.splitlines() if not line.startswith("path = ") or "outbox" not in line)
    h.config_path.write_text(cfg + "\n")
    h.app.close()
    h.app = h.new_app()
    assert h.app.config.reviewers["spine-center"].transport.type == "https"
    return h


def test_https_delivery_posts_each_file_once_with_idempotency_keys(tmp_path, ehr, seeded, endpoint):
    h = _https_hospital(tmp_path, ehr, endpoint.url)
    try:
        sr = h.order(seeded["patient"])
        h.run()
        case = h.case_for(sr)
        assert case.step == "await_opinion", case.last_error
        keys = [p["idempotency-key"] for p in endpoint.posts]
        assert keys[0] == keys[1]                       # the refused first POST was retried with the same key
        assert keys[-1] == f"{case.package_id}/package.jwe"   # the envelope last: its arrival means complete
        assert all(p["authorization"] == "Bearer s3cret-token" for p in endpoint.posts)
        assert all(p["x-fhirbridge-package"] == case.package_id for p in endpoint.posts)
        received = endpoint.root / case.package_id
        r = h.reviewers["spine-center"]
        opened = open_package(received, r.key, r.trusted)   # what arrived is a whole, verifiable package
        assert len(opened.manifest["attachments"]) == 1

        # Delivering again (a retry after a lost acknowledgement) creates nothing new at the reviewer.
        from fhirbridge.exchange.transport import deliver
        from fhirbridge.loop.seal import package_dir
        before = sorted(p.relative_to(endpoint.root) for p in endpoint.root.rglob("*") if p.is_file())
        deliver(h.app.config.reviewer(case.reviewer), package_dir(h.app, case), case.package_id)
        after = sorted(p.relative_to(endpoint.root) for p in endpoint.root.rglob("*") if p.is_file())
        assert before == after
    finally:
        h.close()


def test_reviewer_endpoint_refusing_keeps_the_case_waiting_with_the_reason(tmp_path, ehr, seeded):
    refusing = ReviewerEndpoint(tmp_path / "r", fail_first=10**6, status=403)
    h = _https_hospital(tmp_path, ehr, refusing.url)
    try:
        sr = h.order(seeded["patient"])
        h.run()
        case = h.case_for(sr)
        assert case.step == "failed" and "403" in case.last_error and "spine-center" in case.last_error
    finally:
        h.close()
        refusing.close()


def test_a_redirecting_reviewer_url_fails_the_case_instead_of_counting_as_delivered(tmp_path, ehr, seeded):
    # POST -> 302 -> GET /login -> 200 used to be taken for a delivery: the package was never stored anywhere.
    login = ReviewerEndpoint(tmp_path / "login")
    redirecting = ReviewerEndpoint(tmp_path / "r", redirect_to=f"{login.url.rsplit('/', 2)[0]}/login?next=x")
    h = _https_hospital(tmp_path, ehr, redirecting.url)
    try:
        sr = h.order(seeded["patient"])
        h.run()
        case = h.case_for(sr)
        assert case.step == "failed", case.last_error
        assert "redirects (302)" in case.last_error and "/login" in case.last_error
        assert login.gets == 0 and not login.posts           # never followed
        assert len(redirecting.posts) == 1                   # and not repeated: it is permanent
    finally:
        h.close()
        redirecting.close()
        login.close()


def test_a_day_long_retry_after_leaves_the_case_waiting_instead_of_blocking_the_run(tmp_path, ehr, seeded):
    busy = ReviewerEndpoint(tmp_path / "r", fail_first=10**6, status=503, retry_after="86400")
    h = _https_hospital(tmp_path, ehr, busy.url)
    try:
        sr = h.order(seeded["patient"])
        started = time.monotonic()
        h.run()
        assert time.monotonic() - started < 60
        case = h.case_for(sr)
        assert case.step == "deliver", case.last_error      # waiting for a later run, not failed
        assert "503" in case.last_error and "86400" in case.last_error and "later run" in case.last_error
        assert len(busy.posts) == 1
    finally:
        h.close()
        busy.close()
