"""File the opinion in the EHR: ONE transaction, idempotent (US Core "Writing Clinical Notes"; not IHE MHD:
no SubmissionSet List, PUTs where ITI-65 POSTs, extra entries; docs/architecture.md §11 says what ITI-65 needs).

The transaction holds: the opinion document as a `Binary` (application/fhir+json, securityContext the
Patient), a `DocumentReference` (type 11488-4, subject the Patient, context.related the ServiceRequest,
masterIdentifier and identifier the opinion's id, attachments: the FHIR document by URL and a plain-text
rendering inline), a `Provenance` (author the reviewer, transmitter fhirbridge, signed over its targets),
and the Task set to `completed` with `output`.

Provenance.signature is "a digital signature on the target Reference(s)" (R4 provenance.html): one per
target, in `target` order, each a detached JWS by the hospital's key (the transmitter, on the hospital's
behalf) over the target as written, canonicalized "#static" (RFC 8785 without `meta` and `text`, which the
EHR may set), so anyone with the hospital's public keys (or the `x5c` chain) can check what fhirbridge
filed. *Changed:* it used to carry the reviewer's Bundle.signature, which covers the opinion document, not
the Provenance's targets. That signature is still in the chart: the Binary holds the document as signed,
Bundle.signature included, and verifies with the reviewer's keys.

Why a Binary with a client-assigned id rather than a `Bundle` resource: a document Bundle holds its own
urn:uuid fullUrls, which some servers try to resolve as transaction references and reject; and not every
server rewrites urn:uuid in `attachment.url` (R4 http.html#trules asks it to), so the Binary gets an id we
choose and the DocumentReference names it as `Binary/<id>` directly. The id is derived here from the Case
and the message id, never taken from the reviewer's document: a chosen id could overwrite any Binary.

Why it can never file twice, in one read and one transaction:
- the Binary and the DocumentReference are PUTs to ids derived here from the Case and the opinion id, so the
  same opinion always lands on the same two resources (a repeat overwrites them with the same content);
- the Task entry is a PUT with `ifMatch` on the version we read: a second identical transaction (a retry
  after a lost response, a second worker) fails with 409/412 (FHIR R4 http.html#concurrency);
- the one read is the Task's: the transaction completes it with an output naming our DocumentReference, so
  a completed Task naming it means filed, and nothing else does (not our note existing: see below).
*Changed (issue 14):* this used to assume "any failure rolls back every entry" (R4 #transaction) and, after a
409/412, to conclude "filed" from our note existing. Servers exist that run a transaction as a batch (HTTP
200, one entry 412) or do not roll back: then the note and the Provenance are written and the Task is not.
Now every entry's status is checked (FhirClient.transaction: PartialTransaction); a conflict or a partial
answer re-reads the Task and, unless it is completed naming our note, fails transiently; when the answer shows
a partial write (refused entries, or our note there after a 409/412) the retry searches our Provenance
(`target` our note, entity the opinion's jti) and leaves it out if it is there, so it is never posted twice,
and completes the Task. An EHR that does this should be pinned `transaction_atomic = false` (plan LEDGER).
*Changed:* the DocumentReference used to be a conditional create on the opinion identifier, preceded by a
search for it. That cost a round trip per opinion, and a note elsewhere carrying the same identifier would
have been matched by the condition (the Task then pointing at another patient's note). With a derived id
nothing of anyone else's can ever be matched or overwritten.
The identifier is put in `identifier` as well as `masterIdentifier` because the R4 `identifier` search
parameter of some servers covers only the former.
"""
from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass

from fhirbridge import jsonutil
from fhirbridge.crypto import jws
from fhirbridge.ehr.context import App
from fhirbridge.ehr.task import STATUS, business_status, now_iso
from fhirbridge.errors import FhirbridgeError, FhirError, PartialTransaction
from fhirbridge.exchange import envelope
from fhirbridge.exchange.render import render_opinion
from fhirbridge.loop.receive import opinion_path
from fhirbridge.ops.crashpoints import crash_point
from fhirbridge.steps import Step
from fhirbridge.store.store import Case

