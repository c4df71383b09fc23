"""/readyz names a reviewer's https endpoint that cannot be reached (its Cases wait at deliver), and the
dashboard's banner says so from the same check (issue 17: the banner covers every endpoint the loop needs)."""
from __future__ import annotations

import re
import time

import pytest

from fhirbridge.config import loader as config
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service

pytestmark = pytest.mark.sekmet

TOKEN = "readiness-reviewer-token-0123456789"


def test_an_unreachable_reviewer_endpoint_degrades_readyz_and_shows_on_the_banner(two_reviewers):
    h = two_reviewers
    text = h.config_path.read_text()
    # other-center receives over https; nothing listens on port 9 of this machine.
    at = text.index('name = "other-center"')
    other = re.sub(r'type = "outbox"[^\n]*\npath = "[^"]*"', 'type = "https"\nurl = "http://127.0.0.1:9/inbox"',
                   text[at:], count=1)
    h.config_path.write_text(text[:at] + other + f'\n[api]\ntokens = ["{TOKEN}"]\n')
    svc = Service(config.load(h.config_path))
    try:
        client = create_app(svc=svc).test_client()
        body = client.get("/readyz").get_json()
        assert body["status"] == "degraded", body
        assert body["checks"]["reviewer:other-center"].startswith("unreachable: ")
        assert "reviewer:spine-center" not in body["checks"]              # an outbox needs no network
        login = client.get("/dashboard/login").get_data(as_text=True)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', login).group(1)
        assert client.post("/dashboard/login", data={"csrf_token": csrf, "token": TOKEN}).status_code == 302
        deadline = time.monotonic() + 30
        while True:      # the banner reads /readyz's cache, refreshed in the background
            page = client.get("/dashboard/").get_data(as_text=True)
            if 'id="unreachable"' in page or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert "The endpoint of reviewer other-center: unreachable" in page
    finally:
        svc.stop(wait=True)
