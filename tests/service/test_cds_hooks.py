"""The CDS Hooks 2.0 services (issue 18 part 1) against the real app and the real EHR (sekmet): a CDS client in
the tests plays the EHR (tests/kit/cds_client.py: its own signing key, served as a JWK Set on a loopback port).

Discovery; order-sign with complete prefetch (no EHR read: the patient exists only in the prefetch), without
prefetch (read from the EHR, with and without fhirAuthorization), order-select; the exclusions (stat/asap, a
recent second opinion on the same question, a second opinion already in the basket); the JWT checks (issuer,
signature, expiry, audience, replay, jku); malformed requests (400 with the reason); feedback: an accepted
suggestion places its ServiceRequest exactly once and opens the Case, an overridden card is recorded.
"""
from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhirbridge.config import loader as config
from fhirbridge.crypto.keys import KeyRing, generate_jwks
from fhirbridge.ehr.order import PLACER_SYSTEM
from fhirbridge.ops import metrics
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from tests.kit.cds_client import CPT, SPINE_FUSION, EhrCdsClient

pytestmark = pytest.mark.sekmet

PUBLIC = "http://localhost"
SIGN, SELECT = "fhirbridge-order-sign", "fhirbridge-order-select"


@pytest.fixture
def cds(hospital):
    ehr_client = EhrCdsClient()
    text = hospital.config_path.read_text()
    hospital.config_path.write_text(text + f'\n[service]\npublic_url = "{PUBLIC}"\n'
                                    + ehr_client.config_block(hospital.app.hospital.name))
    svc = Service(config.load(hospital.config_path))
    hospital.app = svc.apps[0]
    client = create_app(svc=svc).test_client()
    try:
        yield hospital, svc, client, ehr_client
    finally:
        svc.stop(wait=True)
        ehr_client.close()


def prefetch_for(patient: dict, priors: list[dict] | None = None) -> dict:
    return {"patient": patient, "priorSecondOpinions": {"resourceType": "Bundle", "type": "searchset",
                                                        "entry": [{"resource": p} for p in priors or []]}}


def synthetic_patient() -> dict:
    """A Patient that exists only in the prefetch: a card for it proves nothing was read from the EHR."""
    return {"resourceType": "Patient", "id": f"only-in-prefetch-{uuid.uuid4().hex[:8]}", "active": True}


def spine_card(r) -> dict:
    assert r.status_code == 200, r.get_json()
    cards = r.get_json()["cards"]
    assert len(cards) == 1, cards
    return cards[0]


# --- discovery -----------------------------------------------------------------------------------------

def test_discovery_names_both_services_and_their_prefetch(cds):
    h, _svc, client, _ehr = cds
    r = client.get("/cds-services")
    assert r.status_code == 200
    services = {s["id"]: s for s in r.get_json()["services"]}
    assert services[SIGN]["hook"] == "order-sign" and services[SELECT]["hook"] == "order-select"
    prefetch = services[SIGN]["prefetch"]
    assert prefetch["patient"] == "Patient/{{context.patientId}}"
    assert prefetch["priorSecondOpinions"] == ("ServiceRequest?patient={{context.patientId}}"
                                               f"&code=urn:test:orders|{h.order_code}")


@pytest.mark.parametrize("section", ["", "\n[cds]\nenabled = false\n"])
def test_without_cds_configured_or_enabled_nothing_is_served(hospital, section):
    hospital.config_path.write_text(hospital.config_path.read_text() + section)
    svc = Service(config.load(hospital.config_path))
    try:
        client = create_app(svc=svc).test_client()
        assert client.get("/cds-services").status_code == 404
        assert client.post(f"/cds-services/{SIGN}", json={}).status_code == 404
        assert client.post(f"/cds-services/{SIGN}/feedback", json={}).status_code == 404
    finally:
        svc.stop(wait=True)


# --- cards ---------------------------------------------------------------------------------------------

