"""Issue 16 parts 1 and 4 in the reviewer portal, in Chromium: the inbox puts urgent referrals first, then the
ones due soonest, and marks the overdue; the Case page names the priority and the referring physician; each
Case gets the opinion form of its collection profile, is answered with it, and the reviewer reads again the
opinion they sent. Screenshots go to build/screenshots/."""
from __future__ import annotations

import base64
import re
import time

import pytest
from sqlalchemy import update

from fhirbridge import jsonutil
from fhirbridge.config import loader as config
from fhirbridge.loop.document import person_name
from fhirbridge.loop.runner import run_pending
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from fhirbridge.store.tables import cases
from fhirbridge.ui.reviewer_portal import PortalSettings, create_portal
from tests.kit.browser import LiveServer, shot

pytestmark = pytest.mark.sekmet

PORTAL_TOKEN = "portal-login-token-0123456789"
CS = "http://fhirbridge.org/fhir/CodeSystem/"


@pytest.fixture
def served(hospital, tmp_path):
    """The hospital's service with spine-center pulling its packages, and spine-center's portal."""
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
    yield hospital, svc, portal
    portal.close()
    server.close()
    svc.stop(wait=True)


def _sign_in(page, portal) -> None:
    page.goto(portal.url + "/")
    page.get_by_label("Portal token").fill(PORTAL_TOKEN)
    page.get_by_role("button", name="Sign in").click()


def test_the_inbox_puts_urgent_first_then_the_soonest_due_and_marks_the_overdue(served, page, seeded, fhir):
    h, svc, portal = served
    later = h.delivered_case(seeded["patient"], question="Routine, due last")
    overdue = h.delivered_case(seeded["patient"], question="Routine, overdue")
    stat = h.delivered_case(seeded["patient"], question="Stat, due last of all", priority="stat")
    urgent = h.delivered_case(seeded["patient"], question="Urgent one", priority="urgent")
    # A Case past its due date: the store's due_at (what the hospital lists to the portal) a day ago.
    with svc.store.engine.begin() as conn:
        conn.execute(update(cases).where(cases.c.id == overdue.id).values(due_at=time.time() - 86400))
        conn.execute(update(cases).where(cases.c.id == stat.id).values(due_at=time.time() + 30 * 86400))

    _sign_in(page, portal)
    rows = page.locator("tbody tr")
    order = [rows.nth(i).get_attribute("data-package") for i in range(rows.count())]
    assert order == [stat.package_id, urgent.package_id, overdue.package_id, later.package_id]
    assert "stat" in rows.nth(0).inner_text() and rows.nth(0).locator(".badge.bad").count() == 1
    assert "urgent" in rows.nth(1).inner_text()
    late = page.locator(f'tr[data-package="{overdue.package_id}"]')
    assert late.get_attribute("class") == "overdue" and "overdue" in late.inner_text()
    assert page.locator("tr.overdue").count() == 1
    # Who asked, by name and organisation, in the inbox.
    name = person_name(fhir.read_ref(h.physician()))
    assert name and name in rows.nth(0).inner_text()
    shot(page, "reviewer-forms-1-inbox-sorted")

    # The Case page: the priority, the referring physician, the due date the hospital has for it.
    rows.nth(0).get_by_role("link").click()
    urgency = page.locator("#urgency").inner_text()
    assert "stat" in urgency and "urgent referral" in urgency
    assert name in page.locator("#referrer").inner_text()
    due = time.strftime("%Y-%m-%d", time.gmtime(svc.store.get(stat.id).due_at))
    assert f"answer by {due}" in page.locator("p.muted").first.inner_text()
    shot(page, "reviewer-forms-2-case-urgent", full_page=False)
    page.goto(portal.url + "/")
    late.get_by_role("link").click()
    assert "overdue" in page.locator("#urgency").inner_text()


def _outcome(page) -> None:
    form = page.locator("#opinion-form")
    form.locator("#f-concordance").get_by_label("Partially concordant").check()
    form.locator("#f-recommendation").get_by_label("Non-surgical care").check()
    form.get_by_label("Risks and benefits (required)").fill("Conservative care first; surgery stays an option.")
    form.locator("#f-urgency").get_by_label("Urgent", exact=True).check()
    form.get_by_label("Is surgery indicated now?").fill("Not now.")


