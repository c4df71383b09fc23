"""What the physician's pages show, read from the EHR (through fhirbridge's own client) and the Case store:
the patient banner, the records an order would share, a Case's progress, and the filed opinion.

Nothing here is logged: these are clinical contents, shown to the physician who opened the chart.
"""
from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

from fhirbridge.ehr import data_request
from fhirbridge.ehr.context import App
from fhirbridge.ehr.order import excluded_records
from fhirbridge.errors import ConsentDenied
from fhirbridge.fhir.elements import clinical_date, concept_text, question_of, summary_line
from fhirbridge.loop import checklist, consent, supplement
from fhirbridge.loop.collect import Collected, collect
from fhirbridge.loop.consent import POLICY
from fhirbridge.loop.document import SECTIONS
from fhirbridge.steps import Step
from fhirbridge.store.store import Case
from fhirbridge.ui.sanitize import safe_xhtml

# The records a physician can deselect: those the profile's searches find (the package's sections), not
# the Practitioners, Organizations, results and Medications they point at, which travel to make them legible.
GROUPS = [(title, types) for title, _code, types in SECTIONS if types != ("ServiceRequest",)]


def when(epoch: float | None) -> str:
    return time.strftime("%d %b %Y, %H:%M UTC", time.gmtime(epoch)) if epoch else ""


def day_of(epoch: float | None) -> str:
    return time.strftime("%d %b %Y", time.gmtime(epoch)) if epoch else ""


@dataclass
class Banner:
    name: str
    details: list[str]


def banner(patient: dict) -> Banner:
    name: dict = next(iter(patient.get("name", [])), {})
    text = name.get("text") or " ".join([*name.get("given", []), name.get("family", "")]).strip() or "(no name)"
    mrn = next((i.get("value") for i in patient.get("identifier", [])
                if any(c.get("code") == "MR" for c in i.get("type", {}).get("coding", []))), None)
    mrn_text = (mrn if mrn.upper().startswith("MRN") else f"MRN {mrn}") if mrn else ""
    details = [patient.get("gender", "").capitalize(),
               f"Born {patient['birthDate']}" if patient.get("birthDate") else "", mrn_text]
    return Banner(name=text, details=[d for d in details if d])


# --- the preview ----------------------------------------------------------------------------------------

@dataclass
class Preview:
    groups: list[tuple[str, list[dict]]]            # (section title, [{"ref", "summary", "date"}])
    supporting: dict[str, int]                      # type -> count of referenced records that travel along
    withheld: list[dict]                            # {"ref", "summary", "reason"}
    consent_note: str | None = None
    offered: list[str] = field(default_factory=list)
    checklist: list[dict] = field(default_factory=list)   # loop/checklist.py for_physician: what the reviewer expects


def preview(app: App, patient: str, profile: str, reviewer: str) -> Preview:
    """Run the real collection rules (and the patient's Consents for this reviewer) on a draft order: what
    the collect step would share if the order were placed now."""
    draft: dict[str, Any] = {"resourceType": "ServiceRequest", "id": "draft",
                             "subject": {"reference": f"Patient/{patient}"}}
    note = None
    try:
        consents = consent.check(app, draft["subject"]["reference"], app.config.reviewer(reviewer))
    except ConsentDenied as exc:
        consents, note = None, str(exc)
    if note:
        return Preview(groups=[], supporting={}, withheld=[], consent_note=note)
    got: Collected = collect(app, draft, app.profile(profile), consents=consents)
    primary = {t for _title, types in GROUPS for t in types}
    groups: list[tuple[str, list[dict]]] = []
    offered: list[str] = []
    supporting: dict[str, int] = {}
    for title, types in GROUPS:
        items = [_item(r) for r in got.resources if r["resourceType"] in types]
        if items:
            groups.append((title, items))
            offered += [i["ref"] for i in items]
    for r in got.resources:
        if r["resourceType"] not in primary:
            kind = SUPPORTING.get(r["resourceType"], r["resourceType"])
            supporting[kind] = supporting.get(kind, 0) + 1
    return Preview(groups=groups, supporting=supporting, withheld=_withheld(app, got.withheld), offered=offered,
                   checklist=checklist.for_physician(got.checklist))


