import hashlib
import io
import json
import os
import tracemalloc

import pytest
from joserfc import jwe as joserfc_jwe

from fhirbridge.crypto import jwe, keys
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.errors import SealError
from fhirbridge.jsonutil import b64url, b64url_decode

ALGORITHMS = ["ECDH-ES+A256KW", "RSA-OAEP-256", "A256GCM", "DEF"]
TEXT = b'{"resourceType":"Bundle","entry":[' + b'{"resource":{"resourceType":"Observation"}},' * 200 + b"{}]}"


@pytest.fixture(scope="module")
def reviewer():
    return KeyRing(keys.generate_jwks(rsa_enc=True), source="reviewer.jwks.json")


@pytest.fixture(scope="module")
def hospital():
    return KeyRing(keys.generate_jwks(), source="/etc/fhirbridge/hospital.jwks.json", label="the hospital's key set")


def _ec(ring):
    return [k for k in ring.encryption_keys() if k.key_type == "EC"]


def _rsa(ring):
    return [k for k in ring.encryption_keys() if k.key_type == "RSA"]


def _error(fn, *args, **kw) -> str:
    with pytest.raises(SealError) as err:
        fn(*args, **kw)
    return str(err.value)


class _Generated(io.RawIOBase):
    """A readable stream of `size` bytes that never exist in memory all at once."""

    def __init__(self, size: int, *, zeros: bool = False):
        self.left, self.zeros, self.digest = size, zeros, hashlib.sha256()

    def readable(self):
        return True

    def read(self, n=-1):
        n = self.left if n is None or n < 0 else min(n, self.left)
        self.left -= n
        data = bytes(n) if self.zeros else os.urandom(n)
        self.digest.update(data)
        return data


class _Sink:
    def __init__(self):
        self.digest, self.size = hashlib.sha256(), 0

    def write(self, data):
        self.digest.update(data)
        self.size += len(data)
        return len(data)


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("pick", [_ec, _rsa], ids=["ECDH-ES+A256KW", "RSA-OAEP-256"])
@pytest.mark.parametrize("compress", [True, False])
def test_round_trip(reviewer, pick, compress):
    sealed = jwe.encrypt_bytes(TEXT, pick(reviewer), compress=compress, typ="fhirbridge-package", cty="json")
    doc = json.loads(sealed)
    assert list(doc) == ["protected", "recipients", "iv", "ciphertext", "tag"]
    (recipient,) = doc["recipients"]
    assert recipient["header"]["alg"] == pick(reviewer)[0].alg
    assert ("epk" in recipient["header"]) == (pick is _ec)
    header, plain = jwe.decrypt_bytes_with_header(sealed, reviewer)
    assert plain == TEXT
    expected = {"enc": "A256GCM", "typ": "fhirbridge-package", "cty": "json"}
    assert header == ({**expected, "zip": "DEF"} if compress else expected)
    assert len(b64url_decode(doc["iv"])) == 12 and len(b64url_decode(doc["tag"])) == 16
    if compress:
        assert len(b64url_decode(doc["ciphertext"])) < len(TEXT) / 5


def test_empty_plaintext(reviewer):
    for compress in (True, False):
        assert jwe.decrypt_bytes(jwe.encrypt_bytes(b"", _ec(reviewer), compress=compress), reviewer) == b""


def test_stream_info(reviewer):
    src, out = io.BytesIO(TEXT), io.BytesIO()
    info = jwe.encrypt_stream(src, out, reviewer.encryption_keys(), chunk_size=1000)
    assert info["plaintext_sha256"] == hashlib.sha256(TEXT).hexdigest()
    assert info["plaintext_size"] == len(TEXT)
    assert info["ciphertext_size"] == len(b64url_decode(json.loads(out.getvalue())["ciphertext"]))
    assert info["kids"] == [k.kid for k in reviewer.encryption_keys()]
    got = io.BytesIO()
    back = jwe.decrypt_stream(io.BytesIO(out.getvalue()), got, reviewer, chunk_size=777)
    assert got.getvalue() == TEXT
    assert back["plaintext_sha256"] == info["plaintext_sha256"]
    assert back["kid"] == reviewer.encryption_keys()[0].kid


