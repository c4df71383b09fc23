"""Who may call what: every staff and reviewer endpoint against every kind of caller (the access matrix).

Staff: admin tokens, scoped API keys (only their SHA-256 configured), OAuth2 JWT access tokens from a
configured issuer. Reviewers: JWTs signed with their registered key (replay-guarded, short-lived), or their
static token. Every refusal is checked for its status and its reason; every allowed call only for getting
past authentication (the request bodies are deliberately incomplete, so nothing changes state).
"""
from __future__ import annotations

import hashlib
import re
import time
import uuid

import pytest
from joserfc import jwt as jose_jwt

from fhirbridge.access.tokens import mint_reviewer_token
from fhirbridge.config import loader as config
from fhirbridge.crypto.keys import KeyRing, generate_jwks, write_public_jwks
from fhirbridge.exchange.reviewer import open_package
from fhirbridge.service.api import STAFF_ENDPOINT_SCOPES
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from tests.kit.hospital import craft_opinion

pytestmark = pytest.mark.sekmet

ADMIN = "admin-token-0123456789abcdef"
KEYS = {scope: f"fbk_{scope.replace(':', '-')}-{uuid.uuid4().hex}" for scope in config.STAFF_SCOPES}
SPINE_ID, OTHER_ID = "urn:oid:2.999.9.1", "urn:oid:2.999.9.2"
AUD = "http://localhost/reviewer"
ISSUER = "https://idp.hospital.test"
STATIC = "static-reviewer-token-0123456789"

# Every staff endpoint: (method, path with {case}, scope). The last test proves the list is complete.
STAFF_ENDPOINTS = [
    ("POST", "/api/orders", "orders:write"),
    ("GET", "/api/orders/{order_id}", "orders:write"),
    ("GET", "/api/cases", "cases:read"),
    ("GET", "/api/cases/{case}", "cases:read"),
    ("POST", "/api/cases/{case}/retry", "cases:write"),
    ("POST", "/api/cases/{case}/cancel", "cases:write"),
    ("GET", "/api/audit?patient={patient}", "audit:read"),
    ("GET", "/api/outcomes", "cases:read"),
    ("GET", "/api/cases/{case}/requests", "cases:read"),
    ("POST", "/api/cases/{case}/requests/{task_id}/answer", "cases:write"),
    ("POST", "/api/cases/{case}/held", "cases:write"),
    ("POST", "/api/cases/{case}/follow-ups", "cases:write"),
    ("GET", "/api/cases/{case}/follow-ups", "cases:read"),
]
# Public on purpose (no credentials, nothing of a Case or a patient): fhirbridge's own code systems.
PUBLIC_FHIR_ENDPOINTS = [
    ("GET", "/fhir/CodeSystem"),
    ("GET", "/fhir/CodeSystem/{cs_id}"),
]
# CDS Hooks (issue 18): discovery is public (service names and prefetch templates only); the hook calls and the
# feedback need the signed JWT of a trusted EHR (tests/service/test_cds_hooks.py checks each kind of refusal).
PUBLIC_CDS_ENDPOINTS = [("GET", "/cds-services")]
CDS_ENDPOINTS = [
    ("POST", "/cds-services/{service_id}"),
    ("POST", "/cds-services/{service_id}/feedback"),
]
REVIEWER_ENDPOINTS = [
    ("GET", "/reviewer/cases"),
    ("GET", "/reviewer/cases/{case}/package/package.jwe"),
    ("POST", "/reviewer/opinions"),
    ("POST", "/reviewer/cases/{case}/decline"),
    ("POST", "/reviewer/cases/{case}/requests"),
    ("GET", "/reviewer/follow-ups"),
    ("GET", "/reviewer/follow-ups/{followup_id}/message"),
]


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    """The hospital's identity provider: its key set, and the public half in a file fhirbridge trusts."""
    d = tmp_path_factory.mktemp("idp")
    jwks = generate_jwks()
    write_public_jwks(d / "idp.jwks.json", jwks)
    return KeyRing(jwks), d / "idp.jwks.json"


def oauth_token(ring: KeyRing, *, scope: str = "cases:read", iss: str = ISSUER, aud: str = "fhirbridge",
                exp_in: int = 300) -> str:
    key = ring.signing_key()
    now = int(time.time())
    claims = {"iss": iss, "aud": aud, "sub": "dr-house", "iat": now, "exp": now + exp_in, "scope": scope}
    return jose_jwt.encode({"alg": "ES384", "kid": key.kid, "typ": "at+jwt"}, claims, key, algorithms=["ES384"])


