"""JSON helpers: orjson on hot paths, RFC 8785 (JCS) canonical form for what is signed."""
from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

import orjson
import rfc8785


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    return orjson.loads(data)


def dumps(obj: Any, *, pretty: bool = False) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 if pretty else 0)


def canonical(obj: Any) -> bytes:
    """RFC 8785 JSON Canonicalization Scheme bytes (sorted keys, ECMAScript number form, no spaces).

    Fast path, no Python walk of the value (issue 19 goal 2: the walk looking for floats was 0.22 s of a 0.39 s
    seal of a 7.3 MiB document that has none): orjson with sorted keys and 53-bit integers already writes JCS
    for everything but non-integral numbers. Its string escaping is JCS's (RFC 8785 section 3.2.2.2: only
    `"`, `\\` and U+0000-U+001F, with the short forms), and its key order is code point order, which is
    UTF-16 order (section 3.2.3) unless a character beyond the BMP is present. One C-speed scan of the output
    then decides: no number token with a fraction or exponent, no `null` (orjson writes NaN and Infinity as
    null; FHIR JSON has no nulls outside the rare primitive-extension arrays), no 4-byte UTF-8 sequence, and
    the bytes are final. Floats found outside strings are rewritten token by token in ECMAScript form (by
    rfc8785's own formatter); `null` or a non-BMP character takes the slow path, which walks the value and
    defers to the reference implementation for anything it cannot prove. `tests/test_jsonutil.py` checks
    both paths against the reference byte for byte."""
    try:
        out = orjson.dumps(obj, option=_FAST_OPTIONS)
    except (TypeError, orjson.JSONEncodeError):
        return _canonical_slow(obj)   # a non-str key, an integer beyond 2^53, a type JSON does not have
    if _NON_BMP.search(out):
        return _canonical_slow(obj)
    if not _CANDIDATE.search(out):
        return out   # the common case: no token that could be a float or a null, not even inside a string
    return _fix_numbers(out, obj)


# Raw 0x01-0x03 never occur in orjson's output (control characters are written as \u00XX escapes), so they
# can stand in for escape pairs and segment joins without changing any length.
_ESC_BACKSLASH, _ESC_QUOTE, _JOIN = b"\x01\x01", b"\x02\x02", b"\x03"
_FAST_OPTIONS = (orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER | orjson.OPT_PASSTHROUGH_DATETIME
                 | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS)
_NON_BMP = re.compile(rb"[\xf0-\xf4]")
# A value token that is a float (has a fraction or an exponent) or null, where a value may start and end.
_NUMBER = rb"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?"
_CANDIDATE = re.compile(rb"[:\[,](?:-?\d+(?:\.\d+|(?:\.\d+)?[eE][+-]?\d+)|null)(?=[,\]}])|^(?:" + _NUMBER + rb"|null)$")
_OUTSIDE_TOKEN = re.compile(rb"(?<=[:\[,\x03])(" + _NUMBER + rb"|null)(?=[,\]}\x03])|^(" + _NUMBER + rb"|null)$")


def _fix_numbers(out: bytes, obj: Any) -> bytes:
    """Rewrite the float tokens of orjson's output outside strings in ECMAScript form. Strings are masked
    without a walk: escaped backslashes and quotes are swapped for same-length placeholders, so every `"` left
    delimits a string and the even pieces of a split on it are what lies between strings."""
    masked = out.replace(b"\\\\", _ESC_BACKSLASH).replace(b'\\"', _ESC_QUOTE)
    pieces = masked.split(b'"')
    outside = _JOIN.join(pieces[0::2])
    seen_null = False

    def fix(m: re.Match) -> bytes:
        nonlocal seen_null
        token = m.group(0)
        if token == b"null":
            seen_null = True
            return token
        if b"." not in token and b"e" not in token and b"E" not in token:
            return token   # an integer: already JCS
        return rfc8785.dumps(float(token))

    fixed = _OUTSIDE_TOKEN.sub(fix, outside)
    if seen_null:
        return _canonical_slow(obj)   # a None, or a NaN/Infinity orjson wrote as null: only the walk can tell
    if fixed == outside:
        return out   # the candidates were all inside strings
    pieces[0::2] = fixed.split(_JOIN)
    return b'"'.join(pieces).replace(_ESC_QUOTE, b'\\"').replace(_ESC_BACKSLASH, b"\\\\")


def _canonical_slow(obj: Any) -> bytes:
    floats: list[float] = []
    try:
        prepared = _prepare(obj, floats)
    except _Slow:
        return rfc8785.dumps(obj)
    out = orjson.dumps(prepared, option=orjson.OPT_SORT_KEYS)
    if not floats:
        return out
    return _PLACEHOLDER.sub(lambda m: rfc8785.dumps(floats[int(m.group(1))]), out)


class _Slow(Exception):
    pass


_PLACEHOLDER = re.compile(rb'"\\u0000(\d+)\\u0000"')
_INT_LIMIT = 2 ** 53 - 1


def _prepare(o: Any, floats: list[float]) -> Any:
    t = type(o)
    if t is dict:
        out = {}
        for k, v in o.items():
            if type(k) is not str or not k.isascii():
                raise _Slow
            out[k] = _prepare(v, floats)
        return out
    if t is list:
        return [_prepare(v, floats) for v in o]
    if t is str:
        if "\x00" in o:
            raise _Slow
        return o
    if t is float:
        if o != o or o in (float("inf"), float("-inf")):
            raise _Slow   # the reference raises its own error for these
        floats.append(o)
        return f"\x00{len(floats) - 1}\x00"
    if t is int:
        if not -_INT_LIMIT <= o <= _INT_LIMIT:
            raise _Slow
        return o
    if o is None or t is bool:
        return o
    raise _Slow


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str | bytes) -> bytes:
    if isinstance(text, str):
        text = text.encode("ascii")
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
