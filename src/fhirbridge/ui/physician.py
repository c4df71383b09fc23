"""The physician's ordering app: a SMART on FHIR EHR-launch app inside the hospital's fhirbridge service.

    /physician/launch?iss=..&launch=..        the EHR opens it (SMART App Launch v2, EHR launch; smart.py)
    /physician/callback                       back from the EHR's authorization endpoint
    /physician/patients/<id>                  the patient in context: earlier second opinions
    /physician/patients/<id>/order            choose specialty and reviewer, ask, see and trim what is shared
    /physician/patients/<id>/cases/<case>     the referral's progress, and the opinion once filed
    /physician/patients/<id>/cases/<case>/requests/<task>   answer the reviewer's request for more records
    /physician/patients/<id>/cases/<case>/held    a Case held for required records: read again, or send without

Who may do what: the user the EHR launched the app for, for the patient in that launch's context only (the
session remembers each launch's patient; any other patient id is refused). Orders are written exactly as
the staff API writes them (order.place_order, then intake.order_changed), with the user (the launch's
fhirUser, a Practitioner or PractitionerRole) as requester; a launch without one places no order, since the
requester is required. Every POST carries the session's CSRF token.

Cookies: the session (ui.install) is SameSite=Strict, which the browser does not send when the EHR's
authorization server redirects back to us from another site; the pending launch (fhirclient's state, PKCE
verifier) therefore travels in its own short-lived Lax cookie scoped to the callback path, and the callback
answers with a page that continues to the app by a same-site navigation, which carries the Strict cookie.
"""
from __future__ import annotations

import re
import time
from typing import Any

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from itsdangerous import BadSignature, URLSafeTimedSerializer
from werkzeug.exceptions import HTTPException

from fhirbridge.config.mappings import profile_names
from fhirbridge.ehr.context import App
from fhirbridge.ehr.data_request import BadRequest
from fhirbridge.ehr.order import place_order
from fhirbridge.errors import CaseError, FhirbridgeError, FhirError
from fhirbridge.exchange.followup import FollowUpError
from fhirbridge.fhir.elements import question_of
from fhirbridge.loop import checklist, supplement
from fhirbridge.loop.followup import NotAskable, OverLimit, ask, remaining, thread
from fhirbridge.loop.intake import order_changed
from fhirbridge.ui import check_csrf, smart
from fhirbridge.ui import physician_view as view

bp = Blueprint("physician", __name__, url_prefix="/physician")
PENDING_COOKIE = "fhirbridge_launch"
MAX_CONTEXTS = 5              # patients open at once in one browser (one per launch)
MAX_QUESTION = 4000
PRIORITIES = (("routine", "Routine"), ("urgent", "Urgent"), ("asap", "As soon as possible"))
REF = re.compile(r"[A-Z][A-Za-z]{1,40}/[A-Za-z0-9\-.]{1,64}")


def install(app: Flask) -> None:
    """Register the app when `[physician_app]` is configured. Sessions, the cookie secret and the shared
    templates are set up for every page by `web._pages`."""
    if app.extensions["fhirbridge"].config.physician_app is not None:
        app.register_blueprint(bp)


def _svc():
    return current_app.extensions["fhirbridge"]


def _cfg():
    return _svc().config.physician_app


# --- launch ------------------------------------------------------------------------------------------------

def _redirect_uri() -> str:
    """Registered with the EHR, so it must be stable: `[service] public_url` (else this request's host)."""
    base = _svc().config.public_url or request.host_url.rstrip("/")
    return f"{base}{url_for('.callback')}"


def _pending_serializer() -> URLSafeTimedSerializer:
    secret = current_app.secret_key
    assert secret is not None  # ui.install sets it before any page is served
    return URLSafeTimedSerializer(secret, salt="fhirbridge/physician-launch")


def _read_pending() -> dict:
    raw = request.cookies.get(PENDING_COOKIE)
    if not raw:
        return {}
    try:
        return _pending_serializer().loads(raw, max_age=smart.PENDING_SECONDS)
    except BadSignature:
        return {}


def _write_pending(resp, pending: dict) -> None:
    if not pending:
        resp.delete_cookie(PENDING_COOKIE, path=url_for(".callback"))
        return
    # The verifier in here is useless without the code, which only the EHR's redirect brings, once.
    resp.set_cookie(PENDING_COOKIE, _pending_serializer().dumps(pending), max_age=smart.PENDING_SECONDS,
                    path=url_for(".callback"), httponly=True, samesite="Lax",
                    secure=current_app.config.get("SESSION_COOKIE_SECURE", False))