@pytest.fixture
def served(two_reviewers, idp, seeded):
    h = two_reviewers
    text = re.sub(r'type = "outbox"[^\n]*\npath = "[^"]*"\n', 'type = "pull"\n', h.config_path.read_text())
    text = text.replace('profiles = []', f'profiles = []\napi_token = "{STATIC}"', 1)
    keys = "".join(f'[[api.keys]]\nname = "{scope}"\nsha256 = "{hashlib.sha256(k.encode()).hexdigest()}"\n'
                   f'scopes = ["{scope}"]\n' for scope, k in KEYS.items())
    text += (f'\n[api]\ntokens = ["{ADMIN}"]\n{keys}'
             f'[api.oauth]\nissuer = "{ISSUER}"\naudience = "fhirbridge"\njwks = "{idp[1]}"\n'
             # The reviewer tokens' audience (AUD): the test client's host, named in the config as it must be.
             '[service]\npublic_url = "http://localhost"\n')
    h.config_path.write_text(text)
    svc = Service(config.load(h.config_path))
    h.app = svc.apps[0]
    case = h.delivered_case(seeded["patient"])      # spine-center's Case, awaiting its opinion
    client = create_app(svc=svc).test_client()
    yield h, svc, client, case
    svc.stop(wait=True)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def call(client, method: str, path: str, headers: dict):
    return client.open(path, method=method, headers=headers, json={} if method == "POST" else None)


def fill(path: str, case, patient: str) -> str:
    return path.format(case=case.id, patient=patient.removeprefix("Patient/"), order_id="no-such-order",
                       task_id="no-such-task", followup_id="no-such-question")


def refused(resp, status: int, words: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.get_json())
    assert words in resp.get_json()["error"]["message"], resp.get_json()


def passed_auth(resp) -> None:
    assert resp.status_code not in (401, 403), (resp.status_code, resp.get_json())


# --- staff -------------------------------------------------------------------------------------------

def test_staff_endpoints_refuse_every_wrong_party(served, idp, seeded):
    h, _svc, client, case = served
    other_idp = KeyRing(generate_jwks())
    reviewer_jwt = lambda: mint_reviewer_token(h.reviewers["spine-center"].key, issuer=SPINE_ID, audience=AUD)  # noqa: E731
    for method, path, scope in STAFF_ENDPOINTS:
        url = fill(path, case, seeded["patient"])
        refused(call(client, method, url, {}), 401, "bearer token is required")
        refused(call(client, method, url, bearer("not-a-token-of-ours-at-all")), 401, "bearer token is required")
        refused(call(client, method, url, bearer(reviewer_jwt())), 401, "not signed by a key of the configured issuer")
        refused(call(client, method, url, bearer(STATIC)), 401, "bearer token is required")
        wrong = next(k for s, k in KEYS.items() if s != scope)
        refused(call(client, method, url, bearer(wrong)), 403, f"lacks the scope {scope}")
        refused(call(client, method, url, bearer(oauth_token(idp[0], scope="nothing"))), 403, "lacks the scope")
        refused(call(client, method, url, bearer(oauth_token(idp[0], scope=scope, exp_in=-600))), 401, "expired")
        refused(call(client, method, url, bearer(oauth_token(idp[0], scope=scope, aud="another-app"))), 401, "aud")
        refused(call(client, method, url, bearer(oauth_token(idp[0], scope=scope, iss="https://evil.test"))), 401,
                "another issuer")
        refused(call(client, method, url, bearer(oauth_token(other_idp, scope=scope))), 401,
                "not signed by a key of the configured issuer")


def test_staff_endpoints_admit_the_right_parties(served, idp, seeded):
    h, _svc, client, case = served
    for method, path, scope in STAFF_ENDPOINTS:
        url = fill(path, case, seeded["patient"])
        for token in (ADMIN, KEYS[scope], oauth_token(idp[0], scope=f"openid {scope}")):
            passed_auth(call(client, method, url, bearer(token)))
    assert h.app.store.get(case.id).step == "await_opinion"     # the empty bodies changed nothing


def test_scoped_reads_see_cases_and_the_accounting(served, seeded):
    _h, _svc, client, case = served
    r = client.get(f"/api/cases/{case.id}", headers=bearer(KEYS["cases:read"]))
    assert r.status_code == 200 and r.get_json()["step"] == "await_opinion"
    r = client.get(f"/api/audit?patient={seeded['patient']}", headers=bearer(KEYS["audit:read"]))
    assert r.status_code == 200
    events = r.get_json()["events"]
    assert [e["kind"] for e in events if e["case"] == case.id] == ["disclosure"]
    assert events[-1]["recipient_identifier"] == f"urn:ietf:rfc:3986|{SPINE_ID}"


