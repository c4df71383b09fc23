"""/api: the staff API. Place orders (for EHRs that cannot write ServiceRequests), list and read Cases with
their events, retry, cancel, the accounting of disclosures. A staff bearer token (admin token, scoped API
key or OAuth2 access token; access.tokens) with the scope each endpoint needs.
"""
from __future__ import annotations

import base64
import binascii
import logging
import re
import time
from dataclasses import replace

from flask import Blueprint, Response, g, jsonify, request

from fhirbridge import jsonutil
from fhirbridge.access.tokens import Unauthorized, staff_from_token
from fhirbridge.ehr import data_request
from fhirbridge.ehr.audit import accounting
from fhirbridge.ehr.order import REQUESTER
from fhirbridge.errors import CaseError, ConfigError, FhirbridgeError
from fhirbridge.fhir.elements import summary_line
from fhirbridge.loop import checklist, supplement
from fhirbridge.loop.accepted_orders import (
    FAILED,
    PENDING,
    PLACED,
    IdempotencyConflict,
    OrderFields,
    accept,
    place,
)
from fhirbridge.loop.actions import cancel, retry
from fhirbridge.loop.followup import NotAskable, OverLimit, ask, remaining
from fhirbridge.ops.measure_report import measure_report
from fhirbridge.ops.outcome_figures import figures
from fhirbridge.service.http import ApiError, app_of, bearer, find_case, json_body, service
from fhirbridge.store.case_query import ListRequest
from fhirbridge.store.followups import FollowUps
from fhirbridge.store.order_requests import OrderRequests

log = logging.getLogger("fhirbridge.service.api")

api = Blueprint("api", __name__, url_prefix="/api")


# The scope each staff endpoint needs. An endpoint missing here is refused to everyone (fail closed), and
# a test checks that every /api route is listed.
STAFF_ENDPOINT_SCOPES = {
    "api.create_order": "orders:write",
    "api.read_order": "orders:write",     # whoever places orders follows them (no case data in the answer)
    "api.list_cases": "cases:read",
    "api.read_case": "cases:read",
    "api.retry_case": "cases:write",
    "api.cancel_case": "cases:write",
    "api.audit_accounting": "audit:read",
    "api.outcomes_report": "cases:read",
    # Issue 16 part 2: a reviewer's requests for more records, and the physician's answer (records, a document).
    "api.record_requests": "cases:read",
    "api.answer_record_request": "cases:write",
    # Issue 16 part 6: a Case held for required records: collect again, or send without them (confirmed).
    "api.release_held_case": "cases:write",
    "api.ask_follow_up": "cases:write",
    "api.list_follow_ups": "cases:read",
}


@api.before_request
def _staff_only():
    cfg = service().config
    if not (cfg.api_tokens or cfg.api_keys or cfg.oauth):
        raise ApiError(401, "the staff API is closed: no tokens are configured ([api] tokens, [[api.keys]] or "
                            "[api.oauth])")
    given = bearer()
    if not given:
        raise ApiError(401, "a valid staff bearer token is required (Authorization: Bearer ...)")
    try:
        g.staff = staff_from_token(given, cfg)
    except Unauthorized as exc:
        raise ApiError(401, str(exc)) from None
    needed = STAFF_ENDPOINT_SCOPES.get(request.endpoint or "")
    if needed is None or needed not in g.staff.scopes:
        raise ApiError(403, f"this token lacks the scope {needed or '(none defined)'} that "
                            f"{request.method} {request.path} needs")


def _case_json(case, *, events: list | None = None) -> dict:
    out = {k: getattr(case, k) for k in ("id", "step", "service_request", "patient", "reviewer", "profile", "task",
                                          "package_id", "opinion_id", "document_reference", "attempts",
                                          "last_error", "created_at", "updated_at", "due_at", "overdue_at")}
    out["hospital"] = case.hospital
    out["overdue"] = case.overdue_at is not None
    if events is not None:
        out["events"] = [{"at": e["at"], "kind": e["kind"], "detail": e["detail"]} for e in events]
    return out


_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


