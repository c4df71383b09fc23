"""What a reviewer reads: an opened package turned into plain values for the templates.

Everything shown is taken from the verified document and its signed manifest; text is escaped by Jinja.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fhirbridge.exchange import envelope
from fhirbridge.exchange.render import imaging_detail, patient_line, report_detail
from fhirbridge.fhir.elements import clinical_date, concept_text, summary_line

KIND_LABELS = {"Condition": "Problem", "DiagnosticReport": "Report", "ImagingStudy": "Imaging",
               "Procedure": "Procedure", "MedicationStatement": "Medication", "MedicationRequest": "Medication",
               "DocumentReference": "Note"}
TEXT_TYPES = ("text/plain", "text/markdown", "text/csv")


@dataclass
class Attachment:
    index: int
    title: str
    content_type: str
    size: int | None
    inline_text: str | None = None      # shown in the page (small text notes)

    @property
    def is_pdf(self) -> bool:
        return self.content_type.split(";")[0].strip() == "application/pdf"

    @property
    def is_text(self) -> bool:
        return self.content_type.split(";")[0].strip() in TEXT_TYPES


@dataclass
class Item:
    kind: str
    date: str
    title: str
    status: str = ""
    details: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)      # (label, url)
    attachments: list[Attachment] = field(default_factory=list)


@dataclass
class RecordView:
    package_id: str
    case_id: str
    hospital: str
    sent: float | None
    answer_by: float | None
    patient: str
    questions: list[str]
    problems: list[Item]
    timeline: list[Item]
    imaging: list[Item]
    medications: list[Item]
    withheld: list[dict]
    policy_note: str | None
    profile: str | None
    priority: str = "routine"                                  # the order's R4 request-priority
    urgent: bool = False                                       # stat, asap or urgent
    requester: dict = field(default_factory=dict)              # envelope.requester: name, organisation, telecom


def _date(r: dict) -> str:
    d = clinical_date(r)
    return d.date().isoformat() if d else ""


def questions_of(text: str | None) -> list[str]:
    """The questions asked: one per non-empty line of the order's question."""
    return [q.strip() for q in (text or "").splitlines() if q.strip()]


def _dosage(r: dict) -> list[str]:
    doses = r.get("dosage") or r.get("dosageInstruction") or []
    return [d.get("text") or concept_text(d.get("route")) for d in doses if d.get("text") or d.get("route")]


def build(opened, *, attachment_text) -> RecordView:
    """`attachment_text(index)` gives the decoded text of a small text attachment (None if not shown inline)."""
    claims, manifest = opened.claims, opened.manifest
    entries = [e["resource"] for e in opened.document.get("entry", []) if "resource" in e]
    refs = {f"{r['resourceType']}/{r.get('id')}": r for r in entries}
    by_type: dict[str, list[dict]] = {}
    for r in entries:
        by_type.setdefault(r["resourceType"], []).append(r)
    patient = next((patient_line(p) for p in by_type.get("Patient", [])), "(no patient in the package)")

    atts = attachments_of(opened)
    att_by_url: dict[str, list[Attachment]] = {}
    for a, url in atts:
        if a.is_text:
            a.inline_text = attachment_text(a.index)
        att_by_url.setdefault(url, []).append(a)

    def item(r: dict, details: list[str] | None = None) -> Item:
        return Item(kind=KIND_LABELS.get(r["resourceType"], r["resourceType"]), date=_date(r),
                    title=summary_line(r), status=r.get("status", ""), details=details or [])

    timeline: list[Item] = []
    for r in by_type.get("DiagnosticReport", []):
        timeline.append(item(r, report_detail(r, refs)))
    for r in by_type.get("Procedure", []):
        timeline.append(item(r, [concept_text(b) for b in r.get("bodySite", [])]))
    for r in by_type.get("DocumentReference", []):
        it = item(r)
        for c in r.get("content", []):
            url = c.get("attachment", {}).get("url") or f"inline:{r.get('id')}"
            it.attachments += att_by_url.get(url, [])
        timeline.append(it)
    imaging = []
    for r in by_type.get("ImagingStudy", []):
        it = item(r, imaging_detail(r, refs))
        for e in r.get("endpoint", []):
            ep = refs.get(e.get("reference", ""))
            if ep and ep.get("address", "").startswith(("http://", "https://")):
                it.links.append(("DICOMweb (WADO-RS)", ep["address"]))
        imaging.append(it)
    timeline += imaging
    timeline.sort(key=lambda i: i.date, reverse=True)
    meds = [item(r, _dosage(r)) for r in by_type.get("MedicationStatement", []) + by_type.get("MedicationRequest", [])]
    return RecordView(
        package_id=str(claims.get("package_id")), case_id=str(claims.get("case_id")),
        hospital=opened.sender, sent=claims.get("iat"), answer_by=envelope.due_at(claims),
        patient=patient, questions=questions_of(manifest.get("question")),
        problems=[item(r) for r in by_type.get("Condition", [])], timeline=timeline, imaging=imaging,
        medications=meds, withheld=list(manifest.get("withheld", [])), policy_note=manifest.get("policy_note"),
        profile=manifest.get("profile"), priority=envelope.priority(claims),
        urgent=envelope.urgency_rank(envelope.priority(claims)) < len(envelope.URGENT),
        requester=envelope.requester(claims))


def attachments_of(opened) -> list[tuple[Attachment, str]]:
    """Every attachment of the package, numbered: the separately encrypted files of the manifest first, then
    those inline in the document (DocumentReference attachment.data). Returns (Attachment, its url key)."""
    out: list[tuple[Attachment, str]] = []
    for att in opened.manifest.get("attachments", []):
        if "dicom" in att:
            continue            # a DICOM series: shown by the image viewer (reviewer/images.html), not here
        out.append((Attachment(len(out), att.get("title") or att["file"].rsplit("/", 1)[-1], att["content_type"],
                               att.get("size")), att["url"]))
    binaries = {f"Binary/{e['resource'].get('id')}": e["resource"] for e in opened.document.get("entry", [])
                if e.get("resource", {}).get("resourceType") == "Binary"}
    for e in opened.document.get("entry", []):
        r = e.get("resource", {})
        if r.get("resourceType") != "DocumentReference":
            continue
        for c in r.get("content", []):
            a = c.get("attachment", {})
            if a.get("data"):
                out.append((Attachment(len(out), a.get("title") or "note", a.get("contentType", "text/plain"),
                                       a.get("size")), f"inline:{r.get('id')}"))
            elif a.get("url") in binaries:
                out.append((Attachment(len(out), a.get("title") or a["url"],
                                       binaries[a["url"]].get("contentType", a.get("contentType", "")),
                                       a.get("size")), a["url"]))
    return out
