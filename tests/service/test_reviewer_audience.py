"""S5: the audience a reviewer token must name comes from `[service] public_url`, never from the request."""
from __future__ import annotations

import re

import pytest

from fhirbridge.access.tokens import mint_reviewer_token
from fhirbridge.config import loader as config
from fhirbridge.errors import ConfigError
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service

pytestmark = pytest.mark.sekmet
SPINE_ID = "urn:oid:2.999.9.1"


def test_a_token_minted_for_another_host_is_refused_without_public_url(hospital):
    """Before: with public_url unset (the default after `init`) the audience was <Host header>/reviewer, so a
    token minted for another service was accepted here by sending that service's Host."""
    svc = Service(config.load(hospital.config_path))
    try:
        client = create_app(svc=svc).test_client()
        token = mint_reviewer_token(hospital.reviewers["spine-center"].key, issuer=SPINE_ID,
                                    audience="http://other-service.example/reviewer")
        r = client.get("/reviewer/cases", headers={"Authorization": f"Bearer {token}",
                                                   "Host": "other-service.example"})
        assert r.status_code == 401
        assert "no [service] public_url" in r.get_json()["error"]["message"]
    finally:
        svc.stop(wait=True)


def test_a_pull_reviewer_needs_public_url_at_start(hospital):
    text = re.sub(r'type = "outbox"[^\n]*\npath = "[^"]*"\n', 'type = "pull"\n', hospital.config_path.read_text())
    hospital.config_path.write_text(text)
    with pytest.raises(ConfigError) as err:
        config.load(hospital.config_path)
    assert err.value.key == "service.public_url" and "spine-center" in str(err.value)
    hospital.config_path.write_text(text + '\n[service]\npublic_url = "https://fhirbridge.hospital.test"\n')
    assert config.load(hospital.config_path).public_url == "https://fhirbridge.hospital.test"


def test_with_public_url_only_its_audience_is_accepted(hospital):
    hospital.config_path.write_text(hospital.config_path.read_text()
                                    + '\n[service]\npublic_url = "https://fhirbridge.hospital.test"\n')
    svc = Service(config.load(hospital.config_path))
    try:
        client = create_app(svc=svc).test_client()
        key = hospital.reviewers["spine-center"].key
        wrong = mint_reviewer_token(key, issuer=SPINE_ID, audience="http://localhost/reviewer")
        r = client.get("/reviewer/cases", headers={"Authorization": f"Bearer {wrong}"})
        assert r.status_code == 401 and "https://fhirbridge.hospital.test/reviewer" in r.get_json()["error"]["message"]
        right = mint_reviewer_token(key, issuer=SPINE_ID, audience="https://fhirbridge.hospital.test/reviewer")
        assert client.get("/reviewer/cases", headers={"Authorization": f"Bearer {right}"}).status_code == 200
    finally:
        svc.stop(wait=True)
