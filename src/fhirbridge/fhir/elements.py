"""Reading FHIR JSON (resources as dicts): codings, clinical dates, references, display text.

Public helpers that collect, consent, the document, the reviewer's rendering and the pages all need; they
know FHIR R4, not fhirbridge.
"""
from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

# Where each type keeps its clinical date (what a lookback window is measured against), first present wins.
DATE_PATHS: dict[str, tuple[str, ...]] = {
    "Condition": ("recordedDate", "onsetDateTime", "onsetPeriod.start"),
    "DiagnosticReport": ("effectiveDateTime", "effectivePeriod.start", "issued"),
    "ImagingStudy": ("started",),
    "Procedure": ("performedDateTime", "performedPeriod.start", "performedPeriod.end"),
    "MedicationStatement": ("effectiveDateTime", "effectivePeriod.end", "effectivePeriod.start", "dateAsserted"),
    "MedicationRequest": ("authoredOn",),
    "DocumentReference": ("date", "context.period.start"),
}


def question_of(service_request: dict) -> str:
    """The clinical question: the order's notes, else its reason text."""
    notes = [n.get("text", "") for n in service_request.get("note", []) if n.get("text")]
    if notes:
        return "\n".join(notes)
    reasons = [r.get("text") or next((c.get("display") for c in r.get("coding", []) if c.get("display")), "")
               for r in service_request.get("reasonCode", [])]
    return "\n".join(r for r in reasons if r)


def has_coding(res: dict, fields: tuple[str, ...], wanted: tuple[tuple[str, str], ...]) -> bool:
    want = set(wanted)
    for f in fields:
        value = res.get(f)
        for cc in value if isinstance(value, list) else [value] if value else []:
            for c in cc.get("coding", []):
                if (c.get("system"), c.get("code")) in want:
                    return True
    return False


def clinical_date(res: dict) -> datetime | None:
    for path in DATE_PATHS.get(res.get("resourceType", ""), ()):
        value: Any = res
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str):
            parsed = parse_fhir_date(value)
            if parsed:
                return parsed
    return None


def parse_fhir_date(value: str) -> datetime | None:
    """FHIR date/dateTime/instant (YYYY, YYYY-MM, YYYY-MM-DD, full) -> aware datetime (UTC if no zone)."""
    try:
        if len(value) == 4:
            return datetime(int(value), 1, 1, tzinfo=UTC)
        if len(value) == 7:
            return datetime(int(value[:4]), int(value[5:7]), 1, tzinfo=UTC)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except ValueError:
        return None


def iter_references(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        ref = obj.get("reference")
        if isinstance(ref, str):
            yield ref
        for k, v in obj.items():
            if k != "contained":
                yield from iter_references(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from iter_references(v)


def concept_text(cc: dict | None) -> str:
    if not cc:
        return ""
    return cc.get("text") or next((c.get("display") or c.get("code") for c in cc.get("coding", [])
                                   if c.get("display") or c.get("code")), "")


def summary_line(r: dict) -> str:
    """One human line per record, for narratives and the reviewer's summary."""
    t = r["resourceType"]
    if t == "DiagnosticReport":
        when = r.get("effectiveDateTime") or r.get("issued") or ""
        line = f"{concept_text(r.get('code'))} ({r.get('status')}, {when[:10]})"
        return line + (f": {r['conclusion']}" if r.get("conclusion") else "")
    if t == "ImagingStudy":
        mods = ",".join(m.get("code", "") for m in r.get("modality", []))
        uid = next((i["value"] for i in r.get("identifier", []) if i.get("system") == "urn:dicom:uid"), "")
        return (f"{r.get('description') or concept_text((r.get('procedureCode') or [None])[0])} [{mods}] "
                f"{(r.get('started') or '')[:10]} study {uid.removeprefix('urn:oid:')}, "
                f"{r.get('numberOfSeries', len(r.get('series', [])))} series")
    if t == "Procedure":
        when = r.get("performedDateTime") or r.get("performedPeriod", {}).get("start", "")
        return f"{concept_text(r.get('code'))} ({r.get('status')}, {when[:10]})"
    if t in ("MedicationStatement", "MedicationRequest"):
        med = concept_text(r.get("medicationCodeableConcept")) or r.get("medicationReference", {}).get("display", "")
        dosage = "; ".join(d.get("text", "") for d in (r.get("dosage") or r.get("dosageInstruction") or [])
                           if d.get("text"))
        return f"{med or 'medication'} ({r.get('status')}){': ' + dosage if dosage else ''}"
    if t == "Condition":
        status = concept_text(r.get("clinicalStatus"))
        return f"{concept_text(r.get('code'))}{' (' + status + ')' if status else ''}"
    if t == "DocumentReference":
        return f"{concept_text(r.get('type')) or r.get('description', 'document')} ({(r.get('date') or '')[:10]})"
    if t == "ServiceRequest":
        return question_of(r)
    return f"{t}/{r.get('id')}"