# --- reviewers ---------------------------------------------------------------------------------------

def test_reviewer_endpoints_refuse_every_wrong_party(served):
    h, svc, client, case = served
    spine, other = h.reviewers["spine-center"].key, h.reviewers["other-center"].key
    for method, path in REVIEWER_ENDPOINTS:
        url = fill(path, case, "x")
        refused(call(client, method, url, {}), 401, "reviewer token is required")
        refused(call(client, method, url, bearer(ADMIN)), 401, "reviewer token is required")
        refused(call(client, method, url, bearer(KEYS["cases:read"])), 401, "reviewer token is required")
        # Signed by the other reviewer's key but claiming to be spine-center.
        refused(call(client, method, url, bearer(mint_reviewer_token(other, issuer=SPINE_ID, audience=AUD))), 401,
                "not signed by a signing key registered for this reviewer")
        refused(call(client, method, url, bearer(mint_reviewer_token(spine, issuer=SPINE_ID,
                                                                     audience="https://elsewhere/reviewer"))), 401,
                "aud must be")
        refused(call(client, method, url, bearer(mint_reviewer_token(spine, issuer="urn:oid:9.9", audience=AUD))),
                401, "not a registered reviewer")
        token = mint_reviewer_token(spine, issuer=SPINE_ID, audience=AUD)
        passed_auth(call(client, method, url, bearer(token)))
        refused(call(client, method, url, bearer(token)), 401, "used before (a replay)")
    # The other reviewer, properly authenticated, does not see spine-center's Case at all.
    for method, path in REVIEWER_ENDPOINTS:
        if "{case}" in path:
            r = call(client, method, fill(path, case, "x"),
                     bearer(mint_reviewer_token(other, issuer=OTHER_ID, audience=AUD)))
            refused(r, 404, f"no Case {case.id}")
            refused(call(client, method, fill(path, case, "x"), bearer(STATIC)), 404, f"no Case {case.id}")
    r = client.get("/reviewer/cases", headers=bearer(mint_reviewer_token(other, issuer=OTHER_ID, audience=AUD)))
    assert r.status_code == 200 and r.get_json()["cases"] == []
    assert svc.store.get(case.id).step == "await_opinion"


def test_reviewer_token_must_be_short_lived_and_fresh(served):
    h, _svc, client, _case = served
    key = h.reviewers["spine-center"].key.signing_key()

    def token(**over):
        now = int(time.time())
        claims = {"iss": SPINE_ID, "sub": SPINE_ID, "aud": AUD, "iat": now, "exp": now + 60,
                  "jti": uuid.uuid4().hex, **over}
        claims = {k: v for k, v in claims.items() if v is not None}
        return jose_jwt.encode({"alg": "ES384", "kid": key.kid}, claims, key, algorithms=["ES384"])

    now = int(time.time())
    for bad, words in ((token(exp=now - 600, iat=now - 700), "expired"),
                       (token(exp=now + 3600), "lives longer than 300 s"),
                       (token(iat=now + 900, exp=now + 1000), "issued in the future"),
                       (token(jti=None), "unique jti"),
                       (token(sub="someone-else"), "sub must equal its iss"),
                       (token(exp=None), "no exp")):
        refused(client.get("/reviewer/cases", headers=bearer(bad)), 401, words)
    passed_auth(client.get("/reviewer/cases", headers=bearer(token())))


def test_the_signed_token_gets_the_reviewer_its_package(served):
    h, _svc, client, case = served
    token = mint_reviewer_token(h.reviewers["spine-center"].key, issuer=SPINE_ID, audience=AUD)
    r = client.get("/reviewer/cases", headers=bearer(token))
    assert [c["id"] for c in r.get_json()["cases"]] == [case.id]
    token = mint_reviewer_token(h.reviewers["spine-center"].key, issuer=SPINE_ID, audience=AUD)
    r = client.get(f"/reviewer/cases/{case.id}/package/package.jwe", headers=bearer(token))
    assert r.status_code == 200 and r.data.startswith(b"{")