def test_two_recipients_each_decrypt_alone(reviewer, hospital):
    sealed = jwe.encrypt_bytes(TEXT, _ec(reviewer) + _ec(hospital))
    assert len(json.loads(sealed)["recipients"]) == 2
    assert jwe.decrypt_bytes(sealed, reviewer) == TEXT
    assert jwe.decrypt_bytes(sealed, hospital) == TEXT
    # A public key set cannot decrypt, and names the kids the message is for.
    message = _error(jwe.decrypt_bytes, sealed, KeyRing(reviewer.public_jwks(), source="public.json",
                                                        label="the reviewer's public keys"))
    assert _ec(reviewer)[0].kid in message and "the reviewer's public keys" in message
    assert "public.json" not in message


def test_wrong_keyring_names_kids(reviewer, hospital):
    sealed = jwe.encrypt_bytes(TEXT, reviewer.encryption_keys())
    message = _error(jwe.decrypt_bytes, sealed, hospital)
    kids = ", ".join(k.kid for k in reviewer.encryption_keys())
    # Named by its label, never by its file (issue 13, S9: a reviewer uploading an opinion sees this).
    assert message == f"encrypted for keys [{kids}], none of which is in the hospital's key set"


def test_file_round_trip(tmp_path, reviewer):
    plain, sealed, back = tmp_path / "doc.json", tmp_path / "doc.jwe", tmp_path / "out" / "doc.json"
    back.parent.mkdir()
    plain.write_bytes(TEXT)
    info = jwe.encrypt_to_path(plain, sealed, reviewer.encryption_keys())
    info2 = jwe.decrypt_to_path(sealed, back, reviewer)
    assert back.read_bytes() == TEXT
    assert info["plaintext_sha256"] == info2["plaintext_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json", "doc.jwe", "out"]
    assert [p.name for p in back.parent.iterdir()] == ["doc.json"]


# --- interoperability with joserfc --------------------------------------------------------------

def test_joserfc_decrypts_our_output(reviewer):
    doc = json.loads(jwe.encrypt_bytes(TEXT, reviewer.encryption_keys()))
    assert len(doc["recipients"]) == 2
    for recipient in doc["recipients"]:
        flattened = {"protected": doc["protected"], "header": recipient["header"],
                     "encrypted_key": recipient["encrypted_key"], "iv": doc["iv"],
                     "ciphertext": doc["ciphertext"], "tag": doc["tag"]}
        key = reviewer.decryption_key(recipient["header"]["kid"])
        result = joserfc_jwe.decrypt_json(flattened, key, algorithms=ALGORITHMS)
        assert result.plaintext == TEXT
        assert result.protected == {"enc": "A256GCM", "zip": "DEF"}


@pytest.mark.parametrize("zip_", [True, False])
def test_we_decrypt_joserfc_output(reviewer, hospital, zip_):
    protected = {"enc": "A256GCM", **({"zip": "DEF"} if zip_ else {})}
    obj = joserfc_jwe.GeneralJSONEncryption(protected, TEXT)
    for key in reviewer.encryption_keys() + _ec(hospital):
        obj.add_recipient({"alg": key.alg}, key)
    doc = joserfc_jwe.encrypt_json(obj, None, algorithms=ALGORITHMS)
    data = json.dumps(doc).encode()
    assert jwe.decrypt_bytes_with_header(data, reviewer) == (protected, TEXT)
    assert jwe.decrypt_bytes(data, hospital) == TEXT


def test_member_order_does_not_matter_for_small_inputs(reviewer):
    doc = json.loads(jwe.encrypt_bytes(TEXT, _ec(reviewer)))
    for order in (["ciphertext", "tag", "iv", "recipients", "protected"],
                  ["tag", "protected", "recipients", "iv", "ciphertext"]):
        shuffled = json.dumps({k: doc[k] for k in order}, indent=2).encode()
        assert jwe.decrypt_bytes(shuffled, reviewer) == TEXT


def test_flattened_serialization_is_read(reviewer):
    doc = json.loads(jwe.encrypt_bytes(TEXT, _rsa(reviewer)))
    (r,) = doc.pop("recipients")
    flattened = {"protected": doc["protected"], **r, **{k: doc[k] for k in ("iv", "ciphertext", "tag")}}
    assert jwe.decrypt_bytes(json.dumps(flattened).encode(), reviewer) == TEXT


