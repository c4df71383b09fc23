"""Browser tests: Debian's Chromium driven by Playwright, pages served by real local servers, and a
screenshot of every page saved for people to look at (build/screenshots/, or $FHIRBRIDGE_SCREENSHOTS).

`.ci/run` installs chromium; elsewhere these tests skip with the reason when it or Playwright is missing. The
`browser` and `page` fixtures are in tests/ui/conftest.py; this module has what they and the pages' tests use.
"""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from werkzeug.serving import make_server

CHROMIUM = os.environ.get("FHIRBRIDGE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# The closed network here refuses Chromium's background connections; these flags keep it from trying.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage"]
SCREENSHOTS = Path(os.environ.get("FHIRBRIDGE_SCREENSHOTS")
                   or Path(__file__).resolve().parents[2] / "build" / "screenshots")


def shot(page, name: str, *, full_page: bool = True) -> Path:
    """Save a screenshot named for the page it shows (the whole page, or what the window shows now)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


class LiveServer:
    """A WSGI app on a free 127.0.0.1 port in a thread (threaded: the browser opens several connections)."""

    def __init__(self, app):
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
