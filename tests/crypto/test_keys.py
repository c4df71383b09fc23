import json
import logging
import os
import stat

import pytest

from fhirbridge.crypto import keys
from fhirbridge.crypto.keys import PRIVATE_MEMBERS, KeyRing, thumbprint
from fhirbridge.errors import ConfigError, SealError
from fhirbridge.jsonutil import b64url_decode

# RFC 7638 §3.1 example key and its published thumbprint.
RFC7638_KEY = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
         "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY"
         "368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0f"
         "M4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.fixture(scope="module")
def jwks():
    return keys.generate_jwks(rsa_enc=True)


def test_thumbprint_matches_rfc7638_example():
    assert thumbprint(RFC7638_KEY) == RFC7638_THUMBPRINT
    # A KeyRing names a kid-less key by its thumbprint.
    anonymous = {k: v for k, v in RFC7638_KEY.items() if k not in ("kid", "alg")}
    assert KeyRing({"keys": [anonymous]}).kids == [RFC7638_THUMBPRINT]


def test_generated_key_set_shape(jwks):
    by_alg = {k["alg"]: k for k in jwks["keys"]}
    assert set(by_alg) == {"ES384", "ECDH-ES+A256KW", "RSA-OAEP-256"}
    assert (by_alg["ES384"]["use"], by_alg["ES384"]["crv"]) == ("sig", "P-384")
    assert (by_alg["ECDH-ES+A256KW"]["use"], by_alg["ECDH-ES+A256KW"]["crv"]) == ("enc", "P-256")
    assert by_alg["RSA-OAEP-256"]["use"] == "enc"
    assert len(b64url_decode(by_alg["RSA-OAEP-256"]["n"])) * 8 == 3072
    for key in jwks["keys"]:
        assert "d" in key
        public = {k: v for k, v in key.items() if k not in PRIVATE_MEMBERS}
        assert key["kid"] == thumbprint(public)
    assert len(keys.generate_jwks()["keys"]) == 2


def test_public_jwks_has_no_private_members(jwks):
    pub = keys.public_jwks(jwks)
    assert len(pub["keys"]) == 3
    for key in pub["keys"]:
        assert not PRIVATE_MEMBERS & key.keys()
    assert [k["kid"] for k in pub["keys"]] == [k["kid"] for k in jwks["keys"]]
    assert not KeyRing(pub).has_private
    assert KeyRing(jwks).public_jwks() == pub


def test_private_file_is_0600_and_not_overwritten(tmp_path, jwks):
    path = tmp_path / "hospital.jwks.json"
    old_umask = os.umask(0)  # the mode must come from open() itself, not from a friendly umask
    try:
        keys.write_private_jwks(path, jwks)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == jwks

    other = keys.generate_jwks()
    with pytest.raises(ConfigError, match="refusing to overwrite") as err:
        keys.write_private_jwks(path, other)
    assert err.value.file == str(path)
    assert json.loads(path.read_text()) == jwks  # untouched

    keys.write_private_jwks(path, other, overwrite=True)
    assert json.loads(path.read_text()) == other
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hospital.jwks.json"]  # no temp files left


def test_public_file_is_0644_pretty_and_stripped(tmp_path, jwks):
    path = tmp_path / "hospital.public.json"
    old_umask = os.umask(0o077)
    try:
        keys.write_public_jwks(path, jwks)  # given the PRIVATE set by mistake: still writes only public parts
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    text = path.read_text()
    assert "\n  " in text
    assert json.loads(text) == keys.public_jwks(jwks)
    keys.write_public_jwks(path, jwks)  # public files may be replaced


@pytest.mark.parametrize("content, reason", [
    (None, "not found"),
    (b'{"keys": [', "not valid JSON"),
    (b'{"keys": []}', "no usable keys"),
    (b'[1, 2]', "not a JWK Set"),
    (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0"}]}', "symmetric"),
])
def test_load_errors_name_the_file(tmp_path, content, reason):
    path = tmp_path / "keys.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=reason) as err:
        KeyRing.load(path)
    assert err.value.file == str(path)
    assert str(path) in str(err.value)


def test_bad_key_error_names_file_and_hides_material(tmp_path, jwks):
    broken = dict(jwks["keys"][0])
    secret = broken["d"]
    broken["x"] = broken["x"][:-4] + "AAAA"  # no longer on the curve / matching d
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [broken]}))
    with pytest.raises(ConfigError) as err:
        KeyRing.load(path)
    message = str(err.value)
    assert str(path) in message and broken["kid"] in message
    assert secret not in message and broken["x"] not in message


def test_group_readable_private_file_warns(tmp_path, jwks, caplog):
    path = tmp_path / "keys.json"
    keys.write_private_jwks(path, jwks)
    with caplog.at_level(logging.WARNING, logger="fhirbridge.crypto.keys"):
        KeyRing.load(path)
    assert not caplog.records
    os.chmod(path, 0o640)
    with caplog.at_level(logging.WARNING, logger="fhirbridge.crypto.keys"):
        ring = KeyRing.load(path)
    assert ring.source == str(path)
    assert any("chmod 600" in r.getMessage() for r in caplog.records)
    assert all(jwks["keys"][0]["d"] not in r.getMessage() for r in caplog.records)


def test_keyring_lookups(jwks):
    ring = KeyRing(jwks, source="ours")
    sig, ec_enc, rsa_enc = jwks["keys"]
    assert ring.has_private and ring.kids == [sig["kid"], ec_enc["kid"], rsa_enc["kid"]]
    assert ring.signing_key().kid == sig["kid"] and ring.signing_key().is_private
    assert not ring.verification_key(sig["kid"]).is_private
    assert ring.verification_key(ec_enc["kid"]) is None  # use=enc is not for signatures
    assert ring.verification_key("nope") is None
    assert ring.decryption_key(ec_enc["kid"]).is_private
    assert ring.decryption_key(sig["kid"]) is None
    assert [k.kid for k in ring.encryption_keys()] == [ec_enc["kid"], rsa_enc["kid"]]
    assert not any(k.is_private for k in ring.encryption_keys())
    assert sig["d"] not in repr(ring)

    public = KeyRing(keys.public_jwks(jwks), source="/keys/peer.json", label="the peer's key set")
    with pytest.raises(SealError, match="^the peer's key set has no private signing key$"):
        public.signing_key()
    assert public.decryption_key(ec_enc["kid"]) is None


def test_key_without_use_serves_both_purposes(jwks):
    generic = {k: v for k, v in jwks["keys"][1].items() if k not in ("use", "alg")}
    ring = KeyRing({"keys": [generic]})
    assert ring.signing_key().kid == generic["kid"]
    assert ring.decryption_key(generic["kid"]) is not None
    assert len(ring.encryption_keys()) == 1


def test_unknown_key_types_are_ignored_but_duplicates_rejected(jwks):
    okp = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    ring = KeyRing({"keys": [okp, *keys.public_jwks(jwks)["keys"]]})
    assert len(ring.kids) == 3
    with pytest.raises(ConfigError, match="share kid"):
        KeyRing({"keys": [jwks["keys"][0], jwks["keys"][0]]})
