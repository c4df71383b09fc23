"""The portal's image viewer in Chromium: a package carrying DICOM series (the kit's generated CT, MR,
multi-frame and RLE series, pydicom's real MR slice, one series in a transfer syntax nothing decodes), opened
by a reviewer who scrolls, changes the window, plays the frames, marks a key image and sends the opinion,
which carries the key image. Screenshots go to build/screenshots/ (image-viewer-*.png)."""
from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pytest
from playwright.sync_api import expect

from fhirbridge.crypto.keys import KeyRing
from fhirbridge.exchange import envelope
from fhirbridge.exchange import key_images as keys
from fhirbridge.exchange.reviewer import write_reviewer_keys
from fhirbridge.fhir.validate import validate as validate_resource
from fhirbridge.ui.reviewer_portal import PortalSettings, create_portal
from tests.kit.browser import LiveServer, shot
from tests.kit.imaging_packages import REPORT_CONCLUSION, make_imaging_package, viewer_study
from tests.kit.packages import Site

TOKEN = "portal-login-token-images-0123"
MAPPINGS = Path(__file__).resolve().parents[2] / "src" / "fhirbridge" / "mappings"


@pytest.fixture
def served(tmp_path):
    site = Site(tmp_path / "hospital", "hospital-a")
    reviewer = write_reviewer_keys(tmp_path / "reviewer")
    study = viewer_study(tmp_path / "study")
    make_imaging_package(tmp_path / "packages", site.private, KeyRing.load(reviewer["public_keys"]), study)
    settings = PortalSettings(key=reviewer["private_keys"], trust=site.public_file, work_dir=tmp_path / "portal",
                              mappings_dir=MAPPINGS, packages_dir=tmp_path / "packages",
                              answers_dir=tmp_path / "answers", token=TOKEN)
    live = LiveServer(create_portal(settings))
    yield live, site, study, settings
    live.close()


def _sign_in(page, url: str) -> None:
    page.goto(url + "/")
    page.get_by_label("Portal token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Cases assigned to you")


def _src(page) -> str:
    return page.locator("#frame").get_attribute("src") or ""


def _shown(page) -> None:
    """Wait until the image element shows a decoded image (naturalWidth > 0) for its current src."""
    page.wait_for_function("() => { const i = document.getElementById('frame'); "
                           "return i.complete && i.naturalWidth > 0; }")