@api.post("/orders")
def create_order():
    body = json_body()
    unknown = set(body) - {"hospital", "patient", "question", "reviewer", "profile", "requester", "priority"}
    if unknown:
        raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}")
    for field in ("patient", "question"):
        if not isinstance(body.get(field), str) or not body[field].strip():
            raise ApiError(400, f"{field} is required (a non-empty string)")
    for field in ("hospital", "reviewer", "profile", "requester", "priority"):
        if field in body and not isinstance(body[field], str):
            raise ApiError(400, f"{field} must be a string")
    patient = body["patient"].removeprefix("Patient/")
    if not _ID.fullmatch(patient):
        raise ApiError(400, "patient must be a Patient id or Patient/<id>")
    requester = body.get("requester")
    if requester and not REQUESTER.fullmatch(requester):
        raise ApiError(400, "requester must be Practitioner/<id> or PractitionerRole/<id>")
    if body.get("priority", "routine") not in ("routine", "urgent", "asap", "stat"):
        raise ApiError(400, "priority must be one of routine, urgent, asap, stat")
    app = _hospital_app(body.get("hospital"))
    if not g.staff.may_see(app.hospital.name):
        raise ApiError(403, f"this token may not place orders for {app.hospital.name}")
    if body.get("reviewer") and body["reviewer"] not in app.config.reviewers:
        raise ApiError(400, f"no reviewer {body['reviewer']!r} (configured: {', '.join(app.config.reviewers)})")
    if not requester:
        # BSeR: a referral's requester is 1..1; no order is placed that names nobody as asking for it.
        raise ApiError(400, "requester is required: the ordering clinician, Practitioner/<id> or "
                            "PractitionerRole/<id>")
    fields = OrderFields(patient=patient, question=body["question"], requester=requester,
                         reviewer=body.get("reviewer"), profile=body.get("profile"),
                         priority=body.get("priority", "routine"))
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(400, "Idempotency-Key must be 1 to 255 visible ASCII characters (a UUID is best)")
    try:
        row, created = accept(app, fields, key=key, caller=g.staff.name)
    except IdempotencyConflict as exc:
        raise ApiError(422, str(exc)) from None
    # RFC 7240 `Prefer: respond-async`: answer as soon as the order is recorded; a worker places it in the EHR.
    if "respond-async" in request.headers.get("Prefer", "").replace(" ", "").split(","):
        if row["state"] == PENDING:
            service().place_soon(app, row["id"])
        resp = jsonify({"order": _order_json(app, row)})
        resp.status_code = 202 if row["state"] == PENDING else _status_of(row)
        resp.headers["Location"] = f"/api/orders/{row['id']}"
        resp.headers["Preference-Applied"] = "respond-async"
        return resp
    if row["state"] == PENDING:
        row = place(app, worker=service().worker, request_id=row["id"], fresh=created) or row
    return _order_answer(app, row)


def _status_of(row: dict) -> int:
    return {PLACED: 201, FAILED: 400}.get(row["state"], 202)


def _order_json(app, row: dict) -> dict:
    return {"id": row["id"], "state": row["state"], "service_request": row["service_request"],
            "case": row["case_id"], "error": row["error"], "attempts": row["attempts"],
            "created_at": row["created_at"], "updated_at": row["updated_at"], "hospital": app.hospital.name,
            "url": f"/api/orders/{row['id']}"}


def _order_answer(app, row: dict):
    """The synchronous answer: 201 with the order and its Case once placed (as before accepted orders), the
    error once failed, 202 while the EHR could not be reached (the order is kept and placed when it answers:
    answering an error would invite the client to order again)."""
    if row["state"] == FAILED:
        raise ApiError(400, row["error"] or "the order could not be placed")
    if row["state"] == PENDING:
        resp = jsonify({"order": _order_json(app, row), "service_request": None, "case": None,
                        "note": "the EHR did not answer; the order is kept and placed as soon as it does"})
        resp.status_code = 202
        resp.headers["Location"] = f"/api/orders/{row['id']}"
        return resp
    ref = row["service_request"]
    case = app.store.find_by_order(app.hospital.key, ref)
    # The order exists in the EHR from here on: whatever happens next, answer 201 so a client does not
    # retry and create a second order; the poll takes it in if taking it in now failed.
    return jsonify({"service_request": ref, "case": _case_json(case) if case else None, "order": _order_json(app, row),
                    **({} if case else {"note": "the order is in the EHR; the next poll takes it in"})}), 201


@api.get("/orders/<order_id>")
def read_order(order_id: str):
    """An accepted order: pending, placed (with its ServiceRequest and Case) or failed (with why)."""
    row = OrderRequests(service().store).get(order_id) if _ID.fullmatch(order_id) else None
    app = service().app_for_key(row["hospital"]) if row else None
    if row is None or app is None or not g.staff.may_see(app.hospital.name):
        raise ApiError(404, f"no order {order_id}")   # another hospital's order does not exist for this token
    if row["state"] == PLACED and not row["case_id"]:
        case = app.store.find_by_order(app.hospital.key, row["service_request"])
        row = dict(row, case_id=case.id if case else None)
    return jsonify({"order": _order_json(app, row)})


def _hospital_app(name: str | None):
    try:
        return service().app_for(name)
    except ConfigError:
        names = ", ".join(service().config.hospitals)
        raise ApiError(400, f"say which hospital: \"hospital\" must be one of {names}") from None


