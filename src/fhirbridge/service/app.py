"""The web application: one Flask app factory, served by gunicorn (`fhirbridge serve`).

    /api/...       hospital staff: place orders (for EHRs that cannot write ServiceRequests), list and read
                   Cases with their events, retry, cancel. Bearer token from `[api] tokens`.
    /reviewer/...  reviewers without an endpoint of their own (transport "pull"): list their Cases, fetch
                   sealed package files, submit sealed opinions, decline. Bearer `reviewers[].api_token`;
                   each reviewer sees only its own Cases.
    /fhir/...      FHIR-facing: subscription notifications from the EHR (answers are OperationOutcome).
    /healthz /readyz /openapi.json /docs

Every error is a JSON body with a clear message ({"error": {"status", "message"}}); FHIR-facing endpoints
answer with an OperationOutcome instead. Nothing clinical is ever in a response of /api or /reviewer
except the sealed (encrypted) files themselves.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request, send_file
from werkzeug.exceptions import HTTPException

from fhirbridge.config import loader as config_mod
from fhirbridge.errors import CaseError, ConfigError, FhirbridgeError, FhirError, RejectedOpinion, SealError
from fhirbridge.service.scheduler import Service
from fhirbridge.store.store import ping

log = logging.getLogger("fhirbridge.service.app")
MAX_OPINION_UPLOAD = 8 * 1024 * 1024
PAGE_PREFIXES = ("/dashboard", "/physician")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(message)


def service() -> Service:
    return current_app.extensions["fhirbridge"]


def _json_error(status: int, message: str):
    return jsonify({"error": {"status": status, "message": message}}), status


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


# --- staff API ----------------------------------------------------------------------------------------

api = Blueprint("api", __name__, url_prefix="/api")


# The scope each staff endpoint needs. An endpoint missing here is refused to everyone (fail closed), and
# a test checks that every /api route is listed.
STAFF_ENDPOINT_SCOPES = {
    "api.create_order": "orders:write",
    "api.list_cases": "cases:read",
    "api.read_case": "cases:read",
    "api.retry_case": "cases:write",
    "api.cancel_case": "cases:write",
    "api.audit_accounting": "audit:read",
}


@api.before_request
def _staff_only():
    from fhirbridge.access.tokens import Unauthorized, staff_from_token
    cfg = service().config
    if not (cfg.api_tokens or cfg.api_keys or cfg.oauth):
        raise ApiError(401, "the staff API is closed: no tokens are configured ([api] tokens, [[api.keys]] or "
                            "[api.oauth])")
    given = _bearer()
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


def _visible(case) -> bool:
    app = service().app_for_key(case.hospital)
    return app is not None and g.staff.may_see(app.hospital.name)


def _case_json(case, *, events: list | None = None) -> dict:
    out = {k: getattr(case, k) for k in ("id", "step", "service_request", "patient", "reviewer", "profile", "task",
                                          "package_id", "opinion_id", "document_reference", "attempts",
                                          "last_error", "created_at", "updated_at", "due_at", "overdue_at")}
    out["hospital"] = case.hospital
    out["overdue"] = case.overdue_at is not None
    if events is not None:
        out["events"] = [{"at": e["at"], "kind": e["kind"], "detail": e["detail"]} for e in events]
    return out


def _body() -> dict:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object (Content-Type: application/json)")
    return data


def _find_case(case_id: str):
    try:
        case = service().store.get(case_id)
    except CaseError:
        raise ApiError(404, f"no Case {case_id}") from None
    if "staff" in g and not _visible(case):
        raise ApiError(404, f"no Case {case_id}")   # another hospital's Case does not exist for this token
    return case


_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


@api.post("/orders")
def create_order():
    from fhirbridge.loop.intake import order_changed
    from fhirbridge.ehr.order import place_order
    body = _body()
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
    if requester and not re.fullmatch(r"(Practitioner|PractitionerRole)/[A-Za-z0-9\-.]{1,64}", requester):
        raise ApiError(400, "requester must be Practitioner/<id> or PractitionerRole/<id>")
    if body.get("priority", "routine") not in ("routine", "urgent", "asap", "stat"):
        raise ApiError(400, "priority must be one of routine, urgent, asap, stat")
    app = _hospital_app(body.get("hospital"))
    if not g.staff.may_see(app.hospital.name):
        raise ApiError(403, f"this token may not place orders for {app.hospital.name}")
    if body.get("reviewer") and body["reviewer"] not in app.config.reviewers:
        raise ApiError(400, f"no reviewer {body['reviewer']!r} (configured: {', '.join(app.config.reviewers)})")
    sr = place_order(app, patient=patient, question=body["question"], reviewer=body.get("reviewer"),
                     profile=body.get("profile"), requester=requester, priority=body.get("priority", "routine"))
    ref = f"ServiceRequest/{sr['id']}"
    # The order exists in the EHR from here on: whatever happens next, answer 201 so a client does not
    # retry and create a second order; the poll takes it in if taking it in now fails.
    try:
        order_changed(app, sr)
    except Exception as exc:  # noqa: BLE001
        log.warning("order %s written but not yet taken in: %s", ref, exc)
    case = app.store.find_by_order(app.hospital.key, ref)
    return jsonify({"service_request": ref, "case": _case_json(case) if case else None,
                    **({} if case else {"note": "the order is in the EHR; the next poll takes it in"})}), 201


def _hospital_app(name: str | None):
    try:
        return service().app_for(name)
    except ConfigError:
        names = ", ".join(service().config.hospitals)
        raise ApiError(400, f"say which hospital: \"hospital\" must be one of {names}") from None


@api.get("/cases")
def list_cases():
    step = request.args.get("step")
    # A mistyped filter must not answer as if it had filtered (an empty list, or every Case for "overdue").
    from fhirbridge.service.openapi import CASE_STEPS
    if step is not None and step not in CASE_STEPS:
        raise ApiError(400, f"step must be one of {', '.join(CASE_STEPS)}")
    if request.args.get("overdue") not in (None, "true"):
        raise ApiError(400, 'overdue must be "true" (or left out)')
    hospital = request.args.get("hospital")
    cases = service().store.list(steps=(step,) if step else None,
                                 hospital=_hospital_app(hospital).hospital.key if hospital else None)
    if request.args.get("overdue") == "true":
        cases = [c for c in cases if c.overdue_at is not None]
    return jsonify({"cases": [_case_json(c) for c in cases if _visible(c)]})


@api.get("/audit")
def audit_accounting():
    """The accounting of disclosures for one patient (what `fhirbridge audit --patient` prints)."""
    from fhirbridge.ehr.audit import accounting
    patient = request.args.get("patient", "")
    patient = patient if patient.startswith("Patient/") else f"Patient/{patient}"
    if not _ID.fullmatch(patient.removeprefix("Patient/")):
        raise ApiError(400, "patient is required: ?patient=<Patient id>")
    rows = []
    for app in service().apps:
        if g.staff.may_see(app.hospital.name):
            rows += [dict(r, hospital=app.hospital.name) for r in accounting(app, patient)]
    return jsonify({"patient": patient, "events": rows})


@api.get("/cases/<case_id>")
def read_case(case_id: str):
    case = _find_case(case_id)
    return jsonify(_case_json(case, events=service().store.events(case.id)))


@api.post("/cases/<case_id>/retry")
def retry_case(case_id: str):
    from fhirbridge.loop.runner import retry
    case = _find_case(case_id)
    return jsonify(_case_json(retry(_app_of(case), case)))


@api.post("/cases/<case_id>/cancel")
def cancel_case(case_id: str):
    from fhirbridge.loop.runner import cancel
    reason = _body().get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise ApiError(400, "reason is required: say why the referral is cancelled")
    case = _find_case(case_id)
    try:
        return jsonify(_case_json(cancel(_app_of(case), case, reason.strip())))
    except CaseError as exc:
        raise ApiError(409, str(exc)) from None


def _app_of(case):
    app = service().app_for_key(case.hospital)
    if app is None:
        raise ApiError(409, "this Case belongs to a hospital that is no longer configured")
    return app


# --- reviewer API (transport "pull") -----------------------------------------------------------------

reviewer_api = Blueprint("reviewer_api", __name__, url_prefix="/reviewer")


@reviewer_api.before_request
def _reviewer_only():
    """A signed JWT from the reviewer's registered key (api_auth), or its static api_token where configured."""
    from fhirbridge.access.tokens import Unauthorized, reviewer_from_bearer
    svc = service()
    try:
        g.reviewer = reviewer_from_bearer(_bearer(), svc.config, audiences=reviewer_audiences(),
                                          keys_for=lambda r, kid: svc.apps[0].reviewer_keys(r.name, kid),
                                          remember=lambda jti, r: svc.store.remember_token(jti, r.name))
    except Unauthorized as exc:
        raise ApiError(401, str(exc)) from None


