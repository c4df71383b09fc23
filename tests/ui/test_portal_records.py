"""Issue 16 parts 2 and 6 in the reviewer portal, in Chromium: the Case page shows the packet's checklist first;
after the hospital answered a request for more records, the inbox marks the Case "new records" (the supplement
is not a Case of its own), its page links the supplement, and the supplement's page says what was added on
request and sends the reviewer back to the first package to answer. Screenshots: build/screenshots/portal-records-*.
"""
from __future__ import annotations

import re

import pytest

from fhirbridge.config import loader as config
from fhirbridge.demo.localehr import seed_patient
from fhirbridge.ehr import data_request
from fhirbridge.loop import supplement
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from fhirbridge.ui.reviewer_portal import PortalSettings, create_portal
from tests.kit.browser import LiveServer, shot
from tests.loop.test_supplement import QUERY, discharge_summary

pytestmark = pytest.mark.sekmet
pytest.importorskip("playwright")

PORTAL_TOKEN = "portal-login-token-0123456789"


def test_the_portal_shows_the_checklist_first_and_new_records_on_the_case(hospital, ehr, fhir, page, tmp_path):
    own = seed_patient(ehr, fhir, profile="spine")
    case = hospital.delivered_case(own["patient"])
    task = data_request.request_records(hospital.app, case, "Please send the discharge summary.", QUERY)
    stored, _ = fhir.create(discharge_summary(own["patient"]))
    supplement.answer_request(hospital.app, hospital.app.store.get(case.id), task,
                              records=[f"DocumentReference/{stored['id']}"], upload=None, actor="ward clerk")
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "await_opinion", case.last_error
    [entry] = case.data["supplements"]

    r = hospital.reviewers[case.reviewer]
    settings = PortalSettings(key=r.files["private_keys"], trust=r.directory / "trusted.jwks.json",
                              work_dir=tmp_path / "portal", mappings_dir=hospital.app.config.mappings_dir,
                              packages_dir=hospital.root / "outbox" / case.reviewer, token=PORTAL_TOKEN)
    portal = LiveServer(create_portal(settings))
    try:
        page.goto(portal.url + "/")
        page.get_by_label("Portal token").fill(PORTAL_TOKEN)
        page.get_by_role("button", name="Sign in").click()
        rows = page.locator("tbody tr")
        assert rows.count() == 1                                  # the supplement is no Case of its own
        assert rows.first.get_attribute("data-package") == case.package_id
        assert "new records" in rows.first.inner_text()
        shot(page, "portal-records-1-inbox-new-records")

        rows.first.get_by_role("link").first.click()
        # The checklist is the first thing on the Case page, before the referring physician and the records.
        first = page.locator("section.card").first
        assert first.get_attribute("id") == "checklist"
        items = first.locator("li")
        texts = items.all_inner_texts()
        assert "Medication plan with dosages: included (1)" in texts
        assert "Operative report of an earlier surgery: not found in the EHR" in texts
        assert "check-not_found" in first.locator('li[data-item="Pathology reports"]').get_attribute("class")
        assert "The hospital sent records you asked for" in page.locator("#new-records").inner_text()
        shot(page, "portal-records-2-case-checklist")

        page.locator("#new-records").get_by_role("link", name="supplement 1").click()
        banner = page.locator("#supplement")
        assert "Added on your request" in banner.inner_text() and "1 record" in banner.inner_text()
        assert "You asked: Please send the discharge summary." in banner.inner_text()
        assert f"DocumentReference/{stored['id']}: added on request" in banner.inner_text()
        assert page.locator('li[data-item="Discharge summary of an earlier stay"]').inner_text().startswith(
            "Discharge summary of an earlier stay: included")
        assert page.get_by_role("link", name="Answer the referral there").is_visible()
        assert page.locator("form[action$='/opinion']").count() == 0
        shot(page, "portal-records-3-supplement")
        page.get_by_role("link", name="Answer the referral there").click()
        assert page.url.endswith(f"/cases/{case.package_id}")
        assert page.locator("form[action$='/opinion']").count() == 1
        assert entry["package_id"] != case.package_id
    finally:
        portal.close()


def test_a_pulling_portal_gets_the_supplement_too(hospital, ehr, fhir, page, tmp_path):
    """With `pull` transport the hospital's reviewer API lists the supplement as a package of the same Case."""
    holder: dict = {}
    server = LiveServer(lambda environ, start_response: holder["app"](environ, start_response))
    text = re.sub(r'type = "outbox"[^\n]*\npath = "[^"]*"\n', 'type = "pull"\n', hospital.config_path.read_text())
    hospital.config_path.write_text(text + f'\n[service]\npublic_url = "{server.url}"\n')
    svc = Service(config.load(hospital.config_path))
    hospital.app = svc.apps[0]
    holder["app"] = create_app(svc=svc)
    r = hospital.reviewers["spine-center"]
    settings = PortalSettings(key=r.files["private_keys"], trust=r.directory / "trusted.jwks.json",
                              work_dir=tmp_path / "portal", mappings_dir=hospital.app.config.mappings_dir,
                              pull=[f"{server.url}/reviewer"], issuer="urn:oid:2.999.9.1", token=PORTAL_TOKEN)
    portal = LiveServer(create_portal(settings))
    try:
        own = seed_patient(ehr, fhir, profile="spine")
        case = hospital.delivered_case(own["patient"])
        task = data_request.request_records(hospital.app, case, "Please send the discharge summary.", QUERY)
        stored, _ = fhir.create(discharge_summary(own["patient"]))
        supplement.answer_request(hospital.app, hospital.app.store.get(case.id), task,
                                  records=[f"DocumentReference/{stored['id']}"], upload=None, actor="ward clerk")
        hospital.run(intake=False)
        assert hospital.app.store.get(case.id).step == "await_opinion"
        page.goto(portal.url + "/")
        page.get_by_label("Portal token").fill(PORTAL_TOKEN)
        page.get_by_role("button", name="Sign in").click()
        rows = page.locator("tbody tr")
        assert rows.count() == 1 and "new records" in rows.first.inner_text()
        rows.first.get_by_role("link").first.click()
        page.locator("#new-records").get_by_role("link", name="supplement 1").click()
        assert f"DocumentReference/{stored['id']}: added on request" in page.locator("#supplement").inner_text()
        shot(page, "portal-records-4-pulled-supplement")
    finally:
        portal.close()
        server.close()
        svc.stop(wait=True)
