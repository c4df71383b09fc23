"""What the reviewer sends after the opinion, received: the answer to a follow-up question, a corrected opinion.

Both are accepted the way an opinion is (loop/receive.py): every check before anything moves, the sealed file
kept in the Case directory (still encrypted to the hospital) under a name only its message id uses, then one
compare-and-set in the store; a worker files it (loop/followup.py). Refused with the reason, writing nothing:
an answer that does not decrypt or verify with the keys of the Case's reviewer; one naming a question this
hospital never asked of that reviewer (`unknown`); a second answer to a question (already answered or filed);
a replayed message id; an answer naming another patient or order than the question.

This module imports neither loop/receive.py nor the write plans: receive.py hands corrections and answers here.
"""
from __future__ import annotations

import logging
from pathlib import Path

from fhirbridge.crypto import jws
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.ehr.context import App
from fhirbridge.errors import RejectedOpinion, SealError
from fhirbridge.exchange import envelope
from fhirbridge.exchange.followup import answer_composition
from fhirbridge.fhir.narrative import narrative_problems
from fhirbridge.store.followups import ANSWERED, CORRECTION, QUESTION, SENT, FollowUps
from fhirbridge.store.store import Case

log = logging.getLogger("fhirbridge.loop.followup")

UNKNOWN = ("the answer names no follow-up question this hospital asked of its sender (an unknown question, "
           "another reviewer's, or a key that reviewer has not registered); nothing written")


class UnknownQuestion(RejectedOpinion):
    """An answer to a question that does not exist (for this sender)."""

    exit_code = 2


class AlreadyAnswered(RejectedOpinion):
    """A second answer to a question, or the same answer again (a replay)."""

    exit_code = 2


def answer_path(app: App, case_id: str, answer_id: str) -> Path:
    return app.case_dir(case_id) / f"answer-{answer_id}.jwe"


def correction_path(app: App, case_id: str, correction_id: str) -> Path:
    # The name a received opinion has (loop/receive.opinion_path): a correction is an opinion.
    return app.case_dir(case_id) / f"opinion-{correction_id}.jwe"


class AnswerKeys:
    """The key set that must verify an answer: that of the reviewer the named question was sent to
    (envelope.KeyResolver). A question that does not exist and one sent to another reviewer are refused
    with the same words, as opinions are (receive.NOT_YOURS)."""

    def __init__(self, app: App):
        self.app = app

    def keyring_for(self, token: str, claims: dict) -> KeyRing:
        row = FollowUps(self.app.store).get(str(claims.get("in_reply_to", "")))
        if row is None or row["kind"] != QUESTION or row["hospital"] != self.app.hospital.key:
            log.warning("follow-up answer refused: it names question %.80r, which this service did not ask",
                        claims.get("in_reply_to"))
            raise UnknownQuestion(UNKNOWN)
        try:
            keys = self.app.reviewer_keys(row["reviewer"], kid=envelope.peek_header(token).get("kid"))
            jws.verify_compact(token, keys, typ=envelope.ANSWER)
        except SealError as exc:
            log.warning("follow-up answer to %s refused: not verified by the keys of reviewer %s: %s", row["id"],
                        row["reviewer"], exc)
            raise UnknownQuestion(UNKNOWN) from None
        return keys


def receive_answer(app: App, data: bytes, *, source: str = "answer") -> tuple[Case, str]:
    """Accept a sealed answer to a follow-up question: (its Case, the answer's id). Refuses with the reason."""
    try:
        claims, document = envelope.open_sealed(data, typ=envelope.ANSWER, decrypt=app.hospital_keys,
                                                trusted=AnswerKeys(app))
    except SealError as exc:
        raise SealError(f"{source}: refused: {exc}") from None
    followups = FollowUps(app.store)
    row = followups.get(str(claims["in_reply_to"]))
    assert row is not None   # AnswerKeys found it
    case = app.store.get(row["case_id"])
    jti = str(claims["jti"])
    if app.store.message_seen(jti) or row["answer_id"] == jti:
        raise AlreadyAnswered(f"answer {jti} was received before (a replay); nothing written")
    if row["state"] != SENT:
        raise AlreadyAnswered(f"follow-up question {row['seq']} of Case {case.id[:8]} is {row['state']}: it has "
                              "its answer already, or has not been sent; nothing written")
    if claims.get("case_id") != case.id or claims.get("patient") != case.patient or \
            claims.get("service_request") != case.service_request:
        raise RejectedOpinion(f"the answer's claims name another Case, patient or order than follow-up question "
                              f"{row['seq']} of Case {case.id[:8]}; nothing written")
    h = app.hospital
    if envelope.party_uri(claims.get("aud")) != envelope.organization_uri(h.identifier_system, h.identifier_value):
        raise RejectedOpinion("the answer is addressed to another hospital than the one that decrypted it; "
                              "nothing written")
    if document.get("identifier") != {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{jti}"}:
        raise RejectedOpinion("the answer document's identifier must be urn:uuid:<its message id>; nothing written")
    comp = answer_composition(document)
    problems = narrative_problems(str((comp.get("text") or {}).get("div", "")))
    if problems:
        raise RejectedOpinion("the answer's narrative is not safe XHTML (" + "; ".join(problems[:3]) +
                              "); nothing written")
    path = answer_path(app, case.id, jti)
    envelope.write_atomic(path, data)
    if not app.store.remember_message(jti, case.id) or not followups.answered(row["id"], answer_id=jti):
        raise AlreadyAnswered(f"follow-up question {row['seq']} of Case {case.id[:8]} took another answer "
                              "meanwhile; nothing written")
    app.store.add_event(case.id, "followup.answered", {"followup": row["id"], "seq": row["seq"], "answer": jti})
    log.info("case %s: follow-up question %s answered", case.id, row["seq"], extra={"case_id": case.id})
    return case, jti


def accept_correction(app: App, case: Case, claims: dict, data: bytes) -> str:
    """A corrected opinion for a filed Case, checked by loop/receive.py like any opinion: kept and recorded
    to be filed as a new version of the note (loop/followup.py). It must correct the current version."""
    jti = str(claims["jti"])
    followups = FollowUps(app.store)
    corrections = followups.of_case(case.id, CORRECTION)
    current = corrections[-1]["answer_id"] if corrections else case.opinion_id
    if claims.get("replaces") != current:
        raise RejectedOpinion(f"the correction replaces opinion {claims.get('replaces')}, but the current version "
                              f"of Case {case.id[:8]}'s opinion is {current}; nothing written")
    if corrections and corrections[-1]["state"] != "filed":
        raise RejectedOpinion(f"Case {case.id[:8]} has a correction still being filed; send this one once it is "
                              "in the chart; nothing written")
    envelope.write_atomic(correction_path(app, case.id, jti), data)
    if not app.store.remember_message(jti, case.id):
        raise AlreadyAnswered(f"opinion {jti} was received before (a replay); nothing written")
    row = followups.add(jti, case_id=case.id, hospital=case.hospital, reviewer=case.reviewer, kind=CORRECTION,
                        state=ANSWERED, answer_id=jti)
    app.store.add_event(case.id, "correction.received", {"correction": jti, "replaces": current, "seq": row["seq"]})
    return jti