def reviewer_audiences() -> tuple[str, ...]:
    """The aud a reviewer token must name: <public_url>/reviewer (else this request's own base URL)."""
    public = service().config.public_url
    return (f"{public}/reviewer",) if public else (request.host_url.rstrip("/") + "/reviewer",)


def _own_case(case_id: str):
    case = _find_case(case_id)
    if case.reviewer != g.reviewer.name:
        raise ApiError(404, f"no Case {case_id}")  # another reviewer's Case does not exist for this one
    return case


@reviewer_api.get("/cases")
def reviewer_cases():
    cases = [c for c in service().store.list(steps=("await_opinion",)) if c.reviewer == g.reviewer.name]
    return jsonify({"cases": [{"id": c.id, "package_id": c.package_id, "due_at": c.due_at,
                               "files": _package_files(c)} for c in cases]})


def _package_dir(case) -> Path:
    return service().config.data_dir / "cases" / case.id / "package" / str(case.package_id)


def _package_files(case) -> list[str]:
    d = _package_dir(case)
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) if d.is_dir() else []


@reviewer_api.get("/cases/<case_id>/package/<path:name>")
def reviewer_file(case_id: str, name: str):
    case = _own_case(case_id)
    if case.step not in ("await_opinion", "file", "done"):
        raise ApiError(409, f"Case {case_id} has no package to fetch (it is {case.step})")
    if name not in _package_files(case):
        raise ApiError(404, f"no file {name!r} in this package")
    if case.step == "await_opinion":
        _consent_still_allows(case)
    return send_file(_package_dir(case) / name, mimetype="application/jose+json", as_attachment=True,
                     download_name=Path(name).name)


