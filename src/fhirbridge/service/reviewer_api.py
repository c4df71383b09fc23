"""/reviewer: the reviewer API, for reviewers without an endpoint of their own (transport "pull"): list
their Cases, fetch sealed package files, submit sealed opinions, ask for more records, decline. A signed
JWT from the reviewer's registered key (or its static api_token where configured); each reviewer sees
only its own Cases. Nothing clinical leaves here except the sealed (encrypted) files themselves.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, g, jsonify, request, send_file

from fhirbridge.access.tokens import Unauthorized, reviewer_from_bearer
from fhirbridge.ehr.data_request import BadRequest, request_records
from fhirbridge.errors import CaseError, ConsentDenied, FhirbridgeError
from fhirbridge.exchange.envelope import ENVELOPE_FILE
from fhirbridge.loop import consent
from fhirbridge.loop.actions import cancel, decline
from fhirbridge.loop.followup import message_dir
from fhirbridge.loop.followup_inbound import UnknownQuestion
from fhirbridge.loop.receive import app_for, receive_bytes
from fhirbridge.service.http import ApiError, app_of, bearer, find_case, json_body, service
from fhirbridge.steps import Step
from fhirbridge.store.followups import SENT, FollowUps

MAX_OPINION_UPLOAD = 8 * 1024 * 1024

reviewer_api = Blueprint("reviewer_api", __name__, url_prefix="/reviewer")


@reviewer_api.before_request
def _reviewer_only():
    """A signed JWT from the reviewer's registered key (access.tokens), or its static api_token where configured."""
    svc = service()
    try:
        g.reviewer = reviewer_from_bearer(bearer(), svc.config, audiences=reviewer_audiences(),
                                          keys_for=lambda r, kid: svc.apps[0].reviewer_keys(r.name, kid),
                                          remember=lambda jti, r: svc.store.remember_token(jti, r.name))
    except Unauthorized as exc:
        raise ApiError(401, str(exc)) from None


def reviewer_audiences() -> tuple[str, ...]:
    """The aud a reviewer token must name: <public_url>/reviewer. Never derived from the request (its Host
    header is the caller's to choose); without public_url no token is accepted (the loader requires it
    wherever a reviewer pulls)."""
    public = service().config.public_url
    return (f"{public}/reviewer",) if public else ()


def _own_case(case_id: str):
    case = find_case(case_id)
    if case.reviewer != g.reviewer.name:
        raise ApiError(404, f"no Case {case_id}")  # another reviewer's Case does not exist for this one
    return case


@reviewer_api.get("/cases")
def reviewer_cases():
    cases = [c for c in service().store.list_cases(steps=(Step.AWAIT_OPINION.value,)) if c.reviewer == g.reviewer.name]
    # Each supplement (issue 16 part 2: records added on request) is listed as a package of the same Case; its
    # files are fetched with ?package=<its id>.
    return jsonify({"cases": [{"id": c.id, "package_id": pid, "due_at": c.due_at, "files": _package_files(c, pid)}
                              for c in cases for pid in [str(c.package_id), *_supplements(c)]]})


def _supplements(case) -> list[str]:
    return [str(s["package_id"]) for s in (case.data or {}).get("supplements", [])]


def _package_dir(case, package_id: str | None = None) -> Path:
    pid = package_id if package_id in _supplements(case) else str(case.package_id)
    return service().config.data_dir / "cases" / case.id / "package" / pid


def _package_files(case, package_id: str | None = None) -> list[str]:
    d = _package_dir(case, package_id)
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) if d.is_dir() else []


@reviewer_api.get("/cases/<case_id>/package/<path:name>")
def reviewer_file(case_id: str, name: str):
    case = _own_case(case_id)
    if case.step not in (Step.AWAIT_OPINION, Step.FILE, Step.DONE):
        raise ApiError(409, f"Case {case_id} has no package to fetch (it is {case.step})")
    package = request.args.get("package") or None
    if package is not None and package != case.package_id and package not in _supplements(case):
        raise ApiError(404, f"no package {package!r} in this Case")
    if name not in _package_files(case, package):
        raise ApiError(404, f"no file {name!r} in this package")
    if case.step == Step.AWAIT_OPINION:
        _consent_still_allows(case)
    return send_file(_package_dir(case, package) / name, mimetype="application/jose+json", as_attachment=True,
                     download_name=Path(name).name)


def _consent_still_allows(case) -> None:
    """For a pull reviewer, "delivered" means "made available": a Consent recorded since then must still stop
    the disclosure, so each fetch looks again (every file: attachments decrypt on their own). Fails closed:
    without an answer from the EHR nothing is handed out."""
    denied = _consent_denial(case, "package", {"step": "fetch"})
    if denied is not None:
        cancel(app_of(case), case, str(denied))
        raise ApiError(410, "this package has been withdrawn by the hospital; do not use any copy of it")