def _item(r: dict) -> dict:
    moment, summary = clinical_date(r), summary_line(r)
    shown = moment is not None and moment.strftime("%Y-%m-%d") not in summary   # most summaries say when
    return {"ref": f"{r['resourceType']}/{r['id']}", "summary": summary,
            "date": moment.strftime("%d %b %Y") if moment is not None and shown else ""}


# What the supporting records are, in words a physician uses.
SUPPORTING = {"Practitioner": "clinicians", "PractitionerRole": "clinicians' roles", "Organization": "organisations",
              "Observation": "results", "Medication": "medications", "Endpoint": "image archive addresses",
              "Specimen": "specimens", "Location": "locations"}


def _withheld(app: App, withheld: list[dict]) -> list[dict]:
    found = read_many(app, [w["reference"] for w in withheld if "not found" not in w["reason"]])
    out = []
    for w in withheld:
        r = found.get(w["reference"])
        out.append({"ref": w["reference"], "summary": summary_line(r) if r else w["reference"],
                    "reason": w["reason"].removeprefix(POLICY)})
    return out


def read_many(app: App, refs: list[str]) -> dict[str, dict]:
    """Resources by "Type/id", one `_id` search per type (batches of 50)."""
    by_type: dict[str, list[str]] = {}
    for ref in refs:
        t, _, rid = ref.partition("/")
        by_type.setdefault(t, []).append(rid)
    out: dict[str, dict] = {}
    for t, ids in by_type.items():
        for i in range(0, len(ids), 50):
            for r in app.ehr.search(t, {"_id": ",".join(ids[i:i + 50])}):
                if r.get("resourceType") == t:
                    out[f"{t}/{r['id']}"] = r
    return out


# --- Cases -----------------------------------------------------------------------------------------------

def cases_for(app: App, patient: str) -> list[Case]:
    return sorted(app.store.list_cases(hospital=app.hospital.key, patient=f"Patient/{patient}"),
                  key=lambda c: c.created_at, reverse=True)


STATUS: dict[str, tuple[str, str]] = {
    Step.COLLECT: ("Collecting records", ""), Step.SEAL: ("Preparing the package", ""),
    Step.DELIVER: ("Sending", ""), Step.AWAIT_OPINION: ("With the reviewer", ""),
    Step.FILE: ("Opinion received", "ok"),
    Step.NEEDS_REVIEW: ("Opinion received; staff are checking that it is in the chart", "warn"),
    Step.SUPPLEMENT: ("Sending the records the reviewer asked for", ""),
    Step.AWAIT_RECORDS: ("Waiting: records the reviewer needs are missing", "warn"),
    Step.DONE: ("Opinion filed", "ok"), Step.FAILED: ("Stopped", "bad"),
    Step.CANCELLED: ("Cancelled", "warn"), Step.DECLINED: ("Declined by the reviewer", "warn")}


def status_of(case: Case) -> tuple[str, str]:
    label, tone = STATUS.get(case.step, (case.step, ""))
    if case.step == Step.AWAIT_OPINION and data_request.open_refs(case):
        return "The reviewer asks for more records", "warn"
    if case.overdue_at and case.step == Step.AWAIT_OPINION:
        return "Overdue", "warn"
    return label, tone


# --- more records on the reviewer's request (issue 16 part 2) --------------------------------------------

def record_requests(app: App, case: Case) -> list[dict]:
    """The reviewer's requests, newest first; for an open one, what could answer it (the query's result ticked)
    and the document kinds the profile's checklist names (so an uploaded document counts for its item)."""
    if not data_request.open_refs(case) and not (case.data or {}).get("supplements"):
        return []
    kinds = [(f"{e.codes[0][0]}|{e.codes[0][1]}", e.name) for e in app.profile(case.profile).expect if e.codes]
    sent = {s["task"]: s for s in (case.data or {}).get("supplements", [])}
    out = []
    for req in reversed(data_request.requests_for(app, case)):
        item: dict[str, Any] = {"req": req, "id": req.task.split("/", 1)[1], "sent": sent.get(req.task),
                                "candidates": [], "query_error": None, "kinds": kinds}
        if req.is_open and case.step == Step.AWAIT_OPINION:
            offered = supplement.candidates(app, case, req)
            item["candidates"] = [{**_item(c["resource"]), "proposed": c["proposed"]} for c in offered["records"]]
            item["query_error"] = offered["query_error"]
        out.append(item)
    return out


