"""The portal decrypts each of a package's series once: opening the package extracts its images, checking each
against the signed manifest in the same pass (it used to decrypt every series to verify it at open, then again
to extract it). A series that does not match is still refused at open, and nothing of it is shown."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from fhirbridge.crypto import jwe
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.exchange.reviewer import write_reviewer_keys
from fhirbridge.ui.reviewer_portal import PortalSettings, create_portal
from tests.kit.dicom_studies import make_study
from tests.kit.imaging_packages import make_imaging_package
from tests.kit.packages import Site

TOKEN = "portal-login-token-images-once-01"
MAPPINGS = Path(__file__).resolve().parents[2] / "src" / "fhirbridge" / "mappings"


@pytest.fixture
def portal(tmp_path, monkeypatch):
    site = Site(tmp_path / "hospital", "hospital-a")
    reviewer = write_reviewer_keys(tmp_path / "reviewer")
    study = make_study(tmp_path / "study", ct_slices=2, mr_slices=2, frames=2, rle_slices=1)
    make_imaging_package(tmp_path / "packages", site.private, KeyRing.load(reviewer["public_keys"]), study)
    decrypted: Counter[str] = Counter()
    real = jwe.decrypt_stream

    def counting(src, dst, keyring, **kw):
        decrypted[Path(getattr(src, "name", "")).name] += 1
        return real(src, dst, keyring, **kw)

    monkeypatch.setattr(jwe, "decrypt_stream", counting)
    app = create_portal(PortalSettings(key=reviewer["private_keys"], trust=site.public_file,
                                       work_dir=tmp_path / "portal", mappings_dir=MAPPINGS,
                                       packages_dir=tmp_path / "packages", token=TOKEN))
    client = app.test_client()
    page = client.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    client.post("/login", data={"csrf_token": csrf, "token": TOKEN})
    return client, study, decrypted, tmp_path / "packages" / "pkg-img"


def test_each_series_is_decrypted_once_from_opening_to_viewing(portal):
    client, study, decrypted, package = portal
    assert client.get("/").status_code == 200          # the list of packages (what a reviewer sees first)
    assert client.get("/cases/pkg-img").status_code == 200
    page = client.get("/cases/pkg-img/images")
    assert page.status_code == 200
    for series in study.series:
        assert client.get(f"/cases/pkg-img/images/{series}/0.png").status_code == 200
    series_files = sorted(p.name for p in (package / "attachments").glob("att-*.jwe"))
    assert len(series_files) == len(study.series)
    assert {name: decrypted[name] for name in series_files} == dict.fromkeys(series_files, 1)


def test_a_series_that_does_not_match_its_manifest_is_refused_at_open(portal):
    client, _study, _decrypted, package = portal
    victim = sorted((package / "attachments").glob("att-*.jwe"))[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] = ord("A") if data[len(data) // 2] != ord("A") else ord("B")
    victim.write_bytes(bytes(data))
    client.get("/")
    page = client.get("/cases/pkg-img")
    assert page.status_code >= 400
    assert victim.name in page.text
    assert not list((package.parent.parent / "portal" / "images").glob("*/*/*/*.dcm"))