def _consent_denial(case, what: str, event: dict) -> ConsentDenied | None:
    """The patient's Consents looked at again for a fetch: the denial (recorded as `consent.denied` with
    `event`), or None when they allow it. Fails closed: an EHR that does not answer is a 503."""
    app = app_of(case)
    try:
        consent.check(app, case.patient, app.config.reviewer(case.reviewer))
    except ConsentDenied as exc:
        app.store.add_event(case.id, "consent.denied", {**event, "consent": exc.consent})
        return exc
    except FhirbridgeError as exc:
        raise ApiError(503, f"the hospital cannot release this {what} right now ({exc.__class__.__name__}); "
                            "try again later") from None
    return None


def _consent_allows_question(case, followup_id: str) -> None:
    """As for a package: the question is made available, so each fetch looks at the patient's Consents again.
    The Case is done (its opinion filed), so a denial withholds the question and leaves the Case as it is."""
    if _consent_denial(case, "question", {"step": "follow-up fetch", "followup": followup_id}) is not None:
        raise ApiError(410, "this question has been withdrawn by the hospital; do not use any copy of it")


@reviewer_api.post("/opinions")
def reviewer_opinion():
    if (request.content_length or 0) > MAX_OPINION_UPLOAD:
        raise ApiError(413, f"an opinion is at most {MAX_OPINION_UPLOAD} bytes")
    data = request.get_data(cache=False)
    if len(data) > MAX_OPINION_UPLOAD:
        raise ApiError(413, f"an opinion is at most {MAX_OPINION_UPLOAD} bytes")
    app = app_for(service().apps, data)
    # What binds an opinion to its Case is its signature, checked against the keys of the reviewer the Case
    # was sent to, not the bearer token: a reviewer cannot submit anything for another's Case that the
    # other did not sign.
    # The same upload takes a corrected opinion and the answer to a follow-up question (receive_bytes tells
    # them apart by the envelope's type): an answer to a question this hospital never asked is a 404.
    try:
        received = receive_bytes(app, data, source="uploaded opinion")
    except UnknownQuestion as exc:
        raise ApiError(404, str(exc)) from None
    return jsonify({"case": received.case.id, received.kind: received.opinion_id, "kind": received.kind,
                    "status": "accepted; filing"}), 202


@reviewer_api.get("/follow-ups")
def reviewer_follow_ups():
    """The follow-up questions sent to this reviewer and not yet answered, each with its sealed message."""
    rows = FollowUps(service().store).open_rows(reviewer=g.reviewer.name, states=(SENT,))
    store = service().store
    return jsonify({"follow_ups": [{"id": r["id"], "case": r["case_id"], "seq": r["seq"], "sent_at": r["sent_at"],
                                    "package_id": store.get(r["case_id"]).package_id,
                                    "message": f"follow-ups/{r['id']}/message"} for r in rows]})


@reviewer_api.get("/follow-ups/<followup_id>/message")
def reviewer_follow_up_message(followup_id: str):
    row = FollowUps(service().store).get(followup_id)
    if row is None or row["reviewer"] != g.reviewer.name or row["kind"] != "question" or row["sent_at"] is None:
        raise ApiError(404, f"no follow-up question {followup_id}")
    case = _own_case(row["case_id"])
    path = message_dir(app_of(case), case.id, followup_id) / ENVELOPE_FILE
    if not path.exists():
        raise ApiError(404, f"no follow-up question {followup_id}")
    _consent_allows_question(case, followup_id)
    return send_file(path, mimetype="application/jose+json", as_attachment=True,
                     download_name=f"followup-{followup_id}.jwe")


@reviewer_api.post("/cases/<case_id>/requests")
def reviewer_data_request(case_id: str):
    """Ask the hospital for more records (a CDex-style data request Task in the EHR, part of the referral)."""
    case = _own_case(case_id)
    try:
        body = json_body()
        ref = request_records(app_of(case), case, body.get("text"), body.get("query"))
    except BadRequest as exc:
        raise ApiError(409 if "awaits" in str(exc) else 400, str(exc)) from None
    return jsonify({"case": case.id, "task": ref, "status": "requested"}), 201


@reviewer_api.post("/cases/<case_id>/decline")
def reviewer_decline(case_id: str):
    case = _own_case(case_id)   # first: another reviewer's Case is a 404 whatever the body says
    reason = json_body().get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise ApiError(400, "reason is required: the referring physician needs to know why")
    try:
        return jsonify({"case": decline(app_of(case), case, reason.strip()).id, "status": "declined"})
    except CaseError as exc:
        raise ApiError(409, str(exc)) from None
