"""The hospital IT dashboard (/dashboard on the service): Cases by state, overdue and failed Cases (with their
error and a retry button), turnaround per reviewer, and what the second opinions concluded.

Staff sign in with the same credentials as the staff API (an admin token, a scoped key, or an OAuth2 access
token). The session keeps a keyed fingerprint of the credential, never the credential, and every request checks
it against the configuration in force (`access.tokens.staff_from_session`): a token or key removed or rotated
ends its sessions at once, an OAuth session ends at the token's `exp`, and signing out records the session in
the store, so the cookie replayed is refused by every worker and replica. Seeing needs `cases:read`, retrying
`cases:write`; a scoped key limited to some hospitals sees only those hospitals' Cases.

What the opinions concluded (concordance, recommendation) is read from the codes stored when each opinion was
filed (the outcomes table, loop/outcomes.py); an opinion filed before that is read from the accepted opinion
itself (kept encrypted to the hospital in data_dir) and cached per process. Only the counts are shown; the
Outcomes page (ui/outcomes_view.py) shows what the chart shows became of the plan.
"""
from __future__ import annotations

import logging
import statistics
import time
from collections import Counter

from flask import Blueprint, abort, current_app, flash, g, redirect, render_template, request, session, url_for

from fhirbridge import jsonutil
from fhirbridge.access.tokens import Unauthorized, session_grant, staff_from_session, staff_from_token
from fhirbridge.config.terminology import OPINION_OBSERVATION, same_system
from fhirbridge.crypto import jwe
from fhirbridge.ehr.audit import owed
from fhirbridge.errors import CaseError, FhirbridgeError
from fhirbridge.loop.actions import retry as retry_case
from fhirbridge.steps import ALL_STEPS, WORK_STEPS, Step
from fhirbridge.ui import check_csrf, safe_next
from fhirbridge.ui.charts import bar_chart
from fhirbridge.ui.outcomes_view import outcomes_context

log = logging.getLogger("fhirbridge.dashboard")
dashboard = Blueprint("dashboard", __name__, url_prefix="/dashboard")
SESSION_HOURS = 8
STATE_ORDER = ALL_STEPS
STATE_LABELS: dict[str, str] = {Step.COLLECT: "Collecting", Step.SEAL: "Packaging", Step.DELIVER: "Sending",
                                 Step.AWAIT_OPINION: "With reviewer", Step.FILE: "Filing",
                                 Step.NEEDS_REVIEW: "Needs review", Step.DONE: "Filed",
                                 Step.FAILED: "Failed", Step.CANCELLED: "Cancelled", Step.DECLINED: "Declined"}
STATE_COLORS = {"Filed": "#1e7a46", "Failed": "#b3261e", "With reviewer": "#1f5fa8", "Cancelled": "#6b7280",
                "Declined": "#9a6200", "Needs review": "#b45309"}
# How a recommendation relates to the plan the referring physician had (usually surgery).
PLAN_EFFECT = {"proceed-as-planned": "Confirmed the plan", "less-invasive-procedure": "Changed: less invasive",
               "non-surgical-care": "Changed: no surgery", "watchful-waiting": "Changed: no surgery",
               "further-diagnostics": "More diagnostics first"}
_conclusions: dict[str, dict] = {}     # case id -> {"concordance", "recommendation"} (per process)


def _svc():
    return current_app.extensions["fhirbridge"]


def _secret() -> bytes:
    key = current_app.secret_key
    return key if isinstance(key, bytes) else str(key).encode()


def _staff() -> dict | None:
    """Who is signed in, re-checked once per request: the credential still configured (or the OAuth token not
    yet expired) and the session not signed out. A session that fails is dropped from the cookie."""
    if "dashboard_staff" in g:
        return g.dashboard_staff
    grant, found = session.get("staff"), None
    if grant is not None:
        try:
            staff = staff_from_session(grant, _svc().config, _secret())
            if not _svc().store.session_revoked(grant["sid"]):
                found = {"name": staff.name, "scopes": sorted(staff.scopes),
                         "hospitals": sorted(staff.hospitals) if staff.hospitals is not None else None}
        except Unauthorized:
            pass
        if found is None:
            session.pop("staff", None)
    g.dashboard_staff = found
    return found


def _signed_in_staff() -> dict:
    """The sign-in behind a view: `_signed_in` sent anyone without one to the login page first (one that
    expired in between is refused here rather than crashing the view)."""
    s = _staff()
    if s is None:
        abort(401, "your sign-in has expired: sign in again")
    return s


@dashboard.before_request
def _signed_in():
    if request.endpoint in ("dashboard.login",):
        return None
    s = _staff()
    if s is None:
        return redirect(url_for("dashboard.login", next=request.path))
    if "cases:read" not in s["scopes"]:
        abort(403, "your credentials do not include cases:read")
    return None


def _visible(case) -> bool:
    s = _signed_in_staff()
    app = _svc().app_for_key(case.hospital)
    return app is not None and (s["hospitals"] is None or app.hospital.name in s["hospitals"])


