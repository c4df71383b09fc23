"""The reviewer portal when a hospital's reviewer API cannot be reached (issue 17, part 3): the inbox says why in
words (refused, DNS), never requests' raw `HTTPConnectionPool(host=...): Max retries exceeded ...` text."""
from __future__ import annotations

import html

from fhirbridge.config.model import PACKAGE_MAPPINGS
from fhirbridge.demo.localehr import free_port
from fhirbridge.exchange.reviewer import write_reviewer_keys
from fhirbridge.ui.reviewer_portal import PortalSettings, create_portal
from tests.kit.packages import Site

TOKEN = "portal-errors-token-0123456789ab"


def inbox_text(tmp_path, api: str) -> str:
    files = write_reviewer_keys(tmp_path / "reviewer", None)
    Site(tmp_path / "reviewer" / "trusted", "hospital-a")
    app = create_portal(PortalSettings(key=files["private_keys"], trust=tmp_path / "reviewer" / "trusted",
                                       work_dir=tmp_path / "portal", mappings_dir=PACKAGE_MAPPINGS, token=TOKEN,
                                       pull=[api], issuer="urn:oid:2.999.7.9"))
    client = app.test_client()
    with client.session_transaction() as s:
        s["reviewer"] = True
    resp = client.get("/")
    assert resp.status_code == 200
    return html.unescape(resp.get_data(as_text=True))


def test_a_hospital_that_is_down_is_named_in_words(tmp_path):
    port = free_port()
    page = inbox_text(tmp_path, f"http://127.0.0.1:{port}/reviewer")
    assert "HTTPConnectionPool" not in page and "Max retries" not in page and "NewConnectionError" not in page
    assert (f"could not fetch new cases from http://127.0.0.1:{port}/reviewer: the hospital's service could not "
            f"be reached: connection refused by 127.0.0.1:{port}: nothing listens on that port") in page


def test_a_hospital_whose_name_does_not_resolve_is_a_dns_failure(tmp_path):
    page = inbox_text(tmp_path, "https://hospital.invalid/reviewer")
    assert "HTTPSConnectionPool" not in page and "NameResolutionError" not in page
    assert "DNS: the name 'hospital.invalid' does not resolve" in page
