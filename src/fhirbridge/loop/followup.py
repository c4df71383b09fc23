"""Follow-up questions and corrected opinions of a filed Case: asked, sent, answered and filed exactly once
(issue 16, parts 3 and 5; docs/reviewers.md "After the opinion").

    ask      the physician (physician page, POST /api/cases/<id>/follow-ups): the Case's opinion is filed, the
             reviewer's `follow_up_limit` (default 3) not reached; the text waits encrypted to the hospital's own
             key in the Case directory, a row `asked` (store/followups.py) names it
    send     a worker: the question sealed once (kept, so a repeat re-sends the same message), the Communication
             written to the EHR exactly once, the message delivered by the reviewer's transport (outbox and https
             are idempotent; a pull reviewer fetches it from /reviewer/follow-ups), row `sent`
    answer   the reviewer's sealed answer (portal, `reviewer answer --follow-up`, the inbox, POST
             /reviewer/follow-up-answers) accepted by loop/followup_inbound.py, row `answered`
    file     a worker: the addendum note (DocumentReference, relatesTo `appends` the opinion note) and its
             Provenance, exactly once by the hospital's write plan, row `filed`
    correct  a corrected opinion (an opinion envelope whose claims say what it `replaces`): a new version of the
             note (relatesTo `replaces`) and its Provenance; on plan ATOMIC the earlier note is set `superseded`
             in the same transaction, on LEDGER/ONCE (no update of a note there) it stays `current` and the
             event log says so.

Exactly once, per write plan (ehr/write_plan.py), as for the opinion itself:
- ATOMIC: every resource at an id derived from the Case and the message (UUIDv5): the Communication a PUT
  (update-as-create: a repeat lands on the same resource), the note, its Binary and Provenance one transaction,
  preceded by a read of the derived note id (atomic: the note there means all of it is).
- LEDGER / ONCE: POSTs through the write ledger (loop/post_writes.post_once) under kinds numbered per question
  (`followup2.Communication`, `addendum2.DocumentReference`, `correction1.Provenance`): LEDGER reconciles a
  lost answer by searching the identifier (the message's urn:uuid), ONCE stops the follow-up at needs_review
  for a person (`fhirbridge resolve <case> --follow-up <id>`). Never a second POST.

FHIR R4 Communication (communication.html): `basedOn` the order ServiceRequest, `partOf` nothing of ours,
`about` the opinion note (Reference(Any)), `inResponseTo` unused (the answer is a note, not a Communication),
`status` completed (it has been sent: the write follows the sealing), `sender` the order's requester (or the
person who asked), `recipient` the reviewer organisation by identifier, `payload.contentString` the question.
"""
from __future__ import annotations

import base64
import logging
import time
import uuid
from dataclasses import dataclass

from fhirbridge import jsonutil
from fhirbridge.crypto import files, jwe
from fhirbridge.ehr import audit
from fhirbridge.ehr.context import App
from fhirbridge.ehr.task import now_iso
from fhirbridge.ehr.write_plan import Kind
from fhirbridge.errors import CaseError, ConsentDenied, FhirbridgeError, FhirError
from fhirbridge.exchange import envelope
from fhirbridge.exchange.conclusions import conclusions_of
from fhirbridge.exchange.followup import (
    QUESTION_PREFIX,
    answer_text,
    check_text,
    question_bundle,
    seal_question,
)
from fhirbridge.exchange.render import render_opinion
from fhirbridge.exchange.transport import DeliveryError, deliver
from fhirbridge.loop import consent
from fhirbridge.loop.followup_inbound import answer_path, correction_path
from fhirbridge.loop.post_writes import Review, note_content, post_once
from fhirbridge.loop.runner import lease_seconds
from fhirbridge.loop.writeback import (
    FORMAT_CODE,
    OPINION_ID_SYSTEM,
    attachment,
    build_provenance,
)
from fhirbridge.ops.crashpoints import crash_point
from fhirbridge.steps import Step
from fhirbridge.store.followups import (
    ANSWERED,
    ASKED,
    CORRECTION,
    FAILED,
    FILED,
    NEEDS_REVIEW,
    QUESTION,
    SENT,
    FollowUps,
    OverLimit,
)
from fhirbridge.store.store import Case, worker_id