def test_the_reviewer_reads_the_images_and_marks_a_key_image_that_goes_with_the_opinion(served, page):
    live, site, study, settings = served
    _sign_in(page, live.url)
    page.locator("tbody tr", has_text="Is surgery indicated?").get_by_role("link").click()
    page.get_by_role("link", name="Open the image viewer").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("Images:")

    # Series list with thumbnails, every one decoded (the undecodable one excepted).
    series = page.locator("nav.series-list a.series")
    expect(series).to_have_count(6)
    page.wait_for_function("() => [...document.querySelectorAll('.thumb')].filter(i => i.complete && "
                           "i.naturalWidth > 0).length === 5")
    expect(page.locator(".no-preview")).to_have_count(1)

    # The report beside the images: the DiagnosticReport that references this ImagingStudy.
    expect(page.locator("aside.report")).to_contain_text(REPORT_CONCLUSION)

    # The real MR slice (pydicom's MR_small, a head MR), rendered from the DICOM file.
    page.locator("a.series", has_text="MR head").click()
    _shown(page)
    assert page.evaluate("document.getElementById('frame').naturalWidth") == 64
    shot(page, "image-viewer-1-mr-slice")

    # Scrolling through the generated MR series: keys, wheel, slider.
    page.locator("a.series", has_text="MR T2 sagittal").click()
    _shown(page)
    expect(page.locator("#slice-out")).to_have_text("1")
    page.locator("#stage").focus()
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    expect(page.locator("#slice-out")).to_have_text("3")
    assert "/2.png" in _src(page)
    page.locator("#stage").hover()
    page.mouse.wheel(0, 120)
    expect(page.locator("#slice-out")).to_have_text("4")
    page.keyboard.press("ArrowUp")
    expect(page.locator("#slice-out")).to_have_text("3")
    _shown(page)

    # A key image: slice 3 of the MR series.
    mr_uid = next(uid for uid, paths in study.series.items() if _description(paths[0]) == "MR T2 sagittal")
    page.get_by_role("button", name="Mark / unmark as key image").click()
    expect(page.locator(".flash.ok")).to_contain_text("Marked as a key image")
    expect(page.locator("#key-images li")).to_have_count(1)
    expect(page.locator("#slice-out")).to_have_text("3")        # back where the reviewer was
    shot(page, "image-viewer-2-key-image")

    # CT window presets change the pixels (the server renders each window).
    page.locator("a.series", has_text="CT spine").click()
    _shown(page)
    pngs = {}
    for preset in ("Lung", "Bone", "Soft tissue"):
        page.get_by_role("button", name=preset, exact=True).click()
        _shown(page)
        assert "wc=" in _src(page)
        pngs[preset] = page.request.get(live.url + _src(page)).body()
    assert len(set(pngs.values())) == 3
    page.locator("#wc").fill("1000")
    page.locator("#ww").fill("10")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#frame")).to_have_attribute("src", re.compile(r"wc=1000&ww=10"))
    _shown(page)
    assert page.request.get(live.url + _src(page)).body() not in pngs.values()
    page.get_by_role("button", name="Bone", exact=True).click()
    _shown(page)
    shot(page, "image-viewer-3-ct-bone-window")

    # Multi-frame playback: the frame number advances by itself, then stops.
    page.locator("a.series", has_text="multi-frame").click()
    _shown(page)
    expect(page.locator("#frame-controls")).to_be_visible()
    expect(page.locator("#frame-count")).to_have_text("6")
    page.get_by_role("button", name="Play").click()
    page.wait_for_function("() => Number(document.getElementById('frame-out').textContent) >= 3")
    page.get_by_role("button", name="Pause").click()
    assert re.search(r"frame=[3-6]", _src(page))

    # A transfer syntax without a decoder: a clear message and the download, not a broken page.
    page.locator("a.series", has_text="MR no decoder").click()
    expect(page.locator("#cannot")).to_contain_text("cannot display")
    expect(page.locator("#cannot")).to_contain_text("download the DICOM")
    assert page.get_by_role("link", name="Download this DICOM file").is_visible()
    shot(page, "image-viewer-4-cannot-display")

    # The opinion carries the key image: the case page lists it, the sealed answer holds it.
    page.get_by_role("link", name="Back to the Case").click()
    expect(page.locator("#f-key-images")).to_contain_text("frame 1")
    page.get_by_label("Concordant: diagnosis confirmed").check()
    page.get_by_label("Is surgery indicated?").fill("Not yet.")
    page.get_by_label("Non-surgical care").check()
    page.get_by_label("Risks and benefits (required)").fill("Physiotherapy first avoids surgical risk.")
    page.get_by_label("Routine").check()
    page.get_by_role("button", name="Sign and send").click()
    expect(page.locator(".flash.ok").first).to_contain_text("Signed and sent")
    expect(page.locator("#sent-opinion")).to_contain_text("Key images")

    [answer] = list(settings.answers_dir.glob("opinion-*.jwe"))
    reviewer_public = KeyRing.load(settings.key.parent / "reviewer.public.jwks.json")
    opened = envelope.open_verified(answer.read_bytes(), typ=envelope.OPINION, decrypt=site.private,
                                    trusted=reviewer_public)
    document = opened.document
    mr_sop = _sop(sorted(study.series[mr_uid], key=_number)[2])
    assert keys.listed(document) == [{"study_uid": study.study_uid, "series_uid": mr_uid, "sop_uid": mr_sop,
                                      "frames": [1]}]
    comp = document["entry"][0]["resource"]
    section = next(s for s in comp["section"] if s["code"]["coding"][0]["code"] == "121180")
    assert mr_sop in section["text"]["div"] and mr_sop in comp["text"]["div"]
    # What the hospital checks before filing (loop/receive.check_document): every entry valid R4.
    for entry in document["entry"]:
        assert validate_resource(entry["resource"]) == [], entry["resource"]["resourceType"]


def _description(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get("SeriesDescription", ""))


def _sop(path: Path) -> str:
    return path.stem


def _number(path: Path) -> int:
    return int(pydicom.dcmread(path, stop_before_pixels=True).InstanceNumber)
