"""The conversation after the opinion, on the wire: a follow-up question and its answer (issue 16, part 3).

    question (hospital -> reviewer): envelope QUESTION, document = a signed `collection` Bundle holding the
        Communication as it is written to the EHR (basedOn the order, about the opinion note, the question in
        payload.contentString); claims: jti = the follow-up's id, the Case, package, opinion, patient, order, seq.
    answer (reviewer -> hospital): envelope ANSWER, document = a signed FHIR document (Composition LOINC 11488-4
        "Consult note", `relatesTo` appends the opinion document by its identifier) whose one section holds the
        question and the answer; claims: a new jti, `in_reply_to` = the question's jti, the same Case.

Both travel in the same sealed envelope as packages and opinions (exchange/envelope.py): signed by the sender,
encrypted to the receiver only. The answer's narrative is built from escaped text, never markup the reviewer
typed, and checked against the R4 narrative allow-list before it is signed (as the opinion's is).
This module knows neither side's state: the hospital's loop (loop/followup.py) and the reviewer's tools
(cli/reviewer.py, the portal) call it.
"""
from __future__ import annotations

import html
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fhirbridge.crypto import jws
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.errors import FhirbridgeError, SealError
from fhirbridge.exchange import envelope
from fhirbridge.exchange.reviewer import TrustStore
from fhirbridge.fhir.narrative import narrative_problems

QUESTION_FILE = envelope.ENVELOPE_FILE    # the transports deliver a directory holding this one file
QUESTION_PREFIX = "followup-"             # the question's directory at the reviewer: followup-<id>
QUESTION_LIFETIME = 90 * 86400
ANSWER_LIFETIME = 30 * 86400
MAX_TEXT = 8000                           # characters of a question or an answer
CONSULT_NOTE = {"system": "http://loinc.org", "code": "11488-4", "display": "Consult note"}
RFC3986 = "urn:ietf:rfc:3986"


class FollowUpError(FhirbridgeError):
    """A question or answer that cannot be sent as it is (empty, too long)."""

    exit_code = 2


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def check_text(text: object, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise FollowUpError(f"the {what} is empty")
    text = text.strip()
    if len(text) > MAX_TEXT:
        raise FollowUpError(f"the {what} is {len(text)} characters; at most {MAX_TEXT}")
    return text


# --------------------------------------------------------------------------- the question (hospital side)


def question_bundle(communication: dict, *, signer: KeyRing, who: dict, when: str,
                    x5c: list[str] | None = None) -> dict:
    """The signed Bundle that carries the question: the Communication as the EHR has it."""
    bundle = {"resourceType": "Bundle", "type": "collection", "timestamp": when,
              "identifier": {"system": RFC3986, "value": f"urn:uuid:{uuid.uuid4()}"},
              "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": communication}]}
    return jws.sign_bundle(bundle, signer, who=who, when=when, x5c=x5c)


def seal_question(*, claims: dict, bundle: dict, signer: KeyRing, recipient: KeyRing) -> bytes:
    return envelope.seal(typ=envelope.QUESTION, claims=claims, document=bundle, signer=signer, recipient=recipient)


# --------------------------------------------------------------------------- the reviewer's side


@dataclass(frozen=True)
class OpenedQuestion:
    claims: dict
    communication: dict
    hospital: KeyRing      # the trusted hospital whose keys verified it: the answer is sealed to it only

    @property
    def id(self) -> str:
        return str(self.claims["jti"])

    @property
    def text(self) -> str:
        return question_text(self.communication)


def question_text(communication: dict) -> str:
    return "\n".join(str(p.get("contentString", "")) for p in communication.get("payload", [])
                     if isinstance(p, dict)).strip()


def question_path(path: Path) -> Path:
    """The sealed question of a delivered directory (followup-<id>/package.jwe), or the file itself."""
    path = Path(path)
    return path / QUESTION_FILE if path.is_dir() else path


def open_question(path: Path, key: KeyRing, trusted: KeyRing | TrustStore) -> OpenedQuestion:
    data = envelope.read_limited(question_path(path), envelope.QUESTION)
    return open_question_bytes(data, key, trusted)


def open_question_bytes(data: bytes, key: KeyRing, trusted: KeyRing | TrustStore) -> OpenedQuestion:
    store = TrustStore.of(trusted)
    opened = envelope.open_verified(data, typ=envelope.QUESTION, decrypt=key, trusted=store, check_expiry=False)
    entries = [e.get("resource") for e in opened.document.get("entry", []) if isinstance(e, dict)]
    comms = [r for r in entries if isinstance(r, dict) and r.get("resourceType") == "Communication"]
    if len(comms) != 1:
        raise SealError("the follow-up question holds no Communication")
    return OpenedQuestion(opened.claims, comms[0], opened.keys)


