"""S12 (issue 13): the reviewer portal names a package's sender by the trusted hospital whose keys verified
it (the reviewer's own name for that trust entry), never by the name the package gives itself; that claim is
shown only marked as unverified. No EHR needed: the package is sealed here."""
from __future__ import annotations

from pathlib import Path

from fhirbridge.config.model import PACKAGE_MAPPINGS
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.exchange.reviewer import write_reviewer_keys
from fhirbridge.ui.reviewer_portal import PortalSettings, create_portal
from tests.kit.packages import Site, make_package


def test_the_portal_shows_the_verifying_trust_entry_as_the_sender(tmp_path: Path):
    files = write_reviewer_keys(tmp_path / "reviewer", None)
    trusted = tmp_path / "reviewer" / "trusted"
    general, _other = Site(trusted, "general-hospital"), Site(trusted, "st-elsewhere")
    # General Hospital's key signs a package that says it comes from St Elsewhere.
    make_package(tmp_path / "packages", general.private, KeyRing.load(files["public_keys"]), sender="St Elsewhere")
    app = create_portal(PortalSettings(key=files["private_keys"], trust=trusted, work_dir=tmp_path / "portal",
                                       mappings_dir=PACKAGE_MAPPINGS, token="portal-sender-token-0123456789",
                                       packages_dir=tmp_path / "packages"))
    client = app.test_client()
    with client.session_transaction() as s:
        s["reviewer"] = True
    shown = 'general-hospital (calls itself &#34;St Elsewhere&#34;: not verified)'
    for page in (client.get("/").get_data(as_text=True), client.get("/cases/pkg-1").get_data(as_text=True)):
        assert shown in page
        assert page.count("St Elsewhere") == page.count(shown)     # never on its own