def _consent_still_allows(case) -> None:
    """For a pull reviewer, "delivered" means "made available": a Consent recorded since then must still stop
    the disclosure, so each fetch looks again (every file: attachments decrypt on their own). Fails closed:
    without an answer from the EHR nothing is handed out."""
    from fhirbridge.loop import consent
    from fhirbridge.errors import ConsentDenied
    from fhirbridge.loop.runner import cancel
    app = _app_of(case)
    try:
        consent.check(app, case.patient, app.config.reviewer(case.reviewer))
    except ConsentDenied as exc:
        app.store.add_event(case.id, "consent.denied", {"step": "fetch", "consent": exc.consent})
        cancel(app, case, str(exc))
        raise ApiError(410, "this package has been withdrawn by the hospital; do not use any copy of it") from None
    except FhirbridgeError as exc:
        raise ApiError(503, f"the hospital cannot release this package right now ({exc.__class__.__name__}); "
                            "try again later") from None


@reviewer_api.post("/opinions")
def reviewer_opinion():
    from fhirbridge.loop.receive import app_for, receive_bytes
    if (request.content_length or 0) > MAX_OPINION_UPLOAD:
        raise ApiError(413, f"an opinion is at most {MAX_OPINION_UPLOAD} bytes")
    data = request.get_data(cache=False)
    if len(data) > MAX_OPINION_UPLOAD:
        raise ApiError(413, f"an opinion is at most {MAX_OPINION_UPLOAD} bytes")
    app = app_for(service().apps, data)
    # What binds an opinion to its Case is its signature, checked against the keys of the reviewer the Case
    # was sent to, not the bearer token: a reviewer cannot submit anything for another's Case that the
    # other did not sign.
    received = receive_bytes(app, data, source="uploaded opinion")
    return jsonify({"case": received.case.id, "opinion": received.opinion_id, "status": "accepted; filing"}), 202


@reviewer_api.post("/cases/<case_id>/requests")
def reviewer_data_request(case_id: str):
    """Ask the hospital for more records (a CDex-style data request Task in the EHR, part of the referral)."""
    from fhirbridge.ehr.data_request import BadRequest, request_records
    case = _own_case(case_id)
    try:
        ref = request_records(_app_of(case), case, _body().get("text"))
    except BadRequest as exc:
        raise ApiError(409 if "awaits" in str(exc) else 400, str(exc)) from None
    return jsonify({"case": case.id, "task": ref, "status": "requested"}), 201


@reviewer_api.post("/cases/<case_id>/decline")
def reviewer_decline(case_id: str):
    from fhirbridge.loop.runner import decline
    case = _own_case(case_id)   # first: another reviewer's Case is a 404 whatever the body says
    reason = _body().get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise ApiError(400, "reason is required: the referring physician needs to know why")
    try:
        return jsonify({"case": decline(_app_of(case), case, reason.strip()).id, "status": "declined"})
    except CaseError as exc:
        raise ApiError(409, str(exc)) from None


# --- health --------------------------------------------------------------------------------------------

health = Blueprint("health", __name__)


@health.get("/.well-known/jwks.json")
def hospital_jwks():
    """The public keys of every hospital served here: reviewers verify packages and seal opinions with them
    (a reviewer can follow this URL instead of keeping a copy). Never a private member."""
    from fhirbridge.crypto.keys import public_jwks
    keys: list[dict] = []
    for app in service().apps:
        keys += public_jwks(app.hospital_keys.public_jwks())["keys"]
    resp = json_response({"keys": keys}, content_type="application/jwk-set+json")
    resp.headers["Cache-Control"] = "public, max-age=300"
    return resp


@health.get("/healthz")
def healthz():
    return jsonify({"status": "alive"})