@bp.get("/launch")
def launch():
    iss = request.args.get("iss", "").strip().rstrip("/")
    token = request.args.get("launch", "").strip()
    if not iss or not token:
        raise smart.LaunchError("open this app from a patient's chart in the EHR (the launch needs iss and launch)")
    hospital = _cfg().hospital_for(iss, _svc().config.hospitals)
    if hospital is None:
        # Checked before anything is fetched from `iss`: an unknown server is never contacted.
        raise smart.LaunchError("this EHR is not allowed to open the app: its address is not configured "
                                "in [physician_app] issuers", 403)
    url, pending = smart.begin(iss=iss, launch=token, client_id=_cfg().client_id, scope=_cfg().scope,
                               redirect_uri=_redirect_uri())
    pending["hospital"] = hospital
    kept = {k: v for k, v in _read_pending().items() if time.time() - v.get("at", 0) < smart.PENDING_SECONDS}
    kept = dict(sorted(kept.items(), key=lambda kv: kv[1]["at"])[-2:])  # a few launches may be under way
    kept[pending["state"]] = pending
    resp = redirect(url, 302)
    _write_pending(resp, kept)
    return resp


@bp.get("/callback")
def callback():
    pendings = _read_pending()
    pending = pendings.pop(request.args.get("state", ""), None)
    if pending is None:
        raise smart.LaunchError("this sign-in did not start here, or took too long: open the app again from the "
                                "patient's chart", 403)
    launched = smart.finish(pending, request.url, client_id=_cfg().client_id)
    app = _svc().app_for(pending["hospital"])
    contexts = {k: v for k, v in session.get("physician", {}).items() if v["expires"] > time.time()}
    contexts.pop(launched.patient, None)
    contexts[launched.patient] = {"hospital": pending["hospital"], "user": launched.user,
                                  "user_name": _user_name(app, launched.user), "banner": launched.need_patient_banner,
                                  "expires": launched.expires_at,
                                  # From a CDS Hooks card's smart link (ehr/cds.py): the order form's prefill.
                                  "prefill": launched.app_context}
    session["physician"] = dict(list(contexts.items())[-MAX_CONTEXTS:])
    target = url_for(".landing", patient=launched.patient)
    resp = make_response(render_template("physician/continue.html", title="Opening the patient", target=target))
    _write_pending(resp, pendings)
    return resp


def _user_name(app: App, user: str | None) -> str | None:
    if not user:
        return None
    try:
        res = app.ehr.read_ref(user)
    except FhirbridgeError:
        return None
    name: dict = next(iter(res.get("name", [])), {}) if res.get("resourceType") == "Practitioner" else {}
    text = name.get("text") or " ".join([*name.get("prefix", []), *name.get("given", []), name.get("family", "")])
    return text.strip() or None


# --- the patient in context ----------------------------------------------------------------------------

def _context(patient: str) -> tuple[dict, App]:
    ctx = session.get("physician", {}).get(patient)
    if not ctx or ctx["expires"] < time.time():
        abort(403, "this app was not opened for this patient, or the launch has expired: open it from the "
                   "patient's chart in the EHR")
    return ctx, _svc().app_for(ctx["hospital"])


def _page(template: str, *, patient: str, ctx: dict, app: App, current: str, **kw):
    p = app.ehr.read_ref(f"Patient/{patient}")
    nav = [("Second opinions", url_for(".landing", patient=patient), current == "landing"),
           ("New order", url_for(".order", patient=patient), current == "order")]
    return render_template(template, patient_id=patient, banner=view.banner(p) if ctx["banner"] else None,
                           patient_name=view.banner(p).name, nav=nav, where=app.hospital.name,
                           who=ctx.get("user_name") or ctx.get("user") or "Signed in from the EHR",
                           **kw)


@bp.get("/patients/<patient>")
def landing(patient: str):
    ctx, app = _context(patient)
    cases = view.cases_for(app, patient)
    orders = view.read_many(app, [c.service_request for c in cases[:50]])
    rows = [{"case": c, "status": view.status_of(c), "reviewer": _reviewer_display(app, c.reviewer),
             "ordered": view.day_of(c.created_at),
             "question": question_of(orders[c.service_request]) if c.service_request in orders else "",
             "url": url_for(".case_page", patient=patient, case_id=c.id)} for c in cases[:50]]
    return _page("physician/landing.html", patient=patient, ctx=ctx, app=app, current="landing",
                 title="Second opinions", rows=rows)


