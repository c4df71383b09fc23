"""Text from the EHR, a package or a reviewer never reaches a terminal with its control characters: an escape
sequence in a record could clear the reviewer's screen, retitle the window or hide lines of the summary."""
from __future__ import annotations

import re
import time
import uuid

import pytest

from fhirbridge.cli import main as cli
from fhirbridge.crypto import jws
from fhirbridge.exchange import envelope
from fhirbridge.exchange.render import render_opinion, render_package, terminal_safe

CLEAR_AND_RETITLE = "\x1b[2J\x1b]0;pwned\x07"
EIGHT_BIT_CSI = "\x9b31m"
# Every C0 control but newline and tab, DEL, and every C1 control.
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def assert_clean(text: str) -> None:
    assert not CONTROLS.search(text), repr(CONTROLS.findall(text))
    assert "pwned" not in text  # the window title set by the OSC sequence is gone with it


def _document() -> dict:
    ehr = "https://ehr.example/fhir"
    identifier = {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"}
    return {"resourceType": "Bundle", "identifier": identifier,
            "type": "document", "timestamp": "2024-01-01T00:00:00Z", "entry": [
                {"fullUrl": f"{ehr}/Patient/p1", "resource": {
                    "resourceType": "Patient", "id": "p1", "gender": "female",
                    "name": [{"text": f"Anna{CLEAR_AND_RETITLE} Example"}]}},
                {"fullUrl": f"{ehr}/ServiceRequest/sr1", "resource": {
                    "resourceType": "ServiceRequest", "id": "sr1", "status": "active", "intent": "order",
                    "subject": {"reference": f"{ehr}/Patient/p1"}}},
                {"fullUrl": f"{ehr}/Condition/c1", "resource": {
                    "resourceType": "Condition", "id": "c1", "subject": {"reference": f"{ehr}/Patient/p1"},
                    "code": {"text": f"Lumbar {EIGHT_BIT_CSI}stenosis{CLEAR_AND_RETITLE}\r\x00\x7f"}}}]}


def _claims(iss: dict) -> dict:
    now = int(time.time())
    return {"jti": str(uuid.uuid4()), "iat": now, "exp": now + 3600, "iss": iss,
            "aud": {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.7.9", "display": "Reviewer"},
            "case_id": str(uuid.uuid4()), "package_id": "pkg-ctl", "service_request": "ServiceRequest/sr1",
            "patient": "Patient/p1",
            "manifest": {"question": f"Fusion?{CLEAR_AND_RETITLE}\nOr not{EIGHT_BIT_CSI}?", "shared": [],
                         "withheld": [{"reference": "Condition/c9", "reason": f"label{EIGHT_BIT_CSI}"}],
                         "attachments": []}}


def test_terminal_safe_strips_escape_sequences_and_controls_but_keeps_text():
    assert terminal_safe(f"a{CLEAR_AND_RETITLE}b{EIGHT_BIT_CSI}c\td\ne\x1b\x00\x85\x7f ü ✓") == "ab" "c\td\ne ü ✓"
    assert terminal_safe("\x1b]8;;https://evil.example\x1b\\link\x1b]8;;\x1b\\") == "link"  # OSC 8 hyperlink


def test_render_package_has_no_control_characters():
    iss = {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.7.1", "display": f"Hospital{CLEAR_AND_RETITLE}"}
    text = render_package(_claims(iss), _document())
    assert_clean(text)
    assert "Anna Example" in text and "Lumbar stenosis" in text and "Fusion?" in text and "Or not?" in text


def test_render_opinion_has_no_control_characters():
    doc = {"resourceType": "Bundle", "entry": [
        {"resource": {"resourceType": "Composition", "title": f"Second opinion{CLEAR_AND_RETITLE}",
                      "date": "2024-01-01", "section": [{"title": f"Review{EIGHT_BIT_CSI}", "text": {
                          "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>ok&#27;[2J{EIGHT_BIT_CSI}</p></div>'}}]}},
        {"resource": {"resourceType": "Organization", "name": f"Spine{CLEAR_AND_RETITLE} Center"}}]}
    text = render_opinion(doc, with_patient=False)
    assert_clean(text)
    assert "Spine Center" in text and "Second opinion" in text


@pytest.fixture
def package(sites, tmp_path):
    site = sites["a"]
    iss = {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.7.1", "display": f"Hospital A{CLEAR_AND_RETITLE}"}
    doc = jws.sign_bundle(_document(), site.private, who={"identifier": iss, "display": iss["display"]},
                          when="2024-01-01T00:00:00Z")
    data = envelope.seal(typ=envelope.PACKAGE, claims=_claims(iss), document=doc, signer=site.private,
                         recipient=sites["reviewer_public"])
    d = tmp_path / "pkg-ctl"
    d.mkdir()
    (d / envelope.ENVELOPE_FILE).write_bytes(data)
    return d


def test_reviewer_open_prints_no_control_characters(sites, package, capsys):
    code = cli.main(["reviewer", "open", str(package), "--key", str(sites["key_file"]),
                     "--trust", str(sites["a"].public_file)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert_clean(out + err)
    assert "signature: valid" in out and "Anna Example" in out and "Lumbar stenosis" in out