def answer_document(question: OpenedQuestion, answer: str, *, answer_id: str, timestamp: str,
                    reviewer: dict) -> dict:
    """The addendum as a FHIR document: a Consult note that `appends` the opinion document (R4
    Composition.relatesTo, document-relationship-type), its one section the question and the answer."""
    c = question.claims
    org = {"resourceType": "Organization", "id": str(uuid.uuid5(uuid.NAMESPACE_URL,
                                                                 f"{reviewer['system']}|{reviewer['value']}")),
           "identifier": [{"system": reviewer["system"], "value": reviewer["value"]}],
           "name": reviewer.get("display") or reviewer["value"], "active": True}
    org_url = f"urn:uuid:{org['id']}"
    seq = c.get("seq")
    title = f"Addendum to the second opinion: answer to follow-up question {seq}"
    body = (f"<h2>{html.escape(title)}</h2><h3>Question</h3><p>{html.escape(question.text)}</p>"
            f"<h3>Answer</h3>" + "".join(f"<p>{html.escape(p)}</p>" for p in answer.split("\n\n") if p.strip()))
    div = f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'
    problems = narrative_problems(div)
    if problems:   # cannot happen with escaped text; never send a narrative the hospital would refuse
        raise FhirbridgeError("the answer's narrative is not safe XHTML: " + "; ".join(problems))
    composition = {
        "resourceType": "Composition", "id": str(uuid.uuid4()), "status": "final",
        "type": {"coding": [CONSULT_NOTE], "text": "Consult note (addendum)"},
        "subject": {"reference": str(c["patient"])}, "date": timestamp, "author": [{"reference": org_url}],
        "title": title, "text": {"status": "generated", "div": div},
        "attester": [{"mode": "official", "time": timestamp, "party": {"reference": org_url}}],
        # The addendum appends the opinion document (R4 document-relationship-type `appends`); the hospital
        # files it as a DocumentReference whose relatesTo appends the opinion note (loop/followup.py).
        "relatesTo": [{"code": "appends", "targetIdentifier": {"system": RFC3986,
                                                               "value": f"urn:uuid:{c['opinion_id']}"}}],
        "section": [{"title": "Answer to the follow-up question",
                     "focus": {"reference": str(c["service_request"])},
                     "text": {"status": "generated", "div": div}}],
    }
    return {"resourceType": "Bundle", "type": "document", "timestamp": timestamp,
            "identifier": {"system": RFC3986, "value": f"urn:uuid:{answer_id}"},
            "entry": [{"fullUrl": f"urn:uuid:{composition['id']}", "resource": composition},
                      {"fullUrl": org_url, "resource": org}]}


def seal_answer(question: OpenedQuestion, answer: str, key: KeyRing) -> tuple[bytes, dict]:
    """The reviewer's answer, signed and sealed to the hospital that asked (and no other): (sealed, claims)."""
    text = check_text(answer, "answer")
    c = question.claims
    us = envelope.party(c, "aud")
    answer_id = str(uuid.uuid4())
    timestamp = now_iso()
    document = answer_document(question, text, answer_id=answer_id, timestamp=timestamp, reviewer=us)
    document = jws.sign_bundle(document, key, who={"identifier": {"system": us["system"], "value": us["value"]},
                                                   "display": us.get("display")}, when=timestamp)
    now = int(time.time())
    claims = {"jti": answer_id, "iat": now, "exp": now + ANSWER_LIFETIME, **envelope.reply_addressing(c),
              "case_id": c["case_id"], "in_reply_to": c["jti"], "opinion_id": c["opinion_id"],
              "patient": c["patient"], "service_request": c["service_request"]}
    if question.hospital.has_private:
        raise SealError(f"{question.hospital.label} holds private keys; an answer is sealed to public keys")
    sealed = envelope.seal(typ=envelope.ANSWER, claims=claims, document=document, signer=key,
                           recipient=question.hospital)
    return sealed, claims


# --------------------------------------------------------------------------- reading an answer (hospital side)


def answer_composition(document: dict) -> dict:
    entry = (document.get("entry") or [{}])[0]
    comp = entry.get("resource") if isinstance(entry, dict) else None
    if not isinstance(comp, dict) or comp.get("resourceType") != "Composition":
        raise SealError("the answer's document does not begin with a Composition")
    return comp


def answer_text(document: dict) -> str:
    """The answer as plain text, from the attested narrative (for the physician page and the text rendering)."""
    div = answer_composition(document).get("text", {}).get("div", "")
    answer = div.split("<h3>Answer</h3>", 1)[-1]
    parts = [html.unescape(p.split("</p>", 1)[0]) for p in answer.split("<p>")[1:]]
    return "\n\n".join(parts)
