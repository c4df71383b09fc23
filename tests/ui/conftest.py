"""The browser tests' fixtures: Debian's Chromium driven by Playwright (tests/kit/browser.py), one browser for
the session and a fresh page per test; they skip with the reason when Chromium or Playwright is missing."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.kit.browser import CHROMIUM, CHROMIUM_ARGS


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB")
    pg = context.new_page()
    # Every wait polls until this deadline: long enough for a loaded 2-core machine (CI runs suites side by
    # side), and a page that never shows what it should still fails.
    pg.set_default_timeout(60_000)
    yield pg
    context.close()