@api.get("/cases")
def list_cases():
    """One page of Cases (newest update first unless asked otherwise), filtered in the database; `next` is the
    cursor of the page after it (store/case_query.py). A mistyped filter answers 400, never as if it had
    filtered (an empty list, or every Case for "overdue")."""
    try:
        asked = ListRequest.from_args(request.args)
    except CaseError as exc:
        raise ApiError(400, str(exc)) from None
    hospital = request.args.get("hospital")
    flt = asked.filter
    if hospital:
        flt = replace(flt, hospitals=(_hospital_app(hospital).hospital.key,))
    flt = flt.narrowed_to(a.hospital.key for a in service().apps if g.staff.may_see(a.hospital.name))
    page = service().store.page_cases(flt, sort=asked.sort, descending=asked.descending, limit=asked.limit,
                                      cursor=asked.cursor)
    return jsonify({"cases": [_case_json(c) for c in page.cases], "next": page.next, "limit": asked.limit})


@api.get("/audit")
def audit_accounting():
    """The accounting of disclosures for one patient (what `fhirbridge audit --patient` prints)."""
    patient = request.args.get("patient", "")
    patient = patient if patient.startswith("Patient/") else f"Patient/{patient}"
    if not _ID.fullmatch(patient.removeprefix("Patient/")):
        raise ApiError(400, "patient is required: ?patient=<Patient id>")
    rows = []
    for app in service().apps:
        if g.staff.may_see(app.hospital.name):
            rows += [dict(r, hospital=app.hospital.name) for r in accounting(app, patient)]
    return jsonify({"patient": patient, "events": rows})


@api.get("/outcomes")
def outcomes_report():
    """The outcome figures as a FHIR R4 MeasureReport (ops/measure_report.py) of the hospitals this token may see
    (`?hospital=` one of them)."""
    name = request.args.get("hospital")
    apps = [_hospital_app(name)] if name else service().apps
    apps = [a for a in apps if g.staff.may_see(a.hospital.name)]
    if name and not apps:
        raise ApiError(403, f"this token may not see {name}")
    cfg = service().config
    rows = service().store.outcomes.rows(hospitals=tuple(a.hospital.key for a in apps))
    f = figures(rows, reviewer_names={r.name: r.display for r in cfg.reviewers.values()})
    reporter = apps[0].hospital.organization_ref() if len(apps) == 1 else None
    return Response(jsonutil.dumps(measure_report(f, now=time.time(), reporter=reporter)),
                    mimetype="application/fhir+json")


@api.get("/cases/<case_id>")
def read_case(case_id: str):
    case = find_case(case_id)
    return jsonify(_case_json(case, events=service().store.events(case.id)))


@api.post("/cases/<case_id>/retry")
def retry_case(case_id: str):
    case = find_case(case_id)
    try:
        return jsonify(_case_json(retry(app_of(case), case)))
    except CaseError as exc:  # a finished Case: nothing to retry
        raise ApiError(409, str(exc)) from None


@api.post("/cases/<case_id>/cancel")
def cancel_case(case_id: str):
    reason = json_body().get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise ApiError(400, "reason is required: say why the referral is cancelled")
    case = find_case(case_id)
    try:
        return jsonify(_case_json(cancel(app_of(case), case, reason.strip())))
    except CaseError as exc:
        raise ApiError(409, str(exc)) from None


# --- more records on a reviewer's request (issue 16 part 2; loop/supplement.py) ------------------------------

@api.get("/cases/<case_id>/requests")
def record_requests(case_id: str):
    """The Case's CDex data requests in the EHR, and for the open ones the records that could answer them (the
    request's FHIR query's result `proposed`)."""
    case = find_case(case_id)
    app = app_of(case)
    reqs = data_request.requests_for(app, case)
    out = []
    for r in reqs:
        item: dict = {"task": r.task, "status": r.status, "text": r.text, "query": r.query, "authored": r.authored,
                      "output": list(r.outputs)}
        if r.is_open and case.step == "await_opinion":
            offered = supplement.candidates(app, case, r)
            item["candidates"] = [{"reference": c["ref"], "summary": summary_line(c["resource"]),
                                   "proposed": c["proposed"]} for c in offered["records"]]
            item["query_error"] = offered["query_error"]
        out.append(item)
    return jsonify({"case": case.id, "step": case.step, "requests": out})