def _visible_case(case_id: str):
    """The Case, if this sign-in may see it; otherwise 404, as if it did not exist."""
    try:
        c = _svc().store.get(case_id)
    except CaseError:
        abort(404)
    if not _visible(c):
        abort(404)
    return c


def _nav(current: str) -> list:
    return [("Overview", url_for("dashboard.overview"), current == "overview"),
            ("Outcomes", url_for("dashboard.outcomes"), current == "outcomes")]


@dashboard.route("/login", methods=["GET", "POST"])
def login():
    error = None
    if request.method == "POST":
        check_csrf()
        token = request.form.get("token", "").strip()
        try:
            staff = staff_from_token(token, _svc().config)
        except Unauthorized:
            staff = None
            error = "Those credentials are not valid here. Use a staff token, an API key or an access token."
        if staff is not None and "cases:read" not in staff.scopes:
            error = "Those credentials do not include the cases:read scope the dashboard needs."
        elif staff is not None:
            csrf = session.get("_csrf")
            session.clear()
            session["_csrf"] = csrf
            session["staff"] = session_grant(token, staff, _svc().config, _secret(),
                                             lifetime=SESSION_HOURS * 3600)
            overview = url_for("dashboard.overview")
            return redirect(safe_next(request.args.get("next"), overview, within=overview))
    return render_template("dashboard/login.html", title="Sign in", error=error, where="Hospital IT dashboard"), \
        401 if error else 200


@dashboard.post("/logout")
def logout():
    check_csrf()
    grant = session.pop("staff", None)
    if isinstance(grant, dict) and isinstance(grant.get("sid"), str):
        _svc().store.revoke_session(grant["sid"], keep_seconds=SESSION_HOURS * 3600)
    return redirect(url_for("dashboard.login"))


@dashboard.get("/")
def overview():
    svc = _svc()
    cases = [c for c in svc.store.list_cases() if _visible(c)]
    now = time.time()
    counts = Counter(c.step for c in cases)
    states = [(STATE_LABELS.get(s, s), counts.get(s, 0)) for s in STATE_ORDER if counts.get(s, 0) or s in
              (Step.AWAIT_OPINION, Step.DONE, Step.FAILED)]
    overdue = sorted((c for c in cases if c.overdue_at is not None and c.step == Step.AWAIT_OPINION),
                     key=lambda c: c.due_at or 0)
    failed = sorted((c for c in cases if c.step == "failed"), key=lambda c: -c.updated_at)
    waiting = sorted((c for c in cases if c.step in WORK_STEPS and c.last_error),
                     key=lambda c: -c.updated_at)
    reviewers = _turnaround(svc, cases)
    concl = _conclusion_counts(svc, [c for c in cases if c.step == Step.DONE])
    staff = _signed_in_staff()
    # AuditEvents the EHR has not accepted yet (refused copies stay owed and are retried): per hospital shown.
    audit_owed = ([(a.hospital.name, owed(a)) for a in svc.apps
                   if staff["hospitals"] is None or a.hospital.name in staff["hospitals"]]
                  if svc.config.audit.write_to_ehr else None)
    return render_template(
        "dashboard/overview.html", title="Referrals", where="Hospital IT dashboard", nav=_nav("overview"),
        who=staff["name"], can_retry="cases:write" in staff["scopes"], total=len(cases), states=states,
        state_chart=bar_chart(states, title="Cases by state", colors=STATE_COLORS), overdue=overdue, failed=failed,
        waiting=waiting,
        reviewers=reviewers, concl=concl, audit_owed=audit_owed,
        concordance_chart=bar_chart(concl["concordance"], title="Concordance with the referring diagnosis"),
        plan_chart=bar_chart(concl["plan"], title="What the second opinion meant for the planned treatment"),
        app_name=lambda c: (svc.app_for_key(c.hospital).hospital.name if svc.app_for_key(c.hospital) else "?"),
        fmt=_fmt, ago=lambda t: _days(now - t) if t else "", step_label=lambda s: STATE_LABELS.get(s, s))


@dashboard.get("/outcomes")
def outcomes():
    """What the opinions advised and what the chart shows became of the plan (ui/outcomes_view.py)."""
    svc, staff = _svc(), _signed_in_staff()
    keys = [a.hospital.key for a in svc.apps if staff["hospitals"] is None or a.hospital.name in staff["hospitals"]]
    return render_template("dashboard/outcomes.html", title="Outcomes", where="Hospital IT dashboard",
                           nav=_nav("outcomes"), who=staff["name"], **outcomes_context(svc, keys))


@dashboard.get("/cases/<case_id>")
def case(case_id: str):
    svc, c = _svc(), _visible_case(case_id)
    staff = _signed_in_staff()
    return render_template("dashboard/case.html", title=f"Case {c.id[:8]}", where="Hospital IT dashboard",
                           nav=_nav("case"), who=staff["name"], c=c, events=svc.store.events(c.id),
                           can_retry="cases:write" in staff["scopes"], fmt=_fmt,
                           step_label=lambda s: STATE_LABELS.get(s, s))


