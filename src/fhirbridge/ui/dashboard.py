"""The hospital IT dashboard (/dashboard on the service): Cases by state, overdue and failed Cases (with their
error and a retry button), turnaround per reviewer, and what the second opinions concluded.

Staff sign in with the same credentials as the staff API (an admin token, a scoped key, or an OAuth2 access
token). The session keeps a keyed fingerprint of the credential, never the credential, and every request checks
it against the configuration in force (`access.tokens.staff_from_session`): a token or key removed or rotated
ends its sessions at once, an OAuth session ends at the token's `exp`, and signing out records the session in
the store, so the cookie replayed is refused by every worker and replica. Seeing needs `cases:read`, retrying
`cases:write`; a scoped key limited to some hospitals sees only those hospitals' Cases.

Every view reads only what it shows: counts per step and per reviewer in SQL (GROUP BY), a page of rows with a
keyset cursor (store/case_query.py), and what the opinions concluded from the coded summary the file step
stores with the Case (loop/opinion_summary.py: codes of our CodeSystems, never text), so no view decrypts the
opinions (at 100,000 Cases that took about 15 s per worker); the Outcomes page (ui/outcomes_view.py) shows
what the chart shows became of the plan. The Case list (/dashboard/cases) takes the
parameters of GET /api/cases; the pages poll /dashboard/changes.json and reload at the same URL when
something changed; a banner names any EHR (or the store, or a key file) `/readyz` finds unusable.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import replace
from zoneinfo import ZoneInfo

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from fhirbridge.access.tokens import Unauthorized, session_grant, staff_from_session, staff_from_token
from fhirbridge.ehr import data_request
from fhirbridge.ehr.audit import owed
from fhirbridge.errors import CaseError, FhirbridgeError
from fhirbridge.loop.actions import cancel as cancel_case
from fhirbridge.loop.actions import retry as retry_case
from fhirbridge.loop.opinion_summary import backfill
from fhirbridge.steps import ALL_STEPS, FINAL_STEPS, WORK_STEPS, Step
from fhirbridge.store.case_query import SORTS, CaseFilter, ListRequest
from fhirbridge.ui import banner, check_csrf, clock, safe_next
from fhirbridge.ui.charts import bar_chart
from fhirbridge.ui.fixes import fix_for
from fhirbridge.ui.outcomes_view import outcomes_context
from fhirbridge.ui.timeline import timeline

log = logging.getLogger("fhirbridge.dashboard")
dashboard = Blueprint("dashboard", __name__, url_prefix="/dashboard")
SESSION_HOURS = 8
STATE_ORDER = ALL_STEPS
STATE_LABELS: dict[str, str] = {Step.COLLECT: "Collecting", Step.SEAL: "Packaging", Step.DELIVER: "Sending",
                                 Step.AWAIT_OPINION: "With reviewer", Step.FILE: "Filing",
                                 Step.NEEDS_REVIEW: "Needs review", Step.DONE: "Filed",
                                 Step.FAILED: "Failed", Step.CANCELLED: "Cancelled", Step.DECLINED: "Declined",
                                 Step.AWAIT_RECORDS: "Held: records missing", Step.SUPPLEMENT: "Sending more records"}
STATE_COLORS = {"Filed": "#1e7a46", "Failed": "#b3261e", "With reviewer": "#1f5fa8", "Cancelled": "#6b7280",
                "Declined": "#9a6200", "Needs review": "#b45309"}
# How a recommendation relates to the plan the referring physician had (usually surgery).
PLAN_EFFECT = {"proceed-as-planned": "Confirmed the plan", "less-invasive-procedure": "Changed: less invasive",
               "non-surgical-care": "Changed: no surgery", "watchful-waiting": "Changed: no surgery",
               "further-diagnostics": "More diagnostics first"}
OVERVIEW_ROWS = 20        # rows per table of the overview; the Case list has the rest
LIST_ROWS = 50            # rows per page of the Case list
BACKFILL_PER_VIEW = 20    # opinions filed before migration 0006 summarised per overview view
REFRESH_SECONDS = 10      # how often the pages ask whether anything changed (static/refresh.js)


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
            ("Cases", url_for("dashboard.cases"), current == "cases"),
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


def _visible_keys() -> tuple[str, ...]:
    """The hospital keys this sign-in may see: every query of the dashboard is narrowed to them in SQL."""
    s = _signed_in_staff()
    return tuple(a.hospital.key for a in _svc().apps if s["hospitals"] is None or a.hospital.name in s["hospitals"])


def _zones() -> dict[str, ZoneInfo]:
    return {a.hospital.key: clock.zone(a.hospital.time_zone) for a in _svc().apps}


def _page_helpers() -> dict:
    """What every dashboard template gets: times in the Case's hospital's zone (UTC on hover), labels, names."""
    svc, zones = _svc(), _zones()
    default = next(iter(zones.values()), clock.zone("UTC"))

    def when(epoch, hospital: str | None = None):
        return clock.when(epoch, zones.get(hospital or "", default))

    return {"when": when, "fmt": _fmt, "step_label": lambda s: STATE_LABELS.get(s, s),
            "app_name": lambda c: (svc.app_for_key(c.hospital).hospital.name if svc.app_for_key(c.hospital) else "?"),
            "banner": banner.problems(), "refresh_seconds": REFRESH_SECONDS}


@dashboard.get("/")
def overview():
    """Counts in SQL (GROUP BY), a few rows per table, and the filed opinions' stored summary: never every Case
    read, never an opinion decrypted per view (issue 19: 6.4 s at 100,000 Cases before)."""
    svc, keys, now = _svc(), _visible_keys(), time.time()
    counts = svc.store.count_by_step(keys)
    states = [(STATE_LABELS.get(s, s), counts.get(s, 0)) for s in STATE_ORDER if counts.get(s, 0) or s in
              (Step.AWAIT_OPINION, Step.DONE, Step.FAILED)]
    overdue_filter = CaseFilter(overdue=True, hospitals=keys)
    overdue = sorted(svc.store.page_cases(overdue_filter, limit=OVERVIEW_ROWS).cases, key=lambda c: c.due_at or 0)
    failed = svc.store.page_cases(CaseFilter(steps=(Step.FAILED.value,), hospitals=keys), limit=OVERVIEW_ROWS).cases
    waiting = svc.store.page_cases(CaseFilter(steps=WORK_STEPS, failed=True, hospitals=keys),
                                   limit=OVERVIEW_ROWS).cases
    reviewers = _turnaround(svc, keys)
    # Opinions filed before their summary was stored (migration 0006) are summarised a few per view.
    backfill({a.hospital.key: a for a in svc.apps}, svc.store, limit=BACKFILL_PER_VIEW)
    concl = _conclusion_counts(svc, keys)
    staff = _signed_in_staff()
    # AuditEvents the EHR has not accepted yet (refused copies stay owed and are retried): per hospital shown.
    audit_owed = ([(a.hospital.name, owed(a)) for a in svc.apps
                   if staff["hospitals"] is None or a.hospital.name in staff["hospitals"]]
                  if svc.config.audit.write_to_ehr else None)
    return render_template(
        "dashboard/overview.html", title="Referrals", where="Hospital IT dashboard", nav=_nav("overview"),
        who=staff["name"], can_retry="cases:write" in staff["scopes"], total=sum(counts.values()), states=states,
        state_chart=bar_chart(states, title="Cases by state", colors=STATE_COLORS), overdue=overdue, failed=failed,
        waiting=waiting, failed_total=counts.get(Step.FAILED.value, 0),
        overdue_total=svc.store.count_cases(overdue_filter) if len(overdue) >= OVERVIEW_ROWS else len(overdue),
        reviewers=reviewers, concl=concl, audit_owed=audit_owed,
        concordance_chart=bar_chart(concl["concordance"], title="Concordance with the referring diagnosis"),
        plan_chart=bar_chart(concl["plan"], title="What the second opinion meant for the planned treatment"),
        ago=lambda t: _days(now - t) if t else "", **_page_helpers())


@dashboard.get("/outcomes")
def outcomes():
    """What the opinions advised and what the chart shows became of the plan (ui/outcomes_view.py)."""
    svc, staff = _svc(), _signed_in_staff()
    keys = [a.hospital.key for a in svc.apps if staff["hospitals"] is None or a.hospital.name in staff["hospitals"]]
    return render_template("dashboard/outcomes.html", title="Outcomes", where="Hospital IT dashboard",
                           nav=_nav("outcomes"), who=staff["name"], **outcomes_context(svc, keys))


@dashboard.get("/cases")
def cases():
    """The Case list: every filter of GET /api/cases (the same parameters, so the URL keeps the user's place
    through refreshes and links), one page in SQL with a keyset cursor, sortable, retry and cancel per row."""
    svc, keys = _svc(), _visible_keys()
    tz = next(iter(_zones().values()), clock.zone("UTC"))
    args = {k: v for k, v in request.args.items() if v != ""}
    error = None
    try:
        asked = ListRequest.from_args(args, tz=tz, default_limit=LIST_ROWS)
    except CaseError as exc:
        error, asked = str(exc), ListRequest(CaseFilter())
    flt = asked.filter
    hospital = args.get("hospital")
    if hospital:
        app = next((a for a in svc.apps if a.hospital.name == hospital), None)
        flt = replace(flt, hospitals=(app.hospital.key,) if app else ())
    flt = flt.narrowed_to(keys)
    page = svc.store.page_cases(flt, sort=asked.sort, descending=asked.descending, limit=asked.limit,
                                cursor=asked.cursor)
    staff = _signed_in_staff()
    here = request.full_path.rstrip("?")
    base = {k: v for k, v in args.items() if k != "cursor"}

    def link(**changes) -> str:
        query = {**base, **changes}
        return url_for("dashboard.cases", **{k: v for k, v in query.items() if v not in (None, "")})

    sort_links = {name: link(sort=name, dir="asc" if asked.sort == name and asked.descending else "desc")
                  for name in SORTS}
    return render_template(
        "dashboard/cases.html", title="Cases", where="Hospital IT dashboard", nav=_nav("cases"), who=staff["name"],
        can_retry="cases:write" in staff["scopes"], page=page, asked=asked, args=args, error=error,
        matching=svc.store.count_cases(flt), steps=ALL_STEPS, reviewers=sorted(svc.config.reviewers),
        hospitals=[a.hospital.name for a in svc.apps if a.hospital.key in keys],
        next_link=link(cursor=page.next) if page.next else None, first_link=link() if asked.cursor else None,
        sort_links=sort_links, here=here, final_steps=FINAL_STEPS, fix_for=fix_for, **_page_helpers()), \
        400 if error else 200


@dashboard.get("/changes.json")
def changes():
    """What the self-refreshing pages poll (static/refresh.js): a fingerprint of the Cases this sign-in sees
    (newest update, how many) and of the banner. Two indexed queries, never a list; the page reloads itself,
    at the same URL (filters and page kept), when the fingerprint changes."""
    svc, keys = _svc(), _visible_keys()
    newest, count = svc.store.fingerprint(keys)
    problems = banner.problems()
    return jsonify({"cases": f"{newest}:{count}", "banner": "|".join(f"{w}:{why}" for w, why in problems)})


@dashboard.get("/cases/<case_id>")
def case(case_id: str):
    svc, c = _svc(), _visible_case(case_id)
    staff = _signed_in_staff()
    app = svc.app_for_key(c.hospital)
    base_url = app.hospital.fhir_base_url if app else None
    # Issue 16: the reviewer's open requests for more records (the words stay in the EHR: linked, not shown).
    asked = [("Records asked for (open)", ref) for ref in data_request.open_refs(c)]
    links = [(label, ref, f"{base_url}/{ref}" if base_url else None) for label, ref in
             (("Order", c.service_request), ("Referral Task", c.task), ("Filed note", c.document_reference),
              *asked, ("Patient", c.patient)) if ref]
    return render_template("dashboard/case.html", title=f"Case {c.id[:8]}", where="Hospital IT dashboard",
                           nav=_nav("case"), who=staff["name"], c=c, entries=timeline(svc.store.events(c.id)),
                           links=links, asked=asked, supplements=(c.data or {}).get("supplements", []),
                           can_retry="cases:write" in staff["scopes"], final_steps=FINAL_STEPS,
                           fix=fix_for(c.last_error) if c.step not in (*FINAL_STEPS, Step.NEEDS_REVIEW) else None,
                           here=request.path, **_page_helpers())


def _back() -> str:
    target = request.form.get("back", "")
    return safe_next(target, url_for("dashboard.overview"), within="/dashboard")


def _writable_case(case_id: str):
    check_csrf()
    if "cases:write" not in _signed_in_staff()["scopes"]:
        abort(403, "your credentials do not include cases:write")
    return _svc(), _visible_case(case_id)


@dashboard.post("/cases/<case_id>/retry")
def retry(case_id: str):
    svc, c = _writable_case(case_id)
    try:
        after = retry_case(svc.app_for_key(c.hospital), c, by=_signed_in_staff()["name"])
        flash(f"Case {c.id[:8]} will be retried at {STATE_LABELS.get(after.step, after.step)}.", "ok")
    except FhirbridgeError as exc:
        flash(f"Case {c.id[:8]} was not retried: {exc}", "error")
    return redirect(_back())


@dashboard.post("/cases/<case_id>/cancel")
def cancel(case_id: str):
    """Cancel the referral (a final state the loop respects: a worker's late result is dropped); the EHR Task
    is set to cancelled with the reason where the write plan lets us write it (loop.actions.cancel)."""
    svc, c = _writable_case(case_id)
    reason = request.form.get("reason", "").strip()
    if not reason:
        flash(f"Case {c.id[:8]} was not cancelled: say why (the reason goes on the EHR Task).", "error")
        return redirect(_back())
    try:
        cancel_case(svc.app_for_key(c.hospital), c, reason, by=_signed_in_staff()["name"])
        flash(f"Case {c.id[:8]} is cancelled.", "ok")
    except FhirbridgeError as exc:
        flash(f"Case {c.id[:8]} was not cancelled: {exc}", "error")
    return redirect(_back())


# --- figures --------------------------------------------------------------------------------------------

def _turnaround(svc, keys: tuple[str, ...]) -> list[dict]:
    """Per reviewer: Cases sent, filed, overdue, declined (one GROUP BY); days from delivery to the filed
    opinion at the median and 90th percentile (read from the index on the stored turnaround)."""
    counts = svc.store.reviewer_counts(keys)
    out = []
    for name, reviewer in svc.config.reviewers.items():
        mine = counts.get(name, {})
        median, p90 = svc.store.turnaround_quantiles(name, (0.5, 0.9), keys)
        out.append({"name": reviewer.display, "target": reviewer.turnaround_days, "sent": mine.get("sent", 0),
                    "filed": mine.get(Step.DONE.value, 0), "open": mine.get(Step.AWAIT_OPINION.value, 0),
                    "overdue": mine.get("overdue", 0), "declined": mine.get(Step.DECLINED.value, 0),
                    "median": round(median / 86400, 1) if median is not None else None,
                    "p90": round(p90 / 86400, 1) if p90 is not None else None})
    return out


def _conclusion_counts(svc, keys: tuple[str, ...]) -> dict:
    """What the filed opinions concluded, counted in SQL from the summary stored at filing
    (loop/opinion_summary.py). `unread`: filed opinions whose codes could not be read (or not yet)."""
    conc: Counter[str] = Counter()
    plan: Counter[str] = Counter()
    filed = unread = 0
    for (concordance, recommendation), n in svc.store.conclusion_counts(keys).items():
        filed += n
        if concordance is None and recommendation is None:
            unread += n
            continue
        if concordance:
            conc[concordance] += n
        if recommendation:
            plan[PLAN_EFFECT.get(recommendation, recommendation)] += n
    conc_labels = {"concordant": "Concordant", "partially-concordant": "Partially concordant",
                   "discordant": "Discordant"}
    changed = sum(v for k, v in plan.items() if k.startswith("Changed"))
    total = sum(plan.values())
    return {"concordance": [(conc_labels.get(k, k), conc.get(k, 0)) for k in conc_labels],
            "plan": sorted(plan.items(), key=lambda kv: -kv[1]), "filed": filed, "unread": unread,
            "changed_share": round(100 * changed / total) if total else None}


def _fmt(epoch) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(epoch)) if epoch else ""


def _days(seconds: float) -> str:
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
