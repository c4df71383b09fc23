"""More records on a reviewer's request (issue 16 part 2): the physician's answer and the `supplement` step.

A reviewer asks with a CDex data request Task (ehr/data_request.py). The physician answers it on the physician
page or the staff API (`answer_request`): by ticking further records (`candidates`: what the Case's collection
profile lets out now that the first package did not carry, the result of the request's FHIR query pre-ticked)
and/or by uploading a document (PDF or plain text). The answer is kept with the Case (the records' references
in the store, the document encrypted to the hospital's own key in the Case directory) and the Case moves to
`supplement`, which a worker runs (`supplement_step`, safe to repeat from its start):

1. the uploaded document is written to the EHR as a DocumentReference FIRST, exactly once under every write
   plan (`write_document`): ATOMIC puts it to an id derived from the Case, the request and the document's
   SHA-256 (update-as-create; found by reading it first); LEDGER and ONCE post it once, recorded in the write
   ledger before the POST (`supplement.DocumentReference.sent`), with If-None-Exist on its identifier where
   the EHR honours it; a POST whose answer was lost is reconciled by searching, never by a second POST: by
   identifier (LEDGER), or, where the EHR has no identifier search (ONCE), by the patient's DocumentReferences
   with the identifier compared here. That search is the one collect itself relies on, so every EHR fhirbridge
   serves has it;
2. the records are collected again with the profile's rules and the patient's Consents, exactly as for the
   first package (loop/collect.py, the records the physician ticked no longer held back as deselected), and
   only the chosen ones (and the records they refer to) are kept; a chosen record the rules now withhold is
   listed as withheld with its reason, as in the first package;
3. they are sealed (loop/seal.py: signed, encrypted to the same reviewer) with `supplement_of` the first
   package, the request, and each item "added on request" in the signed manifest (`supplement.sealed`), and
   delivered like the first package (`supplement.delivered`); the disclosure is accounted for (BALP);
4. the request Task is completed with one output per record sent; the Case awaits the opinion again.

Which supplement is sealed is kept in a small work file per request: a repeat after `supplement.sealed`
delivers the same package (the outbox leaves an existing one alone; HTTPS has an Idempotency-Key per file).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhirbridge import jsonutil
from fhirbridge.config.mappings import Profile
from fhirbridge.crypto import jwe
from fhirbridge.crypto.files import private_dir
from fhirbridge.ehr import audit, data_request
from fhirbridge.ehr.context import App
from fhirbridge.ehr.data_request import BadRequest
from fhirbridge.ehr.task import CASE_ID_SYSTEM, now_iso
from fhirbridge.ehr.write_plan import Kind
from fhirbridge.errors import FhirbridgeError, FhirError
from fhirbridge.exchange.envelope import write_atomic
from fhirbridge.exchange.transport import deliver
from fhirbridge.fhir.elements import iter_references
from fhirbridge.loop import checklist, guards
from fhirbridge.loop.collect import Collected, collect, find_attachments, has_collected, load_collected
from fhirbridge.loop.result import StepResult
from fhirbridge.loop.seal import package_dir, seal_case
from fhirbridge.ops.crashpoints import crash_point
from fhirbridge.steps import Step
from fhirbridge.store.store import Case

ADDED = "added on request"
NOT_CHOSEN = "in the EHR, not chosen by the referring physician"
DOCUMENT_SYSTEM = CASE_ID_SYSTEM + ":supplement-document"
UPLOAD_TYPES = ("application/pdf", "text/plain")
# One document, inline in the DocumentReference (no Binary: see step 1), base64 in the API's 16 MB request.
MAX_UPLOAD = 10 * 1024 * 1024
UPLOAD_TYP = "fhirbridge-upload+jwe"
LOINC = "http://loinc.org"


@dataclass(frozen=True)
class Upload:
    title: str
    content_type: str
    data: bytes
    code: tuple[str, str] | None = None    # a LOINC document code (from the profile's checklist) or None


def _dir(app: App, case: Case, task_ref: str) -> Path:
    return app.case_dir(case.id) / "supplement" / hashlib.sha256(task_ref.encode()).hexdigest()[:16]


def _ledger_kind(task_ref: str) -> str:
    return "supplement." + hashlib.sha256(task_ref.encode()).hexdigest()[:16]


# --- what the physician may add ----------------------------------------------------------------------------

def already_sent(app: App, case: Case) -> set[str]:
    """What the reviewer has: the first package's records and every supplement's."""
    sent: set[str] = set()
    if has_collected(app, case):
        sent |= {f"{r['resourceType']}/{r['id']}" for r in load_collected(app, case).resources}
    for s in (case.data or {}).get("supplements", []):
        sent |= set(s.get("sent", []))
    return sent


def candidates(app: App, case: Case, request: data_request.Request | None = None) -> dict[str, Any]:
    """{"records": [{"ref", "resource", "proposed"}], "query_error": str | None}: the records the profile lets
    out now (the patient's Consents applied) that the reviewer does not have yet; those the request's query
    finds are `proposed` (pre-ticked). A query is run for the Case's patient only."""
    sr = app.ehr.read_ref(case.service_request)
    consents = guards.check_consent(app, case, sr)
    now = collect(app, sr, app.profile(case.profile), consents=consents, keep_deselected=True)
    sent = already_sent(app, case)
    proposed, error = set(), None
    if request is not None and request.query:
        try:
            proposed = run_query(app, case, request.query)
        except (BadRequest, FhirError) as exc:
            error = f"the reviewer's query could not be run: {exc}"
    primary = set(app.profile(case.profile).rules)
    records = [{"ref": ref, "resource": r, "proposed": ref in proposed}
               for r in now.resources for ref in [f"{r['resourceType']}/{r['id']}"]
               if r["resourceType"] in primary and ref not in sent]
    records.sort(key=lambda x: (not x["proposed"], x["ref"]))
    return {"records": records, "query_error": error}


def run_query(app: App, case: Case, query: str) -> set[str]:
    """The reviewer's FHIR query, for the Case's patient (the patient parameter is always ours)."""
    data_request.clean_query(query, case.patient)
    rtype, params = data_request.parse_query(query)
    params = [(k, v) for k, v in params if k not in ("patient", "subject")] + [("patient", case.patient)]
    return {f"{r['resourceType']}/{r['id']}" for r in app.ehr.search(rtype, params) if r.get("resourceType") == rtype}


# --- the physician's answer --------------------------------------------------------------------------------

def check_upload(upload: Upload) -> Upload:
    if upload.content_type not in UPLOAD_TYPES:
        raise BadRequest("the document is a PDF or a plain text file")
    if not upload.data:
        raise BadRequest("the document is empty")
    if len(upload.data) > MAX_UPLOAD:
        raise BadRequest(f"the document is at most {MAX_UPLOAD // (1024 * 1024)} MB")
    if upload.content_type == "application/pdf" and not upload.data.startswith(b"%PDF-"):
        raise BadRequest("the file is not a PDF")
    if upload.content_type == "text/plain":
        try:
            upload.data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("a text document must be UTF-8") from None
    title = " ".join(upload.title.split())[:200] or "Document supplied on the reviewer's request"
    return dataclasses.replace(upload, title=title)


def answer_request(app: App, case: Case, task_ref: str, *, records: list[str], upload: Upload | None,
                   actor: str) -> Case:
    """The physician's answer to a request: checked, kept, and the Case moved to `supplement`."""
    if case.step != Step.AWAIT_OPINION:
        raise BadRequest(f"Case {case.id[:8]} is {case.step}: a request is answered while the Case awaits the opinion")
    _task, req = data_request.read_request(app, case, task_ref)
    if not req.is_open:
        raise BadRequest(f"the request {task_ref} is {req.status}: it was answered already")
    records = sorted(set(records))
    if records:
        offered = {c["ref"] for c in candidates(app, case)["records"]}
        unknown = [r for r in records if r not in offered]
        if unknown:
            raise BadRequest(f"{unknown[0]} is not a record this Case can send")
    if upload is not None:
        upload = check_upload(upload)
    if not records and upload is None:
        raise BadRequest("tick at least one record or add a document")
    spec: dict[str, Any] = {"task": task_ref, "records": records, "by": actor, "document": None}
    if upload is not None:
        digest = hashlib.sha256(upload.data).hexdigest()
        body = jsonutil.dumps({"title": upload.title, "content_type": upload.content_type,
                               "code": list(upload.code) if upload.code else None,
                               "data": base64.b64encode(upload.data).decode("ascii")})
        private_dir(_dir(app, case, task_ref))   # 0700: the document is PHI, even encrypted
        write_atomic(_dir(app, case, task_ref) / "upload.jwe",
                     jwe.encrypt_bytes(body, app.hospital_keys.encryption_keys(), typ=UPLOAD_TYP))
        spec["document"] = {"sha256": digest}
    return app.store.update(case.id, step=Step.SUPPLEMENT.value, last_error=None, next_attempt_at=None, attempts=0,
                            data={"supplement": spec}, event_kind="records.answered",
                            detail={"task": task_ref, "records": len(records), "document": upload is not None,
                                    "by": actor})


# --- the step ---------------------------------------------------------------------------------------------

def supplement_step(app: App, case: Case) -> StepResult:
    spec = (case.data or {}).get("supplement")
    if not spec:
        raise FhirbridgeError(f"Case {case.id[:8]} is at supplement with no answer to send")
    sr = guards.check_order(app, case)
    guards.show_step_on_task(app, case)
    consents = guards.check_consent(app, case, sr)
    task_ref = spec["task"]
    chosen = list(spec["records"])
    if spec.get("document"):
        chosen.append(write_document(app, case, spec))          # FIRST: the document is in the chart
    work = _dir(app, case, task_ref)
    sealed_file = work / "sealed.json"
    if sealed_file.exists():
        sealed = jsonutil.loads(sealed_file.read_bytes())
    else:
        _task, req = data_request.read_request(app, case, task_ref)
        profile = app.profile(case.profile)
        now = collect(app, sr, profile, consents=consents, keep_deselected=True)
        sup = select(app, now, chosen, profile, already_sent(app, case))
        extra = {"supplement_of": case.package_id, ADDED.replace(" ", "_"): [
                     {"reference": f"{r['resourceType']}/{r['id']}", "reason": ADDED} for r in sup.resources
                     if f"{r['resourceType']}/{r['id']}" in set(chosen)],
                 "request": {"task": task_ref, "text": req.text, **({"query": req.query} if req.query else {})}}
        package_id, summary = seal_case(app, case, sup, extra_manifest=extra, due_at=case.due_at)
        private_dir(work)
        sealed = {"package_id": package_id, "sent": extra[ADDED.replace(" ", "_")], "summary": summary}
        write_atomic(sealed_file, jsonutil.dumps(sealed))
        crash_point("supplement.sealed")
    package_id = sealed["package_id"]
    sent = [a["reference"] for a in sealed["sent"]]
    sup_case = dataclasses.replace(case, package_id=package_id)
    detail = deliver(app.config.reviewer(case.reviewer), package_dir(app, sup_case), package_id)
    audit.record_disclosure(app, sup_case, detail)
    crash_point("supplement.delivered")
    if app.write_plan.task_write:
        data_request.complete(app, case, task_ref, sent)
    # The Case keeps each supplement (references and ids only), once however often the step is repeated.
    done = [s for s in (case.data or {}).get("supplements", []) if s.get("task") != task_ref]
    app.store.update(case.id, data={"supplements": [*done, {"task": task_ref, "package_id": package_id,
                                                            "sent": sent, "by": spec.get("by")}],
                                    "open_requests": [r for r in data_request.open_refs(case) if r != task_ref]})
    return StepResult({"task": task_ref, "package_id": package_id, "supplement_of": case.package_id,
                       "records": len(sent), **{k: sealed["summary"].get(k) for k in ("shared", "withheld")},
                       **{k: detail.get(k) for k in ("transport", "already_delivered") if k in detail}})


def select(app: App, now: Collected, chosen: list[str], profile: Profile, sent: set[str]) -> Collected:
    """The supplement's records: the chosen ones the rules let out, with the records they refer to; a chosen
    record the rules withhold is listed with its reason (the first package's rule: POLICY reasons are never
    named to the reviewer, seal keeps to `disclosable_withheld`)."""
    by_ref = {f"{r['resourceType']}/{r['id']}": r for r in now.resources}
    wanted = [r for r in chosen if r in by_ref]
    keep: dict[str, dict] = {}
    # The order's requester and organisation travel too: the supplement names the referring physician as the
    # first package does (loop/document.py referring_physician reads them from the records).
    ordered = ["/".join(t.split("/")[-2:]) for t in iter_references(now.service_request)]
    frontier = wanted + [r for r in ordered if r in by_ref and r.split("/")[0] not in profile.rules]
    for _depth in range(3):
        nxt = []
        for ref in frontier:
            if ref in keep:
                continue
            keep[ref] = by_ref[ref]
            for target in iter_references(by_ref[ref]):
                local = target.split("/")[-2:] if "/" in target else []
                key = "/".join(local)
                if key in by_ref and key not in keep and (key not in sent or key.split("/")[0] not in profile.rules):
                    nxt.append(key)
        frontier = nxt
    withheld = [w for w in now.withheld if w["reference"] in set(chosen)]
    withheld += [{"reference": r, "reason": "not found in the EHR"} for r in chosen
                 if r not in by_ref and r not in {w["reference"] for w in withheld}]
    resources = list(keep.values())
    kept = {f"{r['resourceType']}/{r['id']}" for r in resources}
    # The checklist as the reviewer now has it (the first package's records and this one's); a record the rules
    # let out that the reviewer still does not have was not chosen by the physician.
    have = sent | kept
    entries = []
    for e in now.checklist:
        got = [r for r in e["records"] if r in have]
        held = e["withheld"] + [{"reference": r, "reason": NOT_CHOSEN} for r in e["records"] if r not in have]
        status = checklist.INCLUDED if got else checklist.WITHHELD if held else checklist.NOT_FOUND
        entries.append({**e, "records": got, "withheld": held, "status": status})
    return dataclasses.replace(now, resources=resources, withheld=withheld, imaging=[], checklist=entries,
                               attachments=list(find_attachments(app, resources)))


# --- the document, written first, exactly once ----------------------------------------------------------

def write_document(app: App, case: Case, spec: dict) -> str:
    task_ref = spec["task"]
    digest = spec["document"]["sha256"]
    ident = f"{case.id}/{task_ref.split('/')[-1]}/{digest[:32]}"
    kind = _ledger_kind(task_ref)
    row = app.store.ledger(case.id).get(kind)
    if row and row["state"] == "confirmed":
        return str(row["server_id"])
    plan = app.write_plan
    if plan.kind is Kind.ATOMIC:
        # Update-as-create to an id of ours: a repeat finds it and writes nothing.
        rid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{DOCUMENT_SYSTEM}|{ident}"))
        try:
            app.ehr.read("DocumentReference", rid)
        except FhirError as exc:
            if exc.status not in (404, 410):
                raise
            app.ehr.update({**_document(app, case, spec, ident), "id": rid})
        ref = f"DocumentReference/{rid}"
        app.store.ledger_record(case.id, kind, identifier=f"{DOCUMENT_SYSTEM}|{ident}", state="confirmed",
                                server_id=ref)
        app.store.add_event(case.id, "records.document", {"document_reference": ref})
        return ref
    if row and row["state"] == "sent":
        found = _find_document(app, case, ident, by_identifier=plan.kind is Kind.LEDGER)
        if found:
            app.store.ledger_record(case.id, kind, identifier=f"{DOCUMENT_SYSTEM}|{ident}", state="confirmed",
                                    server_id=found)
            app.store.add_event(case.id, "write.reconciled", {"kind": "supplement document", "found": found})
            return found
        # Not in the EHR, searched for: the earlier POST never landed; sending it is safe.
    resource = _document(app, case, spec, ident)
    app.store.ledger_record(case.id, kind, identifier=f"{DOCUMENT_SYSTEM}|{ident}", state="sent", sent=True)
    crash_point("supplement.DocumentReference.sent")
    try:
        stored, _ = app.ehr.create(resource, if_none_exist=f"identifier={DOCUMENT_SYSTEM}|{ident}"
                                   if plan.capabilities.conditional_create else None)
    except FhirError as exc:
        if exc.status is None or (exc.status >= 500 and exc.status != 503):
            raise FhirError(f"the document may have been written ({exc}); it will be looked for before anything "
                            "is sent again", status=exc.status, transient=True) from None
        app.store.ledger_record(case.id, kind, identifier=f"{DOCUMENT_SYSTEM}|{ident}", state="intended")
        raise
    if (stored.get("subject") or {}).get("reference") != case.patient:
        raise FhirbridgeError(f"DocumentReference/{stored.get('id')} carries this document's identifier but belongs "
                              "to another patient; not sending")
    ref = f"DocumentReference/{stored['id']}"
    app.store.ledger_record(case.id, kind, identifier=f"{DOCUMENT_SYSTEM}|{ident}", state="confirmed", server_id=ref)
    app.store.add_event(case.id, "records.document", {"document_reference": ref})
    return ref


def _find_document(app: App, case: Case, ident: str, *, by_identifier: bool) -> str | None:
    params = {"identifier": f"{DOCUMENT_SYSTEM}|{ident}"} if by_identifier else {"patient": case.patient}
    for doc in app.ehr.search("DocumentReference", params):
        if doc.get("resourceType") == "DocumentReference" and any(
                i.get("system") == DOCUMENT_SYSTEM and i.get("value") == ident for i in doc.get("identifier", [])):
            return f"DocumentReference/{doc['id']}"
    return None


def _document(app: App, case: Case, spec: dict, ident: str) -> dict:
    up = jsonutil.loads(jwe.decrypt_bytes(_dir(app, case, spec["task"]).joinpath("upload.jwe").read_bytes(),
                                          app.hospital_keys))
    data = base64.b64decode(up["data"])
    code = up.get("code")
    doc: dict[str, Any] = {
        "resourceType": "DocumentReference", "status": "current", "docStatus": "final",
        "identifier": [{"system": DOCUMENT_SYSTEM, "value": ident}],
        "type": ({"coding": [{"system": code[0], "code": code[1]}], "text": up["title"]} if code
                 else {"text": up["title"]}),
        "subject": {"reference": case.patient}, "date": now_iso(), "description": up["title"],
        # R4 Attachment.hash is the SHA-1 of the data, base64.
        "content": [{"attachment": {"contentType": up["content_type"], "title": up["title"], "size": len(data),
                                    "hash": base64.b64encode(hashlib.sha1(data).digest()).decode("ascii"),
                                    "data": up["data"], "creation": now_iso()}}],
        "context": {"related": [{"reference": case.service_request}]},
    }
    if (spec.get("by") or "").startswith(("Practitioner/", "PractitionerRole/")):
        doc["author"] = [{"reference": spec["by"]}]
    return doc