def order_summary(sr: dict, app: App) -> dict:
    held_back = sorted(excluded_records(sr))
    found = read_many(app, held_back) if held_back else {}
    return {"question": question_of(sr), "authored": sr.get("authoredOn"), "priority": sr.get("priority"),
            "held_back": [summary_line(found[r]) if r in found else r for r in held_back]}


def timeline(app: App, case: Case, reviewer_display: str, ordered_by: str | None = None) -> list[dict]:
    """The referral's milestones, each done (with when), in progress, or still to come."""
    events = app.store.events(case.id)
    first: dict[str, dict] = {}
    for e in events:
        first.setdefault(e["kind"], e)
    # A Case a profile held (issue 16 part 6) was collected too: its collect ended in checklist.held.
    first.setdefault("collect.done", first.get("checklist.held") or {})
    if not first["collect.done"]:
        del first["collect.done"]
    collected = first.get("collect.done", {}).get("detail", {})
    shared = sum((collected.get("counts") or {}).values())
    due = f"answer due by {when(case.due_at)}" if case.due_at else ""
    # (key, label once done, label while in progress, event, detail, the Case steps during which it is current)
    steps = [
        ("ordered", "Ordered", "Ordered", first.get("opened"), f"by {ordered_by}" if ordered_by else "", ()),
        ("collected", "Records collected", "Collecting the records", first.get("collect.done"),
         f"{shared} records shared, {collected.get('withheld', 0)} withheld" if collected else
         "waiting for records the reviewer needs" if case.step == Step.AWAIT_RECORDS else "",
         ("collect", "await_records")),
        ("sent", f"Sent to {reviewer_display}", f"Sealing and sending to {reviewer_display}",
         first.get("deliver.done"), due, ("seal", "deliver")),
        ("received", "Opinion received", "Waiting for the reviewer's opinion", first.get("opinion.received"),
         "", ("await_opinion",)),
        ("filed", "Filed in the chart", "Filing the opinion in the chart", first.get("file.done"), "", ("file",)),
    ]
    out = []
    for e in events:
        if e["kind"] == "records.requested":
            steps.insert(-2, ("asked", "The reviewer asked for more records", "", e, "", ()))
        elif e["kind"] == "supplement.done":
            n = (e["detail"] or {}).get("records", 0)
            steps.insert(-2, ("supplement", "More records sent on request", "", e, f"{n} record(s) added", ()))
    for key, done_label, current_label, event, detail, current_steps in steps:
        state = "done" if event else ("current" if case.step in current_steps else "pending")
        if key == "received" and state == "current":
            detail = due
        out.append({"key": key, "label": current_label if state == "current" else done_label, "state": state,
                    "at": when(event["at"]) if event else "", "detail": detail if state != "pending" else ""})
    return out


# --- the filed opinion ----------------------------------------------------------------------------------

def filed_opinion(app: App, case: Case) -> dict | None:
    """The opinion as filed in the chart: the FHIR document the DocumentReference points at (a Binary)."""
    if case.step != "done" or not case.document_reference:
        return None
    docref = app.ehr.read_ref(case.document_reference)
    url = next((c["attachment"]["url"] for c in docref.get("content", [])
                if c.get("attachment", {}).get("contentType", "").startswith("application/fhir+json")
                and c["attachment"].get("url", "").startswith("Binary/")), None)
    if url is None:
        return None
    binary = app.ehr.read_ref(url)
    document = json.loads(base64.b64decode(binary.get("data", "")))
    return opinion_view(document)


def opinion_view(document: dict) -> dict:
    entries = [e.get("resource", {}) for e in document.get("entry", [])]
    comp = entries[0] if entries and entries[0].get("resourceType") == "Composition" else {}
    author = next((r.get("name") for r in entries if r.get("resourceType") == "Organization"), "")
    coded = [{"label": concept_text(o.get("code")), "value": concept_text(o.get("valueCodeableConcept"))}
             for o in entries if o.get("resourceType") == "Observation"]
    sections = [{"title": s.get("title", ""), "html": safe_xhtml(s.get("text", {}).get("div", ""))}
                for s in comp.get("section", [])]
    return {"title": comp.get("title", "Second opinion"), "author": author, "date": comp.get("date", ""),
            "coded": coded, "sections": sections}

