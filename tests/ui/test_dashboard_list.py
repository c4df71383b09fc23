"""The dashboard's Case list, banner and refresh in a real browser (issue 17 part 1): find any Case by the
filters, page through them, retry and cancel a row; a banner when the EHR stops mid-test; a page that refreshes
itself when a Case appears or moves, keeping its filter; times in the hospital's time zone, UTC on hover."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from fhirbridge.config import loader as config
from fhirbridge.fhir.client import FhirClient
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from fhirbridge.ui import dashboard as dashboard_module
from tests.kit.browser import LiveServer, shot
from tests.kit.faultproxy import FaultProxy

pytestmark = pytest.mark.sekmet

ADMIN = "dashboard-list-admin-token-0123456789"
SYNTHETIC = 64
WAIT = 30_000    # ms: the page polls every second; /readyz's cache is up to 5 s old; a loaded 2-core machine


def sign_in(page, url):
    page.goto(url + "/dashboard/cases")
    page.get_by_label("Staff token, API key or access token").fill(ADMIN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Cases")


@pytest.fixture
def site(hospital, seeded, monkeypatch):
    """A real Case awaiting its opinion, 64 more loaded through the store, the EHR behind a proxy that can be
    stopped, Berlin time, and pages that ask for changes every second."""
    h = hospital
    real = h.delivered_case(seeded["patient"])
    ehr_url = re.search(r'fhir_base_url = "([^"]+)"', h.config_path.read_text()).group(1)
    proxy = FaultProxy(ehr_url)
    text = h.config_path.read_text().replace(f'fhir_base_url = "{ehr_url}"',
                                             f'fhir_base_url = "{proxy.base_url}"\ntime_zone = "Europe/Berlin"')
    h.config_path.write_text(text + f'\n[api]\ntokens = ["{ADMIN}"]\n')
    key = h.app.store.get(real.id).hospital
    base = 1_764_600_000.0          # 2025-12-01 14:40 UTC
    h.app.store.load_cases([{
        "id": f"bulk{i:04d}-0000-4000-8000-000000000000", "hospital": key,
        "service_request": f"ServiceRequest/bulk-{i}",
        "patient": f"Patient/bulk-{i % 8}", "reviewer": "spine-center", "profile": "default",
        "step": "failed" if i % 16 == 0 else "done", "data": {"failed_step": "collect"} if i % 16 == 0 else {},
        "last_error": "could not reach the EHR at X: connection refused by h:1: nothing listens on that port"
        if i % 16 == 0 else None, "created_at": base + i * 3600, "updated_at": base + i * 3600}
        for i in range(SYNTHETIC)])
    monkeypatch.setattr(dashboard_module, "REFRESH_SECONDS", 1)
    svc = Service(config.load(h.config_path))
    server = LiveServer(create_app(svc=svc))
    try:
        yield h, svc, server, real, proxy, ehr_url
    finally:
        server.close()
        svc.stop(wait=True)
        proxy.close()


def test_the_list_finds_pages_retries_and_cancels(site, page):
    h, svc, server, real, _proxy, ehr_url = site
    sign_in(page, server.url)
    expect(page.locator("#matching")).to_contain_text(f"{SYNTHETIC + 1} Cases match; 50 shown")
    rows = page.locator("table.cases tbody tr")
    expect(rows).to_have_count(50)
    assert real.id[:8] in rows.first.inner_text()          # the most recently updated first
    # Berlin time on the page, UTC on hover.
    created = page.locator(f"tr[data-case='{real.id}'] time").first
    assert re.search(r"CET|CEST", created.inner_text()) and created.get_attribute("title").endswith("UTC")
    shot(page, "dashboard-list-1-first-page")

    page.get_by_role("link", name="Next page").click()
    expect(rows).to_have_count(SYNTHETIC + 1 - 50)
    assert "cursor=" in page.url
    expect(page.get_by_role("link", name="Next page")).to_have_count(0)
    page.get_by_role("link", name="First page").click()
    expect(rows).to_have_count(50)

    # Search: one patient's failed Cases; the URL keeps the filter.
    page.get_by_label("Patient").fill("bulk-0")
    page.get_by_label("Failed or retrying").check()
    page.get_by_role("button", name="Search").click()
    wanted = sorted(f"bulk{i:04d}" for i in range(SYNTHETIC) if i % 8 == 0 and i % 16 == 0)
    expect(rows).to_have_count(len(wanted))
    assert "patient=bulk-0" in page.url and "failed=true" in page.url
    assert sorted(r[:8] for r in rows.locator("td:first-child").all_inner_texts()) == wanted
    shot(page, "dashboard-list-2-search")

    # Sort by creation, oldest first.
    page.goto(server.url + "/dashboard/cases?sort=created&dir=asc&limit=5")
    expect(rows).to_have_count(5)
    assert rows.first.inner_text().startswith("bulk0000")

    # Retry a failed row: back at the step that failed, by this sign-in, and back on the same list.
    page.goto(server.url + "/dashboard/cases?failed=true")
    target = "bulk0016-0000-4000-8000-000000000000"
    page.get_by_role("button", name="Retry Case bulk0016").click()
    expect(page.get_by_text("Case bulk0016 will be retried at Collecting")).to_be_visible()
    assert "failed=true" in page.url
    assert svc.store.get(target).step == "collect"
    assert svc.store.events(target)[-1]["detail"] == {"step": "collect", "by": "api token"}

    # Cancel the real Case: a reason is asked for; the Case ends and its Task in the EHR is cancelled.
    page.goto(server.url + f"/dashboard/cases?case={real.id[:8]}")
    expect(rows).to_have_count(1)
    page.get_by_label(f"Cancel Case {real.id[:8]}").click()
    page.get_by_label(f"Reason for cancelling Case {real.id[:8]}").fill("patient moved to another hospital")
    shot(page, "dashboard-list-3-cancel", full_page=False)
    page.get_by_role("button", name=f"Confirm cancelling Case {real.id[:8]}").click()
    expect(page.get_by_text(f"Case {real.id[:8]} is cancelled.")).to_be_visible()
    after = svc.store.get(real.id)
    assert after.step == "cancelled" and after.last_error == "patient moved to another hospital"
    task = FhirClient(ehr_url).read(*after.task.split("/"))
    assert task["status"] == "cancelled"
    expect(page.get_by_role("button", name=f"Retry Case {real.id[:8]}")).to_have_count(0)   # final: no actions
    page.goto(server.url + f"/dashboard/cases/{real.id}")
    cancelled = page.locator(".timeline li[data-kind='cancelled']")
    expect(cancelled).to_contain_text("Referral cancelled")
    expect(cancelled).to_contain_text("api token")
    expect(cancelled).to_contain_text("patient moved to another hospital")
    link = page.get_by_role("link", name=after.task)
    assert link.get_attribute("href").endswith(f"/{after.task}")
    shot(page, "dashboard-list-4-cancelled-case")


def test_a_cancel_without_the_pages_csrf_token_is_refused(site, page):
    _h, svc, server, real, _proxy, _ehr = site
    sign_in(page, server.url)
    resp = page.request.post(server.url + f"/dashboard/cases/{real.id}/cancel", form={"reason": "forged"})
    assert resp.status == 400 and "did not come from this page" in resp.text()
    assert svc.store.get(real.id).step == "await_opinion"


def test_a_bad_filter_says_what_is_wrong(site, page):
    _h, _svc, server, _real, _proxy, _ehr = site
    sign_in(page, server.url)
    page.goto(server.url + "/dashboard/cases?created_from=yesterday")
    expect(page.get_by_role("alert")).to_contain_text("created_from must be a date (YYYY-MM-DD)")


def test_the_banner_appears_when_the_ehr_stops(site, page):
    _h, _svc, server, _real, proxy, _ehr = site
    sign_in(page, server.url)
    page.goto(server.url + "/dashboard/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Second-opinion referrals")
    expect(page.locator("#unreachable")).to_have_count(0)
    proxy.close()                                   # the EHR stops answering mid-test
    # The page notices by itself (its poll sees the banner's check change) and reloads with the banner.
    banner = page.locator("#unreachable")
    expect(banner).to_be_visible(timeout=WAIT)
    expect(banner).to_contain_text("The EHR of Test Hospital")
    expect(banner).to_contain_text("unreachable")
    shot(page, "dashboard-banner-ehr-down")


def test_the_list_refreshes_itself_keeping_its_filter(site, page):
    h, svc, server, real, _proxy, _ehr = site
    sign_in(page, server.url)
    page.goto(server.url + "/dashboard/cases?step=await_opinion")
    rows = page.locator("table.cases tbody tr")
    expect(rows).to_have_count(1)
    key = svc.store.get(real.id).hospital
    # A new Case appears meanwhile (taken in by another worker).
    svc.store.load_cases([{"id": "fresh000-0000-4000-8000-000000000000", "hospital": key,
                           "service_request": "ServiceRequest/fresh", "patient": "Patient/fresh",
                           "reviewer": "spine-center", "profile": "default", "step": "await_opinion"}])
    expect(rows).to_have_count(2, timeout=WAIT)
    assert "step=await_opinion" in page.url
    expect(rows.first).to_contain_text("fresh000")
    # A step changes: the Case leaves the filtered list by itself.
    svc.store.update(real.id, step="file", event_kind="opinion.received")
    expect(rows).to_have_count(1, timeout=WAIT)
    assert "step=await_opinion" in page.url
    shot(page, "dashboard-list-5-refreshed")
