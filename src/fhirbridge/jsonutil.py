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

    Fast path: orjson with sorted keys already writes JCS for everything but non-integral numbers. Its string
    escaping is JCS's (RFC 8785 section 3.2.2.2: only `"`, `\\` and U+0000-U+001F, with the short forms) and
    keys here are ASCII FHIR element names, whose UTF-16 order (section 3.2.3) is their byte order. Floats are
    swapped for placeholders, serialised by rfc8785's own ECMAScript number formatter and put back. Anything
    outside that (a non-str key, an integer beyond 2^53, a NUL in a string that could pass for a placeholder)
    goes to the reference implementation, which `tests/test_jsonutil.py` checks this against."""
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
