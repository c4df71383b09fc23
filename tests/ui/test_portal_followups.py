"""The reviewer portal in a real browser (issue 16 parts 3 and 5): a draft saved and resumed (encrypted at rest
with the reviewer's key), the sent opinion shown read-only, and a follow-up question from the hospital answered
once; the hospital files the answer as an addendum. Screenshots: build/screenshots/reviewer-followup-*.png.
"""
from __future__ import annotations

import pytest
from playwright.sync_api import expect

from fhirbridge.loop.followup import ask, run_followups
from fhirbridge.loop.runner import run_pending
from fhirbridge.store.followups import FollowUps
from tests.kit.browser import shot
from tests.ui.test_reviewer_portal import PORTAL_TOKEN, hospital_served, portal  # noqa: F401 - fixtures

pytestmark = pytest.mark.sekmet


def test_a_draft_is_resumed_and_a_follow_up_answered_once(hospital_served, portal, page, seeded, fhir, tmp_path):  # noqa: F811
    h, svc, _server = hospital_served
    case = h.delivered_case(seeded["patient"], question="Is surgery indicated now?")
    page.goto(portal.url + "/login")
    page.get_by_label("Portal token").fill(PORTAL_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.locator("tbody tr", has_text="Is surgery indicated now?").get_by_role("link").click()
    case_url = page.url

    # Half an answer, saved as a draft, then the reviewer leaves.
    page.get_by_label("Concordant: diagnosis confirmed").check()
    page.get_by_label("Risks and benefits (required)").fill("Surgery helps faster; physiotherapy is safer.")
    page.get_by_role("button", name="Save draft").click()
    expect(page.get_by_text("Draft saved. It is kept encrypted")).to_be_visible()
    drafts = list((tmp_path / "portal" / "answered").glob("*.draft.jwe"))
    assert len(drafts) == 1 and b"physiotherapy is safer" not in drafts[0].read_bytes()     # encrypted at rest
    assert drafts[0].stat().st_mode & 0o777 == 0o600
    page.goto(portal.url + "/")
    page.goto(case_url)
    expect(page.locator("#draft-note")).to_contain_text("Resumed your draft")
    assert page.get_by_label("Concordant: diagnosis confirmed").is_checked()
    assert "physiotherapy is safer" in page.get_by_label("Risks and benefits (required)").input_value()
    page.locator("#draft-note").scroll_into_view_if_needed()
    shot(page, "reviewer-followup-1-draft-resumed", full_page=False)

    # Finished and sent: the draft is gone, the opinion is shown, the form is not.
    page.get_by_label("Proceed with the planned treatment").check()
    page.get_by_label("Routine").check()
    page.get_by_label("Is surgery indicated now?").fill("Yes.")
    page.get_by_role("button", name="Sign and send").click()
    expect(page.get_by_text("Signed and sent: uploaded to the hospital")).to_be_visible()
    assert not list((tmp_path / "portal" / "answered").glob("*.draft.jwe"))
    assert page.locator("#sent-opinion").is_visible()
    # The form is not offered again: only a correction, folded away, starts from it.
    assert not page.locator("#opinion-form").is_visible() and page.get_by_role("button", name="Save draft").count() == 0
    expect(page.locator("#correct summary")).to_have_text("Send a corrected opinion")
    run_pending(h.app, intake=False)
    case = svc.store.get(case.id)
    assert case.step == "done", case.last_error

    # The physician asks; the hospital sends the question; the portal shows it on the Case.
    row = ask(h.app, case, "Would you still operate if the leg pain settles in six weeks?")
    assert run_followups(h.app) == 1
    page.goto(portal.url + "/")
    row_text = page.locator("tbody tr", has_text="Is surgery indicated now?").inner_text()
    assert "1 follow-up question" in row_text and "answered" in row_text
    shot(page, "reviewer-followup-2-inbox", full_page=False)
    page.goto(case_url)
    article = page.get_by_role("article", name="Follow-up question 1")
    expect(article).to_contain_text("settles in six weeks")
    article.get_by_label("Your answer to question 1").fill("No: then continue physiotherapy and review at 3 months.")
    shot(page, "reviewer-followup-3-question")
    article.get_by_role("button", name="Sign and send the answer").click()
    expect(page.get_by_text("Your answer to follow-up question 1 was signed and sent")).to_be_visible()
    article = page.get_by_role("article", name="Follow-up question 1")
    expect(article).to_contain_text("review at 3 months")
    assert article.get_by_role("button").count() == 0          # answered once: no second answer offered
    shot(page, "reviewer-followup-4-answered")
    page.goto(portal.url + "/")
    assert "follow-up question" not in page.locator("tbody tr", has_text="Is surgery indicated now?").inner_text()

    assert run_followups(h.app) == 1
    filed = FollowUps(h.app.store).get(row["id"])
    assert filed["state"] == "filed", filed["error"]
    note = fhir.read_ref(filed["note"])
    assert note["relatesTo"] == [{"code": "appends", "target": {"reference": case.document_reference}}]

    # The reviewer corrects the opinion from the portal: the form starts from what was sent; the correction
    # replaces the current version, and the hospital files it in place of the note in the chart.
    page.goto(case_url)
    page.locator("#correct summary").click()
    assert page.get_by_label("Proceed with the planned treatment").is_checked()          # what was sent
    assert "physiotherapy is safer" in page.get_by_label("Risks and benefits (required)").input_value()
    page.get_by_label("Non-surgical care").check()
    page.get_by_role("button", name="Preview").click()
    expect(page.locator("#preview")).to_contain_text("Non-surgical care")
    assert page.locator("#correct").get_attribute("open") is not None       # the preview opens it again
    page.locator("#correct").scroll_into_view_if_needed()
    shot(page, "reviewer-followup-5-correction-preview", full_page=False)
    page.get_by_role("button", name="Sign and send the correction").click()
    expect(page.get_by_text("Corrected opinion signed and sent: uploaded to the hospital")).to_be_visible()
    expect(page.locator("#sent-opinion")).to_contain_text("Non-surgical care")
    expect(page.locator("#correct summary")).to_contain_text("1 sent")
    assert run_followups(h.app) == 1
    [corrected] = FollowUps(h.app.store).of_case(case.id, "correction")
    assert corrected["state"] == "filed", corrected["error"]
    assert fhir.read_ref(corrected["note"])["relatesTo"] == [
        {"code": "replaces", "target": {"reference": case.document_reference}}]
    assert svc.store.get(case.id).recommendation == "non-surgical-care"
