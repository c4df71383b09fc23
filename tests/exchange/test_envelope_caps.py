"""Envelope size caps per direction: a package may be large, an opinion small; a sealed file past its cap is
refused unopened and a small one that inflates past it is refused while inflating. None of this needs the EHR."""
from __future__ import annotations

import pytest

from fhirbridge.crypto import jwe, jws
from fhirbridge.crypto.keys import KeyRing, generate_jwks
from fhirbridge.errors import SealError
from fhirbridge.exchange import envelope

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def ring() -> KeyRing:
    return KeyRing(generate_jwks())


def test_caps_depend_on_the_envelope_type():
    assert envelope.max_envelope_bytes(envelope.PACKAGE) == 256 * MiB
    assert envelope.max_plaintext_bytes(envelope.PACKAGE) == 512 * MiB
    assert envelope.max_envelope_bytes(envelope.OPINION) == 8 * MiB
    assert envelope.max_plaintext_bytes(envelope.OPINION) == 32 * MiB
    with pytest.raises(ValueError):
        envelope.max_envelope_bytes("fhirbridge-something")


def test_a_small_opinion_that_inflates_past_its_cap_is_refused_while_inflating(ring):
    # 40 MiB of one byte deflates to ~40 KB: small on disk, a bomb once opened.
    bomb = jwe.encrypt_bytes(b" " * (40 * MiB), ring.encryption_keys(), typ=f"{envelope.OPINION}+jwe",
                             cty="application/json")
    assert len(bomb) < 200 * 1024
    with pytest.raises(SealError, match=f"exceeds limit of {32 * MiB} bytes"):
        envelope.open_sealed(bomb, typ=envelope.OPINION, decrypt=ring, trusted=ring)


def test_a_package_keeps_the_large_plaintext_cap(ring):
    big = jwe.encrypt_bytes(b" " * (40 * MiB), ring.encryption_keys(), typ=f"{envelope.PACKAGE}+jwe",
                            cty="application/json")
    with pytest.raises(SealError) as info:
        envelope.open_sealed(big, typ=envelope.PACKAGE, decrypt=ring, trusted=ring)
    assert "exceeds limit" not in str(info.value)   # opened in full, refused for being no envelope at all


def test_an_oversized_opinion_file_is_refused_unopened(ring, tmp_path):
    data = b"{" + b" " * (9 * MiB)
    with pytest.raises(SealError, match=f"refusing a {len(data)} byte {envelope.OPINION} envelope"):
        envelope.open_sealed(data, typ=envelope.OPINION, decrypt=ring, trusted=ring)
    f = tmp_path / "opinion.jwe"
    f.write_bytes(data)
    for kw in ({"typ": envelope.OPINION}, {}):   # without a type: the strictest cap
        with pytest.raises(SealError, match="refusing a .* byte envelope"):
            envelope.read_limited(f, **kw)
    assert envelope.read_limited(f, envelope.PACKAGE) == data
    with pytest.raises(SealError, match="limit 100"):
        envelope.read_limited(f, limit=100)


def test_seal_refuses_what_the_receiver_would_refuse(ring, monkeypatch):
    monkeypatch.setitem(envelope._CAPS, envelope.OPINION, (8 * MiB, 2000))
    doc = {"resourceType": "Bundle", "type": "document", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Basic", "id": "x" * 60}}] * 40}
    doc = jws.sign_bundle(doc, ring, who={"display": "x"}, when="2024-01-01T00:00:00Z")
    with pytest.raises(SealError, match="accepts at most 2000"):
        envelope.seal(typ=envelope.OPINION, claims={"jti": "1"}, document=doc, signer=ring, recipient=ring)
    monkeypatch.setitem(envelope._CAPS, envelope.OPINION, (1000, 32 * MiB))
    with pytest.raises(SealError, match="sealed fhirbridge-opinion is .* accepts at most 1000"):
        envelope.seal(typ=envelope.OPINION, claims={"jti": "1"}, document=doc, signer=ring, recipient=ring)
