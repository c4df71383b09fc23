"""SMART Backend Services (fhir.auth.SmartBackendAuth) against a real sekmet that enforces SMART."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from joserfc import jwt as jose_jwt

from fhirbridge.config import loader as config
from fhirbridge.crypto.keys import KeyRing, generate_jwks, write_private_jwks
from fhirbridge.demo.localehr import seed_patient
from fhirbridge.errors import ConfigError, FhirError
from fhirbridge.fhir.auth import (
    ASSERTION_TYPE,
    DEFAULT_SCOPES,
    REFUSED_AFTER_REAUTH,
    SmartBackendAuth,
    _only_v1,
    make_auth,
    v1_scopes,
)
from fhirbridge.fhir.client import FhirClient
from tests.kit.faultproxy import FaultProxy
from tests.kit.hospital import TestHospital, smart_ehr_running
from tests.kit.hospital import client_keys as new_client_keys

pytestmark = pytest.mark.sekmet

CLIENT_ID = "fhirbridge-test"
TOKEN_LIFETIME = 3  # seconds: short, so re-minting after expiry is observable


@pytest.fixture(scope="module")
def smart_keys(tmp_path_factory) -> Path:
    return new_client_keys(tmp_path_factory.mktemp("smart-keys"))


@pytest.fixture(scope="module")
def smart_ehr(tmp_path_factory, smart_keys):
    """A second sekmet that accepts only SMART tokens and grants our client exactly the scopes fhirbridge derives
    (tests.kit.hospital.start_smart_ehr: behind the gate that authorises each transaction entry)."""
    with smart_ehr_running(tmp_path_factory.mktemp("smart-ehr"), CLIENT_ID, smart_keys, TOKEN_LIFETIME) as server:
        yield server


def _auth(ehr, keys: Path, **kw) -> SmartBackendAuth:
    kw.setdefault("client_id", CLIENT_ID)
    return SmartBackendAuth.from_keys(keys=keys, fhir_base_url=ehr.base_url, **kw)


def _record_token_requests(auth: SmartBackendAuth) -> list[dict]:
    """The form bodies we send to the token endpoint (what goes over the wire)."""
    sent: list[dict] = []

    def hook(resp, **_kw):
        if resp.request.method == "POST":
            sent.append({k: v[0] for k, v in parse_qs(resp.request.body).items()})
        return resp
    auth._http.hooks["response"].append(hook)
    return sent


@pytest.fixture(scope="module")
def smart_seeded(smart_ehr, smart_keys) -> dict:
    # The seeder (the hospital's own systems) updates ImagingStudies and posts transactions: it writes with the
    # server's unrestricted token, not as fhirbridge's client.
    with FhirClient(smart_ehr.direct_url, auth=smart_ehr.admin) as client:
        return seed_patient(smart_ehr.ehr, client, family="Smart-Testpatient", given="Berta", profile="spine")


def test_server_refuses_requests_without_a_token(smart_ehr):
    with FhirClient(smart_ehr.base_url, retries=0) as client, pytest.raises(FhirError) as err:
        list(client.search("Patient", {"_count": "1"}))
    assert err.value.status == 401


def test_token_obtained_once_and_cached_for_many_calls(smart_ehr, smart_keys, smart_seeded):
    auth = _auth(smart_ehr, smart_keys)
    sent = _record_token_requests(auth)
    with FhirClient(smart_ehr.base_url, auth=auth) as client:
        for _ in range(8):
            assert client.read_ref(smart_seeded["patient"])["resourceType"] == "Patient"
    assert auth.token_requests == 1 and len(sent) == 1
    assert auth.token_url == smart_ehr.token_url  # discovered
    form = sent[0]
    assert form["grant_type"] == "client_credentials"
    assert form["client_assertion_type"] == ASSERTION_TYPE
    assert form["scope"].split() == list(DEFAULT_SCOPES)
    assert set(auth.granted_scope.split()) == set(DEFAULT_SCOPES)
    assert "***" in repr(auth) and form["client_assertion"] not in repr(auth)


def test_token_is_reminted_after_expiry(smart_ehr, smart_keys, smart_seeded):
    auth = _auth(smart_ehr, smart_keys)
    with FhirClient(smart_ehr.base_url, auth=auth) as client:
        client.read_ref(smart_seeded["patient"])
        time.sleep(TOKEN_LIFETIME + 0.5)
        client.read_ref(smart_seeded["patient"])  # renewed before sending: no 401 round trip needed
    assert auth.token_requests == 2


def test_token_is_reminted_shortly_before_expiry(smart_ehr, smart_keys):
    real = time.time()
    now = [real]
    auth = _auth(smart_ehr, smart_keys, clock=lambda: now[0])
    auth.access_token()
    now[0] = real + TOKEN_LIFETIME * 0.7  # still well inside its life: cached
    auth.access_token()
    assert auth.token_requests == 1
    now[0] = real + TOKEN_LIFETIME * 0.85  # inside the last 20 %: renewed
    auth.access_token()
    assert auth.token_requests == 2


def test_assertion_is_short_lived_signed_and_unique(smart_ehr, smart_keys):
    auth = _auth(smart_ehr, smart_keys)
    sent = _record_token_requests(auth)
    for _ in range(3):
        auth.invalidate()
        auth.access_token()
    ring = KeyRing.load(smart_keys)
    jtis = set()
    for form in sent:
        token = jose_jwt.decode(form["client_assertion"], ring.signing_key(), algorithms=["ES384"])
        c, h = token.claims, token.header
        assert h["alg"] == "ES384" and h["kid"] == ring.signing_key().kid and h["typ"] == "JWT"
        assert c["iss"] == c["sub"] == CLIENT_ID
        assert c["aud"] == auth.token_url
        assert 0 < c["exp"] - time.time() <= 300 and c["exp"] - c["iat"] <= 300
        jtis.add(c["jti"])
    assert len(jtis) == len(sent) == 3


def test_rejected_token_reauthorises_once_and_retries(smart_ehr, smart_keys, smart_seeded):
    auth = _auth(smart_ehr, smart_keys)
    with FhirClient(smart_ehr.base_url, auth=auth) as client:
        client.read_ref(smart_seeded["patient"])
        with auth._lock:  # the server has forgotten (revoked) our token
            auth._token = auth._token[:-6] + "AAAAAA"
        patient = client.read_ref(smart_seeded["patient"])
    assert patient["resourceType"] == "Patient"
    assert auth.token_requests == 2


def test_rejected_post_is_retried_with_its_body(smart_ehr, smart_keys, smart_seeded):
    auth = _auth(smart_ehr, smart_keys, scopes=("system/Task.c", "system/Task.rs"))
    with FhirClient(smart_ehr.base_url, auth=auth) as client:
        auth.access_token()
        with auth._lock:
            auth._token = "not-a-token"
        created, _ = client.create({"resourceType": "Task", "status": "draft", "intent": "order",
                                    "description": "smart retry", "for": {"reference": smart_seeded["patient"]}})
    assert created["resourceType"] == "Task" and created["id"]


def test_second_refusal_gives_a_clear_error(smart_ehr, smart_keys, monkeypatch):
    auth = _auth(smart_ehr, smart_keys)
    real_mint = auth._mint

    def mint_a_bad_token():
        real_mint()
        auth._token = "forged." + auth._token.split(".", 1)[1]
    monkeypatch.setattr(auth, "_mint", mint_a_bad_token)
    with FhirClient(smart_ehr.base_url, auth=auth) as client, pytest.raises(FhirError) as err:
        list(client.search("Patient", {"_count": "1"}))
    assert str(err.value) == REFUSED_AFTER_REAUTH and err.value.status == 401
    assert auth.token_requests == 2  # the first token and exactly one re-authorisation


def test_unknown_client_is_a_clear_error_with_the_endpoints_answer(smart_ehr, smart_keys):
    auth = _auth(smart_ehr, smart_keys, client_id="nobody-registered-me")
    with FhirClient(smart_ehr.base_url, auth=auth) as client, pytest.raises(FhirError) as err:
        list(client.search("Patient", {"_count": "1"}))
    msg = str(err.value)
    assert "/auth/token" in msg and "HTTP 401" in msg
    assert "invalid_client" in msg and "Unknown client_id 'nobody-registered-me'" in msg
    assert "eyJ" not in msg  # no assertion or token in the message


def test_wrong_key_is_refused(smart_ehr, tmp_path):
    other = tmp_path / "other.jwks.json"
    write_private_jwks(other, generate_jwks())
    with pytest.raises(FhirError, match="invalid_client.*verification failed"):
        _auth(smart_ehr, other).access_token()


def test_concurrent_threads_share_one_token(smart_ehr, smart_keys):
    auth = _auth(smart_ehr, smart_keys)
    start = threading.Barrier(8)
    tokens: list[str] = []

    def worker():
        start.wait()
        tokens.append(auth.access_token())
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(tokens)) == 1 and auth.token_requests == 1


def test_configured_token_url_skips_discovery(smart_ehr, smart_keys):
    auth = _auth(smart_ehr, smart_keys, token_url=smart_ehr.token_url, scopes=("system/Patient.rs",))
    sent = _record_token_requests(auth)
    auth.access_token()
    assert auth.granted_scope == "system/Patient.rs" and sent[0]["scope"] == "system/Patient.rs"


def test_a_discovered_plain_http_token_endpoint_is_refused(smart_ehr, smart_keys):
    """Issue 13: whoever can alter the EHR's .well-known/smart-configuration (it comes over the base URL) could
    name a plain-http token endpoint and read the client assertion and the token on the way. A discovered
    endpoint must be https (plain http only to loopback): refused before anything is sent to it."""
    def plain_http(body: bytes) -> bytes:
        doc = json.loads(body)
        doc["token_endpoint"] = "http://ehr.invalid/oauth/token"
        return json.dumps(doc).encode()

    proxy = FaultProxy(smart_ehr.base_url)
    try:
        proxy.add(method="GET", path=r"/\.well-known/smart-configuration", action="rewrite", rewrite=plain_http)
        auth = SmartBackendAuth.from_keys(keys=smart_keys, client_id=CLIENT_ID, fhir_base_url=proxy.base_url)
        with pytest.raises(FhirError) as err:
            auth.access_token()
        assert proxy.count("GET", r"smart-configuration") == 1     # it was discovered, then refused
    finally:
        proxy.close()
    assert not err.value.transient and auth.token_requests == 0
    assert "not https" in str(err.value) and "http://ehr.invalid/oauth/token" in str(err.value)
    assert "[hospital.auth] token_url" in str(err.value)
    # The EHR's own endpoint, discovered over loopback http, is still used (the other tests here).
    assert _auth(smart_ehr, smart_keys).access_token()


# --------------------------------------------------------------------- scopes (no server needed)

def test_v1_fallback_only_when_the_server_shows_only_v1():
    assert _only_v1({"scopes_supported": ["system/*.read", "system/*.write", "system/*.*"]})
    assert not _only_v1({"scopes_supported": ["system/*.read", "system/*.rs"]})
    assert not _only_v1({"scopes_supported": ["system/*.read"], "capabilities": ["permission-v2"]})
    assert not _only_v1({})
    assert v1_scopes(("system/Patient.rs", "system/Task.cu", "system/Subscription.cru", "system/X.read")) == (
        "system/Patient.read", "system/Task.write", "system/Subscription.read", "system/Subscription.write",
        "system/X.read")


# --------------------------------------------------------------------- configuration

def _config(tmp_path: Path, auth_block: str) -> Path:
    keys = tmp_path / "hospital.jwks.json"
    if not keys.exists():
        write_private_jwks(keys, generate_jwks())
    path = tmp_path / "fhirbridge.toml"
    path.write_text(f'''
[hospital]
name = "H"
keys = "hospital.jwks.json"
fhir_base_url = "https://ehr.example.org/fhir"
[hospital.identifier]
system = "urn:ietf:rfc:3986"
value = "urn:oid:2.999.1"
[hospital.auth]
{auth_block}
''')
    return path


def test_config_smart_defaults(tmp_path):
    cfg = config.load(_config(tmp_path, 'type = "smart"\nclient_id = "fb"'), environ={})
    a = cfg.hospital.auth
    assert (a.type, a.client_id, a.keys, a.token_url, a.scopes, a.alg) == (
        "smart", "fb", cfg.hospital.keys, None, None, None)
    assert a.fhir_base_url == "https://ehr.example.org/fhir"
    assert config.check_files(cfg) == []
    auth = make_auth(a.as_dict())
    assert isinstance(auth, SmartBackendAuth) and auth.alg == "ES384" and auth.scopes == DEFAULT_SCOPES
    assert make_auth(a.as_dict()) is auth  # one shared object (and token) per configuration


def test_config_smart_explicit(tmp_path):
    write_private_jwks(tmp_path / "client.jwks.json", generate_jwks())
    cfg = config.load(_config(tmp_path, 'type = "smart"\nclient_id = "fb"\nkeys = "client.jwks.json"\n'
                                        'token_url = "https://ehr.example.org/oauth/token"\n'
                                        'scopes = "system/Patient.rs system/Task.cu"\nalg = "ES384"'), environ={})
    a = cfg.hospital.auth
    assert a.keys == tmp_path / "client.jwks.json" and a.token_url == "https://ehr.example.org/oauth/token"
    assert a.scopes == ("system/Patient.rs", "system/Task.cu") and a.alg == "ES384"


@pytest.mark.parametrize("block, key, words", [
    ('type = "smart"', "hospital.auth.client_id", "client_id"),
    ('type = "smart"\nclient_id = "fb"\nalg = "HS256"', "hospital.auth.alg", "RS384, ES384"),
    ('type = "smart"\nclient_id = "fb"\ntoken_url = "ftp://x"', "hospital.auth.token_url", "http(s)"),
    ('type = "smart"\nclient_id = "fb"\nscopes = []', "hospital.auth.scopes", "non-empty"),
    ('type = "bearer"\ntoken = "t"\nclient_id = "fb"', "hospital.auth.client_id", "only used with"),
    ('type = "oauth"', "hospital.auth.type", "smart"),
])
def test_config_smart_errors_name_file_and_key(tmp_path, block, key, words):
    path = _config(tmp_path, block)
    with pytest.raises(ConfigError) as err:
        config.load(path, environ={})
    assert err.value.key == key and err.value.file == str(path) and words in str(err.value)


def test_config_smart_alg_must_fit_the_key(tmp_path):
    cfg = config.load(_config(tmp_path, 'type = "smart"\nclient_id = "fb"\nalg = "RS384"'), environ={})
    problems = config.check_files(cfg)
    assert len(problems) == 1 and "RS384 needs an RSA" in problems[0] and "hospital.auth.alg" in problems[0]


# --------------------------------------------------------------------- the whole loop

def test_whole_loop_with_smart_enforced(tmp_path, smart_ehr, smart_keys, smart_seeded):
    from fhirbridge.loop.receive import receive_file

    hospital = TestHospital(tmp_path, smart_ehr.base_url)
    try:
        hospital.use_smart(CLIENT_ID, smart_keys)
        assert isinstance(hospital.app.ehr._session.auth, SmartBackendAuth)

        sr = hospital.order(smart_seeded["patient"], "Is the planned L4-L5 decompression indicated?")
        report = hospital.run()
        assert report.opened == 1 and not report.errors, report.errors
        case = hospital.case_for(sr)
        assert case.step == "await_opinion", case.last_error
        received = receive_file(hospital.app, hospital.answer(case))
        assert received.case.step == "file"
        hospital.run(intake=False)
        case = hospital.app.store.get(case.id)
        assert case.step == "done", case.last_error
        task = hospital.app.ehr.read_ref(case.task)
        assert task["status"] == "completed"
    finally:
        hospital.close()