def test_a_spine_fusion_draft_with_full_prefetch_gets_the_card_without_reading_the_ehr(cds):
    h, svc, client, ehr = cds
    patient = synthetic_patient()
    draft = ehr.draft(SPINE_FUSION, id="draft-fusion-1", patient=patient["id"])
    body = ehr.order_sign(patient["id"], "Practitioner/dr-a", [draft], prefetch=prefetch_for(patient))
    card = spine_card(ehr.call(client, SIGN, body, public_url=PUBLIC))
    assert card["indicator"] == "info" and len(card["summary"]) < 140 and "spine" in card["summary"].lower()
    assert "Spine Center" in card["detail"]           # which reviewers fit: spine-center serves "spine"
    assert card["selectionBehavior"] == "at-most-one"
    [suggestion] = card["suggestions"]
    assert suggestion["isRecommended"] is True and uuid.UUID(suggestion["uuid"])
    [action] = suggestion["actions"]
    sr = action["resource"]
    assert action["type"] == "create" and sr["resourceType"] == "ServiceRequest"
    assert sr["status"] == "draft" and sr["intent"] == "order"
    assert sr["code"]["coding"] == [{"system": "urn:test:orders", "code": h.order_code, "display": "Second Opinion"}]
    assert sr["reasonReference"] == [{"reference": "ServiceRequest/draft-fusion-1"}]
    assert sr["reasonCode"] == [{"coding": [SPINE_FUSION]}]
    assert sr["subject"] == {"reference": f"Patient/{patient['id']}"}
    assert sr["requester"] == {"reference": "Practitioner/dr-a"}
    assert sr["performer"][0]["identifier"]["value"] == "urn:oid:2.999.9.1"
    assert {"system": PLACER_SYSTEM, "value": suggestion["uuid"]}.items() <= sr["identifier"][0].items()
    row = svc.store.cds_card(card["uuid"])
    assert row["draft_order"] == "ServiceRequest/draft-fusion-1" and row["rule"] == "spine-elective"
    assert row["outcome"] is None and row["ordered_by"] == "Practitioner/dr-a"


def test_cpt_codes_trigger_too_and_an_unrelated_order_gets_nothing(cds):
    _h, _svc, client, ehr = cds
    patient = synthetic_patient()
    cpt = ehr.draft({"system": CPT, "code": "63047"}, id="draft-decompression", patient=patient["id"])
    lab = ehr.draft({"system": "http://loinc.org", "code": "2345-7"}, id="draft-lab", patient=patient["id"])
    r = ehr.call(client, SIGN, ehr.order_sign(patient["id"], "Practitioner/dr-a", [lab, cpt],
                                              prefetch=prefetch_for(patient)), public_url=PUBLIC)
    assert spine_card(r)["suggestions"][0]["actions"][0]["resource"]["reasonReference"] == [
        {"reference": "ServiceRequest/draft-decompression"}]
    r = ehr.call(client, SIGN, ehr.order_sign(patient["id"], "Practitioner/dr-a", [lab],
                                              prefetch=prefetch_for(patient)), public_url=PUBLIC)
    assert r.status_code == 200 and r.get_json() == {"cards": []}


@pytest.mark.parametrize("priority", ["stat", "asap"])
def test_an_emergency_order_gets_no_card(cds, priority):
    _h, _svc, client, ehr = cds
    patient = synthetic_patient()
    draft = ehr.draft(SPINE_FUSION, id="draft-emergency", patient=patient["id"], priority=priority)
    r = ehr.call(client, SIGN, ehr.order_sign(patient["id"], "Practitioner/dr-a", [draft],
                                              prefetch=prefetch_for(patient)), public_url=PUBLIC)
    assert r.status_code == 200 and r.get_json() == {"cards": []}


