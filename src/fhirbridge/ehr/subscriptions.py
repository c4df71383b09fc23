"""Topic-based subscriptions on the hospital's EHR (FHIR R4 Subscriptions Backport IG, rest-hook), so an
order reaches fhirbridge when it is placed instead of at the next poll.

`subscribe()` registers (or reuses) ONE backport Subscription per hospital: the EHR's topic for
ServiceRequest changes, filtered on our order codes, posting to `{public_url}/fhir/notify/<hospital>` with
a secret bearer token in `channel.header`. The token's SHA-256 and the last `eventsSinceSubscriptionStart`
seen live in the Case store, so any replica can check a notification and notice missed events
(`service/notify.py` receives them). Polling stays on: it is the backstop for anything a subscription misses.

The per-hospital state uses rows of the `cursors` table named `subscription*` (no schema change):

    subscription                 value: the EHR's Subscription id (None while a new one is being created)
    subscription.token           value: SHA-256 (hex) of the current bearer token; updated_at: when set
    subscription.previous-token  value: the token before the last rotation; updated_at: when it was rotated
    subscription.events          value: highest eventsSinceSubscriptionStart seen
    subscription.liveness        value: kind of the last notification; updated_at: when it arrived
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import and_, insert, select, update
from sqlalchemy.exc import IntegrityError

from fhirbridge.config.model import env_name
from fhirbridge.ehr.context import App, log
from fhirbridge.errors import ConfigError, FhirbridgeError, FhirError
from fhirbridge.store.store import Store, cursors

# Subscriptions R5 Backport IG (hl7.fhir.uv.subscriptions-backport, STU 1.1) for FHIR R4.
BP = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
PROFILE = f"{BP}/backport-subscription"
EXT_FILTER = f"{BP}/backport-filter-criteria"
EXT_CONTENT = f"{BP}/backport-payload-content"
EXT_HEARTBEAT = f"{BP}/backport-heartbeat-period"
EXT_TOPIC_CANONICAL = f"{BP}/capabilitystatement-subscriptiontopic-canonical"
# R4 has no SubscriptionTopic resource: servers publish topics as Basic resources carrying the R5
# cross-version extensions (as fhir-candle and sekmet do), with code fhir-types#SubscriptionTopic.
XV_TOPIC = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic"
TOPIC_CODE = "http://hl7.org/fhir/fhir-types|SubscriptionTopic"

PAYLOADS = ("id-only", "full-resource")
DEFAULT_HEARTBEAT = 120
HANDSHAKE_WAIT = 15.0
# After a rotation, notifications already on their way still carry the old token; refusing them would make
# the EHR retry and then put the renewed Subscription in error. The old token stays valid this long.
ROTATION_GRACE = 300.0

STATE = "subscription"
TOKEN = "subscription.token"
PREVIOUS_TOKEN = "subscription.previous-token"
EVENTS = "subscription.events"
LIVENESS = "subscription.liveness"


# --- topics --------------------------------------------------------------------------------------

@dataclass
class Topic:
    url: str
    title: str = ""
    status: str = "active"
    interactions: dict[str, set[str]] = field(default_factory=dict)  # resource type -> create/update/delete
    filters: dict[str, set[str]] = field(default_factory=dict)       # filter parameter -> resource types ("*": any)
    defined: bool = True  # False: only advertised in the CapabilityStatement, definition not readable

    def problem(self) -> str | None:
        """Why this topic cannot carry our orders, or None."""
        if not self.defined:
            return None  # chosen by the operator; the EHR checks the filter when the Subscription is made
        if self.status not in ("active", ""):
            return f"it is {self.status}"
        if "ServiceRequest" not in self.interactions:
            return "it does not cover ServiceRequest"
        if "create" not in self.interactions["ServiceRequest"]:
            return "it does not fire when a ServiceRequest is created"
        if not ({"ServiceRequest", "*"} & self.filters.get("code", set())):
            can = ", ".join(sorted(self.filters)) or "nothing"
            # Without a code filter every order in the hospital (lab, imaging, ...) would be sent to us.
            return f"it cannot filter by code (canFilterBy: {can}), so every order in the hospital would be sent"
        return None

    @property
    def covers_updates(self) -> bool:
        return "update" in self.interactions.get("ServiceRequest", set())


def _ext(node: dict, url: str) -> list[dict]:
    return [e for e in node.get("extension") or [] if isinstance(e, dict) and e.get("url") == url]


def _value(ext: dict) -> Any:
    return next((v for k, v in ext.items() if k.startswith("value")), None)


def _part(ext: dict, name: str) -> list[Any]:
    return [_value(e) for e in _ext(ext, name)]


def topic_from_basic(basic: dict) -> Topic | None:
    """An R5 SubscriptionTopic carried as R4 Basic with cross-version extensions; None if not one."""
    urls = [_value(e) for e in _ext(basic, f"{XV_TOPIC}.url")]
    if not urls or not isinstance(urls[0], str):
        return None
    status = next((_value(e) for e in basic.get("modifierExtension") or [] if isinstance(e, dict)
                   and e.get("url") == f"{XV_TOPIC}.status"), None) or \
        next((_value(e) for e in _ext(basic, f"{XV_TOPIC}.status")), None) or ""
    topic = Topic(url=urls[0], status=str(status),
                  title=str(next((_value(e) for e in _ext(basic, f"{XV_TOPIC}.title")), "") or ""))
    for trigger in _ext(basic, f"{XV_TOPIC}.resourceTrigger"):
        resource = str(next(iter(_part(trigger, "resource")), "") or "").rsplit("/", 1)[-1]
        # R5 SubscriptionTopic.resourceTrigger.supportedInteraction: none listed means all of them.
        kinds = {str(i) for i in _part(trigger, "supportedInteraction") if i} or {"create", "update", "delete"}
        if resource:
            topic.interactions.setdefault(resource, set()).update(kinds)
    for can in _ext(basic, f"{XV_TOPIC}.canFilterBy"):
        param = next(iter(_part(can, "filterParameter")), None)
        resource = str(next(iter(_part(can, "resource")), "") or "").rsplit("/", 1)[-1] or "*"
        if param:
            topic.filters.setdefault(str(param), set()).add(resource)
    return topic


def discover_topic(app: App, wanted: str | None = None) -> tuple[Topic, list[str]]:
    """The EHR's topic for ServiceRequest changes, and warnings about it.

    Backport IG, topic discovery for R4: the CapabilityStatement lists the topic canonicals the server
    supports (extension capabilitystatement-subscriptiontopic-canonical on the Subscription resource); the
    definitions (triggers, canFilterBy) are read from `Basic?code=SubscriptionTopic`. Preferred: a topic that
    fires on create AND update (a revoked order then arrives by notification too) and can filter by code."""
    advertised = _advertised(app)
    defined = {}
    try:
        for basic in app.ehr.search("Basic", {"code": TOPIC_CODE}):
            topic = topic_from_basic(basic) if basic.get("resourceType") == "Basic" else None
            if topic:
                defined[topic.url] = topic
    except FhirError as exc:
        if exc.transient:
            raise
        log.info("the EHR publishes no topic definitions as Basic (%s)", exc)
    if wanted:
        topic = defined.get(wanted) or (Topic(url=wanted, defined=False) if wanted in advertised else None)
        if topic is None:
            raise FhirbridgeError(f"the EHR does not offer topic {wanted} (offered: "
                                  f"{', '.join(sorted(set(defined) | advertised)) or 'none'})")
        problem = topic.problem()
        if problem:
            raise FhirbridgeError(f"topic {wanted} cannot be used: {problem}")
        return topic, _warnings(topic)
    usable, refused = [], []
    for topic in defined.values():
        if "ServiceRequest" not in topic.interactions:
            continue
        problem = topic.problem()
        (refused.append(f"{topic.url}: {problem}") if problem else usable.append(topic))
    if not usable:
        detail = ("; ".join(refused) if refused else
                  "no topic covers ServiceRequest" if defined else
                  f"it publishes no topic definitions (advertised: {', '.join(sorted(advertised)) or 'none'})")
        raise FhirbridgeError(f"the EHR at {app.hospital.fhir_base_url} has no usable topic for ServiceRequest "
                              f"changes: {detail}. Name one with --topic if you know it fits; until then "
                              "polling takes orders in")
    usable.sort(key=lambda t: (not t.covers_updates, t.url))
    return usable[0], _warnings(usable[0])


def _advertised(app: App) -> set[str]:
    try:
        cap = app.ehr.capabilities()
    except FhirError as exc:
        if exc.transient:
            raise
        return set()
    out = set()
    for rest in cap.get("rest") or []:
        for res in rest.get("resource") or []:
            if res.get("type") == "Subscription":
                out |= {str(_value(e)) for e in _ext(res, EXT_TOPIC_CANONICAL) if _value(e)}
    return out


def _warnings(topic: Topic) -> list[str]:
    if topic.defined and not topic.covers_updates:
        return [f"topic {topic.url} fires only when an order is created: revoked orders are noticed by polling"]
    if not topic.defined:
        return [f"topic {topic.url} is advertised but its definition is not readable; the EHR checks the filter"]
    return []


# --- registering -----------------------------------------------------------------------------------

@dataclass
class SubscribeResult:
    subscription: str        # "Subscription/<id>"
    status: str              # requested | active | error | off (R4 subscription-status)
    action: str              # created | updated | unchanged
    topic: str
    endpoint: str
    payload: str
    heartbeat: int | None
    error: str | None = None
    turned_off: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def endpoint_for(app: App) -> str:
    public = app.config.public_url
    if not public:
        raise ConfigError("is not set: it is the http(s) URL at which the EHR reaches this service, and the EHR "
                          "posts notifications to <public_url>/fhir/notify/<hospital> "
                          "(or set FHIRBRIDGE_SERVICE__PUBLIC_URL)",
                          file=str(app.config.file), key="service.public_url")
    return f"{public}/fhir/notify/{env_name(app.hospital.name)}"


def subscribe(app: App, *, payload: str = "id-only", heartbeat: int | None = DEFAULT_HEARTBEAT,
              topic: str | None = None, wait: float = HANDSHAKE_WAIT) -> SubscribeResult:
    """Register this hospital's Subscription on its EHR, or bring the existing one up to date.

    Idempotent: a Subscription already posting to our endpoint is reused (left alone when nothing changed,
    updated in place otherwise), and any further ones to the same endpoint are turned off, so running this
    twice never leaves two active Subscriptions."""
    if payload not in PAYLOADS:
        raise FhirbridgeError(f"payload must be one of {', '.join(PAYLOADS)}")
    if heartbeat is not None and heartbeat < 0:
        raise FhirbridgeError("heartbeat must be 0 (none) or a number of seconds")
    endpoint = endpoint_for(app)
    chosen, warnings = discover_topic(app, topic)
    if endpoint.startswith("http://") and not _loopback(endpoint):
        warnings.append(f"{endpoint} is plain http: the bearer token and any full-resource payload travel "
                        "unencrypted; use an https public_url")
    key, store = app.hospital.key, app.store
    state = load_state(store, key)
    existing = _existing(app, endpoint)
    keep = next((s for s in existing if s["id"] == state.subscription), None) or \
        next((s for s in existing if s.get("status") == "active"), None) or (existing[0] if existing else None)
    turned_off = []
    for other in existing:
        if other is not keep:
            other = dict(other, status="off")
            app.ehr.update(other, if_match=(other.get("meta") or {}).get("versionId"))
            turned_off.append(f"Subscription/{other['id']}")
    moved = _moved_away(app, state.subscription, existing)
    if moved is not None:  # public_url or the hospital's name changed: the old one would still be notifying
        app.ehr.update(dict(moved, status="off"), if_match=(moved.get("meta") or {}).get("versionId"))
        turned_off.append(f"Subscription/{moved['id']}")
    token = _header_token(keep) if keep else None
    if not (token and state.token_hash and hmac.compare_digest(token_hash(token), state.token_hash)):
        token = secrets.token_urlsafe(32)
    filter_ = f"ServiceRequest?code={app.order_codes.search_token()}"
    reason = f"fhirbridge: second-opinion orders for {app.hospital.name}"
    wanted = _resource(chosen.url, endpoint, filter_, payload, heartbeat or None, token, reason)
    if keep is not None and keep.get("status") == "active" and _same(keep, wanted):
        _set_subscription(store, key, keep["id"], reset_events=keep["id"] != state.subscription)
        return SubscribeResult(f"Subscription/{keep['id']}", "active", "unchanged", chosen.url, endpoint, payload,
                               heartbeat or None, turned_off=turned_off, warnings=warnings)
    # The token is stored before the EHR learns it: the EHR's handshake can arrive before its answer does.
    set_token(store, key, token_hash(token))
    try:
        if keep is not None:
            wanted["id"] = keep["id"]
            stored = app.ehr.update(wanted, if_match=(keep.get("meta") or {}).get("versionId"))
            action = "updated"
        else:
            # A new Subscription counts its events from zero: forget the old count before its handshake.
            _set_subscription(store, key, None, reset_events=True)
            stored, _ = app.ehr.create(wanted)
            action = "created"
    except FhirError as exc:
        if exc.transient:
            raise
        raise FhirbridgeError(f"the EHR refused the Subscription for {endpoint}: {exc}") from None
    _set_subscription(store, key, stored["id"], reset_events=action == "created")
    stored = _await_handshake(app, stored, wait)
    status = stored.get("status", "requested")
    log.info("Subscription/%s for %s %s: %s", stored["id"], app.hospital.name, action, status)
    return SubscribeResult(f"Subscription/{stored['id']}", status, action, chosen.url, endpoint, payload,
                           heartbeat or None, error=stored.get("error") if status == "error" else None,
                           turned_off=turned_off, warnings=warnings)


def _resource(topic: str, endpoint: str, filter_: str, payload: str, heartbeat: int | None, token: str,
              reason: str) -> dict:
    """A backport-subscription (R4 Subscription + backport extensions). `criteria` holds the topic canonical;
    the filter goes in `_criteria` (backport-filter-criteria, `Resource?param=value`); R4 allows a client to
    submit only status `requested` (or `off`); the server moves it to active after the handshake."""
    channel: dict[str, Any] = {
        "type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json",
        "_payload": {"extension": [{"url": EXT_CONTENT, "valueCode": payload}]},
        # R4 Subscription.channel.header: sent by the server with every notification, so our endpoint can
        # tell the EHR's posts from anyone else's.
        "header": [f"Authorization: Bearer {token}"],
    }
    if heartbeat:
        channel["extension"] = [{"url": EXT_HEARTBEAT, "valueUnsignedInt": heartbeat}]
    return {"resourceType": "Subscription", "meta": {"profile": [PROFILE]}, "status": "requested",
            "reason": reason, "criteria": topic,
            "_criteria": {"extension": [{"url": EXT_FILTER, "valueString": filter_}]}, "channel": channel}


def _same(current: dict, wanted: dict) -> bool:
    def essentials(sub: dict) -> tuple:
        ch = sub.get("channel") or {}
        return (sub.get("criteria"), sorted(str(_value(e)) for e in _ext(sub.get("_criteria") or {}, EXT_FILTER)),
                ch.get("type"), ch.get("endpoint"), ch.get("payload"),
                [_value(e) for e in _ext(ch.get("_payload") or {}, EXT_CONTENT)],
                [_value(e) for e in _ext(ch, EXT_HEARTBEAT)], list(ch.get("header") or []))
    return essentials(current) == essentials(wanted)


def _existing(app: App, endpoint: str) -> list[dict]:
    """Our Subscriptions on the EHR (same endpoint), not turned off. R4 search parameter `url` is
    Subscription.channel.endpoint; a server without it is searched whole and filtered here."""
    try:
        found = list(app.ehr.search("Subscription", {"url": endpoint}))
    except FhirError as exc:
        if exc.transient or exc.status not in (400, 404, 501):
            raise
        found = list(app.ehr.search("Subscription"))
    return [s for s in found if s.get("resourceType") == "Subscription" and s.get("status") != "off"
            and (s.get("channel") or {}).get("endpoint") == endpoint]


def _moved_away(app: App, sub_id: str | None, existing: list[dict]) -> dict | None:
    """Our previous Subscription when it posts to another endpoint of ours (same path, other public_url or
    hospital name) and is not off; None otherwise."""
    if not sub_id or any(s["id"] == sub_id for s in existing):
        return None
    try:
        old = app.ehr.read("Subscription", sub_id)
    except FhirError as exc:
        if exc.transient:
            raise
        return None  # gone
    endpoint = str((old.get("channel") or {}).get("endpoint") or "")
    return old if old.get("status") != "off" and "/fhir/notify/" in endpoint else None


def _header_token(sub: dict) -> str | None:
    for header in (sub.get("channel") or {}).get("header") or []:
        name, _, value = str(header).partition(":")
        if name.strip().lower() == "authorization" and value.strip().lower().startswith("bearer "):
            return value.strip()[7:].strip()
    return None


def _await_handshake(app: App, sub: dict, wait: float) -> dict:
    """Backport IG: a new rest-hook Subscription stays `requested` until the server's handshake to the
    endpoint succeeds (then `active`) or fails (then `error`)."""
    deadline = time.monotonic() + wait
    while sub.get("status") == "requested" and time.monotonic() < deadline:
        time.sleep(0.25)
        sub = app.ehr.read("Subscription", sub["id"])
    return sub


def _loopback(url: str) -> bool:
    return urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")


def turn_off(app: App) -> list[str]:
    """Set every Subscription posting to this hospital's endpoint to `off` (R4: a client may set `off`)."""
    done = []
    for sub in _existing(app, endpoint_for(app)):
        app.ehr.update(dict(sub, status="off"), if_match=(sub.get("meta") or {}).get("versionId"))
        done.append(f"Subscription/{sub['id']}")
    return done