OPINION_ID_SYSTEM = "urn:ietf:rfc:3986"
# Case.data flag: a write-back transaction of this Case was written in part (the server did not roll it back).
PARTIAL = "file_partial_write"
FORMAT_CODE = {"system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode",
               "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient", "display": "mimeType Sufficient"}
PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
US_CORE_PARTICIPANT = "http://hl7.org/fhir/us/core/CodeSystem/us-core-provenance-participant-type"


def find_filed(app: App, case: Case, identifier_value: str) -> str | None:
    """The DocumentReference already filed for this opinion, if any. It must be this Case's (patient and
    order): an identifier found on another patient's note is a collision to stop at, not a filed opinion."""
    for res in app.ehr.search("DocumentReference", {"identifier": f"{OPINION_ID_SYSTEM}|{identifier_value}"}):
        if res.get("resourceType") != "DocumentReference":
            continue
        related = {r.get("reference") for r in res.get("context", {}).get("related", [])}
        if res.get("subject", {}).get("reference") == case.patient and case.service_request in related:
            return f"DocumentReference/{res['id']}"
        raise FhirbridgeError(f"DocumentReference/{res['id']} already carries opinion identifier "
                              f"{identifier_value} but belongs to another patient or order; not filing")
    return None


def binary_id_for(case: Case, opinion_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:fhirbridge:case:{case.id}/opinion/{opinion_id}"))


def docref_id_for(case: Case, opinion_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:fhirbridge:case:{case.id}/opinion/{opinion_id}/note"))


@dataclass(frozen=True)
class Filed:
    """Where the opinion is in the chart after the write-back."""

    document_reference: str            # "DocumentReference/<id>": our note
    already_filed: bool = False        # it was there before this run (a repeat after a lost answer)
    binary: str | None = None          # the FHIR document's Binary, when this run wrote it
    task_completed: bool = False       # the Task is completed with the note as output (in the same write)

    def detail(self) -> dict[str, object]:
        out: dict[str, object] = {"document_reference": self.document_reference}
        if self.already_filed:
            out["already_filed"] = True
        if self.binary:
            out["binary"] = self.binary
        return out


def open_opinion(app: App, case: Case) -> tuple[dict, dict]:
    """The received opinion's (claims, document), re-verified at rest: the file could have been altered."""
    path = opinion_path(app, case)
    if not path.exists():
        raise FhirbridgeError(f"the received opinion {case.opinion_id} is missing from {path.parent}; restore it "
                              "from backup (replicas must share data_dir), then `fhirbridge retry`")
    return envelope.open_sealed(path.read_bytes(), typ=envelope.OPINION, decrypt=app.hospital_keys,
                                trusted=app.reviewer_keys(case.reviewer), check_expiry=False)


def file_opinion(app: App, case: Case) -> Filed:
    """Plan ATOMIC (ehr/write_plan.py): one transaction."""
    # The file step runs on a Case that has accepted its opinion, and the runner made its Task first.
    assert case.opinion_id is not None
    claims, document = open_opinion(app, case)
    ours = f"DocumentReference/{docref_id_for(case, case.opinion_id)}"
    if case.task is None:
        return _file_without_task(app, case, claims, document, ours)
    ident = f"urn:uuid:{case.opinion_id}"   # receive checked that the document's identifier is exactly this
    task = app.ehr.read_ref(case.task)
    filed = filed_per_task(task, ours)
    if filed is None and task.get("status") == "completed":
        filed = find_filed(app, case, ident)   # completed some other way (by hand, or an older fhirbridge)
    if filed:
        return Filed(filed, already_filed=True, task_completed=True)
    version = task.get("meta", {}).get("versionId")
    tx = build_transaction(app, case, claims, document, task)
    if version:
        tx["entry"][-1]["request"]["ifMatch"] = f'W/"{version}"'
    if case.data.get(PARTIAL):
        # An earlier attempt was written in part (the server did not roll it back): its Provenance may be in
        # the chart already. Reuse it rather than post a second one (the PUTs to our ids repeat harmlessly).
        _drop_written_provenance(app, tx, ours, claims)
    try:
        app.ehr.transaction(tx)
    except FhirError as exc:
        if exc.status in (409, 412) or isinstance(exc, PartialTransaction):
            # Filed means the Task says so (completed, its output naming our note), never that our note
            # exists: a server without rollback (or running the transaction as a batch) may have written the
            # Binary, the note and the Provenance and refused the Task. Re-read it; if it is not completed,
            # the retry reuses what was written (_drop_written_provenance) and completes the Task.
            filed = filed_per_task(app.ehr.read_ref(case.task), ours)
            if filed:
                return Filed(filed, already_filed=True, task_completed=True)
            # Only evidence of a partial write makes the retry search for a Provenance: an atomic server's
            # 409/412 (the Task edited meanwhile) wrote nothing, and the atomic plan's scopes need no search.
            if isinstance(exc, PartialTransaction) or _exists(app, ours):
                app.store.update(case.id, data={PARTIAL: True}, event_kind="file.partial",
                                 detail={"error": str(exc)})
            raise FhirError(f"the write-back was not completed ({exc}); will reconcile and retry",
                            status=exc.status, transient=True) from None
        raise
    crash_point("file.committed")
    return Filed(ours, binary=f"Binary/{binary_id_for(case, case.opinion_id)}", task_completed=True)


def _exists(app: App, ref: str) -> bool:
    try:
        app.ehr.read_ref(ref)
        return True
    except FhirError as exc:
        if exc.status in (404, 410):
            return False
        raise


def _file_without_task(app: App, case: Case, claims: dict, document: dict, ours: str) -> Filed:
    """No Task write on this EHR (write plan task_write False): the transaction holds the Binary, the note and
    the Provenance. Being atomic, our note at its derived id means all of it is in the chart: that read
    replaces the Task's."""
    assert case.opinion_id is not None
    if _exists(app, ours):
        return Filed(ours, already_filed=True)
    tx = build_transaction(app, case, claims, document, None)
    app.ehr.transaction(tx)
    crash_point("file.committed")
    return Filed(ours, binary=f"Binary/{binary_id_for(case, case.opinion_id)}")


def filed_per_task(task: dict, docref: str) -> str | None:
    """`docref` if the Task is completed with an output naming it (our transaction did that)."""
    if task.get("status") != "completed":
        return None
    refs = {(o.get("valueReference") or {}).get("reference") for o in task.get("output", [])}
    return docref if docref in refs else None


def find_provenance(app: App, docref: str, opinion_jti: str) -> str | None:
    """Our Provenance for this opinion, if one is in the chart: it targets our note and names the sealed
    opinion (its jti) as its source entity."""
    for res in app.ehr.search("Provenance", {"target": docref}):
        if res.get("resourceType") != "Provenance":
            continue
        whats = {((e.get("what") or {}).get("identifier") or {}).get("value") for e in res.get("entity", [])}
        if f"urn:uuid:{opinion_jti}" in whats:
            return f"Provenance/{res['id']}"
    return None


def _drop_written_provenance(app: App, tx: dict, docref: str, claims: dict) -> None:
    if find_provenance(app, docref, claims["jti"]):
        tx["entry"] = [e for e in tx["entry"] if e["resource"]["resourceType"] != "Provenance"]


def note_fields(app: App, case: Case, document: dict, created: str) -> dict:
    """The consult note's DocumentReference elements, but its id and content (every plan files the same)."""
    assert case.opinion_id is not None
    identifier = {"system": OPINION_ID_SYSTEM, "value": f"urn:uuid:{case.opinion_id}"}
    comp = document["entry"][0]["resource"]
    reviewer = app.config.reviewer(case.reviewer)
    return {
        "masterIdentifier": identifier,
        "identifier": [identifier],
        "status": "current", "docStatus": "final",
        "type": comp["type"],
        "category": comp.get("category", []),
        "subject": {"reference": case.patient},
        "date": created,  # an instant in R4 (Composition.date may be a bare date)
        "author": [reviewer.organization_ref()],
        "custodian": app.hospital.organization_ref(),
        "description": f"Second opinion from {reviewer.display}",
        "context": {"related": [{"reference": case.service_request}]},
    }


def build_provenance(app: App, case: Case, claims: dict, targets: list[dict], created: str) -> dict:
    """The Provenance of the filed note: `targets` as written (each with its id), one signature per target."""
    reviewer = app.config.reviewer(case.reviewer)
    transmitter = {"display": "fhirbridge"}
    hospital_ref = app.hospital.organization_ref()
    # One signature per target, in target order; the signer is the transmitter agent (R4: "the signer should
    # match a Provenance.agent"), acting for the hospital.
    signatures = [jws.sign_resource(target, app.hospital_keys, who=transmitter, on_behalf_of=hospital_ref,
                                    when=created, x5c=app.hospital_x5c) for target in targets]
    return {
        "resourceType": "Provenance",
        "target": [{"reference": f"{t['resourceType']}/{t['id']}"} for t in targets],
        "recorded": created,
        "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                                 "code": "CREATE", "display": "create"}]},
        "agent": [
            {"type": {"coding": [{"system": PARTICIPANT, "code": "author", "display": "Author"}]},
             "who": reviewer.organization_ref()},
            # US Core Provenance: the system that sent the data on the author's behalf is the transmitter.
            {"type": {"coding": [{"system": US_CORE_PARTICIPANT, "code": "transmitter", "display": "Transmitter"}]},
             "who": transmitter, "onBehalfOf": hospital_ref},
        ],
        "entity": [{"role": "source", "what": {"identifier": {"system": OPINION_ID_SYSTEM,
                                                              "value": f"urn:uuid:{claims['jti']}"},
                                               "display": "Sealed second opinion as received"}}],
        "signature": signatures,
    }


def completed_task(task: dict, docref_ref: str, created: str) -> dict:
    """The Task as the write-back leaves it: completed, its output naming our note (without meta)."""
    status, code, display = STATUS[Step.DONE]
    task = dict(task)
    task.update({"status": status, "lastModified": created,
                 "businessStatus": business_status(code, display),
                 "output": [{"type": {"text": "Second opinion"},
                             "valueReference": {"reference": docref_ref}}]})
    period = task.setdefault("executionPeriod", {})
    period.setdefault("start", created)
    period["end"] = created
    task.pop("meta", None)
    return task


def build_transaction(app: App, case: Case, claims: dict, document: dict, task: dict | None) -> dict:
    """The ATOMIC plan's transaction; without `task` (no Task write on this EHR) it has no Task entry."""
    assert case.opinion_id is not None  # built only for a Case that has accepted its opinion
    binary_id = binary_id_for(case, case.opinion_id)
    binary_ref = f"Binary/{binary_id}"
    docref_ref = f"DocumentReference/{docref_id_for(case, case.opinion_id)}"
    prov_url = f"urn:uuid:{uuid.uuid4()}"
    doc_json = jsonutil.dumps(document)
    text = render_opinion(document, with_patient=False).encode("utf-8")
    created = now_iso()
    binary = {"resourceType": "Binary", "id": binary_id, "contentType": "application/fhir+json",
              "securityContext": {"reference": case.patient},
              "data": base64.b64encode(doc_json).decode("ascii")}

    docref = {"resourceType": "DocumentReference", "id": docref_ref.split("/")[1],
              **note_fields(app, case, document, created), "content": [
                  {"attachment": {**attachment("application/fhir+json", doc_json, "Second opinion (FHIR document)",
                                                created, inline=False), "url": binary_ref},
                   "format": FORMAT_CODE},
                  {"attachment": attachment("text/plain; charset=utf-8", text, "Second opinion (text)", created)},
              ]}
    provenance = build_provenance(app, case, claims, [docref, binary], created)
    entries = [
        {"resource": binary, "request": {"method": "PUT", "url": binary_ref}},
        {"resource": docref, "request": {"method": "PUT", "url": docref_ref}},
        {"fullUrl": prov_url, "resource": provenance, "request": {"method": "POST", "url": "Provenance"}},
    ]
    if task is not None:
        done = completed_task(task, docref_ref, created)
        entries.append({"resource": done, "request": {"method": "PUT", "url": f"Task/{done['id']}"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def attachment(content_type: str, data: bytes, title: str, created: str, *, inline: bool = True) -> dict:
    att = {"contentType": content_type, "title": title, "creation": created, "size": len(data),
           # R4 Attachment.hash is the base64 SHA-1 of the data.
           "hash": base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")}
    if inline:
        att["data"] = base64.b64encode(data).decode("ascii")
    return att
