"""Streaming JWE (RFC 7516), General JSON Serialization (§7.2.1), implemented on `cryptography`.

Why not joserfc here: joserfc's encrypt/decrypt are one-shot. The whole plaintext, the ciphertext and
their base64 forms sit in memory together (4-5x the payload), which does not fit 100 MB attachments.
And its `decrypt_json` fails unless the given key opens *every* recipient, while our packages are
addressed to several parties that each hold only their own key. Here memory stays O(chunk_size)
whatever the size of the message, and any single recipient can open it. joserfc still reads what we
write and we read what it writes (see tests/crypto/test_jwe.py).

What we write, in this member order (the reader relies on it for streaming, see `decrypt_stream`):

    {"protected": B64({"enc":"A256GCM","zip":"DEF",...}),
     "recipients": [{"header": {"alg":..., "kid":..., "epk": {...}}, "encrypted_key": ...}, ...],
     "iv": ..., "ciphertext": ..., "tag": ...}

- enc is always A256GCM (RFC 7518 §5.3): one random 256-bit CEK and one random 96-bit IV per message.
- alg per recipient key: EC -> ECDH-ES+A256KW (RFC 7518 §4.6), RSA -> RSA-OAEP-256 (RFC 7518 §4.3).
- zip DEF is raw DEFLATE (RFC 7516 §4.1.3, RFC 1951), applied to the plaintext before encryption.

Unauthenticated plaintext: AES-GCM confirms integrity only at the very end, after the tag. So
`decrypt_stream` has already written (unverified) plaintext to `dst` when it raises SealError, and
the caller MUST discard everything written to `dst` on error. `decrypt_to_path` does that for you:
it writes to a temporary file next to the destination and renames it only on success.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Protocol, TypeGuard

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from fhirbridge.crypto.keys import KeyRing, thumbprint
from fhirbridge.errors import SealError
from fhirbridge.jsonutil import b64url, dumps, loads

ENC = "A256GCM"
ALG_ECDH = "ECDH-ES+A256KW"
ALG_RSA = "RSA-OAEP-256"
ZIP = "DEF"
DEFAULT_CHUNK = 1 << 20
_PARALLEL_HASH = 64 << 10     # writes at least this large are hashed on the Encryptor's helper thread
# Inputs whose members cannot be streamed (ciphertext before the header members, e.g. another
# library's output) are parsed whole; only up to this size, to keep memory bounded.
FALLBACK_LIMIT = 64 << 20

_CEK_LEN, _IV_LEN, _TAG_LEN = 32, 12, 16  # RFC 7518 §5.3: 256-bit key, 96-bit IV, 128-bit tag
_CURVES: dict[str, Callable[[], ec.EllipticCurve]] = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1,
                                                     "P-521": ec.SECP521R1}
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_CT_MARKER = re.compile(rb'"ciphertext"\s*:\s*"')
_STREAM_CRITICAL = ("protected", "unprotected", "recipients", "header", "encrypted_key", "iv", "aad")
_INTEGRITY = "integrity check failed: the file was altered or truncated"


class Writable(Protocol):
    """Where decrypt_stream puts the plaintext: a binary file, or anything else that takes bytes (a hash)."""

    def write(self, data: bytes, /) -> int: ...


# --- base64url -------------------------------------------------------------------------------

# '+' and '/' are not base64url (RFC 4648 §5): map them to a byte strict decoding rejects.
_URL_TO_STD = bytes.maketrans(b"-_+/", b"+/!!")


def _b64_strict(text: bytes) -> bytes:
    """Unpadded base64url (RFC 7515 §2) -> bytes, rejecting anything that is not the canonical encoding."""
    if b"=" in text or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    tail = len(text) % 4
    raw = binascii.a2b_base64((text + b"=" * (-len(text) % 4)).translate(_URL_TO_STD), strict_mode=True)
    # RFC 4648 §3.5: the unused bits of a final partial group must be zero; otherwise a changed
    # character could decode to the same bytes and an altered file would pass unnoticed.
    if tail and base64.urlsafe_b64encode(raw[-(tail - 1):]).rstrip(b"=") != text[-tail:]:
        raise ValueError("non-canonical base64url")
    return raw


def _member_bytes(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise SealError(f"malformed: {name} is missing or not a string")
    try:
        return _b64_strict(value.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise SealError(f"malformed: {name} is not base64url") from None


class _B64Writer:
    """Encodes a byte stream as one unbroken base64url string: whole 3-byte groups until close()."""

    def __init__(self, dst: BinaryIO):
        self._dst, self._rest = dst, b""

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        if self._rest:
            # Complete the pending group first: joining the rest to a whole chunk would copy every chunk.
            need = 3 - len(self._rest)
            if len(view) < need:
                self._rest += bytes(view)
                return
            self._dst.write(base64.urlsafe_b64encode(self._rest + bytes(view[:need])))
            view, self._rest = view[need:], b""
        n = len(view) - len(view) % 3
        if n:
            self._dst.write(base64.urlsafe_b64encode(view[:n]))
        self._rest = bytes(view[n:])

    def close(self) -> None:
        self._dst.write(base64.urlsafe_b64encode(self._rest).rstrip(b"="))


class _B64Reader:
    """The inverse: decodes base64url text fed in arbitrary pieces, 4 characters at a time."""

    def __init__(self):
        self._rest = b""

    def feed(self, text: bytes) -> bytes:
        if self._rest:
            text = self._rest + text
        n = len(text) - len(text) % 4
        self._rest = text[n:]
        return _b64_strict(text[:n]) if n else b""

    def finish(self) -> bytes:
        return _b64_strict(self._rest)


# --- key management (per recipient) ----------------------------------------------------------

def _concat_kdf(z: bytes, alg: str, apu: bytes, apv: bytes) -> bytes:
    # RFC 7518 §4.6.2 (NIST SP 800-56A Concat KDF, SHA-256): OtherInfo = AlgorithmID || PartyUInfo ||
    # PartyVInfo || SuppPubInfo, the first three length-prefixed (32-bit big-endian); with key
    # wrapping, AlgorithmID is the "alg" value and keydatalen is the wrapping key size (256 bits).
    def lp(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    other = lp(alg.encode("ascii")) + lp(apu) + lp(apv) + struct.pack(">I", _CEK_LEN * 8)
    return ConcatKDFHash(algorithm=hashes.SHA256(), length=_CEK_LEN, otherinfo=other).derive(z)


def _kid_of(key) -> str:
    return key.kid or thumbprint(key.as_dict(private=False))


def _epk_jwk(pub: ec.EllipticCurvePublicKey, crv: str) -> dict:
    size = (pub.curve.key_size + 7) // 8  # RFC 7518 §6.2.1.2: full-length coordinates
    nums = pub.public_numbers()
    return {"kty": "EC", "crv": crv, "x": b64url(nums.x.to_bytes(size, "big")),
            "y": b64url(nums.y.to_bytes(size, "big"))}


def _wrap_cek(key, cek: bytes) -> dict:
    kid = _kid_of(key)
    if key.key_type == "EC":
        if key.alg not in (None, ALG_ECDH):
            raise SealError(f"cannot encrypt for key {kid}: it is for {key.alg}, not {ALG_ECDH}")
        if key.curve_name not in _CURVES:
            raise SealError(f"cannot encrypt for key {kid}: curve {key.curve_name} is not supported")
        eph = ec.generate_private_key(_CURVES[key.curve_name]())
        kek = _concat_kdf(eph.exchange(ec.ECDH(), key.public_key), ALG_ECDH, b"", b"")
        header = {"alg": ALG_ECDH, "kid": kid, "epk": _epk_jwk(eph.public_key(), key.curve_name)}
        return {"header": header, "encrypted_key": b64url(aes_key_wrap(kek, cek))}
    if key.key_type == "RSA":
        if key.alg not in (None, ALG_RSA):
            raise SealError(f"cannot encrypt for key {kid}: it is for {key.alg}, not {ALG_RSA}")
        return {"header": {"alg": ALG_RSA, "kid": kid},
                "encrypted_key": b64url(key.public_key.encrypt(cek, _OAEP))}
    raise SealError(f"cannot encrypt for key {kid}: key type {key.key_type} is not supported (use EC or RSA)")


def _ephemeral_key(epk: object, crv: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(epk, dict) or epk.get("kty") != "EC":
        raise SealError("malformed: the recipient header has no EC epk")
    if epk.get("crv") != crv:
        raise SealError(f"malformed: epk is on curve {epk.get('crv')!r} but the recipient key is on {crv}")
    curve = _CURVES[crv]()
    size = (curve.key_size + 7) // 8
    x, y = _member_bytes(epk.get("x"), "epk.x"), _member_bytes(epk.get("y"), "epk.y")
    if len(x) != size or len(y) != size:
        raise SealError("malformed: epk coordinates have the wrong length")
    try:
        # Point validation: a point off the curve would leak bits of our private key (invalid-curve attack).
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + x + y)
    except ValueError:
        raise SealError("malformed: epk is not a point on the curve") from None


def _unwrap_cek(header: dict, recipient: dict, key, kid: str) -> bytes:
    alg = header.get("alg")
    encrypted_key = _member_bytes(recipient.get("encrypted_key"), "encrypted_key")
    cek: bytes | None = None
    if alg == ALG_ECDH:
        if key.key_type != "EC":
            raise SealError(f"message uses {alg} for key {kid}, but that key is {key.key_type}")
        epk = _ephemeral_key(header.get("epk"), key.curve_name)
        apu = _member_bytes(header["apu"], "apu") if "apu" in header else b""
        apv = _member_bytes(header["apv"], "apv") if "apv" in header else b""
        kek = _concat_kdf(key.private_key.exchange(ec.ECDH(), epk), ALG_ECDH, apu, apv)
        try:
            cek = aes_key_unwrap(kek, encrypted_key)  # RFC 3394 unwrap carries its own integrity check
        except (InvalidUnwrap, ValueError):
            cek = None
    elif alg == ALG_RSA:
        if key.key_type != "RSA":
            raise SealError(f"message uses {alg} for key {kid}, but that key is {key.key_type}")
        try:
            cek = key.private_key.decrypt(encrypted_key, _OAEP)
        except ValueError:
            cek = None
    else:
        raise SealError(f"unsupported key management algorithm {alg!r} (supported: {ALG_ECDH}, {ALG_RSA})")
    if cek is None or len(cek) != _CEK_LEN:
        # RFC 7516 §11.5: on a failed unwrap carry on with a random CEK, so the outcome is the same
        # integrity failure as for any altered ciphertext and no padding/unwrap oracle is exposed.
        cek = os.urandom(_CEK_LEN)
    return cek


# --- encryption ------------------------------------------------------------------------------

class Encryptor:
    """A JWE being written to `dst` as plaintext is pushed in (`write`), for producers that write rather than
    be read (a tar stream of a DICOM series): memory O(one write) whatever the total. `close()` finishes the
    message and returns what encrypt_stream returns."""

    def __init__(self, dst: BinaryIO, recipients: list, *, compress: bool = True, typ: str | None = None,
                 cty: str | None = None):
        if not recipients:
            raise SealError("nothing to encrypt for: no encryption keys given "
                            "(does the recipient's key set have a use=enc key?)")
        protected: dict = {"enc": ENC}
        if compress:
            protected["zip"] = ZIP
        if typ:
            protected["typ"] = typ
        if cty:
            protected["cty"] = cty
        protected_b64 = b64url(dumps(protected))
        cek, iv = os.urandom(_CEK_LEN), os.urandom(_IV_LEN)
        self._wrapped = [_wrap_cek(key, cek) for key in recipients]
        self._encryptor = Cipher(algorithms.AES(cek), modes.GCM(iv)).encryptor()
        # RFC 7516 §5.1 step 14: AAD = ASCII(BASE64URL(UTF8(JWE Protected Header))) (no "aad" member).
        self._encryptor.authenticate_additional_data(protected_b64.encode("ascii"))
        self._deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS) if compress else None  # raw DEFLATE
        self._dst = dst
        dst.write(b'{"protected":"' + protected_b64.encode("ascii") + b'","recipients":' + dumps(self._wrapped)
                  + b',"iv":"' + b64url(iv).encode("ascii") + b'","ciphertext":"')
        self._out = _B64Writer(dst)
        self._digest = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jwe-sha256")
        self.plaintext_size = self.ciphertext_size = 0

    def write(self, chunk: bytes) -> int:
        # The plaintext's SHA-256 runs on a helper thread while this thread encrypts and encodes the same chunk
        # (hashlib and the cipher release the GIL): with a second core the hash costs no time, and it was a
        # fifth of sealing a DICOM series (bench --only images). Waited for before returning, so the caller
        # may reuse its buffer.
        hashing = self._hasher.submit(self._digest.update, chunk) if len(chunk) >= _PARALLEL_HASH else None
        if hashing is None:
            self._digest.update(chunk)
        self.plaintext_size += len(chunk)
        data = self._deflater.compress(chunk) if self._deflater else chunk
        if data:
            ct = self._encryptor.update(data)
            self.ciphertext_size += len(ct)
            self._out.write(ct)
        if hashing is not None:
            hashing.result()
        return len(chunk)

    def close(self) -> dict:
        ct = self._encryptor.update(self._deflater.flush() if self._deflater else b"") + self._encryptor.finalize()
        self.ciphertext_size += len(ct)
        self._out.write(ct)
        self._out.close()
        self._hasher.shutdown()
        self._dst.write(b'","tag":"' + b64url(self._encryptor.tag).encode("ascii") + b'"}')
        return {"plaintext_sha256": self._digest.hexdigest(), "plaintext_size": self.plaintext_size,
                "ciphertext_size": self.ciphertext_size, "kids": [w["header"]["kid"] for w in self._wrapped]}


def encrypt_stream(src: BinaryIO, dst: BinaryIO, recipients: list, *, compress: bool = True,
                   typ: str | None = None, cty: str | None = None, chunk_size: int = DEFAULT_CHUNK) -> dict:
    """Encrypt `src` to `dst` for every public key in `recipients`; memory O(chunk_size).

    Returns {"plaintext_sha256", "plaintext_size", "ciphertext_size", "kids"}.
    """
    enc = Encryptor(dst, recipients, compress=compress, typ=typ, cty=cty)
    while chunk := src.read(chunk_size):
        enc.write(chunk)
    return enc.close()


# --- decryption: parsing ---------------------------------------------------------------------

@dataclass
class _Members:
    protected_b64: str
    protected: dict
    shared: dict  # the "unprotected" member
    recipients: list
    iv: bytes
    aad: str | None

    @property
    def additional_data(self) -> bytes:
        # RFC 7516 §5.2 step 15 (and §5.1 step 14): the protected header, plus "." + aad when present.
        aad = self.protected_b64.encode("ascii")
        return aad + b"." + self.aad.encode("ascii") if self.aad is not None else aad


def _parse_members(obj: dict) -> _Members:
    protected_b64 = obj.get("protected")
    if not isinstance(protected_b64, str) or not protected_b64:
        raise SealError("malformed: no protected header (enc and zip must be integrity-protected)")
    try:
        protected = loads(_b64_strict(protected_b64.encode("ascii")))
    except (ValueError, UnicodeEncodeError):
        raise SealError("malformed: the protected header is not base64url-encoded JSON") from None
    shared = obj.get("unprotected", {})
    if not isinstance(protected, dict) or not isinstance(shared, dict):
        raise SealError("malformed: a JWE header is not a JSON object")
    if "recipients" in obj:
        recipients = obj["recipients"]
    else:  # flattened serialization (RFC 7516 §7.2.2): the single recipient's members sit at top level
        recipients = [{k: obj[k] for k in ("header", "encrypted_key") if k in obj}]
    if not isinstance(recipients, list) or not recipients or not all(isinstance(r, dict) for r in recipients):
        raise SealError("malformed: recipients must be a non-empty array of objects")
    iv = _member_bytes(obj.get("iv"), "iv")
    if len(iv) != _IV_LEN:
        raise SealError("malformed: the A256GCM iv must be 96 bits")
    aad = obj.get("aad")
    if aad is not None and not isinstance(aad, str):
        raise SealError("malformed: aad is not a string")
    return _Members(protected_b64, protected, shared, recipients, iv, aad)


def _joint_header(m: _Members, recipient: dict) -> dict:
    own = recipient.get("header", {})
    if not isinstance(own, dict):
        raise SealError("malformed: a recipient header is not a JSON object")
    joint: dict = {}
    for part in (m.protected, m.shared, own):
        clash = joint.keys() & part.keys()
        if clash:  # RFC 7516 §7.2.1: the three headers' member names must be disjoint
            raise SealError(f"malformed: header parameter {sorted(clash)[0]!r} appears in more than one header")
        joint.update(part)
    return joint


def _check_content_header(m: _Members, joint: dict) -> None:
    if joint.get("enc") != ENC:
        raise SealError(f"unsupported content encryption {joint.get('enc')!r} (only {ENC})")
    if "zip" in joint and "zip" not in m.protected:
        raise SealError("malformed: zip must be in the protected header (RFC 7516 §4.1.3)")
    if m.protected.get("zip", ZIP) != ZIP:
        raise SealError(f"unsupported compression {m.protected['zip']!r} (only {ZIP})")
    if "crit" in joint:  # RFC 7516 §4.1.13: we understand no extensions
        raise SealError("unsupported: the JWE header lists critical extensions (crit)")


def _open_cek(m: _Members, keyring: KeyRing) -> tuple[str, bytes]:
    kids = []
    for recipient in m.recipients:
        joint = _joint_header(m, recipient)
        kid = joint.get("kid")
        if not isinstance(kid, str):
            kids.append("<no kid>")
            continue
        kids.append(kid)
        key = keyring.decryption_key(kid)
        if key is not None:
            _check_content_header(m, joint)
            return kid, _unwrap_cek(joint, recipient, key, kid)
    shown = ", ".join(k[:64] for k in kids)
    raise SealError(f"encrypted for keys [{shown}], none of which is in {keyring.label}")


def _loads_object(doc: bytes | bytearray, *, where: str, truncated: str) -> dict:
    try:
        obj = loads(doc)
    except orjson.JSONDecodeError as err:
        if err.pos >= len(doc.rstrip()):
            raise SealError(f"truncated: the file ends {truncated}") from None
        raise SealError(f"malformed: not valid JSON{' ' + where if where else ''} "
                        f"({err.msg} at byte {err.pos})") from None
    if not isinstance(obj, dict):
        raise SealError("not an encrypted package: expected a JWE JSON object")
    return obj


# --- decryption: the content pipeline --------------------------------------------------------

class _Opener:
    """base64url text -> AES-GCM decrypt -> inflate -> dst, in bounded pieces."""

    def __init__(self, m: _Members, cek: bytes, dst: Writable, *, max_plaintext: int | None, chunk_size: int):
        self._decryptor = Cipher(algorithms.AES(cek), modes.GCM(m.iv)).decryptor()
        self._decryptor.authenticate_additional_data(m.additional_data)
        self._b64 = _B64Reader()
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if m.protected.get("zip") == ZIP else None
        self._dst, self._limit, self._chunk = dst, max_plaintext, chunk_size
        self._digest = hashlib.sha256()
        self.plaintext_size = self.ciphertext_size = 0

    def feed(self, text: bytes) -> None:
        try:
            raw = self._b64.feed(text)
        except ValueError:
            raise SealError("malformed: the ciphertext is not base64url") from None
        self._decrypt(raw)

    def finish(self, tag: bytes) -> str:
        try:
            raw = self._b64.finish()
        except ValueError:
            raise SealError("malformed: the ciphertext is not base64url") from None
        self._decrypt(raw)
        try:
            self._decryptor.finalize_with_tag(tag)
        except InvalidTag:
            raise SealError(_INTEGRITY) from None
        if self._inflater is not None:
            self._emit(self._inflater.flush())  # at most one pending match: small
            if not self._inflater.eof:
                raise SealError(_INTEGRITY + " (the compressed stream is incomplete)")
        return self._digest.hexdigest()

    def _decrypt(self, raw: bytes) -> None:
        if raw:
            self.ciphertext_size += len(raw)
            self._inflate(self._decryptor.update(raw))

    def _inflate(self, data: bytes) -> None:
        z = self._inflater
        if z is None:
            self._emit(data)
            return
        try:
            # max_length caps each step's output: a decompression bomb never expands in one go.
            self._emit(z.decompress(data, self._chunk))
            while z.unconsumed_tail:
                self._emit(z.decompress(z.unconsumed_tail, self._chunk))
        except zlib.error:
            raise SealError(_INTEGRITY + " (the compressed data is corrupt)") from None
        if z.unused_data:
            raise SealError(_INTEGRITY + " (data after the end of the compressed stream)")

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        self.plaintext_size += len(data)
        if self._limit is not None and self.plaintext_size > self._limit:
            raise SealError(f"plaintext exceeds limit of {self._limit} bytes "
                            "(refusing to expand further: possible decompression bomb)")
        self._digest.update(data)
        self._dst.write(data)


class _Reader:
    def __init__(self, src: BinaryIO, chunk_size: int):
        self._src, self._size, self._pending, self.offset = src, chunk_size, b"", 0

    def read(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        data = self._src.read(self._size) or b""
        self.offset += len(data)
        return data

    def unread(self, data: bytes) -> None:
        self._pending = data + self._pending


def _read_head(reader: _Reader, max_header: int) -> tuple[bytearray, re.Match | None]:
    """Read until the ciphertext member starts; the match is None if it is not within max_header bytes."""
    head = bytearray()
    while data := reader.read():
        start = max(0, len(head) - 64)  # the marker may straddle two reads
        head += data
        first = head.lstrip()[:1]
        if first and first != b"{":
            raise SealError("not an encrypted package: expected a JWE JSON object (RFC 7516 §7.2)")
        m = _CT_MARKER.search(head, start)
        if m is not None:
            return head, (m if m.start() <= max_header else None)
        if len(head) > max_header:
            break
    return head, None


def _head_members(prefix: bytes) -> dict | None:
    """The members before "ciphertext", as an object; None if they do not parse on their own."""
    text = prefix.rstrip()
    if text.endswith(b","):
        text = text[:-1] + b"}"
    elif text.strip() == b"{":
        text = b"{}"
    else:
        return None
    try:
        obj = loads(text)
    except orjson.JSONDecodeError:
        return None  # e.g. the marker matched inside a string: let the full parse decide
    return obj if isinstance(obj, dict) else None


def _streamable(obj: dict | None) -> TypeGuard[dict]:
    return (obj is not None and "protected" in obj and "iv" in obj
            and ("recipients" in obj or "encrypted_key" in obj))


def _pump_ciphertext(reader: _Reader, opener: _Opener) -> bytes:
    """Feed the ciphertext string to `opener`; returns what follows its closing quote."""
    while True:
        data = reader.read()
        if not data:
            raise SealError(f"truncated: the file ends inside the ciphertext (after {reader.offset} bytes)")
        quote = data.find(b'"')
        if quote < 0:
            opener.feed(data)
            continue
        opener.feed(data[:quote])
        return data[quote + 1:]


def _read_trailer(reader: _Reader, rest: bytes, max_header: int) -> dict:
    buf = bytearray(rest)
    while data := reader.read():
        buf += data
        if len(buf) > max_header:
            raise SealError(f"malformed: more than {max_header} bytes follow the ciphertext")
    text = bytes(buf).strip()
    if not text:
        raise SealError("truncated: the file ends right after the ciphertext, before the authentication tag")
    if text[:1] == b"}":
        if text[1:].strip():
            raise SealError("malformed: unexpected data after the JWE object")
        return {}
    if text[:1] != b",":
        raise SealError("malformed: unexpected character after the ciphertext")
    return _loads_object(b"{" + text[1:], where="after the ciphertext",
                         truncated="after the ciphertext, before the authentication tag is complete")


def _tag(head: dict, trailer: dict) -> bytes:
    late = [k for k in _STREAM_CRITICAL if k in trailer]
    if late:
        raise SealError(f"unsupported layout: member {late[0]!r} follows the ciphertext; "
                        "streaming decryption needs it before")
    if "tag" in head and "tag" in trailer:
        raise SealError("malformed: duplicate tag member")
    tag = _member_bytes(trailer.get("tag", head.get("tag")), "tag")
    if len(tag) != _TAG_LEN:
        raise SealError("malformed: the A256GCM tag must be 128 bits")
    return tag


def _read_rest(reader: _Reader, head: bytearray, max_header: int) -> bytearray:
    while data := reader.read():
        head += data
        if len(head) > FALLBACK_LIMIT:
            raise SealError(
                f"unsupported layout: the members before the ciphertext are larger than {max_header} bytes or "
                f"come in an order that cannot be streamed; such files are accepted only up to "
                f"{FALLBACK_LIMIT >> 20} MiB")
    return head


# --- decryption: entry points ----------------------------------------------------------------

def decrypt_stream(src: BinaryIO, dst: Writable, keyring: KeyRing, *, max_plaintext: int | None = None,
                   max_header: int = 1 << 20, chunk_size: int = DEFAULT_CHUNK) -> dict:
    """Decrypt a JWE JSON message from `src` into `dst` with a key from `keyring`.

    Streams (memory O(chunk_size)) when the members needed to start decrypting (protected,
    recipients or encrypted_key, iv) precede "ciphertext" within `max_header` bytes, as our writer
    puts them; other layouts (e.g. another library's output) are parsed whole, up to 64 MiB.

    On SealError, whatever was written to `dst` is unauthenticated and MUST be discarded.
    Returns {"header": protected header, "kid", "plaintext_sha256", "plaintext_size", "ciphertext_size"}.
    """
    reader = _Reader(src, chunk_size)
    head, match = _read_head(reader, max_header)
    first = _head_members(bytes(head[:match.start()])) if match else None
    if match is not None and _streamable(first):  # first is None when match is
        reader.unread(bytes(head[match.end():]))
        del head
        members = _parse_members(first)
        kid, cek = _open_cek(members, keyring)
        opener = _Opener(members, cek, dst, max_plaintext=max_plaintext, chunk_size=chunk_size)
        rest = _pump_ciphertext(reader, opener)
        tag = _tag(first, _read_trailer(reader, rest, max_header))
    else:
        whole = _read_rest(reader, head, max_header)
        del head
        if not whole.strip():
            raise SealError("not an encrypted package: the file is empty")
        obj = _loads_object(whole, where="", truncated="before the JWE JSON object is complete")
        del whole
        members = _parse_members(obj)
        ciphertext = obj.get("ciphertext")
        if not isinstance(ciphertext, str):
            raise SealError("malformed: no ciphertext member")
        tag = _member_bytes(obj.get("tag"), "tag")
        if len(tag) != _TAG_LEN:
            raise SealError("malformed: the A256GCM tag must be 128 bits")
        kid, cek = _open_cek(members, keyring)
        opener = _Opener(members, cek, dst, max_plaintext=max_plaintext, chunk_size=chunk_size)
        try:
            text = ciphertext.encode("ascii")
        except UnicodeEncodeError:
            raise SealError("malformed: the ciphertext is not base64url") from None
        del obj, ciphertext
        for i in range(0, len(text), chunk_size):
            opener.feed(text[i:i + chunk_size])
    digest = opener.finish(tag)
    return {"header": members.protected, "kid": kid, "plaintext_sha256": digest,
            "plaintext_size": opener.plaintext_size, "ciphertext_size": opener.ciphertext_size}


def _atomic_output(dst_path: str | os.PathLike):
    dst_path = os.fspath(dst_path)
    directory = os.path.dirname(os.path.abspath(dst_path))
    # mkstemp creates the file 0600: decrypted output is PHI, and partial output is never visible.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst_path)}.", suffix=".part", dir=directory)
    return os.fdopen(fd, "wb"), tmp, dst_path


def _run_to_path(src_path, dst_path, work) -> dict:
    out, tmp, final = _atomic_output(dst_path)
    try:
        with out, open(src_path, "rb") as src:
            info = work(src, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, final)
        return info
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def decrypt_to_path(src_path: str | os.PathLike, dst_path: str | os.PathLike, keyring: KeyRing, **kw) -> dict:
    """decrypt_stream into `dst_path`, which appears (atomically) only if decryption fully succeeded."""
    return _run_to_path(src_path, dst_path, lambda src, out: decrypt_stream(src, out, keyring, **kw))


def encrypt_to_path(src_path: str | os.PathLike, dst_path: str | os.PathLike, recipients: list, **kw) -> dict:
    """encrypt_stream into `dst_path`, written to a temporary file and renamed into place when complete."""
    return _run_to_path(src_path, dst_path, lambda src, out: encrypt_stream(src, out, recipients, **kw))


def encrypt_bytes(data: bytes, recipients: list, **kw) -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out, recipients, **kw)
    return out.getvalue()


def decrypt_bytes_with_header(data: bytes, keyring: KeyRing, **kw) -> tuple[dict, bytes]:
    out = io.BytesIO()
    info = decrypt_stream(io.BytesIO(data), out, keyring, **kw)
    return info["header"], out.getvalue()


def decrypt_bytes(data: bytes, keyring: KeyRing, **kw) -> bytes:
    return decrypt_bytes_with_header(data, keyring, **kw)[1]
