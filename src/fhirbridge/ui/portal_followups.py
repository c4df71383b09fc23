"""The reviewer portal's side of the conversation after the opinion (issue 16 part 3): the hospital's follow-up
questions on a Case this reviewer answered, and the form that answers each one, once.

Questions arrive as a delivered folder `followup-<id>` next to the packages (outbox and https transports) or are
fetched from the hospital's reviewer API (`GET /reviewer/follow-ups`, then the sealed message) for pulled Cases;
each is opened with the reviewer's key and verified against the trusted hospital that sent the package. The
answer is sealed to that hospital only (exchange/followup.py) and uploaded (`POST /reviewer/opinions`) or written
to the answers directory. What was asked and answered is kept in the work directory encrypted to the reviewer's
own key (it is the patient's record), so the page shows the thread again and a second answer is never offered.
"""
from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import requests
from flask import Flask, abort, flash, redirect, request, url_for

from fhirbridge import jsonutil
from fhirbridge.crypto import files, jwe
from fhirbridge.errors import FhirbridgeError, SealError
from fhirbridge.exchange import envelope
from fhirbridge.exchange.followup import QUESTION_PREFIX, FollowUpError, OpenedQuestion, open_question, seal_answer
from fhirbridge.ui import check_csrf

if TYPE_CHECKING:  # the portal imports this module; the name is only for the annotations
    from fhirbridge.ui.reviewer_portal import Portal, PortalCase

MAX_QUESTION_FILE = envelope.max_envelope_bytes(envelope.QUESTION)
ANSWER_TYP = "fhirbridge-sent-answer+jwe"


@dataclass(frozen=True)
class Question:
    id: str
    seq: int
    text: str
    sent: float | None
    answered: dict | None      # {"answer", "at", "where"} once this portal answered it


def _answered_path(portal: Portal, fid: str) -> Path:
    return portal.s.work_dir / "answered" / f"followup-{hashlib.sha256(fid.encode()).hexdigest()[:32]}.jwe"


def answered(portal: Portal, fid: str) -> dict | None:
    p = _answered_path(portal, fid)
    return jsonutil.loads(jwe.decrypt_bytes(p.read_bytes(), portal.key)) if p.exists() else None


def _question_paths(portal: Portal, pc: PortalCase) -> list[Path]:
    """The sealed questions that may be about this Case: delivered folders, or fetched from its hospital."""
    if pc.api and pc.case_id:
        return _pull(portal, pc)
    d = portal.s.packages_dir
    if not d or not d.is_dir():
        return []
    return sorted(p / envelope.ENVELOPE_FILE for p in d.iterdir()
                  if p.name.startswith(QUESTION_PREFIX) and (p / envelope.ENVELOPE_FILE).is_file())


def listing(portal: Portal, api: str) -> list[dict]:
    """The hospital's open follow-up questions for us (GET /reviewer/follow-ups); [] when it cannot be read."""
    out = io.BytesIO()
    try:
        portal._fetch(api, "/follow-ups", out, 1024 * 1024)
        rows = jsonutil.loads(out.getvalue()).get("follow_ups", [])
    except (requests.RequestException, FhirbridgeError, ValueError, AttributeError):
        return []
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _pull(portal: Portal, pc: PortalCase) -> list[Path]:
    assert pc.api is not None
    rows = listing(portal, pc.api)
    folder = files.private_dir(pc.directory.parent / "followups")
    for r in rows:
        fid = str(r.get("id", ""))
        if r.get("case") != pc.case_id or not fid.replace("-", "").isalnum():
            continue
        target = folder / f"{QUESTION_PREFIX}{fid}.jwe"
        if not target.exists():
            try:
                portal._download(pc.api, f"/follow-ups/{fid}/message", target, MAX_QUESTION_FILE)
            except (requests.RequestException, FhirbridgeError):
                continue
    return sorted(folder.glob(f"{QUESTION_PREFIX}*.jwe"))


def open_count(portal: Portal, pid: str) -> int:
    """How many follow-up questions about the Case wait for this reviewer's answer."""
    try:
        return sum(1 for q in questions(portal, pid) if not q.answered)
    except (FhirbridgeError, OSError):
        return 0


def questions(portal: Portal, pid: str) -> list[Question]:
    """The follow-up questions about the Case `pid` (its package), oldest first."""
    pc = portal.cases.get(pid)
    if pc is None:
        return []
    out: list[Question] = []
    for path in _question_paths(portal, pc):
        try:
            q = opened(portal, path)
        except (SealError, FhirbridgeError, OSError):
            continue   # not for us, or not from a hospital we trust: never shown
        if q.claims.get("package_id") != pc.package_id:
            continue
        out.append(Question(q.id, int(q.claims.get("seq") or 0), q.text, q.claims.get("iat"), answered(portal, q.id)))
    return sorted(out, key=lambda q: q.seq)


def opened(portal: Portal, path: Path) -> OpenedQuestion:
    cache: dict = portal.__dict__.setdefault("_questions", {})
    if path not in cache:
        cache[path] = open_question(path, portal.key, portal.trust)
    return cache[path]


def install(app: Flask, portal: Portal, send) -> None:
    """The answer route. `send(portal, pc, sealed, claims, name)`: how the portal hands a sealed file over."""

    @app.post("/cases/<pid>/follow-ups/<fid>")
    def answer_follow_up(pid: str, fid: str):
        check_csrf()
        pc = portal.cases.get(pid) or abort(404)
        question = next((q for q in questions(portal, pid) if q.id == fid), None)
        if question is None:
            abort(404, "no such follow-up question for this Case")
        if question.answered:
            flash("This follow-up question was answered already; an answer cannot be changed.", "error")
            return redirect(url_for("case", pid=pid, _anchor="follow-ups"))
        text = request.form.get("answer", "")
        path = next(p for p in _question_paths(portal, pc) if opened(portal, p).id == fid)
        try:
            sealed, claims = seal_answer(opened(portal, path), text, portal.key)
            where = send(portal, pc, sealed, claims, f"answer-{claims['jti']}.jwe")
        except FollowUpError as exc:
            flash(f"Not sent: {exc}.", "error")
            return redirect(url_for("case", pid=pid, _anchor="follow-ups"))
        except (requests.RequestException, FhirbridgeError) as exc:
            flash(f"Not sent: {exc}. Try again.", "error")
            return redirect(url_for("case", pid=pid, _anchor="follow-ups"))
        envelope.write_atomic(_answered_path(portal, fid), jwe.encrypt_bytes(
            jsonutil.dumps({"answer": text.strip(), "at": time.time(), "where": where, "jti": claims["jti"]}),
            portal.key.encryption_keys(), typ=ANSWER_TYP))
        flash(f"Your answer to follow-up question {question.seq} was signed and sent: {where}.", "ok")
        return redirect(url_for("case", pid=pid, _anchor="follow-ups"))