def _reviewer_display(app: App, name: str) -> str:
    r = app.config.reviewers.get(name)
    return r.display if r else (name or "not yet chosen")


# --- ordering -----------------------------------------------------------------------------------------

def _profiles(app: App) -> list[tuple[str, str]]:
    out = []
    for name in profile_names(app.config.mappings_dir):
        description = app.profile(name).description
        out.append((name, description.split(":")[0].strip() or name))
    return sorted(out, key=lambda p: (p[0] != "default", p[1]))


def _form() -> dict:
    f = request.form
    return {"profile": f.get("profile", ""), "reviewer": f.get("reviewer", ""), "question": f.get("question", ""),
            "priority": f.get("priority", "routine"), "preview_for": f.get("preview_for", ""),
            "shown": [r for r in f.getlist("shown") if REF.fullmatch(r)],
            "share": set(f.getlist("share"))}


def _validate(app: App, form: dict) -> dict[str, str]:
    errors = {}
    if form["profile"] not in profile_names(app.config.mappings_dir):
        errors["profile"] = "Choose the specialty of the second opinion"
    if form["reviewer"] not in app.config.reviewers:
        errors["reviewer"] = "Choose the reviewer who should give the opinion"
    if not form["question"].strip():
        errors["question"] = "Write the question the reviewer should answer"
    elif len(form["question"]) > MAX_QUESTION:
        errors["question"] = f"Keep the question under {MAX_QUESTION} characters"
    if form["priority"] not in dict(PRIORITIES):
        errors["priority"] = "Choose how urgent the opinion is"
    return errors


@bp.route("/patients/<patient>/order", methods=["GET", "POST"])
def order(patient: str):
    ctx, app = _context(patient)
    if request.method == "GET":
        prefill = ctx.get("prefill") or {}
        form: dict[str, Any] = {"profile": prefill.get("profile", ""), "reviewer": prefill.get("reviewer", ""),
                                "question": prefill.get("question", ""), "priority": "routine",
                                "preview_for": "", "shown": [], "share": set()}
        return _order_page(patient, ctx, app, form, {}, None)
    check_csrf()
    form = _form()
    errors = _validate(app, form)
    action = request.form.get("action")
    choice = f"{form['profile']}|{form['reviewer']}"
    had_preview = bool(form["preview_for"])
    previewed = had_preview and form["preview_for"] == choice
    if errors or action != "order" or not previewed:
        preview, notice = None, None
        # The list follows the chosen specialty and reviewer (their rules, the patient's Consents for that
        # reviewer); once shown it stays, with the boxes as the physician left them.
        if not ({"profile", "reviewer"} & set(errors)) and (not errors or had_preview):
            preview = view.preview(app, patient, form["profile"], form["reviewer"])
            if not previewed:   # a new list: all ticked, but what was unticked stays unticked
                form["share"] = set(preview.offered) - (set(form["shown"]) - form["share"])
            form["preview_for"] = choice
            if had_preview and not previewed:
                notice = "You changed the specialty or the reviewer: check the records to be shared again."
            elif action == "order" and not had_preview:
                notice = "Check the records to be shared, then place the order."
        return _order_page(patient, ctx, app, form, errors, preview, notice=notice, status=400 if errors else 200)
    if not ctx.get("user"):
        # BSeR: a referral's requester is required, and only the EHR's sign-in (fhirUser) says who is ordering.
        preview = view.preview(app, patient, form["profile"], form["reviewer"])
        return _order_page(patient, ctx, app, form, {}, preview, status=403,
                           notice="The order was not placed: the EHR did not say who you are (no fhirUser in the "
                                  "sign-in), and an order must name the clinician who asks for it. Ask IT to let "
                                  "the app receive your identity (the openid and fhirUser scopes).")
    exclude = [r for r in form["shown"] if r not in form["share"]]
    try:
        sr = _place(app, patient, ctx, form, exclude)
    except FhirbridgeError as exc:
        preview = view.preview(app, patient, form["profile"], form["reviewer"])
        return _order_page(patient, ctx, app, form, {}, preview, notice=f"The order was not placed: {exc}",
                           status=502)
    case = app.store.find_by_order(app.hospital.key, f"ServiceRequest/{sr['id']}")
    _link_card(app, ctx, sr, case)
    if case is None:
        flash("The order is in the EHR; fhirbridge will take it in within a minute.", "ok")
        return redirect(url_for(".landing", patient=patient), 303)
    flash("Second opinion ordered.", "ok")
    return redirect(url_for(".case_page", patient=patient, case_id=case.id), 303)


