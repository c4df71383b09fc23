"""The viewer's routes keep the portal's rules: signed-in reviewers only, the patient's images never cached
(no-store) and never run as a document (nosniff, the sandbox CSP), CSRF on marking, only this package's
images markable, the extracted files private (0600 in 0700 folders)."""
from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from fhirbridge.crypto.keys import KeyRing
from fhirbridge.exchange.reviewer import write_reviewer_keys
from fhirbridge.ui.reviewer_portal import PortalSettings, create_portal
from tests.kit.dicom_studies import make_study
from tests.kit.imaging_packages import make_imaging_package
from tests.kit.packages import Site

TOKEN = "portal-login-token-images-0123"
MAPPINGS = Path(__file__).resolve().parents[2] / "src" / "fhirbridge" / "mappings"


@pytest.fixture
def viewer(tmp_path):
    site = Site(tmp_path / "hospital", "hospital-a")
    reviewer = write_reviewer_keys(tmp_path / "reviewer")
    study = make_study(tmp_path / "study", ct_slices=2, mr_slices=2, frames=2, rle_slices=1)
    make_imaging_package(tmp_path / "packages", site.private, KeyRing.load(reviewer["public_keys"]), study)
    app = create_portal(PortalSettings(key=reviewer["private_keys"], trust=site.public_file,
                                       work_dir=tmp_path / "portal", mappings_dir=MAPPINGS,
                                       packages_dir=tmp_path / "packages", token=TOKEN))
    client = app.test_client()
    page = client.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    client.post("/login", data={"csrf_token": csrf, "token": TOKEN})
    client.get("/")
    # Signing in starts a new session, with a CSRF token of its own.
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/cases/pkg-img").text).group(1)
    series = next(iter(study.series))
    return client, app, study, series, csrf, tmp_path / "portal"


def test_frames_and_files_need_a_signed_in_reviewer(viewer):
    _client, app, _study, series, _csrf, _work = viewer
    anonymous = app.test_client()
    for url in ("/cases/pkg-img/images", f"/cases/pkg-img/images/{series}/0.png",
                f"/cases/pkg-img/images/{series}/thumbnail.png", f"/cases/pkg-img/images/{series}/0.dcm"):
        resp = anonymous.get(url)
        assert resp.status_code == 302 and "/login" in resp.headers["Location"], url


def test_a_rendered_frame_and_a_download_are_never_cached_nor_run(viewer):
    client, _app, study, series, _csrf, _work = viewer
    for url, kind in ((f"/cases/pkg-img/images/{series}/0.png?wc=40&ww=400", "image/png"),
                      (f"/cases/pkg-img/images/{series}/thumbnail.png", "image/png"),
                      (f"/cases/pkg-img/images/{series}/1.dcm", "application/dicom")):
        resp = client.get(url)
        assert resp.status_code == 200 and resp.mimetype == kind, url
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert "sandbox" in resp.headers["Content-Security-Policy"]
    download = client.get(f"/cases/pkg-img/images/{series}/1.dcm")
    assert download.headers["Content-Disposition"].startswith("attachment")
    assert download.data in {p.read_bytes() for p in study.series[series]}     # byte for byte the file
    page = client.get("/cases/pkg-img/images")
    assert page.headers["Cache-Control"] == "no-store" and "script-src" not in page.headers["Content-Security-Policy"]
    assert "<script src=\"/ui-static/viewer.js\"></script>" in page.text


def test_unknown_series_or_images_are_404(viewer):
    client, _app, _study, series, _csrf, _work = viewer
    assert client.get("/cases/pkg-img/images/1.2.3/0.png").status_code == 404
    assert client.get(f"/cases/pkg-img/images/{series}/99.png").status_code == 404
    assert client.get(f"/cases/pkg-img/images/{series}/99.dcm").status_code == 404


def test_marking_needs_the_csrf_token_and_an_image_of_this_package(viewer):
    client, _app, study, series, csrf, _work = viewer
    sop = study.series[series][0].stem
    no_token = client.post("/cases/pkg-img/key-images", data={"series": series, "sop": sop, "frame": "1"})
    assert no_token.status_code == 400
    bad = client.post("/cases/pkg-img/key-images", data={"csrf_token": csrf, "series": series, "sop": "1.2.3",
                                                        "frame": "1"})
    assert bad.status_code == 400
    assert client.post("/cases/pkg-img/key-images", data={"csrf_token": csrf, "series": series, "sop": sop,
                                                         "frame": "2"}).status_code == 400     # one frame only
    ok = client.post("/cases/pkg-img/key-images",
                     data={"csrf_token": csrf, "series": series, "sop": sop, "frame": "1"})
    assert ok.status_code == 302
    assert sop in client.get("/cases/pkg-img/images").text
    client.post("/cases/pkg-img/key-images", data={"csrf_token": csrf, "series": series, "sop": sop, "frame": "1"})
    assert "None yet." in client.get("/cases/pkg-img/images").text           # a second click unmarks it


def test_the_extracted_images_are_private(viewer):
    client, _app, _study, _series, _csrf, work = viewer
    client.get("/cases/pkg-img/images")
    root = work / "images"
    found = list(root.rglob("*.dcm"))
    assert found
    for p in found:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