@dashboard.post("/cases/<case_id>/retry")
def retry(case_id: str):
    check_csrf()
    if "cases:write" not in _signed_in_staff()["scopes"]:
        abort(403, "your credentials do not include cases:write")
    svc, c = _svc(), _visible_case(case_id)
    try:
        after = retry_case(svc.app_for_key(c.hospital), c)
        flash(f"Case {c.id[:8]} will be retried at {STATE_LABELS.get(after.step, after.step)}.", "ok")
    except FhirbridgeError as exc:
        flash(f"Case {c.id[:8]} was not retried: {exc}", "error")
    target = request.form.get("back", "")
    return redirect(target if target.startswith("/dashboard") else url_for("dashboard.overview"))


# --- figures --------------------------------------------------------------------------------------------

def _turnaround(svc, cases) -> list[dict]:
    """Per reviewer: Cases sent, filed, overdue, declined; days from delivery to the filed opinion."""
    out = []
    for name, reviewer in svc.config.reviewers.items():
        mine = [c for c in cases if c.reviewer == name]
        # due_at is set when the package is sealed (config Reviewer.due_at): a Case still at deliver is not sent.
        sent = [c for c in mine if c.due_at is not None and c.step != Step.DELIVER]
        days = []
        for c in sent:
            if c.step == Step.DONE:
                delivered = c.due_at - reviewer.turnaround_days * 86400   # when the package was issued
                days.append(max(0.0, (c.updated_at - delivered) / 86400))
        out.append({"name": reviewer.display, "target": reviewer.turnaround_days, "sent": len(sent),
                    "filed": sum(c.step == Step.DONE for c in mine),
                    "open": sum(c.step == Step.AWAIT_OPINION for c in mine),
                    "overdue": sum(c.overdue_at is not None and c.step == Step.AWAIT_OPINION for c in mine),
                    "declined": sum(c.step == "declined" for c in mine),
                    "median": round(statistics.median(days), 1) if days else None,
                    "p90": round(sorted(days)[max(0, int(len(days) * 0.9 + 0.5) - 1)], 1) if days else None})
    return out


def _conclusion_counts(svc, done) -> dict:
    conc: Counter[str] = Counter()
    plan: Counter[str] = Counter()
    unread = 0
    # The codes stored when each opinion was filed (the outcomes table); only opinions filed before that
    # existed are still read from their files.
    coded = {o.case_id: {"concordance": o.concordance, "recommendation": o.recommendation}
             for o in svc.store.outcomes.rows(hospitals=tuple({c.hospital for c in done}))
             if o.concordance or o.recommendation}
    for c in done:
        found = coded.get(c.id) or _conclusion(svc, c)
        if found is None:
            unread += 1
            continue
        if found.get("concordance"):
            conc[found["concordance"]] += 1
        if found.get("recommendation"):
            plan[PLAN_EFFECT.get(found["recommendation"], found["recommendation"])] += 1
    conc_labels = {"concordant": "Concordant", "partially-concordant": "Partially concordant",
                   "discordant": "Discordant"}
    changed = sum(v for k, v in plan.items() if k.startswith("Changed"))
    total = sum(plan.values())
    return {"concordance": [(conc_labels.get(k, k), conc.get(k, 0)) for k in conc_labels],
            "plan": sorted(plan.items(), key=lambda kv: -kv[1]), "filed": len(done), "unread": unread,
            "changed_share": round(100 * changed / total) if total else None}


def _conclusion(svc, case) -> dict | None:
    """The coded concordance and recommendation of a filed opinion, from the opinion file as accepted."""
    if case.id in _conclusions:
        return _conclusions[case.id]
    app = svc.app_for_key(case.hospital)
    path = svc.config.data_dir / "cases" / case.id / f"opinion-{case.opinion_id}.jwe"
    if app is None or not case.opinion_id or not path.exists():
        return None
    try:
        _hdr, plaintext = jwe.decrypt_bytes_with_header(path.read_bytes(), app.hospital_keys,
                                                        max_plaintext=32 * 1024 * 1024)
        document = jsonutil.loads(plaintext)["document"]
    except (FhirbridgeError, ValueError, KeyError, OSError) as exc:
        log.warning("dashboard: cannot read the opinion of Case %s: %s", case.id, type(exc).__name__)
        return None
    found = {}
    for e in document.get("entry", []):
        r = e.get("resource", {})
        if r.get("resourceType") != "Observation":
            continue
        # Opinions filed before the code systems got their canonical urls carry the legacy urn (terminology.LEGACY).
        code = next((c.get("code") for c in r.get("code", {}).get("coding", [])
                     if same_system(c.get("system"), OPINION_OBSERVATION)), None)
        value = next((c.get("code") for c in r.get("valueCodeableConcept", {}).get("coding", [])), None)
        if code in ("concordance", "recommendation", "urgency") and value:
            found[code] = value
    _conclusions[case.id] = found
    return found


def _fmt(epoch) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(epoch)) if epoch else ""


def _days(seconds: float) -> str:
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
