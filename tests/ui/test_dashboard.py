"""The hospital IT dashboard in a real browser: sign in with staff credentials, see Cases by state, a failed
Case with its error and a retry button that works, turnaround per reviewer, and what the opinions concluded."""
from __future__ import annotations

import hashlib
import re

import pytest
from playwright.sync_api import expect

from fhirbridge.config import loader as config
from fhirbridge.loop.receive import receive_file
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from tests.kit.browser import LiveServer, shot
from tests.kit.hospital import SAMPLE_ANSWER

pytestmark = pytest.mark.sekmet

ADMIN = "dashboard-admin-token-0123456789"
READER = "fbk_reader-0123456789abcdef0123456789"


@pytest.fixture
def dashboard_site(hospital, seeded):
    h = hospital
    # One opinion filed: the reviewer advises against the planned surgery.
    filed = h.delivered_case(seeded["patient"])
    answer = SAMPLE_ANSWER.replace('recommendation = "proceed-as-planned"', 'recommendation = "non-surgical-care"')
    receive_file(h.app, h.answer(filed, answer))
    h.run(intake=False)
    assert h.app.store.get(filed.id).step == "done"
    # One Case that fails for a real reason: the patient's 300 KB PDF is over a (deliberately tiny) limit.
    text = h.config_path.read_text()
    text = re.sub(r"max_attachment_bytes = \d+", "max_attachment_bytes = 1000", text)
    text += (f'\n[api]\ntokens = ["{ADMIN}"]\n[[api.keys]]\nname = "reader"\n'
             f'sha256 = "{hashlib.sha256(READER.encode()).hexdigest()}"\nscopes = ["cases:read"]\n')
    h.config_path.write_text(text)
    h.app.close()
    h.app = h.new_app()
    h.order(seeded["patient"], "Second look at the fusion plan?")
    h.run()
    svc = Service(config.load(h.config_path))
    server = LiveServer(create_app(svc=svc))
    yield h, svc, server, filed
    server.close()
    svc.stop(wait=True)


def sign_in(page, url, token):
    page.goto(url + "/dashboard/")
    page.get_by_label("Staff token, API key or access token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def test_dashboard_shows_the_flow_and_retries_a_failed_case(dashboard_site, page):
    h, svc, server, filed = dashboard_site
    failed = next(c for c in svc.store.list_cases() if c.step == "failed" and c.hospital == h.app.hospital.key)
    assert "1000" in failed.last_error or "larger" in failed.last_error, failed.last_error

    page.goto(server.url + "/dashboard/")
    assert "/dashboard/login" in page.url
    shot(page, "dashboard-1-sign-in")
    sign_in(page, server.url, "not-a-valid-token-anywhere")
    expect(page.get_by_text("Those credentials are not valid here")).to_be_visible()
    sign_in(page, server.url, ADMIN)

    expect(page.get_by_role("heading", level=1)).to_have_text("Second-opinion referrals")
    cards = {c.locator(".stat-label").inner_text(): c.locator(".stat").inner_text()
             for c in page.locator(".grid .card").filter(has=page.locator(".stat")).all()}
    assert cards["Filed"] == "1" and cards["Failed"] == "1" and cards["Cases in all"] == "2"
    assert page.locator("svg[aria-label='Cases by state']").count() == 1
    fail_row = page.locator("section", has=page.get_by_role("heading", name=re.compile("Failed Cases"))) \
        .locator("tbody tr").first
    assert failed.id[:8] in fail_row.inner_text() and "Packaging" in fail_row.inner_text()
    assert failed.last_error[:40] in fail_row.inner_text()
    turnaround = page.locator("section", has=page.get_by_role("heading", name="Turnaround per reviewer"))
    row = turnaround.locator("tbody tr", has_text="Spine Center")
    cells = row.locator("td").all_inner_texts()
    assert cells[2:6] == ["1", "0", "0", "1"]                      # sent, open, overdue, filed
    concl = page.locator("section", has=page.get_by_role("heading", name="What the second opinions concluded"))
    assert "100 %" in concl.inner_text() and "changed the planned treatment" in concl.inner_text()
    assert concl.locator("tr", has_text="Concordant").first.locator("td").inner_text() == "1"
    assert concl.locator("tr", has_text="Changed: no surgery").locator("td").inner_text() == "1"
    shot(page, "dashboard-2-overview")

    fail_row.get_by_role("button", name=f"Retry Case {failed.id[:8]}").click()
    expect(page.get_by_text(f"Case {failed.id[:8]} will be retried at Packaging")).to_be_visible()
    assert svc.store.get(failed.id).step == "seal"
    shot(page, "dashboard-3-retried", full_page=False)

    page.goto(server.url + f"/dashboard/cases/{filed.id}")
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Case {filed.id[:8]}: Filed")
    # A readable timeline (issue 17: it was raw event data), each entry still naming its event kind.
    history = page.locator(".timeline li").all_inner_texts()
    assert any("Second opinion received" in x and "the reviewer" in x for x in history)
    assert any("Opinion filed in the chart" in x for x in history)
    kinds = [li.get_attribute("data-kind") for li in page.locator(".timeline li").all()]
    assert kinds[0] == "opened" and "opinion.received" in kinds and "file.done" in kinds
    shot(page, "dashboard-4-case")


def test_a_read_only_key_sees_but_cannot_retry(dashboard_site, page):
    _h, _svc, server, _filed = dashboard_site
    sign_in(page, server.url, READER)
    expect(page.get_by_role("heading", level=1)).to_have_text("Second-opinion referrals")
    assert page.get_by_role("button", name=re.compile("^Retry")).count() == 0
    # A forged retry without the scope (with the page's own CSRF token) is refused.
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    failed = next(c for c in _svc.store.list_cases() if c.step == "failed")
    resp = page.request.post(server.url + f"/dashboard/cases/{failed.id}/retry", form={"csrf_token": token})
    assert resp.status == 403 and "cases:write" in resp.text()
    assert _svc.store.get(failed.id).step == "failed"
    # The Case list shows no retry or cancel either, and a forged cancel is refused the same way.
    page.goto(server.url + "/dashboard/cases")
    expect(page.locator("table.cases tbody tr").first).to_be_visible()
    assert page.get_by_role("button", name=re.compile("^(Retry|Confirm cancelling)")).count() == 0
    resp = page.request.post(server.url + f"/dashboard/cases/{failed.id}/cancel",
                             form={"csrf_token": token, "reason": "forged"})
    assert resp.status == 403 and "cases:write" in resp.text()
    assert _svc.store.get(failed.id).step == "failed"
