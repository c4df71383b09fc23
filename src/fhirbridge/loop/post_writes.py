"""File the opinion by POSTs, one resource at a time, on an EHR without (atomic) transactions or update-as-create:
write plans LEDGER and ONCE (ehr/write_plan.py). Exactly once, by the write ledger (store tables.write_ledger).

Many vendors' R4 APIs write a clinical note only by `POST DocumentReference`: the server picks the id, so a
retried POST after a lost answer files a second note. Each write here is therefore recorded in the ledger
with its business identifier BEFORE it is sent: `sent` is committed to the store just before the POST (from
then on its outcome is unknown), `confirmed` with the server's id once the EHR answered, `intended` when it is
known NOT to be in the chart (a definite refusal, or a person answered "not filed"), so sending it is safe. A
write left `sent` (a lost answer, a 5xx after sending, a crash) is never simply sent again:
- plan LEDGER reconciles it by searching the identifier: the note by DocumentReference `identifier` (the
  opinion's urn:uuid, also its masterIdentifier), the Provenance by `target` (our note) and its source entity
  (the sealed opinion's jti). Found: confirmed. Not found: it never landed, and is sent again.
  `If-None-Exist` on the identifier is added where the EHR honours it (capability conditional_create), so
  even a race with a second worker cannot file twice there;
- plan ONCE (no identifier search: nothing can be found again) stops the Case at `needs_review` with the
  exact question for a person, who answers with `fhirbridge resolve` (loop/actions.py resolve). Never a second
  POST.
In order: the note, then its Provenance (which names the note's server id), then the Task (completed with the
note as output; PUT with If-Match on the version read, reconciled by reading the Task again).

The document: with no update-as-create a Binary cannot have an id we choose, and a POSTed Binary has no
identifier to search for, so it could not be reconciled. The FHIR document therefore goes INSIDE the
DocumentReference, as an inline attachment (`data`), with the other forms the EHR accepts
(Capabilities.attachment_types, in order, at most max_attachments): the signed FHIR document
(application/fhir+json), a PDF rendering (application/pdf: what many EHR viewers display) and the plain text.
One POST carries them all and nothing is left orphaned. An EHR that requires an Encounter on every note
(requires_encounter) gets the order's (ServiceRequest.encounter); an order without one is a clear failure
naming what is missing, never a made-up Encounter.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fhirbridge import jsonutil
from fhirbridge.ehr.capabilities import Capabilities
from fhirbridge.ehr.context import App
from fhirbridge.ehr.task import now_iso
from fhirbridge.ehr.write_plan import Kind
from fhirbridge.errors import FhirbridgeError, FhirError
from fhirbridge.exchange.pdf import render_opinion_pdf
from fhirbridge.exchange.render import render_opinion
from fhirbridge.loop.writeback import (
    FORMAT_CODE,
    OPINION_ID_SYSTEM,
    Filed,
    attachment,
    build_provenance,
    completed_task,
    filed_per_task,
    find_filed,
    find_provenance,
    note_fields,
    open_opinion,
)
from fhirbridge.ops.crashpoints import crash_point
from fhirbridge.store.store import Case

NOTE, PROVENANCE = "DocumentReference", "Provenance"


@dataclass(frozen=True)
class Review:
    """A write whose outcome only a person can establish (plan ONCE): the question to put to them."""

    kind: str
    question: str


def file_by_post(app: App, case: Case) -> Filed | Review:
    assert case.opinion_id is not None
    plan = app.write_plan
    claims, document = open_opinion(app, case)
    task = app.ehr.read_ref(case.task) if case.task and plan.task_write else None
    ledger = app.store.ledger(case.id)
    confirmed = (ledger.get(NOTE) or {}).get("server_id") if (ledger.get(NOTE) or {}).get("state") == "confirmed" \
        else None
    if task is not None and confirmed and filed_per_task(task, confirmed):
        return Filed(confirmed, already_filed=True, task_completed=True)
    created = now_iso()
    ident = f"urn:uuid:{case.opinion_id}"
    search = plan.kind is Kind.LEDGER

    note: dict = {}

    def make_note() -> dict:
        note.update(build_note(app, case, document, created))
        return note

    docref = post_once(
        app, case, NOTE, f"{OPINION_ID_SYSTEM}|{ident}", make_note,
        find=(lambda: find_filed(app, case, ident)) if search else None,
        if_none_exist=f"identifier={OPINION_ID_SYSTEM}|{ident}" if plan.capabilities.conditional_create else None,
        check=lambda stored: _check_ours(case, stored),
        question=lambda: note_question(app, case))
    if isinstance(docref, Review):
        return docref

    def make_provenance() -> dict:
        target = note or app.ehr.read_ref(docref)   # the note as written, for its signature
        return build_provenance(app, case, claims, [{**target, "id": docref.split("/")[1]}], created)

    provenance = post_once(
        app, case, PROVENANCE, f"{docref}|urn:uuid:{claims['jti']}", make_provenance,
        find=(lambda: find_provenance(app, docref, claims["jti"])) if search and
        plan.capabilities.provenance_target_search else None,
        if_none_exist=None, check=None,
        question=lambda: provenance_question(app, case, docref))
    if isinstance(provenance, Review):
        return provenance
    if task is None:
        return Filed(docref, already_filed=confirmed is not None)
    _complete_task(app, case, task, docref, created)
    return Filed(docref, already_filed=confirmed is not None, task_completed=True)


def post_once(app: App, case: Case, kind: str, identifier: str, make: Callable[[], dict], *,
               find: Callable[[], str | None] | None, if_none_exist: str | None,
               check: Callable[[dict], None] | None, question: Callable[[], str],
               point: str | None = None) -> str | Review:
    """POST one resource exactly once, by the ledger: its server reference, or the question for a person.
    `kind` names the ledger row (one per Case and kind: the follow-ups' writes carry their number, e.g.
    `addendum2.DocumentReference`); `point` the crash point just before the POST (default file.<kind>.sent)."""
    row = app.store.ledger(case.id).get(kind)
    if row and row["state"] == "confirmed":
        return str(row["server_id"])
    if row and row["state"] == "sent":
        # Sent before, its outcome unknown (a lost answer, a 5xx, a crash): never sent again blindly.
        if find is None:
            return Review(kind, question())
        found = find()
        if found:
            app.store.ledger_record(case.id, kind, identifier=identifier, state="confirmed", server_id=found)
            app.store.add_event(case.id, "write.reconciled", {"kind": kind, "found": found})
            return found
        # The EHR, searched by the identifier, does not have it: the earlier POST never landed.
    resource = make()
    app.store.ledger_record(case.id, kind, identifier=identifier, state="sent", sent=True)
    crash_point(point or f"file.{kind}.sent")
    try:
        stored, _created = app.ehr.create(resource, if_none_exist=if_none_exist)
    except FhirError as exc:
        if uncertain(exc):
            if find is None:
                return Review(kind, question())
            raise FhirError(f"{kind} may have been written ({exc}); it will be looked for by its identifier "
                            "before anything is sent again", status=exc.status, transient=True) from None
        # A definite refusal: nothing was written, sending it later is safe.
        app.store.ledger_record(case.id, kind, identifier=identifier, state="intended")
        raise
    if check:
        check(stored)
    ref = f"{resource['resourceType']}/{stored['id']}"
    app.store.ledger_record(case.id, kind, identifier=identifier, state="confirmed", server_id=ref)
    return ref


def uncertain(exc: FhirError) -> bool:
    """Whether a failed POST may have been applied: no answer at all (lost, timed out, cut off), or a 5xx other
    than 503 (a 502/504 gateway may have passed it on; a 500 may have failed after the commit). 429 and 503
    say the request was not processed (RFC 6585 section 4, RFC 9110 section 15.6.4), and a 4xx is a refusal."""
    if exc.status is None:
        return True
    return exc.status >= 500 and exc.status != 503


def _check_ours(case: Case, stored: dict) -> None:
    """A conditional create answers with the match: it must be this Case's note, not another patient's."""
    related = {r.get("reference") for r in (stored.get("context") or {}).get("related", [])}
    if (stored.get("subject") or {}).get("reference") != case.patient or case.service_request not in related:
        raise FhirbridgeError(f"DocumentReference/{stored.get('id')} already carries this opinion's identifier "
                              "but belongs to another patient or order; not filing")


def _complete_task(app: App, case: Case, task: dict, docref: str, created: str) -> None:
    """The Task completed with our note as output, If-Match the version read. A conflict is reconciled by
    reading the Task again: completed naming our note = done; otherwise the next run tries again."""
    version = (task.get("meta") or {}).get("versionId")
    try:
        app.ehr.update(completed_task(task, docref, created),
                       if_match=version if version and app.capabilities.if_match else None)
    except FhirError as exc:
        if exc.status in (409, 412) or uncertain(exc):
            if filed_per_task(app.ehr.read_ref(str(case.task)), docref):
                return
            raise FhirError(f"the Task could not be completed yet ({exc}); will retry", status=exc.status,
                            transient=True) from None
        raise


# ---------------------------------------------------------------------- the note


def build_note(app: App, case: Case, document: dict, created: str) -> dict:
    """The DocumentReference POSTed: no id (the server assigns it), the document inline in the forms the EHR
    takes, the order's Encounter when the EHR requires one."""
    caps = app.capabilities
    note = {"resourceType": "DocumentReference", **note_fields(app, case, document, created),
            "content": note_content(caps, document, created)}
    if caps.requires_encounter:
        sr = app.ehr.read_ref(case.service_request)
        encounter = (sr.get("encounter") or {}).get("reference")
        if not encounter:
            raise FhirbridgeError(f"the EHR files a note only with an Encounter (requires_encounter), and "
                                  f"{case.service_request} names none: set the order's encounter in the EHR, "
                                  "then `fhirbridge retry`")
        note["context"]["encounter"] = [{"reference": encounter}]
    return note