@api.post("/cases/<case_id>/requests/<task_id>/answer")
def answer_record_request(case_id: str, task_id: str):
    """{"records": ["Type/id", ...], "document": {"title", "content_type": "application/pdf" | "text/plain",
    "data": base64, "code": "http://loinc.org|<code>"}}: at least one of them. 202: the supplement goes."""
    if (request.content_length or 0) > UPLOAD_BODY_LIMIT:
        raise ApiError(413, f"the answer is at most {UPLOAD_BODY_LIMIT} bytes")
    body = json_body()
    records = body.get("records", [])
    if not isinstance(records, list) or not all(isinstance(r, str) for r in records):
        raise ApiError(400, 'records is a list of references ("Type/id")')
    case = find_case(case_id)
    try:
        upload = _upload(body.get("document"))
        case = supplement.answer_request(app_of(case), case, f"Task/{task_id}", records=records, upload=upload,
                                         actor=g.staff.name)
    except data_request.BadRequest as exc:
        raise ApiError(409 if "awaits" in str(exc) or "answered already" in str(exc) else 400, str(exc)) from None
    except FhirbridgeError as exc:
        raise ApiError(503 if getattr(exc, "transient", False) else 400, str(exc)) from None
    return jsonify(_case_json(case)), 202


@api.post("/cases/<case_id>/held")
def release_held_case(case_id: str):
    """{"action": "collect-again"} or {"action": "send-without", "confirm": ["<item>", ...]} (every missing
    item named: the physician confirms each one)."""
    body = json_body()
    case = find_case(case_id)
    try:
        if body.get("action") == "collect-again":
            case = checklist.collect_again(app_of(case), case, by=g.staff.name)
        elif body.get("action") == "send-without":
            missing = [str(m) for m in (case.data or {}).get("missing", [])]
            if sorted(body.get("confirm") or []) != sorted(missing):
                raise ApiError(400, f"confirm must name every missing item: {missing}")
            case = checklist.confirm_incomplete(app_of(case), case, by=g.staff.name, missing=missing)
        else:
            raise ApiError(400, 'action is "collect-again" or "send-without"')
    except CaseError as exc:
        raise ApiError(409, str(exc)) from None
    return jsonify(_case_json(case))


UPLOAD_BODY_LIMIT = supplement.MAX_UPLOAD * 4 // 3 + 64 * 1024    # base64 of the largest document, and the rest


def _upload(doc: object) -> supplement.Upload | None:
    if doc is None:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), str):
        raise data_request.BadRequest('document is {"title", "content_type", "data": base64}')
    try:
        data = base64.b64decode(doc["data"], validate=True)
    except (binascii.Error, ValueError):
        raise data_request.BadRequest("document.data is not base64") from None
    code = doc.get("code")
    if code is not None and (not isinstance(code, str) or "|" not in code):
        raise data_request.BadRequest('document.code is "system|code"')
    return supplement.Upload(title=str(doc.get("title") or ""), content_type=str(doc.get("content_type") or ""),
                             data=data, code=tuple(code.split("|", 1)) if code else None)  # type: ignore[arg-type]
# --- follow-up questions on a filed opinion (loop/followup.py) -------------------------------------------
# The answers carry no clinical text: states, times and references (the texts are in the EHR, and on the
# physician page).
FOLLOW_UP_FIELDS = ("id", "kind", "seq", "state", "asked_by", "created_at", "sent_at", "answered_at", "filed_at",
                    "communication", "note", "error")


def _follow_up_json(row: dict) -> dict:
    return {k: row[k] for k in FOLLOW_UP_FIELDS}


@api.post("/cases/<case_id>/follow-ups")
def ask_follow_up(case_id: str):
    """Ask the reviewer a follow-up question about the Case's filed opinion; a worker sends it (202)."""
    case = find_case(case_id)
    body = json_body()
    question, asked_by = body.get("question"), body.get("asked_by")
    if not isinstance(question, str) or not question.strip():
        raise ApiError(400, "question is required (a non-empty string)")
    if asked_by is not None and (not isinstance(asked_by, str) or not REQUESTER.fullmatch(asked_by)):
        raise ApiError(400, "asked_by must be Practitioner/<id> or PractitionerRole/<id>")
    app = app_of(case)
    try:
        row = ask(app, case, question, asked_by=asked_by)
    except NotAskable as exc:
        raise ApiError(409, str(exc)) from None
    except OverLimit as exc:
        raise ApiError(409, str(exc)) from None
    return jsonify({**_follow_up_json(row), "case": case.id, "remaining": remaining(app, case)}), 202


@api.get("/cases/<case_id>/follow-ups")
def list_follow_ups(case_id: str):
    """The Case's follow-up questions (and corrected opinions), oldest first, with what is still open."""
    case = find_case(case_id)
    rows = FollowUps(service().store).of_case(case.id)
    return jsonify({"case": case.id, "limit": app_of(case).config.reviewer(case.reviewer).follow_up_limit,
                    "remaining": remaining(app_of(case), case),
                    "open": sum(1 for r in rows if r["state"] not in ("filed", "failed")),
                    "follow_ups": [_follow_up_json(r) for r in rows]})
