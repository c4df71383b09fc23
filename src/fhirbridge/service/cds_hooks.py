"""/cds-services: the CDS Hooks 2.0 services (the rules and cards: ehr/cds.py; docs/cds-hooks.md).

    GET  /cds-services                     discovery (public: it names services and prefetch templates only)
    POST /cds-services/<id>                a hook call from a trusted EHR: {"cards": [...]}
    POST /cds-services/<id>/feedback       what the clinician did with the cards (accepted / overridden)

Every call but discovery carries the EHR's signed JWT (access.tokens.cds_client_from_jwt: trusted `iss`, its
JWK Set, `aud` = the URL called under `[service] public_url`, `exp`, `jti` once); anything else is a 401.
Served only when `[cds]` is configured and enabled (otherwise 404).
"""
from __future__ import annotations

import logging
import time

from flask import Blueprint, abort, jsonify, request

from fhirbridge.access.tokens import Unauthorized, cds_client_from_jwt, cds_keyring
from fhirbridge.ehr import cds
from fhirbridge.errors import FhirbridgeError, FhirError
from fhirbridge.loop.intake import order_changed
from fhirbridge.ops import metrics
from fhirbridge.service.http import ApiError, bearer, service

log = logging.getLogger("fhirbridge.service.cds_hooks")

cds_hooks = Blueprint("cds_hooks", __name__, url_prefix="/cds-services")


def _settings():
    cfg = service().config.cds
    if cfg is None or not cfg.enabled:
        abort(404)
    return cfg


REPLAY = "this token was used before (a replay): sign a new one for each request"


def _caller_app(*, defer_jti: list | None = None):
    """The hospital whose EHR signed this call (401 when no trusted EHR did). The JWT's jti is recorded now,
    or, with `defer_jti`, appended to it for the caller to record with its own write (one commit per call)."""
    svc = service()
    cfg = svc.config
    audience = f"{cfg.public_url}{request.path}"

    def remember(jti: str, iss) -> bool:
        if defer_jti is not None:
            defer_jti.append((f"cds:{jti}", f"cds:{iss.iss}"))
            return True
        return svc.store.remember_token(f"cds:{jti}", f"cds:{iss.iss}")

    try:
        issuer = cds_client_from_jwt(bearer(), cfg, audience=audience,
                                     keys_for=lambda iss, kid: cds_keyring(cfg, iss, kid), remember=remember)
    except Unauthorized as exc:
        raise ApiError(401, str(exc)) from None
    return svc.app_for(issuer.hospital)


def _body() -> object:
    data = request.get_json(silent=True)
    if data is None:
        raise ApiError(400, "the body must be a JSON object (Content-Type: application/json)")
    return data


@cds_hooks.get("")
def discovery():
    _settings()
    return jsonify(cds.discovery(service().apps))


@cds_hooks.post("/<service_id>")
def call_service(service_id: str):
    settings = _settings()
    if service_id not in cds.SERVICES:
        raise ApiError(404, f"no CDS service {service_id!r} (known: {', '.join(cds.SERVICES)})")
    started = time.monotonic()
    jti: list[tuple[str, str]] = []
    app = _caller_app(defer_jti=jti)
    try:
        call = cds.parse_call(service_id, _body())
        answer = cds.cards_for(app, call, budget=settings.time_budget_ms / 1000,
                               public_url=service().config.public_url or "")
    except cds.CdsInputError as exc:
        raise ApiError(400, str(exc)) from None
    # The replay check and the cards in one transaction: a replayed JWT is refused and records nothing.
    if not app.store.record_cds_call(*jti[0], answer.rows):
        raise ApiError(401, REPLAY)
    metrics.cds_answered(service_id, bool(answer.fetched), time.monotonic() - started)
    return jsonify({"cards": answer.cards})


@cds_hooks.post("/<service_id>/feedback")
def feedback(service_id: str):
    _settings()
    if service_id not in cds.SERVICES:
        raise ApiError(404, f"no CDS service {service_id!r} (known: {', '.join(cds.SERVICES)})")
    app = _caller_app()
    try:
        items = cds.parse_feedback(_body())
    except cds.CdsInputError as exc:
        raise ApiError(400, str(exc)) from None
    out = []
    for item in items:
        card = app.store.cds_card(item.card)
        if card is None or card["hospital"] != app.hospital.key or card["service"] != service_id:
            raise ApiError(404, f"no card {item.card} of {service_id} for this EHR")
        first = app.store.cds_feedback(item.card, outcome=item.outcome, override_reason=item.override_reason,
                                       at=item.at)
        result: dict = {"card": item.card, "recorded": first}
        if item.outcome == "accepted" and item.accepted:
            result.update(_accepted(app, card, item.accepted[0]))
        out.append(result)
    return jsonify({"feedback": out})


def _accepted(app, card: dict, suggestion: str) -> dict:
    """The second-opinion order of an accepted suggestion: written once (ehr.cds.ensure_order) and taken in
    as POST /api/orders does; the Case's events and the card's row name each other."""
    try:
        # One second-opinion order per card: one placed already (this feedback before, or the physician app
        # from the card's link) is the card's order, not a reason for another.
        sr = app.ehr.read_ref(card["second_opinion_order"]) if card.get("second_opinion_order") \
            else cds.ensure_order(app, card, suggestion)
    except cds.CdsInputError as exc:
        raise ApiError(400, str(exc)) from None
    except FhirError:
        raise
    except FhirbridgeError as exc:
        raise ApiError(400, str(exc)) from None
    ref = f"ServiceRequest/{sr['id']}"
    try:
        order_changed(app, sr)
    except Exception as exc:  # noqa: BLE001 - the order is in the EHR; the next poll takes it in
        log.warning("order %s written but not yet taken in: %s", ref, exc)
    case = app.store.find_by_order(app.hospital.key, ref)
    app.store.cds_ordered(card["card_id"], order=ref, case_id=case.id if case else None)
    if case is not None and card.get("case_id") != case.id:
        app.store.add_event(case.id, "cds.accepted", {"card": card["card_id"], "draft_order": card["draft_order"],
                                                     "rule": card["rule"], "suggestion": suggestion})
    return {"service_request": ref, "status": sr.get("status"), "case": case.id if case else None}