def _place(app: App, patient: str, ctx: dict, form: dict, exclude: list[str]) -> dict:
    # Opened from a CDS card: the planned treatment it was about is the order's reason (the outcomes follow it).
    draft = (ctx.get("prefill") or {}).get("draftOrder")
    sr = place_order(app, patient=patient, question=form["question"], reviewer=form["reviewer"],
                     profile=form["profile"], requester=ctx["user"], priority=form["priority"], exclude=exclude,
                     reason_reference={"reference": draft} if draft else None)
    # As the staff API does: the order is in the EHR from here on; if taking it in fails now, the poll does.
    try:
        order_changed(app, sr)
    except Exception as exc:  # noqa: BLE001
        current_app.logger.warning("order ServiceRequest/%s written but not yet taken in: %s", sr.get("id"),
                                   exc.__class__.__name__)
    return sr


def _link_card(app: App, ctx: dict, sr: dict, case) -> None:
    """An order placed from a CDS card's link is that card's second-opinion order (store cds_cards; the Case's
    event cds.ordered), as an accepted suggestion's is: the card of this hospital, for this patient, only."""
    card_id = (ctx.get("prefill") or {}).get("cdsCard")
    card = app.store.cds_card(card_id) if isinstance(card_id, str) else None
    if card is None or not isinstance(card_id, str) or card["hospital"] != app.hospital.key \
            or card["patient"] != sr["subject"]["reference"]:
        return
    ref = f"ServiceRequest/{sr['id']}"
    app.store.cds_ordered(card_id, order=ref, case_id=case.id if case else None)
    if case is not None:
        app.store.add_event(case.id, "cds.ordered", {"card": card_id, "draft_order": card["draft_order"],
                                                    "rule": card["rule"], "via": "smart link"})


def _order_page(patient, ctx, app, form, errors, preview, *, notice=None, status=200):
    reviewers = [(r.name, r.display, ", ".join(r.profiles)) for r in app.config.reviewers.values()]
    reviewer = app.config.reviewers.get(form["reviewer"])
    page = _page("physician/order.html", patient=patient, ctx=ctx, app=app, current="order",
                 title="Order a second opinion", form=form, errors=errors, preview=preview, notice=notice,
                 profiles=_profiles(app), reviewers=reviewers, priorities=PRIORITIES,
                 reviewer_display=reviewer.display if reviewer else "", first_error=next(iter(errors), None),
                 prefilled=(ctx.get("prefill") or {}).get("draftOrder"))
    return page, status


# --- a Case -------------------------------------------------------------------------------------------------

def _own_case(app: App, patient: str, case_id: str):
    case = app.store.find(case_id)
    if case is None or case.hospital != app.hospital.key or case.patient != f"Patient/{patient}":
        abort(404, "no such second opinion for this patient")
    return case


@bp.get("/patients/<patient>/cases/<case_id>")
def case_page(patient: str, case_id: str, *, error: str | None = None, status: int = 200):
    ctx, app = _context(patient)
    case = _own_case(app, patient, case_id)
    notice = "Your question was recorded; it is being sent to the reviewer." if request.args.get("asked") else None
    reviewer = _reviewer_display(app, case.reviewer)
    sr = app.ehr.read_ref(case.service_request)
    return _page("physician/case.html", patient=patient, ctx=ctx, app=app, current="case",
                 title=f"Second opinion from {reviewer}", case=case, reviewer=reviewer,
                 status=view.status_of(case), order=view.order_summary(sr, app),
                 timeline=view.timeline(app, case, reviewer, _requester_name(app, sr)),
                 opinion=view.filed_opinion(app, case), requests=view.record_requests(app, case),
                 profile=dict(_profiles(app)).get(case.profile, case.profile), when=view.when,
                 thread=thread(app, case), remaining=remaining(app, case), notice=notice,
                 error=error), status