log = logging.getLogger("fhirbridge.loop.followup")
QUESTION_TYP = "fhirbridge-followup-text+jwe"
MAX_DELAY = 3600.0
__all__ = ["OverLimit", "ask", "run_followups", "thread", "resolve_followup"]


class NotAskable(CaseError):
    """The Case has no filed opinion to ask about."""


def _question_file(app: App, case_id: str, followup_id: str):
    return app.case_dir(case_id) / f"question-{followup_id}.jwe"


def message_dir(app: App, case_id: str, followup_id: str):
    """The sealed question as the transports deliver it: a directory named followup-<id> holding package.jwe."""
    return files.private_dir(app.case_dir(case_id) / "followups" / f"{QUESTION_PREFIX}{followup_id}")


def ask(app: App, case: Case, text: str, *, asked_by: str | None = None) -> dict:
    """Record a follow-up question on the Case's filed opinion; a worker sends it. Returns its row."""
    text = check_text(text, "question")
    if case.step != Step.DONE or not case.document_reference:
        raise NotAskable(f"Case {case.id[:8]} has no filed opinion to ask about (it is {case.step}); nothing sent")
    reviewer = app.config.reviewer(case.reviewer)
    followup_id = str(uuid.uuid4())
    path = _question_file(app, case.id, followup_id)
    # The text before the row, encrypted to the hospital's own key (it is clinical): an `asked` row always has
    # its question. Over the limit, the file goes again.
    files.write_atomic(path, jwe.encrypt_bytes(jsonutil.dumps({"text": text, "asked_by": asked_by}),
                                               app.hospital_keys.encryption_keys(), typ=QUESTION_TYP))
    try:
        row = FollowUps(app.store).add(followup_id, case_id=case.id, hospital=case.hospital, reviewer=case.reviewer,
                                       kind=QUESTION, state=ASKED, limit=reviewer.follow_up_limit,
                                       asked_by=asked_by)
    except OverLimit:
        path.unlink(missing_ok=True)
        raise
    app.store.add_event(case.id, "followup.asked", {"followup": followup_id, "seq": row["seq"]})
    return row


def _question(app: App, row: dict) -> dict:
    return jsonutil.loads(jwe.decrypt_bytes(_question_file(app, row["case_id"], row["id"]).read_bytes(),
                                            app.hospital_keys))


# --------------------------------------------------------------------------- the worker


def run_followups(app: App, *, worker: str | None = None, limit: int = 20, followup_id: str | None = None) -> int:
    """Send the questions and file the answers and corrections that are due; returns how many were handled."""
    worker = worker or worker_id()
    followups = FollowUps(app.store)
    done = 0
    while done < limit:
        row = followups.claim(hospital=app.hospital.key, worker=worker, lease_seconds=lease_seconds(app),
                              followup_id=followup_id)
        if row is None:
            break
        done += 1
        _run_one(app, followups, row, worker)
    return done