# --- state in the store ----------------------------------------------------------------------------

@dataclass
class State:
    subscription: str | None = None      # the EHR's Subscription id
    token_hash: str | None = None
    previous_token_hash: str | None = None
    rotated_at: float | None = None
    events: int = 0
    last_kind: str | None = None
    last_at: float | None = None


def token_hash(token: str) -> str:
    # A random 256-bit token needs no slow password hash: SHA-256 cannot be reversed or guessed.
    return hashlib.sha256(token.encode()).hexdigest()


def load_state(store: Store, hospital: str) -> State:
    with store.engine.connect() as conn:
        rows = {r.name: r for r in conn.execute(select(cursors.c.name, cursors.c.value, cursors.c.updated_at).where(
            and_(cursors.c.hospital == hospital, cursors.c.name.startswith(STATE, autoescape=True))))}
    def value(name):
        return rows[name].value if name in rows else None
    events = value(EVENTS)
    return State(subscription=value(STATE), token_hash=value(TOKEN), previous_token_hash=value(PREVIOUS_TOKEN),
                 rotated_at=rows[PREVIOUS_TOKEN].updated_at if PREVIOUS_TOKEN in rows else None,
                 events=int(events) if events and events.isdigit() else 0, last_kind=value(LIVENESS),
                 last_at=rows[LIVENESS].updated_at if LIVENESS in rows else None)


