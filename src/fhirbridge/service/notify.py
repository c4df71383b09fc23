"""FHIR Subscription notifications from the EHR (R4 Subscriptions Backport IG, rest-hook), registered with
`fhirbridge subscribe` (ehr/subscriptions.py); see docs/architecture.md, "Intake".

    POST /fhir/notify/<hospital>    <hospital> is the hospital's name as an env name (config.env_name)

The body is a backport notification Bundle: type `history`, first entry a Parameters resource (the R4 form
of SubscriptionStatus) with `type` (handshake | heartbeat | event-notification | query-status |
query-event), `subscription`, `events-since-subscription-start` and one `notification-event` per event,
each with its `focus`. Event notifications take each focus order through `intake.order_changed`, the
same idempotent step polling uses, so an order seen twice (by a repeated notification, or by a poll as
well) opens one Case. A count that jumps past the events carried means events were missed: the service
polls to catch up.

Every answer is an OperationOutcome (FHIR-facing). Nothing clinical is logged or answered: messages name
orders by type/id and give counts.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from flask import Blueprint, Response, request
from werkzeug.exceptions import HTTPException

from fhirbridge.config.model import env_name
from fhirbridge.ehr import subscriptions as subscribe
from fhirbridge.ehr.context import App
from fhirbridge.errors import FhirError
from fhirbridge.jsonutil import dumps, loads
from fhirbridge.loop.intake import order_changed
from fhirbridge.service.http import bearer, service

log = logging.getLogger("fhirbridge.service.notify")
notify = Blueprint("notify", __name__, url_prefix="/fhir")
MAX_COUNT = 10 ** 18

FHIR_JSON = "application/fhir+json"
MAX_NOTIFICATION = 8 * 1024 * 1024
# Work done while the EHR waits for our answer stays bounded: a notification carrying more events than
# this is answered at once and the service catches up by polling instead.
MAX_INLINE_EVENTS = 20
TYPES = ("handshake", "heartbeat", "event-notification", "query-status", "query-event")
_REF_RE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")


class NotifyError(Exception):
    def __init__(self, status: int, code: str, message: str):
        self.status, self.code, self.message = status, code, message
        super().__init__(message)


def outcome(status: int, issues: list[tuple[str, str, str]], headers: dict | None = None) -> Response:
    """An OperationOutcome; issues are (severity, code, diagnostics) with R4 issue-severity / issue-type codes."""
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": s, "code": c, "diagnostics": d} for s, c, d in issues]}
    return Response(dumps(body), status=status, content_type=FHIR_JSON, headers=headers)


@notify.errorhandler(NotifyError)
def _refused(exc: NotifyError):
    headers = {"WWW-Authenticate": 'Bearer realm="fhirbridge notifications"'} if exc.status == 401 else None
    return outcome(exc.status, [("error", exc.code, exc.message)], headers)


@notify.errorhandler(HTTPException)
def _http(exc: HTTPException):
    code = {413: "too-costly", 405: "not-supported", 404: "not-found"}.get(exc.code or 500, "processing")
    return outcome(exc.code or 500, [("error", code, exc.description or exc.name)])


@notify.errorhandler(Exception)
def _unexpected(exc: Exception):
    log.exception("unexpected error on %s %s", request.method, request.path)
    return outcome(500, [("error", "exception", f"internal error ({exc.__class__.__name__}); see the service log")])


@notify.route("/notify/<hospital>", methods=["GET", "PUT", "DELETE", "PATCH"])
def _not_post(hospital: str):
    return outcome(405, [("error", "not-supported", "notifications are POSTed here (rest-hook)")],
                   {"Allow": "POST"})


@notify.post("/notify/<hospital>")
def receive(hospital: str):

    svc = service()
    app = next((a for a in svc.apps if env_name(a.hospital.name) == hospital), None)
    if app is None:
        raise NotifyError(404, "not-found", f"no hospital {hospital[:80]!r} is served here")
    # The bearer token was put in Subscription.channel.header by `fhirbridge subscribe`; only its hash is kept.
    if not subscribe.token_ok(svc.store, app.hospital.key, bearer()):
        raise NotifyError(401, "login", "a valid bearer token is required: the one `fhirbridge subscribe` put in "
                                        "the Subscription's channel.header")
    note = parse(_body())
    seen = subscribe.note_notification(svc.store, app.hospital.key, subscription=note.subscription,
                                       kind=note.type, count=note.count)
    issues: list[tuple[str, str, str]] = []
    catch_up = _missed(note, seen)
    if note.type == "event-notification":
        if len(note.events) > MAX_INLINE_EVENTS:
            catch_up = catch_up or f"{len(note.events)} events in one notification"
            issues.append(("information", "informational",
                           f"{len(note.events)} events: more than {MAX_INLINE_EVENTS} are taken in by polling"))
        else:
            issues += _take_in(app, note)
    else:
        issues.append(("information", "informational", f"{note.type} received"))
    if catch_up:
        svc.catch_up(app)
        issues.append(("information", "informational", f"missed events ({catch_up}): catching up by polling"))
    log.info("%s for %s: %s", note.type, app.hospital.name, "; ".join(i[2] for i in issues))
    return outcome(200, issues)


def _body() -> dict:
    if (request.content_length or 0) > MAX_NOTIFICATION:
        raise NotifyError(413, "too-costly", f"a notification is at most {MAX_NOTIFICATION} bytes")
    mime = (request.mimetype or "").lower()
    if mime not in (FHIR_JSON, "application/json", "application/json+fhir"):
        raise NotifyError(415, "not-supported", "send the notification as application/fhir+json")
    try:
        body = loads(request.get_data(cache=False))
    except ValueError:
        raise NotifyError(400, "structure", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise NotifyError(400, "structure", "the body must be a FHIR resource (a JSON object)")
    return body


# --- the notification ---------------------------------------------------------------------------------

@dataclass
class Event:
    number: int | None
    focus: str | None  # as sent: absolute URL or Type/id


@dataclass
class Notification:
    type: str
    subscription: str | None           # the Subscription's id
    count: int | None                  # eventsSinceSubscriptionStart
    events: list[Event] = field(default_factory=list)
    # "Type/id" -> resource, as a full-resource payload carries it: parsed for its shape, never trusted (_order)
    resources: dict[str, dict] = field(default_factory=dict)


def parse(body: dict) -> Notification:
    """A backport notification Bundle (Backport IG, "Notifications": Bundle.type history, entry[0] the
    backport-subscription-status-r4 Parameters). Parameter names are kebab-case as in the IG; camelCase (as
    some R4B-minded servers send) is accepted too."""
    if body.get("resourceType") != "Bundle" or body.get("type") != "history":
        raise NotifyError(400, "invalid", "expected a notification Bundle of type history (Subscriptions Backport IG)")
    entries = body.get("entry")
    entries = entries if isinstance(entries, list) else []
    first = (entries[0].get("resource") if entries and isinstance(entries[0], dict) else None) or {}
    if not isinstance(first, dict) or first.get("resourceType") != "Parameters":
        raise NotifyError(400, "invalid", "the first entry must be the SubscriptionStatus Parameters resource")
    params = [p for p in first.get("parameter") or [] if isinstance(p, dict)]
    kind = _one(params, "type", "valueCode")
    if kind not in TYPES:
        raise NotifyError(400, "invalid", f"SubscriptionStatus type must be one of {', '.join(TYPES)}")
    sub = _one(params, "subscription", "valueReference")
    sub_ref = sub.get("reference") if isinstance(sub, dict) else None
    if not isinstance(sub_ref, str) or not sub_ref:
        raise NotifyError(400, "invalid", "SubscriptionStatus has no subscription reference")
    sub_type, sub_id, _base = _split(sub_ref)
    if sub_type != "Subscription":
        raise NotifyError(400, "invalid", "SubscriptionStatus.subscription must reference a Subscription")
    count = _number(next((_value(p) for p in params if p.get("name") in (
        "events-since-subscription-start", "eventsSinceSubscriptionStart")), None), "events-since-subscription-start")
    note = Notification(type=kind, subscription=sub_id, count=count)
    for p in params:
        if p.get("name") not in ("notification-event", "notificationEvent"):
            continue
        parts = [q for q in p.get("part") or [] if isinstance(q, dict)]
        number = _number(next((_value(q) for q in parts if q.get("name") in ("event-number", "eventNumber")), None),
                         "event-number")
        focus = next(((q.get("valueReference") or {}).get("reference") for q in parts
                      if q.get("name") == "focus" and isinstance(q.get("valueReference"), dict)), None)
        note.events.append(Event(number, focus if isinstance(focus, str) else None))
    for entry in entries[1:]:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and isinstance(resource.get("id"), str):
            note.resources[f"{resource.get('resourceType')}/{resource['id']}"] = resource
    return note


def _value(p: dict):
    return next((v for k, v in p.items() if k.startswith("value")), None)


def _one(params: list[dict], name: str, key: str):
    return next((p.get(key) for p in params if p.get("name") == name), None)


def _number(value, what: str) -> int | None:
    """R4 has no integer64: the backport IG sends these counts as valueString (R4B/R5 servers: integers)."""
    if value is None:
        return None
    # Bounded: a count of hundreds of digits would not fit the store and would switch gap detection off.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_COUNT:
        return value
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 18:
        return int(value.strip())
    raise NotifyError(400, "invalid", f"{what} must be a whole number below {MAX_COUNT}")


def _split(ref: str) -> tuple[str | None, str | None, str | None]:
    """("Type", "id", base or None) from an absolute or relative literal reference."""
    parts = ref.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) < 2:
        return None, None, None
    rtype, rid = parts[-2], parts[-1]
    if not _REF_RE.match(f"{rtype}/{rid}"):
        return None, None, None
    base = "/".join(parts[:-2]) or None
    return rtype, rid, base


def _missed(note: Notification, seen: int | None) -> str | None:
    """Backport IG, "Handling errors": eventsSinceSubscriptionStart lets a subscriber notice lost
    notifications. Missed: the count moved past what we had seen by more than the events this notification
    carries (for handshakes and heartbeats, which carry none: by anything at all). A notification that
    overtakes an earlier one (EHRs deliver in parallel) looks the same; the poll it causes finds nothing."""
    if seen is None or note.count is None or note.count <= seen:
        return None
    carried = sum(1 for e in note.events if e.number is None or e.number > seen) if \
        note.type == "event-notification" else 0
    missing = note.count - seen - carried
    return f"{missing} event(s) between {seen} and {note.count} never arrived" if missing > 0 else None


# --- taking orders in ------------------------------------------------------------------------------------

def _take_in(app: App, note: Notification) -> list[tuple[str, str, str]]:
    opened = cancelled = unchanged = 0
    problems: list[tuple[str, str, str]] = []
    for event in note.events:
        ref = _our_ref(event.focus)
        if ref is None:
            problems.append(("warning", "not-supported", "an event without a ServiceRequest focus was ignored"))
            continue
        try:
            sr = _order(app, ref)
            if sr is None:
                problems.append(("warning", "not-found", f"{ref} is not a second-opinion order; ignored"))
                continue
            handled = order_changed(app, sr)
        except FhirError as exc:
            # Acknowledged all the same: an error answer makes the EHR retry and then put the Subscription in
            # error, which stops every later notification; the next poll takes this order in.
            log.warning("notification for %s: %s could not be taken in now: %s", app.hospital.name, ref, exc)
            problems.append(("warning", "transient" if exc.transient else "processing",
                             f"{ref} could not be taken in now ({exc}); the next poll takes it in"))
            continue
        except Exception as exc:  # acknowledged for the same reason; the poll retries it
            log.exception("notification for %s: %s could not be taken in", app.hospital.name, ref)
            problems.append(("warning", "exception",
                             f"{ref} could not be taken in now ({exc.__class__.__name__}); the next poll takes it in"))
            continue
        if handled is None:
            unchanged += 1
        elif handled[1] == "opened":
            opened += 1
        else:
            cancelled += 1
    summary = (f"{len(note.events)} event(s): {opened} Case(s) opened, {cancelled} cancelled, "
               f"{unchanged} unchanged")
    return [("information", "informational", summary), *problems]


def _our_ref(focus: str | None) -> str | None:
    """"ServiceRequest/<id>" when the focus is a ServiceRequest, else None. The base the EHR names is not
    compared with ours (behind a proxy it often differs): the order is read from the configured EHR."""
    rtype, rid, _base = _split(focus) if focus else (None, None, None)
    return f"{rtype}/{rid}" if rtype == "ServiceRequest" else None


def _order(app: App, ref: str) -> dict | None:
    """The order an event is about, if it is one of ours: always read from the EHR.

    A full-resource payload's entry is never used (Backport IG allows a receiver to ignore it). The
    notification's bearer token sits in clear in the EHR's Subscription.channel.header, readable by anyone
    who may read Subscriptions, so a notification proves nothing about the order it carries: a forged one
    reusing an ordinary order's id with the second-opinion code and a chosen performer would otherwise open
    a Case that sends a patient's records where the attacker chose. Only the EHR's copy counts, here and
    again before every outbound step (loop/guards.py)."""
    sr = app.ehr.read_ref(ref)
    # The topic's filter is the EHR's promise; this is ours: only our order codes open Cases (as in poll()).
    return sr if sr.get("resourceType") == "ServiceRequest" and app.order_codes.matches(sr) else None