@bp.post("/patients/<patient>/cases/<case_id>/follow-ups")
def ask_follow_up(patient: str, case_id: str):
    """A follow-up question on the filed opinion, asked as the signed-in user (fhirUser): recorded here, sent by
    a worker (a Communication in the EHR and a sealed message to the reviewer; loop/followup.py)."""
    ctx, app = _context(patient)
    check_csrf()
    case = _own_case(app, patient, case_id)
    user = ctx.get("user")
    try:
        ask(app, case, request.form.get("question", ""),
            asked_by=user if isinstance(user, str) and user.startswith(("Practitioner/", "PractitionerRole/"))
            else None)
    except (FollowUpError, NotAskable, OverLimit) as exc:
        return case_page(patient, case_id, error=str(exc), status=409 if not isinstance(exc, FollowUpError)
                         else 400)
    return redirect(url_for(".case_page", patient=patient, case_id=case_id, asked=1), code=303)


@bp.post("/patients/<patient>/cases/<case_id>/held")
def release_held(patient: str, case_id: str):
    """A Case held for required records: check the chart again, or send without them (each one confirmed)."""
    check_csrf()
    ctx, app = _context(patient)
    case = app.store.find(case_id)
    if case is None or case.hospital != app.hospital.key or case.patient != f"Patient/{patient}":
        abort(404, "no such second opinion for this patient")
    who = ctx.get("user") or "physician app"
    missing = [str(m) for m in (case.data or {}).get("missing", [])]
    try:
        if request.form.get("action") == "send-without":
            if sorted(request.form.getlist("confirm")) != sorted(missing):
                flash("Tick each missing record to confirm the reviewer gets the package without it.", "error")
                return redirect(url_for(".case_page", patient=patient, case_id=case.id) + "#held")
            checklist.confirm_incomplete(app, case, by=who, missing=missing)
            flash("Confirmed: the package goes without them; the reviewer is told.", "ok")
        else:
            checklist.collect_again(app, case, by=who)
            flash("The chart is read again.", "ok")
    except CaseError as exc:
        flash(str(exc), "error")
    return redirect(url_for(".case_page", patient=patient, case_id=case.id))


@bp.post("/patients/<patient>/cases/<case_id>/requests/<task_id>")
def answer_request(patient: str, case_id: str, task_id: str):
    """The physician answers a reviewer's request: the records ticked and/or a document (PDF or text)."""
    check_csrf()
    ctx, app = _context(patient)
    case = app.store.find(case_id)
    if case is None or case.hospital != app.hospital.key or case.patient != f"Patient/{patient}":
        abort(404, "no such second opinion for this patient")
    records = [r for r in request.form.getlist("record") if REF.fullmatch(r)]
    upload = None
    file = request.files.get("document")
    if file is not None and file.filename:
        kind = request.form.get("kind") or ""
        code = tuple(kind.split("|", 1)) if "|" in kind else None
        upload = supplement.Upload(title=request.form.get("title") or file.filename,
                                   content_type=(file.mimetype or "").split(";")[0], data=file.read(),
                                   code=code)  # type: ignore[arg-type]
    try:
        supplement.answer_request(app, case, f"Task/{task_id}", records=records, upload=upload,
                                  actor=ctx.get("user") or "physician app")
    except BadRequest as exc:
        flash(str(exc), "error")
        return redirect(url_for(".case_page", patient=patient, case_id=case.id) + "#requests")
    flash("Thank you: the records go to the reviewer now.", "ok")
    return redirect(url_for(".case_page", patient=patient, case_id=case.id))


def _requester_name(app: App, sr: dict) -> str | None:
    ref = sr.get("requester", {}).get("reference")
    return _user_name(app, ref) if ref and ref.startswith("Practitioner/") else None


# --- errors: pages, not JSON ------------------------------------------------------------------------------

@bp.errorhandler(smart.LaunchError)
def _launch_error(exc: smart.LaunchError):
    return render_template("physician/error.html", title="The app could not open", message=str(exc)), exc.status


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    titles: dict[int | None, str] = {403: "Not allowed", 404: "Not found", 400: "Something was wrong with that request"}
    return render_template("physician/error.html", title=titles.get(exc.code, exc.name),
                           message=exc.description), exc.code or 500


@bp.errorhandler(FhirError)
def _ehr_error(exc: FhirError):
    # Named by type/id only (see fhir/client.py); still, the physician needs no more than "try again".
    current_app.logger.warning("physician app: EHR error %s", exc.status)
    return render_template("physician/error.html", title="The EHR did not answer",
                           message="The hospital's EHR could not be reached or refused the request. Try again "
                                   "in a moment; if it persists, tell IT."), 503