def token_ok(store: Store, hospital: str, token: str | None) -> bool:
    if not token:
        return False
    state = load_state(store, hospital)
    given = token_hash(token)
    if state.token_hash and hmac.compare_digest(given, state.token_hash):
        return True
    return bool(state.previous_token_hash and state.rotated_at and time.time() - state.rotated_at < ROTATION_GRACE
                and hmac.compare_digest(given, state.previous_token_hash))


def set_token(store: Store, hospital: str, new_hash: str) -> None:
    with store.engine.begin() as conn:
        current = conn.execute(select(cursors.c.value).where(and_(cursors.c.hospital == hospital,
                                                                   cursors.c.name == TOKEN))).scalar()
        if current == new_hash:
            return
        if current:
            _put(conn, hospital, PREVIOUS_TOKEN, current)
        _put(conn, hospital, TOKEN, new_hash)


def _set_subscription(store: Store, hospital: str, sub_id: str | None, *, reset_events: bool) -> None:
    with store.engine.begin() as conn:
        _put(conn, hospital, STATE, sub_id)
        if reset_events:
            _put(conn, hospital, EVENTS, "0")
        for name in (EVENTS, LIVENESS):  # note_notification locks the liveness row: it must exist
            if conn.execute(select(cursors.c.name).where(and_(cursors.c.hospital == hospital,
                                                              cursors.c.name == name))).first() is None:
                _put(conn, hospital, name, "0" if name == EVENTS else None)