def test_what_a_reviewer_is_told_names_no_file_and_no_other_reviewers_case(served):
    """S9 (issue 13): an opinion uploaded for another reviewer's Case and one for a Case that does not exist
    get the same status and text; a reviewer whose key file is unreadable is not told where it lies."""
    h, svc, client, case = served
    other, spine = h.reviewers["other-center"], h.reviewers["spine-center"]
    opened = open_package(svc.config.data_dir / "cases" / case.id / "package" / str(case.package_id), spine.key,
                          spine.trusted)     # pulled, so in data_dir, not in an outbox
    unknown = craft_opinion(h, case, signer=other.key, opened=opened,
                            claims=lambda c: c.update(case_id=str(uuid.uuid4())))
    foreign = craft_opinion(h, case, signer=other.key, opened=opened)
    answers = []
    for data in (unknown, foreign):
        r = client.post("/reviewer/opinions", data=data, content_type="application/jose+json",
                        headers=bearer(mint_reviewer_token(other.key, issuer=OTHER_ID, audience=AUD)))
        answers.append((r.status_code, r.get_json()))
    assert answers[0] == answers[1], answers
    message = answers[0][1]["error"]["message"]
    for secret in ("spine-center", "Spine Center", SPINE_ID, case.id[:8], str(h.root), "jwks"):
        assert secret not in message, (secret, message)
    assert svc.store.get(case.id).step == "await_opinion"
    # The reviewer's registered key file has gone: the operator's log says which, the reviewer only that
    # its keys are not available.
    jwks = svc.config.reviewer("other-center").jwks
    jwks.rename(jwks.with_suffix(".moved"))
    r = client.get("/reviewer/cases", headers=bearer(mint_reviewer_token(other.key, issuer=OTHER_ID, audience=AUD)))
    refused(r, 401, "keys are not available")
    assert str(jwks.parent) not in r.get_json()["error"]["message"] and "jwks" not in r.get_json()["error"]["message"]


# --- public -------------------------------------------------------------------------------------------

def test_the_code_systems_are_public_and_answer_fhir_to_anyone(served):
    _h, _svc, client, _case = served
    for headers in ({}, bearer("wrong-token-but-long-enough"), bearer(ADMIN)):
        for _method, path in PUBLIC_FHIR_ENDPOINTS:
            r = client.get(path.format(cs_id="referral-step"), headers=headers)
            assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/fhir+json"), path
    r = client.get("/fhir/CodeSystem/no-such-system")
    assert r.status_code == 404 and r.get_json()["resourceType"] == "OperationOutcome"


# --- CDS Hooks -------------------------------------------------------------------------------------------

def test_the_cds_hooks_endpoints_take_no_staff_or_reviewer_credential(served, tmp_path):
    """With [cds] configured, no credential of ours opens a hook call or the feedback: only the EHR's signed JWT
    (tests/service/test_cds_hooks.py has every refusal and the admitted calls)."""
    h, svc, _client, _case = served
    text = h.config_path.read_text()
    h.config_path.write_text(text + '[cds]\n[[cds.issuers]]\niss = "https://ehr.test"\n'
                                    'jwks_url = "http://127.0.0.1:9/jwks.json"\n')
    svc2 = Service(config.load(h.config_path))
    try:
        client = create_app(svc=svc2).test_client()
        spine = h.reviewers["spine-center"].key
        for method, path in CDS_ENDPOINTS:
            url = path.format(service_id="fhirbridge-order-sign")
            for headers in ({}, bearer(ADMIN), bearer(KEYS["orders:write"]), bearer(STATIC),
                            bearer(mint_reviewer_token(spine, issuer=SPINE_ID, audience=AUD))):
                refused(call(client, method, url, headers), 401, "")
        for method, path in PUBLIC_CDS_ENDPOINTS:
            assert call(client, method, path, {}).status_code == 200
    finally:
        svc2.stop(wait=True)


# --- completeness ------------------------------------------------------------------------------------