def test_a_recent_second_opinion_on_the_same_question_silences_the_card(cds):
    h, _svc, client, ehr = cds
    patient = synthetic_patient()
    codes = h.app.order_codes

    def prior(days_ago: int, **over) -> dict:
        return {"resourceType": "ServiceRequest", "id": uuid.uuid4().hex[:12], "status": "completed",
                "intent": "order", "code": {"coding": [codes.order_code]},
                "subject": {"reference": f"Patient/{patient['id']}"},
                "authoredOn": (datetime.now(UTC) - timedelta(days=days_ago)).isoformat(), **over}

    spine = {"orderDetail": [{"coding": [{"system": codes.profile_system, "code": "spine"}]}]}
    cardiac = {"orderDetail": [{"coding": [{"system": codes.profile_system, "code": "cardiac"}]}]}
    draft = ehr.draft(SPINE_FUSION, id="draft-again", patient=patient["id"])

    def cards(priors):
        r = ehr.call(client, SIGN, ehr.order_sign(patient["id"], "Practitioner/dr-a", [draft],
                                                  prefetch=prefetch_for(patient, priors)), public_url=PUBLIC)
        assert r.status_code == 200, r.get_json()
        return r.get_json()["cards"]

    assert cards([prior(30, **spine)]) == []                                       # same question, 1 month ago
    assert cards([prior(30, reasonCode=[{"coding": [SPINE_FUSION]}])]) == []       # named by its reason
    assert len(cards([prior(400, **spine)])) == 1                                  # older than 6 months
    assert len(cards([prior(30, **cardiac)])) == 1                                 # another question
    assert len(cards([prior(30, status="revoked", **spine)])) == 1                 # revoked: never happened


def test_a_second_opinion_already_in_the_basket_means_no_card(cds):
    h, _svc, client, ehr = cds
    patient = synthetic_patient()
    ours = ehr.draft(h.app.order_codes.order_code, id="draft-so", patient=patient["id"])
    draft = ehr.draft(SPINE_FUSION, id="draft-fusion-2", patient=patient["id"])
    r = ehr.call(client, SIGN, ehr.order_sign(patient["id"], "Practitioner/dr-a", [draft, ours],
                                              prefetch=prefetch_for(patient)), public_url=PUBLIC)
    assert r.status_code == 200 and r.get_json() == {"cards": []}


def test_without_prefetch_the_patient_and_prior_orders_are_read_from_the_ehr(cds, seeded, ehr):
    h, _svc, client, cds_ehr = cds
    pid = seeded["patient"].removeprefix("Patient/")
    draft = cds_ehr.draft(SPINE_FUSION, id="draft-fusion-3", patient=pid)
    # Our own client (no fhirAuthorization) ...
    r = cds_ehr.call(client, SIGN, cds_ehr.order_sign(pid, "Practitioner/dr-a", [draft]), public_url=PUBLIC)
    assert spine_card(r)["suggestions"]
    # A prefetch the EHR could not make (an OperationOutcome in its place) is read too.
    failed = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
    body = cds_ehr.order_sign(pid, "Practitioner/dr-a", [draft], prefetch={"patient": failed,
                                                                            "priorSecondOpinions": None})
    assert spine_card(cds_ehr.call(client, SIGN, body, public_url=PUBLIC))["suggestions"]
    # ... and the EHR's access token for its own FHIR server.
    body = cds_ehr.order_sign(pid, "Practitioner/dr-a", [draft], fhir_server=ehr.base_url, token="ehr-issued-token")
    assert spine_card(cds_ehr.call(client, SIGN, body, public_url=PUBLIC))["suggestions"]
    # A patient the EHR does not have: nothing is made up (the read fails, no card, no error for the clinician).
    body = cds_ehr.order_sign("no-such-patient-anywhere", "Practitioner/dr-a", [draft])
    r = cds_ehr.call(client, SIGN, body, public_url=PUBLIC)
    assert r.status_code == 200 and r.get_json() == {"cards": []}


