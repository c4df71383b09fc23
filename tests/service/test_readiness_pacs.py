"""/readyz checks the hospital's PACS as it checks its EHR (issue 17: the banner covers every endpoint the loop
needs): one QIDO-RS search against a real Orthanc with HTTP Basic, and the three answers an operator must tell
apart — working, refusing our credentials (a configuration fix), and unreachable (the PACS is down: Cases with
images wait at collect). The dashboard's banner names the PACS from the same check."""
from __future__ import annotations

import re
import time

import pytest

from fhirbridge.config import loader as config
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from tests.kit.pacs import Pacs, find_orthanc

pytestmark = pytest.mark.sekmet

TOKEN = "readiness-pacs-token-0123456789"
USER, PASSWORD = "fhirbridge", "pacs-secret-42"


@pytest.fixture
def pacs(tmp_path):
    try:
        find_orthanc()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    server = Pacs.start(tmp_path / "pacs", users={USER: PASSWORD})
    try:
        yield server
    finally:
        server.stop()


def _readiness(h, pacs: Pacs, password: str) -> tuple[Service, dict]:
    base = h.config_path.read_text().split("\n[hospital.pacs]")[0]
    h.config_path.write_text(
        base + f'\n[hospital.pacs]\nurl = "{pacs.dicomweb_url}"\n'
        f'[hospital.pacs.auth]\ntype = "basic"\nusername = "{USER}"\npassword = "{password}"\n'
        f'\n[api]\ntokens = ["{TOKEN}"]\n')
    svc = Service(config.load(h.config_path))
    return svc, create_app(svc=svc).test_client().get("/readyz").get_json()


def test_readyz_tells_a_working_pacs_from_refused_credentials_and_from_one_that_is_down(hospital, pacs):
    name = f"pacs:{hospital.app.hospital.name}"

    svc, body = _readiness(hospital, pacs, PASSWORD)
    svc.stop(wait=True)
    assert body["checks"][name] == "ok" and body["status"] == "ready", body

    svc, body = _readiness(hospital, pacs, "not-the-password")
    svc.stop(wait=True)
    assert body["checks"][name] == "refused our credentials: HTTP 401"
    assert body["status"] == "degraded"
    assert "not-the-password" not in str(body) and PASSWORD not in str(body)

    pacs.stop()
    svc, _ = _readiness(hospital, pacs, PASSWORD)
    try:
        client = create_app(svc=svc).test_client()
        body = client.get("/readyz").get_json()
        assert body["checks"][name].startswith("unreachable: "), body
        assert body["status"] == "degraded"
        login = client.get("/dashboard/login").get_data(as_text=True)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', login).group(1)
        assert client.post("/dashboard/login", data={"csrf_token": csrf, "token": TOKEN}).status_code == 302
        deadline = time.monotonic() + 30
        while True:      # the banner reads /readyz's cache, refreshed in the background
            page = client.get("/dashboard/").get_data(as_text=True)
            if 'id="unreachable"' in page or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert f"The PACS of {hospital.app.hospital.name}: unreachable" in page
    finally:
        svc.stop(wait=True)
