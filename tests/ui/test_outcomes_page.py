"""The dashboard's Outcomes page in a real browser, for the test set with known answers (tests/kit/outcomes.py):
the headline figures with their denominators, the chart, and the per-reviewer and per-specialty tables."""
from __future__ import annotations

import pytest
from playwright.sync_api import expect

from fhirbridge.config import loader as config
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from tests.kit.browser import LiveServer, shot
from tests.kit.outcomes import seed_known_outcomes

pytestmark = pytest.mark.sekmet

ADMIN = "outcomes-page-admin-token-0123456789"


@pytest.fixture
def outcomes_site(two_reviewers):
    h = two_reviewers
    h.config_path.write_text(h.config_path.read_text() + f'\n[api]\ntokens = ["{ADMIN}"]\n')
    svc = Service(config.load(h.config_path))
    try:
        seed_known_outcomes(svc.store, svc.apps[0].hospital.key, {"a": "spine-center", "b": "other-center"})
        # Another hospital's outcomes in the same store are not this deployment's to show.
        seed_known_outcomes(svc.store, "another-hospital", {"a": "spine-center", "b": "other-center"})
        server = LiveServer(create_app(svc=svc))
        try:
            yield svc, server
        finally:
            server.close()
    finally:
        svc.stop(wait=True)


def test_the_outcomes_page_shows_the_known_figures_with_their_denominators(outcomes_site, page):
    _svc, server = outcomes_site
    page.goto(server.url + "/dashboard/outcomes")
    page.get_by_label("Staff token, API key or access token").fill(ADMIN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Outcomes of the second opinions")
    cards = {c.locator(".stat-label").inner_text(): (c.locator(".stat").inner_text(), c.locator(".of").inner_text())
             for c in page.locator("section", has=page.get_by_role("heading", name="In short")).locator(".card").all()}
    assert cards["Opinions that changed the plan"] == ("60 %", "6 of 10 opinions with a recommendation")
    assert cards["Plans changed in the chart"] == ("63 %", "5 of 8 assessed in the chart")
    assert cards["Advice followed"] == ("71 %", "5 of 7 with advice that can be checked")
    assert cards["Median days from opinion to decision"] == ("20.0", "7 decisions in the chart")
    assert page.locator("svg[aria-label='What the chart shows became of the planned treatment']").count() == 1

    reviewers = page.locator("section", has=page.get_by_role("heading", name="Per reviewer"))
    spine = reviewers.locator("tbody tr", has_text="Spine Center").locator("td").all_inner_texts()
    assert spine == ["Spine Center", "5", "4 of 5 (80 %)", "5", "2 of 5 (40 %)", "1 of 5 (20 %)", "2 of 5 (40 %)",
                     "4 of 5 (80 %)", "25.0 (4)"]
    other = reviewers.locator("tbody tr", has_text="Other Center").locator("td").all_inner_texts()
    assert other[:3] == ["Other Center", "5", "2 of 5 (40 %)"] and other[3].startswith("3 (1 open, 1 without")
    assert other[-2:] == ["1 of 2 (50 %)", "15.0 (3)"]
    specialties = page.locator("section", has=page.get_by_role("heading", name="Per specialty"))
    assert specialties.locator("tbody tr").count() == 2
    expect(page.get_by_role("link", name="Outcomes")).to_have_attribute("aria-current", "page")
    shot(page, "dashboard-outcomes")
