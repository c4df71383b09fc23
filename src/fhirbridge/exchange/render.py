"""Plain-text renderings: the reviewer's summary of a package, and the opinion for EHRs that show only text.

Both are made of text from outside (the EHR's records, the reviewer's answer), so both go through
`terminal_safe`, and so does every other line of outside text the CLI prints."""
from __future__ import annotations

import re
import time
from html import unescape

from fhirbridge.exchange.envelope import due_at, party, priority, requester_line, urgency_rank
from fhirbridge.fhir.elements import concept_text, summary_line

# What a terminal acts on rather than shows (ECMA-48): CSI sequences (ESC [ or the 8-bit CSI), control strings
# (OSC, DCS, SOS, PM, APC up to BEL or ST: window titles, hyperlinks), other escape sequences, and every other
# C0 control but tab and newline, DEL and C1 control. A record could otherwise clear the reviewer's screen,
# retitle the window, or move the cursor to write over lines of the summary (a withheld record, a warning).
_TERMINAL_CONTROLS = re.compile(
    r"(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]"
    r"|(?:\x1b[\]P^_X]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)"
    r"|\x1b[\x20-\x2f]*[\x30-\x7e]"
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """`text` without terminal control characters and escape sequences (newline and tab are kept): for text
    from the EHR, a package or a reviewer on its way to a terminal or a plain-text note."""
    return _TERMINAL_CONTROLS.sub("", text)


def _entries(document: dict) -> list[dict]:
    return [e["resource"] for e in document.get("entry", []) if "resource" in e]


def _by_type(document: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in _entries(document):
        out.setdefault(r["resourceType"], []).append(r)
    return out


def patient_line(p: dict) -> str:
    name: dict = next(iter(p.get("name", [])), {})
    text = name.get("text") or " ".join([*name.get("given", []), name.get("family", "")]).strip() or "(no name)"
    mrn = next((i.get("value") for i in p.get("identifier", [])
                if any(c.get("code") == "MR" for c in i.get("type", {}).get("coding", []))), None)
    mrn = mrn or next((i.get("value") for i in p.get("identifier", [])), "")
    parts = [text, p.get("gender", ""), f"born {p['birthDate']}" if p.get("birthDate") else "",
             f"id {mrn}" if mrn else ""]
    return ", ".join(x for x in parts if x)


def _when(epoch) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch)) if epoch else "?"


def render_package(claims: dict, document: dict, *, sender: str | None = None) -> str:
    """The package as text. `sender` is who verifiably sent it (`OpenedPackage.sender`); without it the
    package's own claim is shown, marked as unverified."""
    m = claims.get("manifest", {})
    t = _by_type(document)
    lines = [f"Second-opinion referral  (package {claims.get('package_id')})",
             *supplement_lines(m),
             f"From: {sender or str(party(claims, 'iss').get('display')) + ' (not verified)'}    "
             f"To: {party(claims, 'aud').get('display')}",
             f"Sent: {_when(claims.get('iat'))}    Answer by: {_when(due_at(claims))}",
             f"Priority: {priority(claims)}{'  (URGENT: answer first)' if urgency_rank(priority(claims)) < 3 else ''}",
             f"Referring physician: {requester_line(claims) or '(not named)'}",
             f"Collection profile: {m.get('profile')} (lookback {m.get('lookback_days')} days)", ""]
    for p in t.get("Patient", []):
        lines.append(f"Patient: {patient_line(p)}")
    lines += ["", "Question:", *[f"  {q}" for q in (m.get("question") or "(none given)").splitlines()], ""]
    lines += checklist_lines(m)
    refs = {f"{r['resourceType']}/{r.get('id')}": r for r in _entries(document)}

    def block(title: str, items: list[dict], detail=None) -> None:
        lines.append(f"{title} ({len(items)}):")
        if not items:
            lines.append("  none")
        for r in items:
            lines.append(f"  - {summary_line(r)}")
            for extra in (detail(r) if detail else []):
                lines.append(f"      {extra}")
        lines.append("")

    block("Problems", t.get("Condition", []))
    block("Diagnostic reports", t.get("DiagnosticReport", []), lambda r: report_detail(r, refs))
    block("Imaging studies", t.get("ImagingStudy", []), lambda r: imaging_detail(r, refs))
    block("Procedures", t.get("Procedure", []))
    block("Medications", t.get("MedicationStatement", []) + t.get("MedicationRequest", []))
    files = {a["url"]: a for a in m.get("attachments", [])}
    block("Clinical notes", t.get("DocumentReference", []), lambda r: _note_detail(r, files))
    withheld = m.get("withheld", [])
    lines.append(f"Withheld ({len(withheld)}): the record is partial" if withheld else "Withheld: nothing listed")
    for w in withheld:
        lines.append(f"  - {w['reference']}: {w['reason']}")
    if m.get("policy_note"):
        lines.append(f"  {m['policy_note']}")
    return terminal_safe("\n".join(lines) + "\n")