def _run_one(app: App, followups: FollowUps, row: dict, worker: str) -> None:
    case = app.store.get(row["case_id"])
    try:
        if row["state"] == ASKED:
            values = _send(app, case, row)
            if isinstance(values, Review):
                followups.finish(row["id"], worker=worker, expect=ASKED, state=NEEDS_REVIEW, error=values.question)
                app.store.add_event(case.id, "followup.needs_review", {"followup": row["id"], "write": values.kind})
                return
            # Recorded before the row says sent (a row that does is never claimed again): a crash before
            # `finish` repeats the delivery (the same message) and this, which keeps one record per question.
            audit.record_followup_sent(app, case, followup_id=row["id"], seq=row["seq"],
                                       communication=values.get("communication"),
                                       transport=app.config.reviewer(case.reviewer).transport.type)
            crash_point("followup.end")
            followups.finish(row["id"], worker=worker, expect=ASKED, state=SENT, error=None, **values)
            app.store.add_event(case.id, "followup.sent", {"followup": row["id"], "seq": row["seq"], **values})
        else:
            outcome = _file_correction(app, case, row) if row["kind"] == CORRECTION else _file_answer(app, case, row)
            if isinstance(outcome, Review):
                followups.finish(row["id"], worker=worker, expect=ANSWERED, state=NEEDS_REVIEW,
                                 error=outcome.question)
                app.store.add_event(case.id, f"{row['kind']}.needs_review",
                                    {"followup": row["id"], "write": outcome.kind})
                return
            # As for a question: recorded before the row says filed, so a crash in between records it on repeat.
            kind = audit.ADDENDUM_FILED if row["kind"] == QUESTION else audit.CORRECTION_FILED
            audit.record_followup_filed(app, case, kind=kind, message_id=row["answer_id"], seq=row["seq"],
                                        document_reference=outcome)
            crash_point("addendum.end" if row["kind"] == QUESTION else "correction.end")
            followups.finish(row["id"], worker=worker, expect=ANSWERED, state=FILED, note=outcome, filed_at=time.time(),
                             error=None)
            app.store.add_event(case.id, "followup.filed" if row["kind"] == QUESTION else "correction.filed",
                                {"followup": row["id"], "seq": row["seq"], "note": outcome})
    except (FhirError, DeliveryError) as exc:
        if exc.transient:
            followups.later(row["id"], worker=worker, error=str(exc), delay=min(MAX_DELAY, 30.0 * 2 ** row["attempts"]))
            log.warning("case %s: follow-up %s not done yet, will retry: %s", case.id, row["seq"], exc)
            return
        _failed(app, followups, row, worker, exc)
    except FhirbridgeError as exc:
        _failed(app, followups, row, worker, exc)


def _failed(app: App, followups: FollowUps, row: dict, worker: str, exc: Exception) -> None:
    followups.finish(row["id"], worker=worker, expect=row["state"], state=FAILED, error=str(exc))
    app.store.add_event(row["case_id"], f"{row['kind']}.failed", {"followup": row["id"], "error": str(exc)})
    log.error("case %s: follow-up %s failed: %s", row["case_id"], row["seq"], exc)