def note_content(caps: Capabilities, document: dict, created: str) -> list[dict]:
    """DocumentReference.content: the forms the EHR accepts, in its order of preference, at most
    max_attachments of them. Each is inline (R4 Attachment.data) with its size and SHA-1 hash."""
    out: list[dict] = []
    for ctype in caps.attachment_types:
        if ctype == "application/fhir+json":
            out.append({"attachment": attachment(ctype, jsonutil.dumps(document), "Second opinion (FHIR document)",
                                                  created), "format": FORMAT_CODE})
        elif ctype == "application/pdf":
            out.append({"attachment": attachment(ctype, render_opinion_pdf(document), "Second opinion (PDF)",
                                                  created)})
        elif ctype == "text/plain":
            text = render_opinion(document, with_patient=False).encode("utf-8")
            out.append({"attachment": attachment("text/plain; charset=utf-8", text, "Second opinion (text)",
                                                  created)})
    return out[:caps.max_attachments] if caps.max_attachments else out


# ---------------------------------------------------------------------- the questions for a person


def note_question(app: App, case: Case) -> str:
    """Names the patient by id only and the note by what staff see in the chart: no PHI."""
    reviewer = app.config.reviewer(case.reviewer)
    return (f"Was the DocumentReference for opinion urn:uuid:{case.opinion_id} filed in the chart of "
            f"{case.patient}? The EHR's answer to it was lost and this EHR cannot be searched for it. Check the "
            f"patient's documents for a note 'Second opinion from {reviewer.display}' on order "
            f"{case.service_request}, then run `fhirbridge resolve {case.id} --filed DocumentReference/<id>` "
            f"or `fhirbridge resolve {case.id} --not-filed`.")


def provenance_question(app: App, case: Case, docref: str) -> str:
    return (f"Was the Provenance for {docref} (opinion urn:uuid:{case.opinion_id}, {case.patient}) filed? The "
            f"EHR's answer to it was lost and this EHR cannot be searched for it. Check the note's provenance, "
            f"then run `fhirbridge resolve {case.id} --filed Provenance/<id>` or "
            f"`fhirbridge resolve {case.id} --not-filed`.")
