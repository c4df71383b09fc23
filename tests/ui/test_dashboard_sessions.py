"""S7 (issue 13): a dashboard session lives no longer than the credential that opened it.

The session cookie is signed with a secret derived from the hospital's key, so a restarted service (new
configuration, same key) and every other worker accept it. What it carries must therefore be checked anew on
every request: an admin token or API key removed or rotated in the configuration, an OAuth token past its
`exp`, and a session signed out (in any worker) are refused, not honoured for the 8 hours of the session.
"""
from __future__ import annotations

import hashlib
import time

import pytest
from joserfc import jwt as jose_jwt

from fhirbridge.config import loader as config
from fhirbridge.crypto.keys import KeyRing, generate_jwks, write_public_jwks
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service

pytestmark = pytest.mark.sekmet

ADMIN = "dashboard-admin-token-0123456789"
ADMIN_NEW = "dashboard-admin-token-rotated-9876543210"
READER = "fbk_reader-0123456789abcdef0123456789"
READER_NEW = "fbk_reader-rotated-fedcba9876543210fedcba"
ISSUER = "https://idp.hospital.test"
CSRF = "csrf-token-for-these-tests-0123"
COOKIE = "fhirbridge_session"


def api_block(admin: str, reader: str, idp_file) -> str:
    return (f'\n[api]\ntokens = ["{admin}"]\n[[api.keys]]\nname = "reader"\n'
            f'sha256 = "{hashlib.sha256(reader.encode()).hexdigest()}"\nscopes = ["cases:read"]\n'
            f'[api.oauth]\nissuer = "{ISSUER}"\naudience = "fhirbridge"\njwks = "{idp_file}"\n')


@pytest.fixture
def site(hospital, tmp_path):
    """`start(admin, reader)`: the hospital's service with that admin token and reader key (and the IdP), as
    a fresh process would load it; every service started shares the store and the hospital's key."""
    jwks = generate_jwks()
    write_public_jwks(tmp_path / "idp.jwks.json", jwks)
    base = hospital.config_path.read_text()
    services = []

    def start(admin: str = ADMIN, reader: str = READER):
        hospital.config_path.write_text(base + api_block(admin, reader, tmp_path / "idp.jwks.json"))
        svc = Service(config.load(hospital.config_path))
        services.append(svc)
        return create_app(svc=svc).test_client()

    yield start, KeyRing(jwks)
    for svc in services:
        svc.stop(wait=True)


def oauth_token(ring: KeyRing, *, exp_in: int) -> str:
    key = ring.signing_key()
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "fhirbridge", "sub": "dr-house", "iat": now, "exp": now + exp_in,
              "scope": "cases:read"}
    return jose_jwt.encode({"alg": "ES384", "kid": key.kid, "typ": "at+jwt"}, claims, key, algorithms=["ES384"])


def sign_in(client, token: str) -> str:
    """Sign in through the login form; the session cookie it set."""
    with client.session_transaction() as s:
        s["_csrf"] = CSRF
    resp = client.post("/dashboard/login", data={"token": token, "csrf_token": CSRF})
    assert resp.status_code == 302 and resp.headers["Location"] == "/dashboard/", resp.status_code
    cookie = client.get_cookie(COOKIE)
    assert cookie is not None
    assert token not in cookie.value          # the credential never travels in the (readable) cookie
    return cookie.value


def admitted(client, cookie: str) -> bool:
    client.set_cookie(COOKIE, cookie)
    resp = client.get("/dashboard/")
    if resp.status_code == 200:
        return True
    assert resp.status_code == 302 and "/dashboard/login" in resp.headers["Location"], resp.status_code
    return False


def test_a_removed_or_rotated_credential_ends_its_sessions(site):
    start, _idp = site
    before = start()
    admin_session, reader_session = sign_in(before, ADMIN), sign_in(start(), READER)
    assert admitted(before, admin_session) and admitted(before, reader_session)
    # The operator rotates both and restarts: the old sessions (same signing secret) are refused...
    after = start(admin=ADMIN_NEW, reader=READER_NEW)
    assert not admitted(after, admin_session)
    assert not admitted(after, reader_session)
    # ...while the new credentials sign in as before.
    assert admitted(after, sign_in(after, ADMIN_NEW)) and admitted(after, sign_in(start(ADMIN_NEW, READER_NEW),
                                                                                   READER_NEW))


def test_an_oauth_session_ends_at_the_tokens_exp(site):
    start, idp = site
    client = start()
    lasting = sign_in(client, oauth_token(idp, exp_in=3600))
    short = sign_in(client, oauth_token(idp, exp_in=2))
    assert admitted(client, short)
    time.sleep(3.5)
    assert not admitted(client, short)
    assert admitted(client, lasting)


def test_a_signed_out_session_replayed_is_refused_by_every_worker(site):
    start, _idp = site
    worker_a, worker_b = start(), start()      # two gunicorn workers: one store, one secret
    cookie = sign_in(worker_a, ADMIN)
    assert admitted(worker_b, cookie)
    worker_a.set_cookie(COOKIE, cookie)
    resp = worker_a.post("/dashboard/logout", data={"csrf_token": CSRF})
    assert resp.status_code == 302
    assert not admitted(worker_a, cookie)
    assert not admitted(worker_b, cookie)
    assert admitted(worker_b, sign_in(worker_b, ADMIN))      # signing in again works