@health.get("/readyz")
def readyz():
    """Ready when the store answers: every replica can then take API calls and notifications and work the
    Cases of any EHR that is up. Each EHR is checked too, quickly (no retries, 2 s + 3 s) and reported, but
    one hospital's EHR being down must not take every replica out of the load balancer. Cached 5 s."""
    cache = current_app.extensions.setdefault("fhirbridge.ready", {})  # per app, never shared between apps
    with cache.setdefault("lock", threading.Lock()):
        cached = cache.get("result")
        if cached and time.monotonic() - cached[0] < 5:
            return jsonify(cached[1]), cached[2]
        checks, ok = {}, True
        try:
            ping(service().store)
            checks["store"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["store"], ok = f"unreachable: {exc.__class__.__name__}", False
        for app in service().apps:
            checks[f"ehr:{app.hospital.name}"] = _quick_ehr_check(app)
        degraded = [k for k, v in checks.items() if k.startswith("ehr:") and v != "ok"]
        body = {"status": ("degraded" if degraded else "ready") if ok else "not ready", "checks": checks}
        status = 200 if ok else 503
        cache["result"] = (time.monotonic(), body, status)
        return jsonify(body), status


def _quick_ehr_check(app) -> str:
    import requests as rq
    from fhirbridge.fhir.auth import make_auth
    try:
        r = rq.get(f"{app.hospital.fhir_base_url}/metadata", timeout=(2, 3), auth=make_auth(app.hospital.auth.as_dict()),
                   headers={"Accept": "application/fhir+json"})
    except rq.RequestException as exc:
        return f"unreachable: {exc.__class__.__name__}"
    except FhirbridgeError as exc:  # SMART: the token endpoint refused or could not be reached
        return f"unreachable: {exc}"
    return "ok" if r.status_code == 200 else f"unreachable: HTTP {r.status_code}"


# --- the factory -----------------------------------------------------------------------------------------

def create_app(config_path: str | os.PathLike | None = None, *, svc: Service | None = None) -> Flask:
    """The app for gunicorn (`fhirbridge.service.app:create_app()` reads FHIRBRIDGE_CONFIG). The scheduler is not
    started here: gunicorn's post_worker_init starts it in each worker (gunicorn_conf.py), and tests start
    it when they want it."""
    app = Flask("fhirbridge")
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024 * 1024
    app.extensions["fhirbridge"] = svc or Service(config_mod.load(config_path))
    app.register_blueprint(api)
    app.register_blueprint(reviewer_api)
    app.register_blueprint(health)
    from fhirbridge.service.notify import notify
    from fhirbridge.service.openapi import docs
    app.register_blueprint(notify)
    app.register_blueprint(docs)
    _pages(app)
    from fhirbridge.ops import logs
    from fhirbridge.ops import metrics
    logs.init_app(app)
    metrics.init_app(app)
    from fhirbridge.ui.physician import install as install_physician
    install_physician(app)   # only when [physician_app] is configured
    _errors(app)
    return app


def _pages(app: Flask) -> None:
    """The pages for people (ui/): sessions signed with a secret derived from the first hospital's private
    signing key, which every worker and replica already holds."""
    from fhirbridge import jsonutil, ui
    from fhirbridge.ui.dashboard import dashboard
    svc = app.extensions["fhirbridge"]
    # Served over https (public_url): the session cookie never travels over plain http.
    app.config["SESSION_COOKIE_SECURE"] = (svc.config.public_url or "").startswith("https://")
    material = jsonutil.dumps(svc.apps[0].hospital_keys.signing_key().as_dict(private=True))
    ui.install(app, secret=ui.derive_secret(material, "service-pages-session"))
    app.register_blueprint(dashboard)


def _errors(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api(exc: ApiError):
        return _json_error(exc.status, exc.message)

    @app.errorhandler(RejectedOpinion)
    def _rejected(exc: RejectedOpinion):
        return _json_error(409, str(exc))

    @app.errorhandler(SealError)
    def _seal(exc: SealError):
        return _json_error(400, str(exc))

    @app.errorhandler(FhirError)
    def _fhir(exc: FhirError):
        return _json_error(503 if exc.transient else 502, str(exc))

    @app.errorhandler(FhirbridgeError)
    def _ours(exc: FhirbridgeError):
        return _json_error(400, str(exc))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        if request.path.startswith(PAGE_PREFIXES):   # a person in a browser: a page, not JSON
            from flask import render_template
            return render_template("error.html", title=exc.name, message=exc.description or exc.name,
                                   back=request.referrer if (request.referrer or "").startswith(request.host_url)
                                   else None), exc.code or 500
        return _json_error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _json_error(500, f"internal error ({exc.__class__.__name__}); see the service log")


def json_response(obj: dict, status: int = 200, content_type: str = "application/json") -> Response:
    from fhirbridge.jsonutil import dumps
    return Response(dumps(obj), status=status, content_type=content_type)
