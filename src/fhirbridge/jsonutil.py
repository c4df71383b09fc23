"""JSON helpers: orjson on hot paths, RFC 8785 (JCS) canonical form for what is signed."""
from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
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
    # One C pass: each byte to its class, digits dropped, so fixed substrings can say what matters. A float
    # token is a fraction or an exponent followed by the end of a value (":7.25," -> "x.]"); a timestamp's
    # ":00.000Z" in a string becomes "x.x" and is no candidate.
    brief = out.translate(_SHAPE, b"0123456789")
    if b"!" in brief:
        return _canonical_slow(obj)   # a character beyond the BMP: UTF-16 key order may differ from ours
    if out[:1] in (b"{", b"[") and not any(n in brief for n in _FLOAT_OR_NULL_ENDS):
        return out   # the common case: nothing shaped like a float or a null token, not even inside a string
    return _fix_numbers(out, out.translate(_SHAPE), obj)


_FLOAT_OR_NULL_ENDS = (b".]", b"e+]", b"null]")   # `,]}` all map to `]`: what may follow a value
_FAST_OPTIONS = (orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER | orjson.OPT_PASSTHROUGH_DATETIME
                 | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS)


def _shape_table() -> bytes:
    """Each byte of orjson's output mapped to its class, so plain substring searches (C speed, unlike a
    regular expression scanning 7 MiB) find what matters: digits -> 0, e/E -> e, +/- -> +, and the lead
    byte of a 4-byte UTF-8 sequence -> !; quotes, backslashes, dots, value ends (`,]}`) and the letters of
    null stay, the value ends `,]}` all become ]; everything else is x."""
    table = bytearray(b"x" * 256)
    for c in b'0123456789':
        table[c] = ord("0")
    for c in b'eE':
        table[c] = ord("e")
    for c in b'+-':
        table[c] = ord("+")
    for c in b'."\\nul':
        table[c] = c
    for c in b',]}':
        table[c] = ord("]")
    for c in range(0xF0, 0xF5):
        table[c] = ord("!")
    return bytes(table)


_SHAPE = _shape_table()
_NUMBER_AT = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_TOKEN_CHARS = frozenset(b"0123456789-")


def _fix_numbers(out: bytes, shape: bytes, obj: Any) -> bytes:
    """Rewrite orjson's float tokens outside strings in ECMAScript form. Strings are told apart without a
    walk: escaped backslashes and quotes are masked in the shape (same length), so every `"` left delimits a
    string, and a candidate lies outside strings when an even number of them precede it."""
    masked = shape.replace(b"\\\\", b"xx").replace(b'\\"', b"xx")
    candidates: list[int] = []
    for needle in (b"0.0", b"0e+", b"null"):
        at = masked.find(needle)
        while at != -1:
            candidates.append(at)
            at = masked.find(needle, at + 1)
    candidates.sort()
    pieces: list[bytes] = []
    inside, counted, done = False, 0, 0
    for at in candidates:
        if at < done:
            continue   # a second candidate in a token already rewritten (1.5e+30)
        inside ^= bool(masked.count(b'"', counted, at) & 1)
        counted = at
        if inside:
            continue
        if out.startswith(b"null", at):
            return _canonical_slow(obj)   # a None, or a NaN/Infinity orjson wrote as null: only the walk tells
        begin = at
        while begin > 0 and out[begin - 1] in _TOKEN_CHARS:
            begin -= 1
        match = _NUMBER_AT.match(out, begin)
        if match is None:   # cannot happen for orjson's output; stay correct if it ever does
            return _canonical_slow(obj)
        pieces += [out[done:begin], rfc8785.dumps(float(match.group(0)))]
        done = match.end()
    if not pieces:
        return out   # every candidate was inside a string
    pieces.append(out[done:])
    return b"".join(pieces)


def canonical_chunks(obj: Any, *, batch: int = 256) -> Iterator[bytes]:
    """`canonical(obj)` as pieces whose concatenation is the same bytes, for a large document: a long array
    (a Bundle's `entry`) is canonicalised `batch` items at a time, and its head (a document's Composition,
    whose section narratives are single strings of up to the size of all their summaries) and short arrays
    and objects near the top member by member, so the whole form is never in memory at once (issue 19 goal 2:
    peak memory of the seal; orjson reserves several times a long string's length while writing it). JCS
    sorts members by UTF-16 code units; for ASCII names that is `sorted`, and anything else is canonicalised
    whole by `canonical`."""
    yield from _pieces(obj, canonical, True, batch, _DEPTH)


def dumps_chunks(obj: Any, *, batch: int = 256) -> Iterator[bytes]:
    """`dumps(obj)` as pieces (the same JSON value, member order kept), cut as `canonical_chunks` cuts."""
    yield from _pieces(obj, dumps, False, batch, _DEPTH)


_DEPTH = 6          # Bundle > entry > [0] > resource > section > [i] > text: below that, values go whole
_SHORT_ARRAY = 16   # arrays up to this long are cut item by item (a Composition's sections)


def _pieces(value: Any, encode, sort: bool, batch: int, depth: int) -> Iterator[bytes]:
    if depth <= 0:
        yield encode(value)
    elif type(value) is dict:
        if not all(type(k) is str and (k.isascii() or not sort) for k in value):
            yield encode(value)
            return
        lead = b"{"
        for key in (sorted(value) if sort else value):
            yield lead + encode(key) + b":"
            lead = b","
            yield from _pieces(value[key], encode, sort, batch, depth - 1)
        yield b"}" if lead == b"," else b"{}"
    elif type(value) is list and value:
        yield b"["
        if len(value) <= _SHORT_ARRAY:
            for i, item in enumerate(value):
                if i:
                    yield b","
                yield from _pieces(item, encode, sort, batch, depth - 1)
        else:
            yield from _pieces(value[0], encode, sort, batch, depth - 1)
            for start in range(1, len(value), batch):
                yield b"," + encode(value[start:start + batch])[1:-1]   # "[a,b]" without its brackets
        yield b"]"
    else:
        yield encode(value)


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