def _derived(case: Case, what: str, message_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:fhirbridge:case:{case.id}/{what}/{message_id}"))


# --------------------------------------------------------------------------- send a question


def _send(app: App, case: Case, row: dict) -> dict | Review:
    question = _question(app, row)
    reviewer = app.config.reviewer(case.reviewer)
    # A question about the patient discloses as a package does: a Consent recorded since the package went
    # must stop it (ConsentDenied: the follow-up fails with the reason; an EHR that does not answer is
    # transient). A pull reviewer's fetch looks again (service/reviewer_api.py).
    folder = message_dir(app, case.id, row["id"])
    sealed = folder / envelope.ENVELOPE_FILE
    try:
        # Only before the question is sealed: a repeat after a crash past that point may follow a delivery,
        # which a later denial cannot undo; it delivers the same message again and records it.
        if not sealed.exists():
            consent.check(app, case.patient, reviewer)
    except ConsentDenied as exc:
        app.store.add_event(case.id, "consent.denied", {"step": "follow-up", "consent": exc.consent,
                                                        "followup": row["id"]})
        raise
    sender = question.get("asked_by") or _requester(app, case)
    comm = communication(app, case, row, question["text"], sender)
    if not sealed.exists():
        # Sealed once and kept: a repeat after a crash delivers the very same message (same jti, same bytes).
        when = now_iso()
        bundle = question_bundle(comm, signer=app.hospital_keys, who=app.hospital.organization_ref(), when=when,
                                 x5c=app.hospital_x5c)
        now = int(time.time())
        claims = {"jti": row["id"], "iat": now, "exp": now + 90 * 86400,
                  **envelope.addressing(_org(app.hospital.organization_ref()), _org(reviewer.organization_ref())),
                  "case_id": case.id, "package_id": case.package_id, "opinion_id": case.opinion_id,
                  "patient": case.patient, "service_request": case.service_request, "seq": row["seq"]}
        envelope.write_atomic(sealed, seal_question(claims=claims, bundle=bundle, signer=app.hospital_keys,
                                                    recipient=app.reviewer_keys(case.reviewer)))
    ref = _write_communication(app, case, row, comm)
    if isinstance(ref, Review):
        return ref
    crash_point("followup.written")
    detail = deliver(reviewer, folder, f"{QUESTION_PREFIX}{row['id']}")
    log.info("case %s: follow-up question %s sent (%s)", case.id, row["seq"], detail.get("transport"))
    return {"communication": ref, "sent_at": time.time()}


def _org(ref: dict) -> dict:
    ident = ref["identifier"]
    return {"system": ident["system"], "value": ident["value"], "display": ref.get("display")}


def _requester(app: App, case: Case) -> dict | None:
    sr = app.ehr.read_ref(case.service_request)
    return sr.get("requester")


def communication(app: App, case: Case, row: dict, text: str, sender: object) -> dict:
    reviewer = app.config.reviewer(case.reviewer)
    ident = {"system": OPINION_ID_SYSTEM, "value": f"urn:uuid:{row['id']}"}
    comm: dict = {
        "resourceType": "Communication", "identifier": [ident], "status": "completed",
        "basedOn": [{"reference": case.service_request}],
        "about": [{"reference": str(case.document_reference)}],
        "subject": {"reference": case.patient},
        "topic": {"text": f"Follow-up question {row['seq']} on the second opinion"},
        "sent": now_iso(),
        "recipient": [reviewer.organization_ref()],
        "payload": [{"contentString": text}],
    }
    if isinstance(sender, dict):
        comm["sender"] = sender
    elif isinstance(sender, str) and "/" in sender:
        comm["sender"] = {"reference": sender}
    return comm


def _write_communication(app: App, case: Case, row: dict, comm: dict) -> str | Review:
    plan = app.write_plan
    ident = f"{OPINION_ID_SYSTEM}|urn:uuid:{row['id']}"
    if plan.kind is Kind.ATOMIC:
        # Update-as-create at a derived id: a repeat lands on the same Communication.
        cid = _derived(case, "followup", row["id"])
        app.ehr.update({**comm, "id": cid})
        return f"Communication/{cid}"
    search = plan.kind is Kind.LEDGER
    return post_once(
        app, case, f"followup{row['seq']}.Communication", ident, lambda: comm,
        find=(lambda: _find(app, "Communication", ident)) if search else None,
        if_none_exist=f"identifier={ident}" if plan.capabilities.conditional_create else None,
        check=None, point="followup.Communication.sent",
        question=lambda: (f"Was Communication urn:uuid:{row['id']} (follow-up question {row['seq']} of Case "
                          f"{case.id[:8]}, {case.patient}) written to the chart? The EHR's answer was lost and this "
                          f"EHR cannot be searched for it. Check, then run `fhirbridge resolve {case.id} --follow-up "
                          f"{row['id']} --filed Communication/<id>` or `... --not-filed`."))


def _find(app: App, type_: str, ident: str) -> str | None:
    for res in app.ehr.search(type_, {"identifier": ident}):
        if res.get("resourceType") == type_:
            return f"{type_}/{res['id']}"
    return None


# --------------------------------------------------------------------------- file an answer or a correction


@dataclass(frozen=True)
class Note:
    """What is filed: the note (without id and content), its document and plain text, the ledger prefix."""

    fields: dict
    document: dict
    text: str
    prefix: str
    message_id: str


def _file_answer(app: App, case: Case, row: dict) -> str | Review:
    opened = envelope.open_sealed(answer_path(app, case.id, row["answer_id"]).read_bytes(), typ=envelope.ANSWER,
                                  decrypt=app.hospital_keys, trusted=app.reviewer_keys(case.reviewer),
                                  check_expiry=False)
    _claims, document = opened
    reviewer = app.config.reviewer(case.reviewer)
    question = _question(app, row)["text"]
    text = f"Follow-up question {row['seq']}:\n{question}\n\nAnswer:\n{answer_text(document)}\n"
    fields = _note_fields(app, case, row["answer_id"], created=now_iso(),
                          description=f"Addendum to the second opinion from {reviewer.display} (follow-up "
                                      f"question {row['seq']})",
                          relates=("appends", str(case.document_reference)),
                          related=[row["communication"]] if row.get("communication") else [])
    note = Note(fields, document, text, f"addendum{row['seq']}", row["answer_id"])
    return _file_note(app, case, note, point="addendum")


def _file_correction(app: App, case: Case, row: dict) -> str | Review:
    claims, document = envelope.open_sealed(correction_path(app, case.id, row["answer_id"]).read_bytes(),
                                            typ=envelope.OPINION, decrypt=app.hospital_keys,
                                            trusted=app.reviewer_keys(case.reviewer), check_expiry=False)
    reviewer = app.config.reviewer(case.reviewer)
    earlier = current_note(app, case, before_seq=row["seq"])
    comp = document["entry"][0]["resource"]
    fields = _note_fields(app, case, row["answer_id"], created=now_iso(),
                          description=f"Second opinion from {reviewer.display} (corrected, version {row['seq'] + 1})",
                          relates=("replaces", earlier), related=[], type_=comp["type"],
                          category=comp.get("category", []))
    note = Note(fields, document, render_opinion(document, with_patient=False), f"correction{row['seq']}",
                row["answer_id"])
    outcome = _file_note(app, case, note, point="correction", supersede=earlier)
    if not isinstance(outcome, Review):
        # The figures count the current version: its codes replace the first one's in the Case's summary and
        # the outcome row (filing time, turnaround and the outcome's window stay the first filing's). Repeated
        # after a crash, it writes the same values.
        found = conclusions_of(document)
        app.store.set_conclusion(case.id, concordance=found.get("concordance"),
                                 recommendation=found.get("recommendation"))
        app.store.outcomes.set_codes(case.id, concordance=found.get("concordance"),
                                     recommendation=found.get("recommendation"))
    return outcome


def current_note(app: App, case: Case, *, before_seq: int | None = None) -> str:
    """The note that is the opinion's current version: the last filed correction's (before `before_seq`), else
    the opinion note."""
    rows = [r for r in FollowUps(app.store).of_case(case.id, CORRECTION)
            if r["state"] == FILED and r["note"] and (before_seq is None or r["seq"] < before_seq)]
    return str(rows[-1]["note"]) if rows else str(case.document_reference)


def _note_fields(app: App, case: Case, message_id: str, *, created: str, description: str,
                 relates: tuple[str, str], related: list[str], type_: dict | None = None,
                 category: list | None = None) -> dict:
    reviewer = app.config.reviewer(case.reviewer)
    identifier = {"system": OPINION_ID_SYSTEM, "value": f"urn:uuid:{message_id}"}
    code, target = relates
    return {
        "masterIdentifier": identifier, "identifier": [identifier],
        "status": "current", "docStatus": "final",
        "type": type_ or {"coding": [{"system": "http://loinc.org", "code": "11488-4", "display": "Consult note"}]},
        "category": category if category is not None else [{"coding": [{
            "system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
            "code": "clinical-note", "display": "Clinical Note"}]}],
        "subject": {"reference": case.patient}, "date": created,
        "author": [reviewer.organization_ref()], "custodian": app.hospital.organization_ref(),
        "description": description,
        # R4 DocumentReference.relatesTo: `appends` (an addendum) or `replaces` (a new version), target the note.
        "relatesTo": [{"code": code, "target": {"reference": target}}],
        "context": {"related": [{"reference": case.service_request}] + [{"reference": r} for r in related]},
    }


def _file_note(app: App, case: Case, note: Note, *, point: str, supersede: str | None = None) -> str | Review:
    plan = app.write_plan
    if plan.kind is Kind.ATOMIC:
        return _file_atomic(app, case, note, point=point, supersede=supersede)
    claims = {"jti": note.message_id}
    ident = f"{OPINION_ID_SYSTEM}|urn:uuid:{note.message_id}"
    search = plan.kind is Kind.LEDGER
    created = note.fields["date"]
    body: dict = {}

    def make_note() -> dict:
        body.update({"resourceType": "DocumentReference", **note.fields,
                     "content": _content(app, note, created)})
        return body

    def question(kind: str) -> str:
        return (f"Was the {kind} for message urn:uuid:{note.message_id} ({note.prefix} of Case {case.id[:8]}, "
                f"{case.patient}) written to the chart? The EHR's answer was lost and this EHR cannot be searched "
                f"for it. Check the patient's documents, then run `fhirbridge resolve {case.id} --follow-up "
                f"<id> --filed {kind}/<id>` or `... --not-filed`.")

    docref = post_once(app, case, f"{note.prefix}.DocumentReference", ident, make_note,
                       find=(lambda: _find(app, "DocumentReference", ident)) if search else None,
                       if_none_exist=f"identifier={ident}" if plan.capabilities.conditional_create else None,
                       check=None, point=f"{point}.DocumentReference.sent",
                       question=lambda: question("DocumentReference"))
    if isinstance(docref, Review):
        return docref

    def make_provenance() -> dict:
        target = body or app.ehr.read_ref(docref)
        return build_provenance(app, case, claims, [{**target, "id": docref.split("/")[1]}], created)

    prov_find = None
    if search and plan.capabilities.provenance_target_search:
        def prov_find() -> str | None:
            for res in app.ehr.search("Provenance", {"target": docref}):
                if res.get("resourceType") == "Provenance":
                    return f"Provenance/{res['id']}"
            return None
    provenance = post_once(app, case, f"{note.prefix}.Provenance", f"{docref}|urn:uuid:{note.message_id}",
                           make_provenance, find=prov_find, if_none_exist=None, check=None,
                           point=f"{point}.Provenance.sent", question=lambda: question("Provenance"))
    if isinstance(provenance, Review):
        return provenance
    if supersede:
        # No update of a note on these plans (POST-only EHRs): the earlier version cannot be marked superseded;
        # its successor's relatesTo `replaces` is what says so in the chart.
        app.store.add_event(case.id, "correction.not_superseded",
                            {"note": supersede, "reason": "this EHR takes no update of a DocumentReference "
                                                          f"(write plan {plan.kind.name})"})
    return docref


def _content(app: App, note: Note, created: str) -> list[dict]:
    content = note_content(app.capabilities, note.document, created)
    if any(c["attachment"]["contentType"].startswith("text/plain") for c in content) or not content:
        # The plain text of an addendum is its own, not an opinion rendering.
        content = [c for c in content if not c["attachment"]["contentType"].startswith("text/plain")]
        content.append({"attachment": attachment("text/plain; charset=utf-8", note.text.encode("utf-8"),
                                                 "Second opinion addendum (text)", created)})
    return content[:app.capabilities.max_attachments] if app.capabilities.max_attachments else content


def _file_atomic(app: App, case: Case, note: Note, *, point: str, supersede: str | None) -> str:
    ours = f"DocumentReference/{_derived(case, 'note', note.message_id)}"
    try:
        app.ehr.read_ref(ours)
        return ours        # atomic: our note there means the whole transaction is
    except FhirError as exc:
        if exc.status not in (404, 410):
            raise
    created = note.fields["date"]
    binary_id = _derived(case, "binary", note.message_id)
    doc_json = jsonutil.dumps(note.document)
    binary = {"resourceType": "Binary", "id": binary_id, "contentType": "application/fhir+json",
              "securityContext": {"reference": case.patient}, "data": base64.b64encode(doc_json).decode("ascii")}
    docref = {"resourceType": "DocumentReference", "id": ours.split("/")[1], **note.fields, "content": [
        {"attachment": {**attachment("application/fhir+json", doc_json, "Second opinion (FHIR document)", created,
                                     inline=False), "url": f"Binary/{binary_id}"}, "format": FORMAT_CODE},
        {"attachment": attachment("text/plain; charset=utf-8", note.text.encode("utf-8"), "Second opinion (text)",
                                  created)}]}
    provenance = build_provenance(app, case, {"jti": note.message_id}, [docref, binary], created)
    entries = [{"resource": binary, "request": {"method": "PUT", "url": f"Binary/{binary_id}"}},
               {"resource": docref, "request": {"method": "PUT", "url": ours}},
               {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": provenance,
                "request": {"method": "POST", "url": "Provenance"}}]
    if supersede:
        # R4 DocumentReference.status `superseded`: "This DocumentReference has been superseded by another".
        # In the same transaction, If-Match the version read, so an edit made meanwhile is never overwritten.
        old = app.ehr.read_ref(supersede)
        version = (old.get("meta") or {}).get("versionId")
        entry = {"resource": {**old, "status": "superseded"}, "request": {"method": "PUT", "url": supersede}}
        if version:
            entry["request"]["ifMatch"] = f'W/"{version}"'
        entries.append(entry)
    app.ehr.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    crash_point(f"{point}.committed")
    return ours


# --------------------------------------------------------------------------- what the pages and the API show


def thread(app: App, case: Case) -> list[dict]:
    """The Case's follow-up questions and corrections in order, with their texts (decrypted here: for the
    physician page and the staff API, never for the logs)."""
    out = []
    for row in FollowUps(app.store).of_case(case.id):
        item = {k: row[k] for k in ("id", "kind", "seq", "state", "created_at", "sent_at", "answered_at", "filed_at",
                                    "communication", "note", "error")}
        if row["kind"] == QUESTION:
            try:
                item["question"] = _question(app, row)["text"]
            except (FileNotFoundError, FhirbridgeError):
                item["question"] = None
            if row["answer_id"] and row["state"] in (ANSWERED, FILED, NEEDS_REVIEW):
                try:
                    _c, doc = envelope.open_sealed(answer_path(app, case.id, row["answer_id"]).read_bytes(),
                                                   typ=envelope.ANSWER, decrypt=app.hospital_keys,
                                                   trusted=app.reviewer_keys(case.reviewer), check_expiry=False)
                    item["answer"] = answer_text(doc)
                except (FileNotFoundError, FhirbridgeError):
                    item["answer"] = None
        out.append(item)
    return out


def remaining(app: App, case: Case) -> int:
    limit = app.config.reviewer(case.reviewer).follow_up_limit
    return max(0, limit - len(FollowUps(app.store).of_case(case.id, QUESTION)))


def ledger_prefixes(row: dict) -> tuple[str, ...]:
    """The write-ledger kinds of one follow-up's writes: a question's Communication and addendum, or a
    correction's note (questions and corrections are numbered apart, so the kind says which)."""
    if row["kind"] == CORRECTION:
        return (f"correction{row['seq']}.",)
    return (f"followup{row['seq']}.", f"addendum{row['seq']}.")


def resolve_followup(app: App, case: Case, followup_id: str, *, filed: str | None) -> dict:
    """A person answered the needs_review question of a follow-up (plan ONCE): `filed` the resource found in
    the chart ("Type/id"), or None: not there, send it again. The follow-up goes back to its work state."""
    followups = FollowUps(app.store)
    row = followups.get(followup_id)
    if row is None or row["case_id"] != case.id:
        raise CaseError(f"Case {case.id[:8]} has no follow-up {followup_id}")
    if row["state"] != NEEDS_REVIEW:
        raise CaseError(f"follow-up {followup_id} is {row['state']}, not needs_review")
    ledger = app.store.ledger(case.id)
    pending = [(k, v) for k, v in ledger.items() if v["state"] == "sent" and k.startswith(ledger_prefixes(row))]
    for kind, entry in pending:
        if filed is not None and not filed.startswith(kind.split(".", 1)[1] + "/"):
            raise CaseError(f"the write in doubt is a {kind.split('.', 1)[1]}; --filed must name one")
        app.store.ledger_record(case.id, kind, identifier=entry["identifier"],
                                state="confirmed" if filed else "intended", server_id=filed)
    back = ASKED if row["communication"] is None and row["kind"] == QUESTION and row["answer_id"] is None else ANSWERED
    followups.finish(followup_id, worker=None, expect=NEEDS_REVIEW, state=back, error=None)
    app.store.add_event(case.id, "followup.resolved", {"followup": followup_id, "filed": filed})
    return followups.get(followup_id) or row
