"""The reviewer portal in a real browser: a reviewer signs in, opens a Case pulled from the hospital, reads an
attachment, fills the opinion form, gets a validation error, fixes it, previews, signs and sends; the hospital
files the opinion in the EHR. Screenshots of each page go to build/screenshots/."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from fhirbridge.config import loader as config
from fhirbridge.loop.runner import run_pending
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from fhirbridge.ui.reviewer_portal import PortalSettings, create_portal
from tests.kit.browser import LiveServer, shot

pytestmark = pytest.mark.sekmet

PORTAL_TOKEN = "portal-login-token-0123456789"


@pytest.fixture
def hospital_served(hospital):
    """The hospital's service with spine-center pulling its packages, on a real local port."""
    served: dict = {}
    # The port comes first: a pull reviewer's tokens name <public_url>/reviewer, so the config needs the URL.
    server = LiveServer(lambda environ, start_response: served["app"](environ, start_response))
    text = re.sub(r'type = "outbox"[^\n]*\npath = "[^"]*"\n', 'type = "pull"\n', hospital.config_path.read_text())
    hospital.config_path.write_text(text + f'\n[service]\npublic_url = "{server.url}"\n')
    svc = Service(config.load(hospital.config_path))
    hospital.app = svc.apps[0]
    served["app"] = create_app(svc=svc)
    yield hospital, svc, server
    server.close()
    svc.stop(wait=True)


@pytest.fixture
def portal(hospital_served, tmp_path):
    h, _svc, server = hospital_served
    r = h.reviewers["spine-center"]
    settings = PortalSettings(key=r.files["private_keys"], trust=r.directory / "trusted.jwks.json",
                              work_dir=tmp_path / "portal", mappings_dir=h.app.config.mappings_dir,
                              pull=[f"{server.url}/reviewer"], issuer="urn:oid:2.999.9.1", token=PORTAL_TOKEN)
    live = LiveServer(create_portal(settings))
    yield live
    live.close()