def test_order_select_looks_only_at_the_selected_orders(cds):
    _h, _svc, client, ehr = cds
    patient = synthetic_patient()
    fusion = ehr.draft(SPINE_FUSION, id="draft-old-selection", patient=patient["id"])
    lab = ehr.draft({"system": "http://loinc.org", "code": "2345-7"}, id="draft-lab-2", patient=patient["id"])
    body = ehr.order_select(patient["id"], "Practitioner/dr-a", [fusion, lab], ["ServiceRequest/draft-lab-2"],
                            prefetch=prefetch_for(patient))
    r = ehr.call(client, SELECT, body, public_url=PUBLIC)
    assert r.status_code == 200 and r.get_json() == {"cards": []}
    body = ehr.order_select(patient["id"], "Practitioner/dr-a", [fusion, lab],
                            ["ServiceRequest/draft-old-selection"], prefetch=prefetch_for(patient))
    assert spine_card(ehr.call(client, SELECT, body, public_url=PUBLIC))


# --- malformed requests --------------------------------------------------------------------------------

def test_a_malformed_request_is_a_400_that_says_what_is_wrong(cds):
    _h, _svc, client, ehr = cds
    patient = synthetic_patient()
    good = ehr.order_sign(patient["id"], "Practitioner/dr-a", [ehr.draft(SPINE_FUSION, patient=patient["id"])],
                          prefetch=prefetch_for(patient))

    def bad(change, words: str, service: str = SIGN) -> None:
        body = {**good, "context": dict(good["context"])}
        change(body)
        r = ehr.call(client, service, body, public_url=PUBLIC)
        assert r.status_code == 400, r.get_json()
        assert words in r.get_json()["error"]["message"], r.get_json()

    bad(lambda b: b["context"].pop("patientId"), "context.patientId")
    bad(lambda b: b["context"].pop("draftOrders"), "context.draftOrders must be a FHIR Bundle")
    bad(lambda b: b["context"].update(userId="dr-a"), "context.userId must be [ResourceType]/[id]")
    bad(lambda b: b.update(hookInstance="not-a-uuid"), "hookInstance must be a UUID")
    bad(lambda b: b.pop("context"), "context is required")
    bad(lambda b: b.update(hook="patient-view"), "hook must be 'order-sign'")
    bad(lambda b: b.update(hook="order-select"), "context.selections", SELECT)
    bad(lambda b: b.update(fhirAuthorization={"access_token": "x", "token_type": "Bearer"}), "needs access_token")
    bad(lambda b: b.update(prefetch={"patient": {"resourceType": "Patient", "id": "someone-else"}}),
        "prefetch.patient must be the Patient of context.patientId")
    r = ehr.call(client, "no-such-service", good, public_url=PUBLIC)
    assert r.status_code == 404 and "fhirbridge-order-sign" in r.get_json()["error"]["message"]


# --- authentication ------------------------------------------------------------------------------------

def test_calls_are_refused_without_the_signed_jwt_of_a_trusted_ehr(cds):
    _h, _svc, client, ehr = cds
    patient = synthetic_patient()
    body = ehr.order_sign(patient["id"], "Practitioner/dr-a", [ehr.draft(SPINE_FUSION, patient=patient["id"])],
                          prefetch=prefetch_for(patient))
    aud = f"{PUBLIC}/cds-services/{SIGN}"
    stranger = KeyRing(generate_jwks())

    def refused(token: str | None, words: str) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = client.post(f"/cds-services/{SIGN}", json=body, headers=headers)
        assert r.status_code == 401, (r.status_code, r.get_json())
        assert words in r.get_json()["error"]["message"], r.get_json()

    refused(None, "a JWT signed by a trusted EHR is required")
    refused("not-a-jwt-at-all", "a JWT signed by a trusted EHR is required")
    refused(ehr.jwt(aud, iss="https://evil.test"), "not a trusted CDS client")
    refused(ehr.jwt(aud, ring=stranger), "not signed by a key of its issuer")
    refused(ehr.jwt(aud, exp_in=-600, iat_offset=-100), "expired")
    refused(ehr.jwt(aud, exp_in=3600), "lives longer than 300 s")
    refused(ehr.jwt(f"{PUBLIC}/cds-services/{SELECT}"), "aud must be the endpoint called")
    refused(ehr.jwt(aud, header={"jku": "https://evil.test/jwks.json"}), "jku")
    token = ehr.jwt(aud)
    assert client.post(f"/cds-services/{SIGN}", json=body, headers={"Authorization": f"Bearer {token}"}
                       ).status_code == 200
    refused(token, "used before (a replay)")
    # Feedback needs the same proof.
    r = client.post(f"/cds-services/{SIGN}/feedback", json={"feedback": []})
    assert r.status_code == 401


