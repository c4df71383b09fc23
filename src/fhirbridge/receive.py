"""Receive a sealed opinion: check everything before the Case moves, then hand it to the file step.

Refused (RejectedOpinion / SealError, nothing written, the Case unchanged) when: it does not decrypt with
the hospital's keys; it names a Case this service does not know; it is not signed by the reviewer that
Case was sent to; it answers another package; the Case is not awaiting an opinion (already filed,
cancelled...); its message id was seen before (replay); it has expired; its FHIR is invalid; or its
document is about another patient or order.

Accepted opinions are kept as received (still encrypted to the hospital's key) in the Case directory, so
the file step can be retried, and are re-verified there before filing.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from . import envelope
from .context import App
from .crypto.keys import KeyRing
from .errors import RejectedOpinion, SealError
from .fhir.validate import validate as validate_resource
from .store import Case

OPINION_FILE = "opinion.jwe"
CONSULT_NOTE = ("http://loinc.org", "11488-4")


@dataclass
class Received:
    case: Case
    opinion_id: str


def opinion_keys(app: App) -> callable:
    def trusted(claims: dict) -> KeyRing:
        case = app.store.find(str(claims.get("case_id", "")))
        if case is None:
            raise RejectedOpinion(f"the opinion is for Case {claims.get('case_id')!r}, which this service does not "
                                  "know; nothing was written")
        return app.reviewer_keys(case.reviewer)
    return trusted


def receive_bytes(app: App, data: bytes, *, source: str = "opinion") -> Received:
    try:
        claims, document = envelope.open_sealed(data, typ=envelope.OPINION, decrypt=app.hospital_keys,
                                                trusted=opinion_keys(app))
    except SealError as exc:
        raise SealError(f"{source}: refused: {exc}") from None
    case = app.store.get(claims["case_id"])
    reviewer = app.config.reviewer(case.reviewer)
    _refuse_unless(case.step != "done",
                   f"Case {case.id[:8]} already has its opinion filed as {case.document_reference}; nothing written")
    _refuse_unless(not (case.step == "file" and case.opinion_id == claims["jti"]),
                   f"this opinion was already received for Case {case.id[:8]} and is being filed; nothing written")
    _refuse_unless(not app.store.message_seen(claims["jti"]),
                   f"opinion {claims['jti']} was received before (a replay); nothing written")
    _refuse_unless(case.step == "await_opinion",
                   f"Case {case.id[:8]} is {case.step}, not awaiting an opinion; nothing written")
    _refuse_unless(claims.get("package_id") == case.package_id,
                   f"the opinion answers package {claims.get('package_id')}, but Case {case.id[:8]} was sent "
                   f"package {case.package_id}; nothing written")
    iss = claims.get("iss") or {}
    _refuse_unless(iss.get("value") == reviewer.identifier_value,
                   f"the opinion says it is from {iss.get('value')!r}, but Case {case.id[:8]} was sent to "
                   f"{reviewer.identifier_value!r}; nothing written")
    check_document(app, case, document)
    path = app.case_dir(case.id) / OPINION_FILE
    envelope.write_atomic(path, data)
    if not app.store.remember_message(claims["jti"], case.id):
        raise RejectedOpinion(f"opinion {claims['jti']} was received before (a replay); nothing written")
    case = app.store.update(case.id, step="file", opinion_id=claims["jti"], event_kind="opinion.received",
                            detail={"opinion_id": claims["jti"], "from": reviewer.name})
    return Received(case=case, opinion_id=claims["jti"])


def _refuse_unless(ok: bool, message: str) -> None:
    if not ok:
        raise RejectedOpinion(message)


def check_document(app: App, case: Case, document: dict) -> None:
    """The opinion must be a valid Consult note about this Case's patient and order."""
    problems = []
    for i, entry in enumerate(document.get("entry", [])):
        res = entry.get("resource", {})
        for reason in validate_resource(res):
            problems.append(f"entry {i} ({res.get('resourceType', '?')}): {reason}")
    if problems:
        raise RejectedOpinion("the opinion is not valid FHIR; nothing written:\n  " + "\n  ".join(problems[:10]))
    bundle_only = {k: v for k, v in document.items() if k != "entry"}
    reasons = validate_resource({**bundle_only, "entry": []})
    if reasons or document.get("type") != "document":
        raise RejectedOpinion("the opinion is not a FHIR document Bundle: " + "; ".join(reasons or ["type"]))
    comp = document["entry"][0].get("resource", {}) if document.get("entry") else {}
    if comp.get("resourceType") != "Composition":
        raise RejectedOpinion("the opinion document does not start with a Composition; nothing written")
    codings = {(c.get("system"), c.get("code")) for c in comp.get("type", {}).get("coding", [])}
    if CONSULT_NOTE not in codings:
        raise RejectedOpinion("the opinion's Composition is not a Consult note (LOINC 11488-4); nothing written")
    if not same_ref(comp.get("subject", {}).get("reference", ""), case.patient, app):
        raise RejectedOpinion(f"the opinion is about a different patient than Case {case.id[:8]}; nothing written")
    foci = {s.get("focus", {}).get("reference") for s in comp.get("section", []) if s.get("focus")}
    if foci and not any(same_ref(f, case.service_request, app) for f in foci):
        raise RejectedOpinion(f"the opinion answers a different order than Case {case.id[:8]}; nothing written")


def same_ref(ref: str, local: str, app: App) -> bool:
    base = app.config.hospital.fhir_base_url.rstrip("/") + "/"
    return ref == local or ref == base + local


def receive_file(app: App, path: Path) -> Received:
    return receive_bytes(app, envelope.read_limited(path), source=str(path))


def process_inbox(app: App) -> tuple[list[Received], list[tuple[Path, str]]]:
    """Receive every *.jwe in the inbox. Accepted files move to inbox/accepted/, refused ones to
    inbox/refused/ with a .reason.txt beside them: nothing is deleted, nothing is lost."""
    inbox = app.config.inbox
    if not inbox.is_dir():
        return [], []
    accepted, refused = [], []
    for path in sorted(inbox.glob("*.jwe")):
        try:
            accepted.append(receive_file(app, path))
            _move(path, inbox / "accepted")
        except (RejectedOpinion, SealError) as exc:
            refused.append((path, str(exc)))
            dest = _move(path, inbox / "refused")
            dest.with_name(dest.name + ".reason.txt").write_text(str(exc) + "\n", encoding="utf-8")
    return accepted, refused


def _move(path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / path.name
    n = 1
    while dest.exists():
        dest = folder / f"{path.stem}.{n}{path.suffix}"
        n += 1
    shutil.move(str(path), dest)
    return dest