def test_reviewer_reads_answers_and_the_opinion_lands_in_the_ehr(hospital_served, portal, page, seeded, fhir):
    h, svc, _server = hospital_served
    case = h.delivered_case(seeded["patient"], question="Is surgery indicated now?\nWould physiotherapy first be "
                                                        "reasonable?")

    page.goto(portal.url + "/")
    assert page.url.startswith(portal.url + "/login")
    shot(page, "reviewer-1-sign-in")
    page.get_by_label("Portal token").fill("wrong-token-for-sure-123")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text("That token is not right")).to_be_visible()
    page.get_by_label("Portal token").fill(PORTAL_TOKEN)
    page.get_by_role("button", name="Sign in").click()

    # The inbox: the Case pulled from the hospital, awaiting an opinion.
    assert page.get_by_role("heading", level=1).inner_text() == "Cases assigned to you"
    row = page.locator("tbody tr", has_text="Is surgery indicated now?")
    assert row.count() == 1 and "awaiting your opinion" in row.inner_text()
    assert "Zeltwanger-Testpatient" in row.inner_text()
    shot(page, "reviewer-2-inbox")
    row.get_by_role("link").click()

    # The record: question, timeline, imaging with its DICOMweb link, medications with dosage, a note to read.
    assert page.get_by_role("heading", level=1).inner_text().startswith("Second opinion requested:")
    questions = page.locator("section", has=page.get_by_role("heading", name="The question")).locator("li")
    assert questions.all_inner_texts() == ["Is surgery indicated now?", "Would physiotherapy first be reasonable?"]
    assert page.get_by_role("heading", name="Timeline of the records").is_visible()
    imaging = page.locator(".timeline li", has_text="Imaging").first
    assert "DICOMweb" in imaging.inner_text() and "series" in imaging.inner_text()
    meds = page.locator("section", has=page.get_by_role("heading", name="Medications"))
    assert meds.locator("tbody tr").count() >= 1
    note = page.locator("pre.note").first
    assert note.is_visible() and len(note.inner_text().strip()) > 20           # the progress note, readable here
    shot(page, "reviewer-3-case")
    # Headless Chromium has no PDF viewer (the frame stays dark), so the PDF is opened after the screenshot.
    page.locator("summary", has_text="application/pdf").first.click()
    assert page.locator("iframe.doc").first.is_visible()

    # A first try misses required fields: the errors are listed, the page keeps what was typed.
    page.get_by_label("Concordant: diagnosis confirmed").check()
    page.get_by_label("Is surgery indicated now?").fill("Not yet.")
    page.get_by_role("button", name="Sign and send").click()
    errors = page.locator("#form-errors")
    # The form posts and the page comes back with the problems: wait for it (is_visible does not wait), as
    # a loaded CI machine answers the POST later than the click returns.
    expect(errors).to_be_visible()
    assert "Recommendation is required" in errors.inner_text()
    assert "Risks and benefits is required" in errors.inner_text()
    assert "Answer each question" in errors.inner_text()
    expect(errors).to_be_focused()                                               # focus moved to the problems
    assert page.get_by_label("Concordant: diagnosis confirmed").is_checked()
    assert page.get_by_label("Is surgery indicated now?").input_value() == "Not yet."
    assert page.locator("#f-recommendation[aria-invalid=true]").count() == 1
    shot(page, "reviewer-4-validation-error", full_page=False)

    page.get_by_label("Non-surgical care").check()
    page.get_by_label("Risks and benefits (required)").fill("Physiotherapy first avoids surgical risk; "
                                                            "reassess in 8 weeks.")
    page.get_by_label("Routine").check()
    page.get_by_label("Would physiotherapy first be reasonable?").fill("Yes, 8 weeks of guided physiotherapy.")
    page.get_by_label("Alternatives").fill("Epidural steroid injection\nWatchful waiting")
    page.get_by_role("button", name="Preview").click()
    preview = page.locator("#preview")
    assert "Non-surgical care" in preview.inner_text() and "8 weeks of guided physiotherapy" in preview.inner_text()
    shot(page, "reviewer-5-preview", full_page=False)
    page.get_by_role("button", name="Sign and send").click()
    expect(page.get_by_text("Signed and sent: uploaded to the hospital")).to_be_visible()
    shot(page, "reviewer-6-sent", full_page=False)

    # The hospital files it: a Consult note on the patient, linked to the order; the Task is completed.
    assert svc.store.get(case.id).step == "file"
    run_pending(h.app, intake=False)
    done = svc.store.get(case.id)
    assert done.step == "done", done.last_error
    doc = fhir.read_ref(done.document_reference)
    assert doc["subject"]["reference"] == case.patient
    assert doc["context"]["related"] == [{"reference": case.service_request}]
    assert fhir.read_ref(case.task)["status"] == "completed"

    page.goto(portal.url + "/")
    assert "answered" in page.locator("tbody tr", has_text="Is surgery indicated now?").inner_text()


def test_portal_refuses_without_login_and_forged_forms(portal, hospital_served, seeded):
    import requests
    r = requests.get(portal.url + "/", allow_redirects=False, timeout=10)
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    s = requests.Session()
    s.get(portal.url + "/login", timeout=10)
    r = s.post(portal.url + "/login", data={"token": PORTAL_TOKEN}, timeout=10)     # no CSRF token
    assert r.status_code == 400 and "form expired" in r.text
    r = requests.get(portal.url + "/ui-static/fhirbridge.css", timeout=10)          # assets need no login
    assert r.status_code == 200 and "text/css" in r.headers["Content-Type"]


def test_a_decline_the_hospital_does_not_take_keeps_the_reason(hospital_served, portal, page, seeded):
    h, svc, server = hospital_served
    case = h.delivered_case(seeded["patient"], question="Is the fusion needed?")
    page.goto(portal.url + "/login")
    page.get_by_label("Portal token").fill(PORTAL_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.locator("tbody tr", has_text="Is the fusion needed?").get_by_role("link").click()
    server.close()                                        # the hospital's API goes away
    page.locator("summary", has_text="Decline this Case").click()
    reason = "Outside our expertise: paediatric spine."
    page.get_by_label("Why do you decline?").fill(reason)
    page.get_by_role("button", name="Decline").click()
    expect(page.get_by_text("Not sent:")).to_be_visible()
    page.locator("summary", has_text="Decline this Case").click()
    assert page.get_by_label("Why do you decline?").input_value() == reason
    assert svc.store.get(case.id).step == "await_opinion"
