"""CDS Hooks 2.0 for one hospital: which draft orders call for a second opinion, and the cards that say so.

Flask-free: service/cds_hooks.py authenticates the EHR and hands the request body here. Two services:

    fhirbridge-order-sign    hook order-sign    context userId, patientId, encounterId?, draftOrders (Bundle)
    fhirbridge-order-select  hook order-select  the same, plus selections (the newly selected orders' ids)

**Rules** (mappings/cds/*.toml, config.mappings.load_cds_rules): a draft ServiceRequest (or MedicationRequest)
whose code a rule names, at a priority it fires at, gets one card, unless the patient had a second-opinion
order on the same question within the rule's lookback (our order codes; not revoked or entered-in-error; its
reasonCode names one of the rule's codes, its collection profile is the rule's, or its reasonReference is this
draft order), or a second-opinion order is already among the draft orders. Emergency priority (stat, asap by
default) never gets a card.

**Prefetch** (CDS Hooks 2.0 "Prefetch template"): `patient` = Patient/{{context.patientId}} and
`priorSecondOpinions` = ServiceRequest?patient={{context.patientId}}&code=<our order codes>. The draft orders
come in the context. With both prefetched nothing is read from the EHR (the hot path). A key that is missing or
null is read from the hospital's FHIR server: with the request's `fhirAuthorization` access token when its
`fhirServer` is that server, else with fhirbridge's own client; either way with the `[cds] time_budget_ms` as
timeout and no retries, and a read that fails or runs out gives no card rather than a late answer.

**The card** (CDS Hooks 2.0 "Card Attributes"): summary, detail (why, and which reviewers fit: those whose
profiles include the rule's), indicator, source, one suggestion per fitting reviewer (at most three; the first
isRecommended; selectionBehavior at-most-one) whose action `create`s the second-opinion ServiceRequest built
by ehr.order.build_order, with the draft order as its reasonReference and the draft's code as its reasonCode,
and, when the physician app is configured, a link of type "smart" to it with the order prefilled in appContext.
Ids are derived, never random: card uuid = UUIDv5(hospital, hookInstance, draft order, rule); each suggestion's
uuid is also the placer identifier value of the ServiceRequest it creates, so an accepted suggestion names its
order, and creating it again (the EHR executing the action, then our feedback handling) finds the same one.

**Feedback** (`POST .../feedback`): the first outcome per card is kept (store table cds_cards). An accepted
suggestion makes sure its order exists once (`ensure_order`: found by the placer identifier, else written
through ehr.order.place_order with a conditional create); the service then takes it in like POST /api/orders.
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from fhirbridge import jsonutil
from fhirbridge.config.mappings import CdsRule, load_cds_rules
from fhirbridge.ehr.context import App
from fhirbridge.ehr.order import REQUESTER, build_order, place_order
from fhirbridge.errors import FhirbridgeError, FhirError
from fhirbridge.fhir.auth import make_auth
from fhirbridge.fhir.client import FhirClient
from fhirbridge.fhir.elements import parse_fhir_date

log = logging.getLogger("fhirbridge.ehr.cds")

ORDER_SIGN, ORDER_SELECT = "fhirbridge-order-sign", "fhirbridge-order-select"
SERVICES = {
    ORDER_SIGN: {"hook": "order-sign", "title": "fhirbridge: second opinion before high-stakes treatment",
                 "description": "Suggests an external second opinion when elective spine surgery, coronary "
                                "revascularisation, cancer surgery or the start of chemo/radiotherapy is signed."},
    ORDER_SELECT: {"hook": "order-select", "title": "fhirbridge: second opinion when treatment is selected",
                   "description": "The same suggestion as fhirbridge-order-sign, as soon as such an order is "
                                  "selected."},
}
PREFETCH_PATIENT, PREFETCH_PRIOR = "patient", "priorSecondOpinions"
ORDER_TYPES = ("ServiceRequest", "MedicationRequest")
NOT_STANDING = ("revoked", "entered-in-error")
# CDS Hooks 2.0: context.userId for the order hooks is a Practitioner or PractitionerRole, "[ResourceType]/[id]".
_REF = re.compile(r"[A-Za-z]+/[A-Za-z0-9\-.]{1,64}")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_NS = uuid.UUID("5b0a3c52-3e0f-4c55-9a43-5e8f1f0c2d18")   # fhirbridge's namespace for CDS card and suggestion ids
MAX_SUGGESTIONS = 3


class CdsInputError(FhirbridgeError):
    """The hook request is not what CDS Hooks 2.0 says (HTTP 400 with this message)."""


@dataclass
class HookCall:
    service: str
    hook: str
    hook_instance: str
    user: str
    patient: str                       # Patient id (context.patientId)
    encounter: str | None
    draft_orders: list[dict]           # the Bundle's resources
    selections: tuple[str, ...]
    prefetch: dict
    fhir_server: str | None
    access_token: str | None
    fetched: list[str] = field(default_factory=list)   # what had to be read from the EHR (tests, logs)


def prefetch_templates(apps: list[App]) -> dict[str, str]:
    tokens = ",".join(dict.fromkeys(t for a in apps for t in a.order_codes.search_token().split(",")))
    return {PREFETCH_PATIENT: "Patient/{{context.patientId}}",
            PREFETCH_PRIOR: f"ServiceRequest?patient={{{{context.patientId}}}}&code={tokens}"}


def discovery(apps: list[App]) -> dict:
    """The discovery document (CDS Hooks 2.0 "Discovery"): both services with their prefetch templates."""
    prefetch = prefetch_templates(apps)
    return {"services": [{"id": sid, "hook": s["hook"], "title": s["title"], "description": s["description"],
                          "prefetch": prefetch,
                          "usageRequirements": "Send draftOrders in the context; prefetch `patient` and "
                                               "`priorSecondOpinions` to keep the answer under 100 ms."}
                         for sid, s in SERVICES.items()]}


def parse_call(service: str, body: object) -> HookCall:
    """Check a hook request (CDS Hooks 2.0 "HTTP Request" and the hook's context), or CdsInputError."""
    if service not in SERVICES:
        raise CdsInputError(f"no CDS service {service!r} (known: {', '.join(SERVICES)})")
    if not isinstance(body, dict):
        raise CdsInputError("the request body must be a JSON object (CDS Hooks request)")
    hook = SERVICES[service]["hook"]
    if body.get("hook") != hook:
        raise CdsInputError(f"hook must be {hook!r} for the service {service}")
    instance = body.get("hookInstance")
    if not isinstance(instance, str) or not _uuid(instance):
        raise CdsInputError("hookInstance must be a UUID")
    ctx = body.get("context")
    if not isinstance(ctx, dict):
        raise CdsInputError("context is required (an object with userId, patientId and draftOrders)")
    user, patient = ctx.get("userId"), ctx.get("patientId")
    if not isinstance(user, str) or not _REF.fullmatch(user):
        raise CdsInputError("context.userId must be [ResourceType]/[id], e.g. Practitioner/123")
    if not isinstance(patient, str) or not _ID.fullmatch(patient.removeprefix("Patient/")):
        raise CdsInputError("context.patientId must be the FHIR Patient.id")
    encounter = ctx.get("encounterId")
    if encounter is not None and (not isinstance(encounter, str) or not _ID.fullmatch(encounter)):
        raise CdsInputError("context.encounterId must be the FHIR Encounter.id")
    bundle = ctx.get("draftOrders")
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or \
            not isinstance(bundle.get("entry", []), list):
        raise CdsInputError("context.draftOrders must be a FHIR Bundle of the draft orders")
    drafts: list[dict] = []
    for e in bundle.get("entry", []):
        res = e.get("resource") if isinstance(e, dict) else None
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            raise CdsInputError("every entry of context.draftOrders needs a resource")
        drafts.append(res)
    selections: tuple[str, ...] = ()
    if hook == "order-select":
        raw = ctx.get("selections")
        if not isinstance(raw, list) or not raw or not all(isinstance(s, str) and _REF.fullmatch(s) for s in raw):
            raise CdsInputError("context.selections must list the selected orders as [ResourceType]/[id]")
        selections = tuple(raw)
    prefetch = body.get("prefetch") or {}
    if not isinstance(prefetch, dict):
        raise CdsInputError("prefetch must be an object keyed by the discovery's prefetch keys")
    auth = body.get("fhirAuthorization")
    token = None
    if auth is not None:
        # cds-r-1: fhirAuthorization only with a fhirServer; its token is a Bearer token (CDS Hooks 2.0).
        if not isinstance(auth, dict) or not isinstance(auth.get("access_token"), str) or \
                auth.get("token_type") != "Bearer" or not isinstance(body.get("fhirServer"), str):
            raise CdsInputError("fhirAuthorization needs access_token, token_type Bearer and a fhirServer")
        token = auth["access_token"]
    server = body.get("fhirServer")
    return HookCall(service=service, hook=hook, hook_instance=instance, user=user,
                    patient=patient.removeprefix("Patient/"), encounter=encounter, draft_orders=drafts,
                    selections=selections, prefetch=prefetch,
                    fhir_server=server.rstrip("/") if isinstance(server, str) else None, access_token=token)


def _uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
        return True
    except ValueError:
        return False


# --- reading what prefetch did not bring -------------------------------------------------------------

def _budget_client(app: App, call: HookCall, budget: float) -> FhirClient:
    h = app.hospital
    if call.access_token and call.fhir_server == h.fhir_base_url:
        auth = make_auth({"type": "bearer", "token": call.access_token})
    else:
        # Another fhirServer is never called (it would make us fetch from wherever a caller says): our own
        # client reads the hospital's server instead.
        auth = make_auth(h.auth.as_dict(), default_scopes=app.smart_scopes if h.auth.type == "smart" else None)
    return FhirClient(h.fhir_base_url, auth=auth, timeout=(budget, budget), retries=0, validate=False)


def _prefetched(call: HookCall, key: str) -> object:
    """A prefetch value, or None when it is missing, null, or an OperationOutcome (CDS Hooks 2.0: how a CDS
    client reports that it could not prefetch): then it is read from the EHR."""
    value = call.prefetch.get(key)
    if isinstance(value, dict) and value.get("resourceType") == "OperationOutcome":
        return None
    return value


def _patient(app: App, call: HookCall, client_for) -> dict:
    res = _prefetched(call, PREFETCH_PATIENT)
    if res is None:
        call.fetched.append(PREFETCH_PATIENT)
        res = client_for().read_ref(f"Patient/{call.patient}")
    if not isinstance(res, dict) or res.get("resourceType") != "Patient" or res.get("id") != call.patient:
        raise CdsInputError("prefetch.patient must be the Patient of context.patientId")
    return res


def _prior_orders(app: App, call: HookCall, client_for) -> list[dict]:
    bundle = _prefetched(call, PREFETCH_PRIOR)
    if bundle is None:
        call.fetched.append(PREFETCH_PRIOR)
        return list(client_for().search("ServiceRequest", {"patient": call.patient,
                                                           "code": app.order_codes.search_token()}))
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise CdsInputError(f"prefetch.{PREFETCH_PRIOR} must be a searchset Bundle")
    return [e["resource"] for e in bundle.get("entry", []) or []
            if isinstance(e, dict) and isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") == "ServiceRequest"]


# --- the rules ---------------------------------------------------------------------------------------

def _codings(order: dict) -> list:
    concept = order.get("code") if order.get("resourceType") == "ServiceRequest" else \
        order.get("medicationCodeableConcept")
    return (concept or {}).get("coding", []) if isinstance(concept, dict) else []


def _concept_ok(value: object) -> bool:
    return isinstance(value, dict) and isinstance(value.get("coding", []), list) \
        and all(isinstance(c, dict) for c in value.get("coding", []))


def well_formed(order: dict) -> bool:
    """Whether the parts of an order the rules read have their FHIR shapes (a client's draft or prefetch is
    input: an order that does not is passed over, never an error in the middle of the rules)."""
    lists = ("reasonReference", "reasonCode", "orderDetail")
    # FHIR JSON has no nulls (R4 json.html): a key present with null, or another shape, is not well formed.
    return (all(_concept_ok(order[k]) for k in ("code", "medicationCodeableConcept") if k in order)
            and all(isinstance(order[k], str) for k in ("priority", "id", "status", "authoredOn") if k in order)
            and all(isinstance(order.get(k, []), list) and all(isinstance(x, dict) for x in order.get(k, []))
                    for k in lists)
            and all(_concept_ok(x) for k in ("reasonCode", "orderDetail") for x in order.get(k, [])))


def draft_ref(order: dict, index: int) -> str:
    """How the card, its suggestion and the store name the draft order: Type/id when it has an id (CDS Hooks:
    it may not), else its position in the Bundle."""
    return f"{order['resourceType']}/{order['id']}" if isinstance(order.get("id"), str) else \
        f"{order['resourceType']}#draft-{index}"


def _same_question(app: App, prior: dict, rule: CdsRule, draft: str, now: datetime) -> bool:
    if prior.get("status") in NOT_STANDING or not app.order_codes.matches(prior):
        return False
    if any(r.get("reference") == draft for r in prior.get("reasonReference", []) if isinstance(r, dict)):
        return True
    authored = parse_fhir_date(str(prior.get("authoredOn") or ""))
    if authored is None or rule.lookback_months == 0:
        return False
    if authored.tzinfo is None:
        authored = authored.replace(tzinfo=UTC)
    if authored < now - timedelta(days=30.44 * rule.lookback_months):
        return False
    profiles = {c.get("code") for d in prior.get("orderDetail", []) for c in d.get("coding", [])
                if c.get("system") == app.order_codes.profile_system}
    return rule.profile in profiles or any(rule.matches(rc.get("coding", [])) for rc in prior.get("reasonCode", []))


@dataclass
class Answer:
    cards: list[dict]
    rows: list[dict]                   # what the store keeps of each card (Store.record_cds_cards)
    fetched: list[str]                 # prefetch keys that had to be read from the EHR


def cards_for(app: App, call: HookCall, *, budget: float, public_url: str, now: datetime | None = None,
              rules: tuple[CdsRule, ...] | None = None) -> Answer:
    """The cards for one hook call. Raises CdsInputError for a malformed request; an EHR that cannot be read
    in time gives no cards (logged), never an error the clinician has to dismiss."""
    now = now or datetime.now(UTC)
    rules = load_cds_rules(app.config.mappings_dir) if rules is None else rules
    candidates = []
    for i, order in enumerate(call.draft_orders):
        ref = draft_ref(order, i)
        if order.get("resourceType") not in ORDER_TYPES or not well_formed(order):
            continue
        if call.selections and ref not in call.selections:
            continue     # order-select: only the newly selected orders, not the rest of the basket
        if app.order_codes.matches(order):
            return Answer([], [], [])   # a second opinion is already being ordered with them
        codings = _codings(order)
        rule = next((r for r in rules if r.matches(codings)), None)
        if rule is None or (order.get("priority") or "routine") not in rule.priorities:
            continue
        candidates.append((i, ref, order, rule))
    if not candidates:
        return Answer([], [], [])       # nothing to say: no EHR call either
    client: list[FhirClient] = []

    def client_for() -> FhirClient:
        if not client:
            client.append(_budget_client(app, call, budget))
        return client[0]

    started = time.monotonic()
    try:
        patient = _patient(app, call, client_for)
        priors = _prior_orders(app, call, client_for)
    except FhirError as exc:
        log.warning("no CDS card: the EHR could not be read within %.0f ms (%s)", budget * 1000, exc)
        return Answer([], [], call.fetched)
    finally:
        for c in client:
            c.close()
    if call.fetched and time.monotonic() - started > budget:
        log.warning("no CDS card: reading %s from the EHR took longer than the time budget", call.fetched)
        return Answer([], [], call.fetched)
    if patient.get("deceasedBoolean") is True or patient.get("deceasedDateTime"):
        return Answer([], [], call.fetched)
    cards, rows = [], []
    priors = [p for p in priors if well_formed(p)]
    for _i, ref, order, rule in candidates:
        if any(_same_question(app, p, rule, ref, now) for p in priors):
            continue
        card, row = _card(app, call, order, ref, rule, public_url)
        cards.append(card)
        rows.append(row)
    return Answer(cards, rows, call.fetched)


def fitting_reviewers(app: App, rule: CdsRule) -> list:
    return [r for r in app.config.reviewers.values() if rule.profile in r.profiles]


def suggestion_id(card_id: str, reviewer: str | None) -> str:
    return str(uuid.uuid5(_NS, f"{card_id}|suggestion|{reviewer or ''}"))


def _question(rule: CdsRule) -> str:
    """The order's question: the same words on the suggestion and on the order placed on feedback (the store
    keeps no text of the draft order to build more from)."""
    return ("Is the planned treatment (the order this one names as its reason) indicated now, and is there a "
            "less invasive alternative?")


def _card(app: App, call: HookCall, order: dict, ref: str, rule: CdsRule, public_url: str) -> tuple[dict, dict]:
    card_id = str(uuid.uuid5(_NS, f"{app.hospital.key}|{call.hook_instance}|{ref}|{rule.id}"))
    reviewers = fitting_reviewers(app, rule)
    code: dict = next((c for c in _codings(order) if (c.get("system"), c.get("code")) in rule.codes), {})
    question = _question(rule)
    detail = rule.detail
    if reviewers:
        detail += "\n\nReviewers for this: " + ", ".join(r.display for r in reviewers) + "."
    card: dict = {"uuid": card_id, "summary": rule.summary, "detail": detail, "indicator": rule.indicator,
                  "source": {"label": f"fhirbridge second opinion ({app.hospital.name})",
                             **({"url": public_url} if public_url else {})}}
    suggestions = []
    if REQUESTER.fullmatch(call.user):     # an order names its requester (BSeR); a Patient user gets no action
        for n, reviewer in enumerate(reviewers[:MAX_SUGGESTIONS] or [None]):
            sid = suggestion_id(card_id, reviewer.name if reviewer else None)
            resource = suggested_order(app, call.patient, call.user, question, rule, ref, code,
                                       reviewer.name if reviewer else None, sid)
            label = f"Order a second opinion from {reviewer.display}" if reviewer else "Order a second opinion"
            suggestions.append({"label": label, "uuid": sid, "isRecommended": n == 0,
                                "actions": [{"type": "create", "description": label, "resource": resource}]})
    if suggestions:
        card["suggestions"] = suggestions
        card["selectionBehavior"] = "at-most-one"
    if app.config.physician_app is not None and public_url:
        context = {"cdsCard": card_id, "draftOrder": ref, "profile": rule.profile, "question": question,
                   **({"reviewer": reviewers[0].name} if reviewers else {})}
        card["links"] = [{"label": "Open the second-opinion order form", "url": f"{public_url}/physician/launch",
                          "type": "smart", "appContext": jsonutil.dumps(context).decode()}]
    row = {"card_id": card_id, "hospital": app.hospital.key, "service": call.service,
           "hook_instance": call.hook_instance, "patient": f"Patient/{call.patient}", "ordered_by": call.user,
           "draft_order": ref, "draft_code": f"{code.get('system')}|{code.get('code')}"[:300], "rule": rule.id}
    return card, row


def suggested_order(app: App, patient: str, user: str, question: str, rule: CdsRule, draft: str, code: dict,
                    reviewer: str | None, placer: str) -> dict:
    """The second-opinion ServiceRequest a suggestion creates: ehr.order.build_order's, as a draft the
    clinician signs with the rest of the orders (order-sign's draftOrders), its reason the draft order."""
    reason = {"reference": draft} if "#" not in draft else {"display": draft}
    sr = build_order(app, patient=patient, question=question, requester=user, reviewer=reviewer,
                     profile=rule.profile, placer=placer, reason_reference=reason,
                     reason_code=[{"coding": [code]}] if code else None)
    sr["status"] = "draft"
    return sr


# --- feedback ----------------------------------------------------------------------------------------

@dataclass
class Feedback:
    card: str
    outcome: str                       # accepted | overridden
    accepted: tuple[str, ...]          # suggestion uuids
    override_reason: str | None        # system|code
    at: float | None


def parse_feedback(body: object) -> list[Feedback]:
    """CDS Hooks 2.0 "Feedback": {"feedback": [{card, outcome, acceptedSuggestions?, overrideReason?,
    outcomeTimestamp}]}, or CdsInputError."""
    items = body.get("feedback") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise CdsInputError("the body must be {\"feedback\": [...]} with at least one item")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("card"), str) or not _uuid(item["card"]):
            raise CdsInputError(f"feedback[{i}].card must be the uuid of a card")
        outcome = item.get("outcome")
        if outcome not in ("accepted", "overridden"):
            raise CdsInputError(f"feedback[{i}].outcome must be accepted or overridden")
        accepted = item.get("acceptedSuggestions", [])
        if not isinstance(accepted, list) or not all(isinstance(a, dict) and isinstance(a.get("id"), str)
                                                     for a in accepted):
            raise CdsInputError(f"feedback[{i}].acceptedSuggestions must be a list of {{\"id\": <uuid>}}")
        if outcome == "overridden" and accepted:
            raise CdsInputError(f"feedback[{i}]: an overridden card has no accepted suggestions")
        reason = item.get("overrideReason")
        coding = reason.get("reason") if isinstance(reason, dict) else None
        code: str | None = f"{coding.get('system', '')}|{coding.get('code', '')}"[:200] \
            if isinstance(coding, dict) and coding.get("code") else None
        stamp = parse_fhir_date(str(item.get("outcomeTimestamp") or ""))
        out.append(Feedback(card=item["card"], outcome=outcome, accepted=tuple(a["id"] for a in accepted),
                            override_reason=code, at=stamp.timestamp() if stamp and stamp.tzinfo else None))
    return out


def ensure_order(app: App, card: dict, suggestion: str) -> dict:
    """The second-opinion ServiceRequest of an accepted suggestion, written once: found by its placer
    identifier (the EHR may have executed the create action already), else placed through ehr.order with a
    conditional create. Raises CdsInputError for a suggestion that is not one of the card's."""
    rules = {r.id: r for r in load_cds_rules(app.config.mappings_dir)}
    rule = rules.get(card["rule"])
    if rule is None:
        raise CdsInputError(f"the card's rule {card['rule']!r} is no longer configured")
    names = [r.name for r in fitting_reviewers(app, rule)[:MAX_SUGGESTIONS]] or [None]
    reviewer = next((n for n in names if suggestion_id(card["card_id"], n) == suggestion), "")
    if reviewer == "":
        raise CdsInputError(f"suggestion {suggestion} is not one of card {card['card_id']}'s")
    system, _, code = card["draft_code"].partition("|")
    draft = card["draft_order"]
    return place_order(app, patient=card["patient"], question=_question(rule), requester=card["ordered_by"],
                       reviewer=reviewer, profile=rule.profile, placer=suggestion,
                       reason_reference={"reference": draft} if "#" not in draft else {"display": draft},
                       reason_code=[{"coding": [{"system": system, "code": code}]}] if code else None)