# --- feedback -------------------------------------------------------------------------------------------

def _card_for_seeded(h, client, ehr, seeded, draft_id: str) -> dict:
    pid = seeded["patient"].removeprefix("Patient/")
    patient = h.app.ehr.read_ref(seeded["patient"])
    body = ehr.order_sign(pid, h.physician(), [ehr.draft(SPINE_FUSION, id=draft_id, patient=pid)],
                          prefetch=prefetch_for(patient))
    return spine_card(ehr.call(client, SIGN, body, public_url=PUBLIC))


def test_an_accepted_suggestion_places_the_second_opinion_order_exactly_once(cds, seeded, fhir):
    h, svc, client, ehr = cds
    card = _card_for_seeded(h, client, ehr, seeded, f"draft-{uuid.uuid4().hex[:8]}")
    sid = card["suggestions"][0]["uuid"]
    item = {"card": card["uuid"], "outcome": "accepted", "acceptedSuggestions": [{"id": sid}],
            "outcomeTimestamp": datetime.now(UTC).isoformat()}
    first = ehr.feedback(client, SIGN, [item], public_url=PUBLIC)
    assert first.status_code == 200, first.get_json()
    [answer] = first.get_json()["feedback"]
    assert answer["recorded"] is True and answer["status"] == "active" and answer["case"]
    again = ehr.feedback(client, SIGN, [item], public_url=PUBLIC)      # a replayed feedback (a retry)
    assert again.status_code == 200 and again.get_json()["feedback"][0]["recorded"] is False
    assert again.get_json()["feedback"][0]["service_request"] == answer["service_request"]
    orders = list(fhir.search("ServiceRequest", {"identifier": f"{PLACER_SYSTEM}|{sid}"}))
    assert [f"ServiceRequest/{o['id']}" for o in orders] == [answer["service_request"]]
    sr = orders[0]
    assert sr["reasonReference"] == [{"reference": card["suggestions"][0]["actions"][0]["resource"]
                                      ["reasonReference"][0]["reference"]}]
    case = svc.store.get(answer["case"])
    assert case.service_request == answer["service_request"] and case.reviewer == "spine-center"
    accepted = [e for e in svc.store.events(case.id) if e["kind"] == "cds.accepted"]
    assert len(accepted) == 1 and accepted[0]["detail"]["card"] == card["uuid"]
    row = svc.store.cds_card(card["uuid"])
    assert row["outcome"] == "accepted" and row["case_id"] == case.id
    assert svc.store.cds_card_for(case_id=case.id)["card_id"] == card["uuid"]
    assert svc.store.cds_card_for(order=answer["service_request"])["card_id"] == card["uuid"]
    text = metrics.render(svc.store, {h.app.hospital.key: h.app.hospital.name}).decode()
    assert (f'fhirbridge_cds_cards{{hospital="{h.app.hospital.name}",outcome="accepted",rule="spine-elective"}} 1.0'
            in text)


def test_when_the_ehr_executed_the_create_action_itself_no_second_order_is_made(cds, seeded, fhir):
    h, svc, client, ehr = cds
    card = _card_for_seeded(h, client, ehr, seeded, f"draft-{uuid.uuid4().hex[:8]}")
    suggestion = card["suggestions"][0]
    resource = dict(suggestion["actions"][0]["resource"], status="active")    # created and signed by the EHR
    made, _ = fhir.create(resource)
    r = ehr.feedback(client, SIGN, [{"card": card["uuid"], "outcome": "accepted",
                                     "acceptedSuggestions": [{"id": suggestion["uuid"]}]}], public_url=PUBLIC)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["feedback"][0]["service_request"] == f"ServiceRequest/{made['id']}"
    assert len(list(fhir.search("ServiceRequest", {"identifier": f"{PLACER_SYSTEM}|{suggestion['uuid']}"}))) == 1
    assert svc.store.find_by_order(h.app.hospital.key, f"ServiceRequest/{made['id']}") is not None


