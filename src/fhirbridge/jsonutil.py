"""JSON helpers: orjson on hot paths, RFC 8785 (JCS) canonical form for what is signed."""
from __future__ import annotations

import base64
import hashlib
from typing import Any

import orjson
import rfc8785


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def dumps(obj: Any, *, pretty: bool = False) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 if pretty else 0)


def canonical(obj: Any) -> bytes:
    """RFC 8785 JSON Canonicalization Scheme bytes (sorted keys, ECMAScript number form, no spaces)."""
    return rfc8785.dumps(obj)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str | bytes) -> bytes:
    if isinstance(text, str):
        text = text.encode("ascii")
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