def supplement_lines(manifest: dict) -> list[str]:
    """A supplement (issue 16 part 2, loop/supplement.py) says first what it adds to: the records the reviewer
    asked for, each "added on request"."""
    if not manifest.get("supplement_of"):
        return []
    request = manifest.get("request") or {}
    added = manifest.get("added_on_request") or []
    out = [f"NEW RECORDS: a supplement to package {manifest['supplement_of']}, {len(added)} record(s) added on "
           "request; answer the first package"]
    if request.get("text"):
        out.append(f"You asked: {' '.join(str(request['text']).split())}")
    return out


# The packet's checklist (issue 16 part 6, loop/checklist.py writes it): the words per status.
CHECKLIST_WORDS = {"included": "included", "withheld": "withheld", "not_found": "not found in the EHR"}


def checklist_item(entry: dict) -> str:
    """"Discharge summary of an earlier stay: withheld (older than the 730-day lookback window)"."""
    status = str(entry.get("status"))
    text = f"{entry.get('item')}: {CHECKLIST_WORDS.get(status, status)}"
    if status == "withheld" and entry.get("reasons"):
        text += f" ({'; '.join(str(r) for r in entry['reasons'])})"
    if status == "included" and entry.get("records"):
        text += f" ({len(entry['records'])})"
    return text + ("  [required]" if entry.get("required") else "")


def checklist_lines(manifest: dict) -> list[str]:
    """The checklist first: what the reviewer of this specialty expects, and what came of each item."""
    items = manifest.get("checklist") or []
    if not items:
        return []
    missing = sum(1 for e in items if e.get("status") != "included")
    head = f"Checklist ({len(items) - missing} of {len(items)} expected records included):"
    out = [head, *[f"  [{'x' if e.get('status') == 'included' else ' '}] {checklist_item(e)}" for e in items]]
    if manifest.get("sent_without"):
        out.append(f"  The referring physician confirmed sending without: {', '.join(manifest['sent_without'])}")
    return [*out, ""]


def report_detail(r: dict, refs: dict) -> list[str]:
    out = []
    for res in r.get("result", []):
        obs = refs.get(res.get("reference", ""))
        if obs:
            q = obs.get("valueQuantity")
            value = (f"{q.get('value')} {q.get('unit', '')}".strip() if q
                     else concept_text(obs.get("valueCodeableConcept")))
            out.append(f"{concept_text(obs.get('code'))}: {value}")
    for form in r.get("presentedForm", []):
        out.append(f"report document: {form.get('title') or form.get('contentType')}")
    return out


def imaging_detail(r: dict, refs: dict) -> list[str]:
    out = []
    for s in r.get("series", []):
        body = concept_text({"coding": [s["bodySite"]]}) if s.get("bodySite") else ""
        out.append(f"series {s.get('number', '')} {s.get('modality', {}).get('code', '')} uid {s.get('uid')}"
                   f"{' - ' + body if body else ''}, {s.get('numberOfInstances', len(s.get('instance', [])))} images")
    for e in r.get("endpoint", []):
        ep = refs.get(e.get("reference", ""))
        address = ep.get("address") if ep else e.get("reference")
        out.append(f"images at: {address}")
    return out


def _note_detail(r: dict, files: dict) -> list[str]:
    out = []
    for c in r.get("content", []):
        a = c.get("attachment", {})
        where = "inline" if a.get("data") else files.get(a.get("url", ""), {}).get("file", a.get("url", ""))
        out.append(f"attachment: {a.get('title') or '(untitled)'} [{a.get('contentType')}] {where}")
    return out


def _div_text(div: str) -> str:
    # A line break inside a list item continues that item: indent it under the bullet.
    div = re.sub(r"<li>(.*?)</li>", lambda m: "<li>" + re.sub(r"<br\s*/?>", "\n    ", m.group(1)) + "</li>", div,
                 flags=re.S)
    text = re.sub(r"<br\s*/?>", "\n", div)
    text = re.sub(r"</(p|li|tr|h\d)>", "\n", text)
    text = re.sub(r"<li>", "  - ", text)
    text = re.sub(r"<[^>]+>", "", text)
    return "\n".join(line.rstrip() for line in unescape(text).splitlines() if line.strip())


def render_opinion(document: dict, *, with_patient: bool = True) -> str:
    """`with_patient=False` for the copy filed in the chart: the note sits on the patient there, and the
    Patient in the document is the reviewer's copy, which nothing vouches for."""
    entries = _entries(document)
    comp = entries[0] if entries and entries[0]["resourceType"] == "Composition" else {}
    author = next((r.get("name") for r in entries if r["resourceType"] == "Organization"), "")
    lines = [comp.get("title", "Second opinion"), f"Reviewer: {author}"]
    if with_patient:
        lines.append(f"Patient: {next((patient_line(r) for r in entries if r['resourceType'] == 'Patient'), '')}")
    lines += [f"Date: {comp.get('date', '')}", ""]
    for s in comp.get("section", []):
        lines.append(s.get("title", ""))
        lines.append("-" * len(s.get("title", "")))
        lines.append(_div_text(s.get("text", {}).get("div", "")))
        lines.append("")
    return terminal_safe("\n".join(lines))