def _spine(page) -> dict:
    page.locator("#f-surgical_indication").get_by_label("Not indicated").check()
    page.get_by_label("Spinal levels concerned (for example L4-L5, L5-S1)").fill("L5-S1")
    page.get_by_label("Conservative options advised").fill("Physiotherapy for 12 weeks")
    return {"surgical-indication": ["not-indicated"]}


def _cardiac(page) -> dict:
    page.locator("#f-intervention_indication").get_by_label("Indication uncertain").check()
    page.locator("#f-medical_therapy").get_by_label("Optimise medical therapy first").check()
    page.get_by_label("Further tests advised").fill("Stress echocardiography")
    return {"intervention-indication": ["uncertain"], "medical-therapy": ["therapy-optimise"]}


def _oncology(page) -> dict:
    page.locator("#f-histology").get_by_label("Confirmed").check()
    page.locator("#f-grade").get_by_label("Revised").check()
    page.locator("#f-tnm_stage").get_by_label("Revised").check()
    page.get_by_label("TNM stage as the reviewer stages it (for example cT2 cN1 cM0, UICC 8th edition)").fill(
        "cT2 cN0 cM0")
    page.locator("#f-treatment_sequencing").get_by_label("Sequencing changed").check()
    page.get_by_label("Clinical-trial options (registry id and title)").fill("NCT00000000: example trial")
    return {"histology-review": ["confirmed"], "grade-review": ["revised"], "stage-review": ["revised"],
            "treatment-sequencing": ["sequence-changed"]}


def _radiology(page) -> dict:
    studies = page.locator("#f-study_agreement fieldset.study")
    n = studies.count()
    assert n >= 1
    for i in range(n):
        studies.nth(i).get_by_label("2b: Discrepancy" if i == 0 else "1: Concur").check()
    page.locator("#f-missed_findings").get_by_label("Yes").check()
    return {"radpeer-score": ["2b"] + ["1"] * (n - 1), "missed-findings": ["373066001"]}


FORMS = {"spine": ("Second opinion: spine surgery", _spine),
         "cardiac": ("Second opinion: cardiac intervention", _cardiac),
         "oncology": ("Second opinion: oncology", _oncology),
         "radiology": ("Second opinion: radiology re-read", _radiology)}


@pytest.mark.parametrize("profile", sorted(FORMS))
def test_each_case_gets_its_specialty_form_and_the_reviewer_sees_what_they_sent(served, page, seeded, fhir, profile):
    h, svc, portal = served
    case = h.delivered_case(seeded["patient"], profile=profile)
    _sign_in(page, portal)
    page.locator(f'tr[data-package="{case.package_id}"]').get_by_role("link").click()
    title, fill = FORMS[profile]
    form = page.locator("#opinion-form")
    assert form.get_attribute("data-form") == profile and title in form.inner_text()
    shot(page, f"reviewer-forms-3-{profile}-form")
    expected = fill(page)
    _outcome(page)
    page.get_by_role("button", name="Preview").click()
    assert title in page.locator("#preview").inner_text()
    page.get_by_role("button", name="Sign and send").click()
    assert page.get_by_text("Signed and sent: uploaded to the hospital").is_visible()
    sent = page.locator("#sent-opinion")
    assert title in sent.inner_text() and "Partially concordant" in sent.inner_text()
    assert not page.locator("#opinion-form").is_visible()                  # seen, not edited (a correction is folded)
    shot(page, f"reviewer-forms-4-{profile}-sent")

    run_pending(h.app, intake=False)
    done = svc.store.get(case.id)
    assert done.step == "done", done.last_error
    docref = fhir.read_ref(done.document_reference)
    document = jsonutil.loads(base64.b64decode(fhir.read_ref(docref["content"][0]["attachment"]["url"])["data"]))
    found: dict[str, list[str]] = {}
    for e in document["entry"]:
        r = e["resource"]
        if r["resourceType"] == "Observation":
            found.setdefault(r["code"]["coding"][0]["code"], []).append(r["valueCodeableConcept"]["coding"][0]["code"])
    assert found == {**expected, "concordance": ["partially-concordant"], "recommendation": ["non-surgical-care"],
                     "urgency": ["urgent"]}