def test_an_overridden_card_is_recorded_with_its_reason_and_bad_feedback_is_refused(cds):
    _h, svc, client, ehr = cds
    patient = synthetic_patient()
    body = ehr.order_sign(patient["id"], "Practitioner/dr-a",
                          [ehr.draft(SPINE_FUSION, id="draft-override", patient=patient["id"])],
                          prefetch=prefetch_for(patient))
    card = spine_card(ehr.call(client, SIGN, body, public_url=PUBLIC))
    item = {"card": card["uuid"], "outcome": "overridden",
            "overrideReason": {"reason": {"system": "urn:test:reasons", "code": "already-discussed"},
                               "userComment": "talked it over with the patient"}}
    r = ehr.feedback(client, SIGN, [item], public_url=PUBLIC)
    assert r.status_code == 200 and r.get_json()["feedback"][0]["recorded"] is True
    row = svc.store.cds_card(card["uuid"])
    assert row["outcome"] == "overridden" and row["override_reason"] == "urn:test:reasons|already-discussed"
    assert "talked" not in str(row)                   # the user's comment is not kept
    for items, status, words in (([{"card": "x", "outcome": "accepted"}], 400, "must be the uuid of a card"),
                                 ([{"card": card["uuid"], "outcome": "maybe"}], 400, "accepted or overridden"),
                                 ([{"card": str(uuid.uuid4()), "outcome": "overridden"}], 404, "no card"),
                                 ([], 400, "at least one item")):
        r = ehr.feedback(client, SIGN, items, public_url=PUBLIC)
        assert r.status_code == status and words in r.get_json()["error"]["message"], r.get_json()
    r = ehr.feedback(client, SELECT, [item], public_url=PUBLIC)      # the card is order-sign's
    assert r.status_code == 404


# --- bad input --------------------------------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner,
                                                                                  max_size=4), max_leaves=10)


def test_any_body_gets_an_answer_or_a_400_never_a_server_error(cds):
    """Hypothesis: arbitrary JSON in place of the request, of its context, of a draft order, of prefetch and of
    the feedback, each with a valid JWT: 200 or a 400/404 with a message, never a 5xx."""
    _h, _svc, client, ehr = cds
    patient = synthetic_patient()
    good = ehr.order_sign(patient["id"], "Practitioner/dr-a", [ehr.draft(SPINE_FUSION, patient=patient["id"])],
                          prefetch=prefetch_for(patient))

    fields = st.sampled_from(["code", "priority", "id", "status", "reasonReference", "orderDetail", "reasonCode",
                              "authoredOn", "subject"])
    order_like = st.dictionaries(fields, _json, max_size=4).map(lambda d: {"resourceType": "ServiceRequest", **d})

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(where=st.sampled_from(["body", "context", "draft", "prefetch", "prior", "feedback", "auth"]),
           value=_json, order=order_like)
    def check(where, value, order):
        body = copy.deepcopy(good)
        if where == "body":
            body = value
        elif where == "context":
            body["context"] = value
        elif where == "draft":
            body["context"]["draftOrders"]["entry"][0]["resource"] = order
        elif where == "prior":
            body["prefetch"]["priorSecondOpinions"]["entry"] = [{"resource": order}]
        elif where == "prefetch":
            body["prefetch"] = value
        elif where == "auth":
            body["fhirServer"], body["fhirAuthorization"] = "http://127.0.0.1:9/fhir", value
        r = ehr.feedback(client, SIGN, value if isinstance(value, list) else [value], public_url=PUBLIC) \
            if where == "feedback" else ehr.call(client, SIGN, body, public_url=PUBLIC)
        assert r.status_code in (200, 400, 404), (where, value, r.status_code, r.get_json())
        if r.status_code != 200:
            assert r.get_json()["error"]["message"]

    check()
