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
  after a lost response, a second worker) fails as a whole with 409/412 (FHIR R4 http.html#concurrency and
  #transaction: any failure rolls back every entry), so the Provenance is never posted twice;
- the one read is the Task's: the transaction completes it with an output naming our DocumentReference, so
  a completed Task naming it means filed; after a conflict we read our DocumentReference by its id.
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
from fhirbridge.ehr import audit
from fhirbridge.ehr.context import App
from fhirbridge.ehr.task import STATUS, business_status, now_iso
from fhirbridge.errors import FhirbridgeError, FhirError
from fhirbridge.exchange import envelope
from fhirbridge.exchange.render import render_opinion
from fhirbridge.loop.receive import opinion_path
from fhirbridge.loop.result import StepResult
from fhirbridge.ops.crashpoints import crash_point
from fhirbridge.steps import Step
from fhirbridge.store.store import Case

OPINION_ID_SYSTEM = "urn:ietf:rfc:3986"
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


def file_opinion(app: App, case: Case) -> Filed:
    # The file step runs on a Case that has accepted its opinion, and the runner made its Task first.
    assert case.opinion_id is not None and case.task is not None
    path = opinion_path(app, case)
    if not path.exists():
        raise FhirbridgeError(f"the received opinion {case.opinion_id} is missing from {path.parent}; restore it "
                              "from backup (replicas must share data_dir), then `fhirbridge retry`")
    data = path.read_bytes()
    # Re-verified at rest: the file could have been altered since it was received.
    claims, document = envelope.open_sealed(data, typ=envelope.OPINION, decrypt=app.hospital_keys,
                                            trusted=app.reviewer_keys(case.reviewer), check_expiry=False)
    ident = f"urn:uuid:{case.opinion_id}"   # receive checked that the document's identifier is exactly this
    ours = f"DocumentReference/{docref_id_for(case, case.opinion_id)}"
    task = app.ehr.read_ref(case.task)
    filed = _filed_per_task(task, ours)
    if filed is None and task.get("status") == "completed":
        filed = find_filed(app, case, ident)   # completed some other way (by hand, or an older fhirbridge)
    if filed:
        return Filed(filed, already_filed=True, task_completed=True)
    version = task.get("meta", {}).get("versionId")
    tx = build_transaction(app, case, claims, document, task)
    if version:
        tx["entry"][-1]["request"]["ifMatch"] = f'W/"{version}"'
    try:
        app.ehr.transaction(tx)
    except FhirError as exc:
        if exc.status in (409, 412):
            if _is_ours(app, case, ours):
                return Filed(ours, already_filed=True)
            # The Task changed under us (someone edited it): nothing was written; retry with a fresh read.
            raise FhirError(f"the Task changed while filing ({exc}); will retry", status=exc.status,
                            transient=True) from None
        raise
    crash_point("file.committed")
    return Filed(ours, binary=f"Binary/{binary_id_for(case, case.opinion_id)}", task_completed=True)


def _filed_per_task(task: dict, docref: str) -> str | None:
    """`docref` if the Task is completed with an output naming it (our transaction did that)."""
    if task.get("status") != "completed":
        return None
    refs = {(o.get("valueReference") or {}).get("reference") for o in task.get("output", [])}
    return docref if docref in refs else None


def _is_ours(app: App, case: Case, docref: str) -> bool:
    """Our DocumentReference exists, on this Case's patient and order (read by its derived id)."""
    try:
        res = app.ehr.read_ref(docref)
    except FhirError as exc:
        if exc.status in (404, 410):
            return False
        raise
    related = {r.get("reference") for r in res.get("context", {}).get("related", [])}
    return res.get("subject", {}).get("reference") == case.patient and case.service_request in related


def build_transaction(app: App, case: Case, claims: dict, document: dict, task: dict) -> dict:
    assert case.opinion_id is not None  # built only for a Case that has accepted its opinion
    ident_value = f"urn:uuid:{case.opinion_id}"
    identifier = {"system": OPINION_ID_SYSTEM, "value": ident_value}
    binary_id = binary_id_for(case, case.opinion_id)
    binary_ref = f"Binary/{binary_id}"
    docref_ref = f"DocumentReference/{docref_id_for(case, case.opinion_id)}"
    prov_url = f"urn:uuid:{uuid.uuid4()}"
    doc_json = jsonutil.dumps(document)
    text = render_opinion(document, with_patient=False).encode("utf-8")
    comp = document["entry"][0]["resource"]
    reviewer = app.config.reviewer(case.reviewer)
    created = now_iso()
    binary = {"resourceType": "Binary", "id": binary_id, "contentType": "application/fhir+json",
              "securityContext": {"reference": case.patient},
              "data": base64.b64encode(doc_json).decode("ascii")}

    docref = {
        "resourceType": "DocumentReference",
        "id": docref_ref.split("/")[1],
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
        "content": [
            {"attachment": {**_attachment("application/fhir+json", doc_json, "Second opinion (FHIR document)",
                                          created, inline=False), "url": binary_ref},
             "format": FORMAT_CODE},
            {"attachment": _attachment("text/plain; charset=utf-8", text, "Second opinion (text)", created)},
        ],
        "context": {"related": [{"reference": case.service_request}]},
    }
    transmitter = {"display": "fhirbridge"}
    hospital_ref = app.hospital.organization_ref()
    # One signature per target, in target order; the signer is the transmitter agent (R4: "the signer should
    # match a Provenance.agent"), acting for the hospital.
    signatures = [jws.sign_resource(target, app.hospital_keys, who=transmitter, on_behalf_of=hospital_ref,
                                    when=created, x5c=app.hospital_x5c) for target in (docref, binary)]
    provenance = {
        "resourceType": "Provenance",
        "target": [{"reference": docref_ref}, {"reference": binary_ref}],
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
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": binary, "request": {"method": "PUT", "url": binary_ref}},
        {"resource": docref, "request": {"method": "PUT", "url": docref_ref}},
        {"fullUrl": prov_url, "resource": provenance, "request": {"method": "POST", "url": "Provenance"}},
        {"resource": task, "request": {"method": "PUT", "url": f"Task/{task['id']}"}},
    ]}


def _attachment(content_type: str, data: bytes, title: str, created: str, *, inline: bool = True) -> dict:
    att = {"contentType": content_type, "title": title, "creation": created, "size": len(data),
           # R4 Attachment.hash is the base64 SHA-1 of the data.
           "hash": base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")}
    if inline:
        att["data"] = base64.b64encode(data).decode("ascii")
    return att


def file_step(app: App, case: Case) -> StepResult:
    """File the received opinion; its accounting (BALP) is recorded before the step is: once per opinion."""
    filed = file_opinion(app, case)
    audit.record_filed(app, case, filed.document_reference)
    return StepResult(filed.detail(), document_reference=filed.document_reference,
                      task_current=filed.task_completed)