def _put(conn, hospital: str, name: str, value: str | None) -> None:
    now = time.time()
    done = conn.execute(update(cursors).where(and_(cursors.c.hospital == hospital, cursors.c.name == name))
                        .values(value=value, updated_at=now)).rowcount
    if not done:
        try:
            with conn.begin_nested():
                conn.execute(insert(cursors).values(hospital=hospital, name=name, value=value, updated_at=now))
        except IntegrityError:  # another replica inserted it meanwhile
            conn.execute(update(cursors).where(and_(cursors.c.hospital == hospital, cursors.c.name == name))
                         .values(value=value, updated_at=now))


def note_notification(store: Store, hospital: str, *, subscription: str | None, kind: str,
                      count: int | None) -> int | None:
    """Record that a notification arrived (liveness) and the highest eventsSinceSubscriptionStart seen.
    Returns the count seen BEFORE this one, or None when it cannot be compared (another Subscription than
    the current one, or no count).

    The liveness write comes first: it takes the row lock (SQLite: the write lock), so the read and the
    raise of the count below are one step even when notifications arrive in parallel."""
    with store.engine.begin() as conn:
        locked = conn.execute(update(cursors).where(and_(cursors.c.hospital == hospital, cursors.c.name == LIVENESS))
                              .values(value=kind, updated_at=time.time())).rowcount
        if not locked:
            return None
        rows = dict(conn.execute(select(cursors.c.name, cursors.c.value).where(and_(
            cursors.c.hospital == hospital, cursors.c.name.in_((STATE, EVENTS))))).all())
        current = rows.get(STATE)
        if count is None or (current is not None and current != subscription):
            return None
        seen = int(rows[EVENTS]) if (rows.get(EVENTS) or "").isdigit() else 0
        if count > seen:
            conn.execute(update(cursors).where(and_(cursors.c.hospital == hospital, cursors.c.name == EVENTS))
                         .values(value=str(count), updated_at=time.time()))
        return seen