def test_the_matrix_covers_every_endpoint(served):
    _h, _svc, client, _case = served
    app = client.application
    routes = {(m, r.rule) for r in app.url_map.iter_rules() for m in r.methods - {"HEAD", "OPTIONS"}}
    staff = {(m, r) for m, r in routes if r.startswith("/api/")}
    reviewer = {(m, r) for m, r in routes if r.startswith("/reviewer/")}
    norm = lambda p: re.sub(r"\{(\w+)\}", lambda m: f"<{'case_id' if m[1] == 'case' else m[1]}>", p.split("?")[0])  # noqa: E731
    assert staff == {(m, norm(p)) for m, p, _ in STAFF_ENDPOINTS}
    assert reviewer == {(m, norm(p).replace("package.jwe", "<path:name>")) for m, p in REVIEWER_ENDPOINTS}
    fhir = {(m, r) for m, r in routes if r.startswith("/fhir/") and not r.startswith("/fhir/notify/")}
    assert fhir == {(m, norm(p)) for m, p in PUBLIC_FHIR_ENDPOINTS}
    cds = {(m, r) for m, r in routes if r.startswith("/cds-services")}
    assert cds == {(m, norm(p)) for m, p in CDS_ENDPOINTS + PUBLIC_CDS_ENDPOINTS}
    # And every staff endpoint has a scope in the server's own table (an unlisted one is refused to all).
    staff_endpoints = {r.endpoint for r in app.url_map.iter_rules() if r.rule.startswith("/api/")}
    assert staff_endpoints == set(STAFF_ENDPOINT_SCOPES)


# --- a pull reviewer fetching after the patient withdrew consent --------------------------------------

def test_a_pull_fetch_after_a_denying_consent_is_withdrawn(served, ehr):
    from fhirbridge.demo.localehr import seed_patient
    from fhirbridge.fhir.client import FhirClient
    h, svc, client, _case = served
    with FhirClient(ehr.base_url) as fhir:
        own = seed_patient(ehr, fhir, profile="spine")    # this test's own patient: its Consent stays its own
        case = h.delivered_case(own["patient"])
        token = lambda: bearer(mint_reviewer_token(h.reviewers["spine-center"].key, issuer=SPINE_ID,  # noqa: E731
                                                   audience=AUD))
        assert client.get(f"/reviewer/cases/{case.id}/package/package.jwe", headers=token()).status_code == 200
        fhir.create({"resourceType": "Consent", "status": "active", "patient": {"reference": own["patient"]},
                     "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                           "code": "patient-privacy"}]},
                     "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                     "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                                "code": "OPTIN"}]},
                     "provision": {"type": "deny"}})
        r = client.get(f"/reviewer/cases/{case.id}/package/package.jwe", headers=token())
        refused(r, 410, "withdrawn by the hospital")
        assert "Consent/" not in r.get_json()["error"]["message"]
        after = svc.store.get(case.id)
        assert after.step == "cancelled" and "denies disclosure" in after.last_error
        assert fhir.read_ref(after.task)["status"] == "cancelled"
        listed = client.get("/reviewer/cases", headers=token()).get_json()["cases"]
        assert case.id not in [c["id"] for c in listed]


def test_a_reviewer_asks_for_more_records(served, fhir):
    h, svc, client, case = served
    token = lambda: bearer(mint_reviewer_token(h.reviewers["spine-center"].key, issuer=SPINE_ID,  # noqa: E731
                                               audience=AUD))
    url = f"/reviewer/cases/{case.id}/requests"
    refused(client.post(url, headers=token(), json={"text": "<b>x</b>"}), 400, "no markup")
    refused(client.post(url, headers=token(), json={"text": " "}), 400, "say which records")
    r = client.post(url, headers=token(), json={"text": "The MRI of 2023 and the operative note, please."})
    assert r.status_code == 201, r.get_json()
    task = fhir.read_ref(r.get_json()["task"])
    # CDex STU 2.0.0 Task Data Request: its own cdex-temp code, the hrex-temp `data-code` input, no focus
    # (max 0): the order that authorises the request is basedOn.
    assert task["code"]["coding"][0] == {"system": "http://hl7.org/fhir/us/davinci-cdex/CodeSystem/cdex-temp",
                                         "code": "data-request-code", "display": "Data Request Code"}
    assert task["status"] == "requested" and task["intent"] == "order" and "focus" not in task
    assert task["basedOn"] == [{"reference": case.service_request}] and task["authoredOn"]
    assert task["partOf"] == [{"reference": case.task}] and task["for"] == {"reference": case.patient}
    assert task["input"][0]["type"]["coding"] == [{"system": "http://hl7.org/fhir/us/davinci-hrex/CodeSystem/hrex-temp",
                                                   "code": "data-code"}]
    assert task["input"][0]["valueCodeableConcept"]["text"].startswith("The MRI of 2023")
    assert task["reasonCode"]["text"] and task["owner"]["identifier"]
    assert task["requester"]["identifier"]["value"] == SPINE_ID
    assert "records.requested" in [e["kind"] for e in svc.store.events(case.id)]
    # Not about the words: the event log holds the Task reference only.
    assert "MRI" not in str(svc.store.events(case.id))
