"""An opinion's narrative is filed into the chart, where an EHR viewer renders it as HTML: every known bypass
of the old regular-expression check is refused, naming what was refused, and nothing reaches the EHR.
Ordinary narrative (tables, lists, emphasis, https links, relative images) still goes through.

The R4 rules: https://hl7.org/fhir/R4/narrative.html#xhtml (txt-1, txt-2).
"""
from __future__ import annotations

import pytest

from fhirbridge.errors import RejectedOpinion
from fhirbridge.loop.receive import receive_bytes
from fhirbridge.loop.writeback import OPINION_ID_SYSTEM
from tests.kit.hospital import craft_opinion

pytestmark = pytest.mark.sekmet

XHTML = 'xmlns="http://www.w3.org/1999/xhtml"'

# (what the reviewer's tool wrote inside the section's <div>, words the refusal must contain)
BYPASSES = {
    "slash-separated event attribute": ('<img src="x"/onerror=alert(1)>', "onerror"),
    "entity-encoded javascript: URL": ('<a href="&#106;avascript:alert(1)">x</a>', "javascript"),
    "tab inside the scheme": ('<a href="java\tscript:alert(1)">x</a>', "javascript"),
    "named entity for the colon": ('<a href="javascript&colon;alert(1)">x</a>', "javascript"),
    "unknown element with an event": ("<details/open/ontoggle=alert(1)>x</details>", "details"),
    "svg animation setting href": ('<svg><set attributeName="href" to="javascript:alert(1)"/></svg>', "svg"),
}


@pytest.fixture
def case(hospital, seeded):
    return hospital.delivered_case(seeded["patient"])


def _with_section_div(body: str):
    def change(doc):
        doc["entry"][0]["resource"]["section"][0]["text"]["div"] = f"<div {XHTML}>{body}</div>"
    return change


def filed_notes(fhir, jti: str) -> int:
    """DocumentReferences in the EHR carrying this opinion's identifier (what the file step would write)."""
    return sum(1 for r in fhir.search("DocumentReference", {"identifier": f"{OPINION_ID_SYSTEM}|urn:uuid:{jti}"})
               if r["resourceType"] == "DocumentReference")


def _crafted(hospital, case, doc) -> tuple[bytes, str]:
    seen: dict = {}
    data = craft_opinion(hospital, case, doc=doc, claims=lambda c: seen.update(jti=c["jti"]))
    return data, seen["jti"]


@pytest.mark.parametrize("body, words", BYPASSES.values(), ids=BYPASSES.keys())
def test_narrative_bypass_is_refused_and_nothing_is_filed(hospital, case, fhir, body, words):
    task_version = fhir.read_ref(case.task)["meta"]["versionId"]
    data, jti = _crafted(hospital, case, _with_section_div(body))
    with pytest.raises(RejectedOpinion, match="not safe XHTML") as err:
        receive_bytes(hospital.app, data)
    assert words in str(err.value).lower()
    hospital.run(intake=False)
    fresh = hospital.app.store.get(case.id)
    assert fresh.step == "await_opinion" and fresh.opinion_id is None
    assert fhir.read_ref(case.task)["meta"]["versionId"] == task_version
    assert filed_notes(fhir, jti) == 0


def test_unsafe_narrative_on_any_resource_of_the_opinion_is_refused(hospital, case, fhir):
    """Not only the Composition's sections: the whole document is filed as a Binary in the chart."""
    def on_the_organization(doc):
        org = next(e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] == "Organization")
        org["text"] = {"status": "generated", "div": f'<div {XHTML}><a href="javascript&colon;x()">site</a></div>'}
    data, jti = _crafted(hospital, case, on_the_organization)
    with pytest.raises(RejectedOpinion, match="javascript"):
        receive_bytes(hospital.app, data)
    assert filed_notes(fhir, jti) == 0


def test_ordinary_narrative_is_accepted_and_filed(hospital, case, fhir):
    body = ("<p>Review of <b>MRI</b> and <i>CT</i>: <em>agree</em>, <strong>urgent</strong>.</p>"
            "<table><thead><tr><th>Level</th><th>Finding</th></tr></thead>"
            '<tbody><tr><td colspan="1">L4-L5</td><td>stenosis</td></tr></tbody></table>'
            "<ul><li>one</li><li>two</li></ul><ol><li>first</li></ol>"
            '<p>See <a href="https://www.example.org/guideline">the guideline</a> and <a href="#refs">refs</a>.</p>'
            '<p><img src="figure-1.png" alt="figure 1"/></p>')
    data, jti = _crafted(hospital, case, _with_section_div(body))
    receive_bytes(hospital.app, data)
    hospital.run(intake=False)
    assert hospital.app.store.get(case.id).step == "done"
    assert filed_notes(fhir, jti) == 1