# --- tampering ------------------------------------------------------------------------------------

def _sealed_doc(reviewer, **kw):
    return json.loads(jwe.encrypt_bytes(TEXT, reviewer.encryption_keys(), **kw))


def _flip(text: str, index: int) -> str:
    return text[:index] + ("B" if text[index] != "B" else "C") + text[index + 1:]


@pytest.mark.parametrize("compress", [True, False])
def test_tampered_ciphertext(reviewer, compress):
    doc = _sealed_doc(reviewer, compress=compress)
    doc["ciphertext"] = _flip(doc["ciphertext"], len(doc["ciphertext"]) // 2)
    message = _error(jwe.decrypt_bytes, json.dumps(doc).encode(), reviewer)
    assert message.startswith("integrity check failed: the file was altered or truncated")


def test_tampered_tag(reviewer):
    doc = _sealed_doc(reviewer)
    doc["tag"] = _flip(doc["tag"], 3)
    assert _error(jwe.decrypt_bytes, json.dumps(doc).encode(), reviewer) == \
        "integrity check failed: the file was altered or truncated"


def test_non_canonical_last_character_is_rejected(reviewer):
    # The last base64url char of a 16-byte tag carries 4 unused bits; changing only those would
    # decode to the same tag, so strict decoding must refuse it.
    doc = _sealed_doc(reviewer)
    last = doc["tag"][-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    sibling = alphabet[alphabet.index(last) ^ 1]
    doc["tag"] = doc["tag"][:-1] + sibling
    assert "malformed" in _error(jwe.decrypt_bytes, json.dumps(doc).encode(), reviewer)


def test_tampered_protected_header(reviewer):
    doc = _sealed_doc(reviewer)
    # Dropping zip from the (authenticated) header must not go unnoticed.
    doc["protected"] = b64url(json.dumps({"enc": "A256GCM"}).encode())
    assert _error(jwe.decrypt_bytes, json.dumps(doc).encode(), reviewer).startswith("integrity check failed")
    doc = _sealed_doc(reviewer)
    doc["protected"] = _flip(doc["protected"], 5)
    assert _error(jwe.decrypt_bytes, json.dumps(doc).encode(), reviewer).startswith("malformed")


def test_tampered_wrapped_keys(reviewer):
    doc = _sealed_doc(reviewer)
    for r in doc["recipients"]:  # both the AES-KW (EC) and the RSA-OAEP wrapped key
        r["encrypted_key"] = _flip(r["encrypted_key"], 10)
    assert _error(jwe.decrypt_bytes, json.dumps(doc).encode(), reviewer).startswith("integrity check failed")
    rsa_ring = KeyRing({"keys": [k for k in _private_keys(reviewer) if k["kty"] == "RSA"]})
    assert _error(jwe.decrypt_bytes, json.dumps(doc).encode(), rsa_ring).startswith("integrity check failed")


def _private_keys(ring):
    return [ring.decryption_key(k.kid).as_dict(private=True) for k in ring.encryption_keys()]


def test_epk_off_the_curve_is_rejected(reviewer):
    doc = json.loads(jwe.encrypt_bytes(TEXT, _ec(reviewer)))
    epk = doc["recipients"][0]["header"]["epk"]
    epk["y"] = b64url(bytes(32))
    assert "not a point on the curve" in _error(jwe.decrypt_bytes, json.dumps(doc).encode(), reviewer)


def test_garbage_after_the_object(reviewer):
    sealed = jwe.encrypt_bytes(TEXT, _ec(reviewer))
    assert jwe.decrypt_bytes(sealed + b"\n", reviewer) == TEXT
    assert "malformed" in _error(jwe.decrypt_bytes, sealed + b"garbage", reviewer)
    assert "'aad' follows the ciphertext" in _error(jwe.decrypt_bytes, sealed[:-1] + b',"aad":"eA"}', reviewer)


def test_not_a_jwe(reviewer):
    assert "file is empty" in _error(jwe.decrypt_bytes, b"", reviewer)
    assert "expected a JWE JSON object" in _error(jwe.decrypt_bytes, b"PK\x03\x04 zip file", reviewer)
    assert "expected a JWE JSON object" in _error(jwe.decrypt_bytes, b"[1, 2]", reviewer)
    assert "unsupported content encryption" in _error(
        jwe.decrypt_bytes, _reheader(reviewer, {"enc": "A128CBC-HS256", "zip": "DEF"}), reviewer)


def _reheader(reviewer, protected):
    doc = _sealed_doc(reviewer)
    doc["protected"] = b64url(json.dumps(protected).encode())
    return json.dumps(doc).encode()


# --- truncation -----------------------------------------------------------------------------------

def test_truncated_files_fail_and_leave_nothing(tmp_path, reviewer):
    sealed = jwe.encrypt_bytes(os.urandom(50_000), reviewer.encryption_keys())
    start = sealed.index(b'"ciphertext":"') + len(b'"ciphertext":"')
    end = sealed.index(b'","tag"')
    cuts = [1, 20, 300, start - 3, start, start + 1, (start + end) // 2, end - 1, end, end + 1,
            end + 10, len(sealed) - 2, len(sealed) - 1]
    out = tmp_path / "out" / "plain.bin"
    out.parent.mkdir()
    for cut in cuts:
        src = tmp_path / f"cut-{cut}.jwe"
        src.write_bytes(sealed[:cut])
        message = _error(jwe.decrypt_to_path, src, out, reviewer, chunk_size=4096)
        assert message.startswith("truncated"), (cut, message)
        assert not any(out.parent.iterdir()), cut  # neither the output nor a temporary file
    src.write_bytes(sealed)
    jwe.decrypt_to_path(src, out, reviewer)
    assert out.exists()


def test_failed_decrypt_keeps_existing_destination(tmp_path, reviewer):
    doc = _sealed_doc(reviewer)
    doc["tag"] = _flip(doc["tag"], 0)
    src, dst = tmp_path / "bad.jwe", tmp_path / "plain.bin"
    src.write_bytes(json.dumps(doc).encode())
    dst.write_bytes(b"previous")
    with pytest.raises(SealError):
        jwe.decrypt_to_path(src, dst, reviewer)
    assert dst.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jwe", "plain.bin"]


# --- resource limits ------------------------------------------------------------------------------

def test_decompression_bomb_is_stopped(tmp_path, reviewer):
    bomb = tmp_path / "bomb.jwe"
    with open(bomb, "wb") as f:
        jwe.encrypt_stream(_Generated(50_000_000, zeros=True), f, _ec(reviewer))
    assert bomb.stat().st_size < 200_000
    with open(bomb, "rb") as f:
        message = _error(jwe.decrypt_stream, f, _Sink(), reviewer, max_plaintext=1_000_000)
    assert "plaintext exceeds limit of 1000000 bytes" in message
    out = tmp_path / "plain.bin"
    _error(jwe.decrypt_to_path, bomb, out, reviewer, max_plaintext=1_000_000)
    assert not out.exists()


def test_oversized_header_falls_back_only_for_small_inputs(reviewer, monkeypatch):
    doc = {"padding": "x" * 5000, **_sealed_doc(reviewer)}  # unknown members are ignored (RFC 7516 §7.2.1)
    data = json.dumps(doc).encode()
    assert jwe.decrypt_bytes(data, reviewer, max_header=1000) == TEXT
    monkeypatch.setattr(jwe, "FALLBACK_LIMIT", 2000)
    assert "unsupported layout" in _error(jwe.decrypt_bytes, data, reviewer, max_header=1000, chunk_size=512)


def test_memory_stays_bounded_for_64_mib(tmp_path, reviewer):
    size = 64 << 20
    sealed = tmp_path / "big.jwe"
    source = _Generated(size)
    tracemalloc.start()
    try:
        with open(sealed, "wb") as f:
            info = jwe.encrypt_stream(source, f, _ec(reviewer))
        encrypt_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        sink = _Sink()
        with open(sealed, "rb") as f:
            back = jwe.decrypt_stream(f, sink, reviewer)
        decrypt_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info["plaintext_size"] == sink.size == size
    assert info["plaintext_sha256"] == source.digest.hexdigest() == sink.digest.hexdigest()
    assert back["plaintext_sha256"] == info["plaintext_sha256"]
    assert sealed.stat().st_size > size  # really went through the file, base64 and all
    assert encrypt_peak < 16 << 20, encrypt_peak
    assert decrypt_peak < 16 << 20, decrypt_peak
