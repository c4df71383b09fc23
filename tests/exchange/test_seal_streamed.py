"""A package sealed in one streamed pass (issue 19 goal 2) opens like any other: the document is the Bundle
sent, its signature verifies, the claims carry its digest; and an over-cap plaintext is still refused."""
from __future__ import annotations

import io
import time

import pytest

from fhirbridge.crypto import jws
from fhirbridge.crypto.keys import KeyRing, generate_jwks
from fhirbridge.errors import SealError
from fhirbridge.exchange import envelope

WHO = {"reference": "Organization/h", "display": "H"}


@pytest.fixture(scope="module")
def hospital() -> KeyRing:
    return KeyRing(generate_jwks(), label="hospital")


@pytest.fixture(scope="module")
def reviewer() -> KeyRing:
    return KeyRing(generate_jwks(), label="reviewer")


def _bundle(n: int) -> dict:
    return {"resourceType": "Bundle", "id": "doc-1", "meta": {"lastUpdated": "2025-01-01T00:00:00Z"},
            "type": "document", "timestamp": "2025-01-01T00:00:00Z",
            "entry": [{"fullUrl": "urn:uuid:c", "resource": {"resourceType": "Composition", "title": "Referral",
                                                              "section": [{"text": {"div": "<div>x</div>"}}]}}]
            + [{"fullUrl": f"urn:uuid:{i}", "resource": {"resourceType": "Observation", "id": f"o{i}",
                                                         "status": "final", "code": {"text": "Hb"},
                                                         "valueQuantity": {"value": 13.5 + i / 8, "unit": "g/dL"}}}
               for i in range(n)]}


@pytest.mark.parametrize("n", [0, 3, 700])
def test_a_package_sealed_in_one_pass_opens_with_the_document_and_its_digest(hospital, reviewer, n):
    bundle = _bundle(n)
    out = io.BytesIO()
    now = int(time.time())
    size = envelope.seal_signed_document_to(
        out, typ=envelope.PACKAGE, claims={"jti": "p1", "iat": now, "exp": now + 600, "case_id": "c1"},
        document=bundle, signer=hospital, recipient=reviewer, who=WHO, when="2025-01-01T00:00:00Z")
    assert size == len(out.getvalue())
    claims, document = envelope.open_sealed(out.getvalue(), typ=envelope.PACKAGE, decrypt=reviewer,
                                            trusted=KeyRing(hospital.public_jwks()), check_expiry=False)
    assert {k: v for k, v in document.items() if k != "signature"} == bundle
    assert document["signature"]["who"] == WHO
    jws.verify_bundle(document, KeyRing(hospital.public_jwks()))
    assert claims["document_sha256"] == jws.bundle_digest(bundle)
    assert claims["case_id"] == "c1"


def test_a_streamed_package_over_the_plaintext_cap_is_refused(hospital, reviewer, monkeypatch):
    monkeypatch.setattr(envelope, "_caps", lambda typ: (10 ** 9, 4096))
    with pytest.raises(SealError, match="more than 4096 bytes"):
        envelope.seal_signed_document_to(io.BytesIO(), typ=envelope.PACKAGE, claims={}, document=_bundle(200),
                                         signer=hospital, recipient=reviewer, who=WHO, when="x")
