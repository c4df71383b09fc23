"""Logging: one JSON object per line (or readable text on a terminal), with the Case and request ids.

    FHIRBRIDGE_LOG_FORMAT   auto (default: text on a terminal, JSON otherwise) | json | text
    FHIRBRIDGE_LOG_LEVEL    debug | info | warning | error (default: the command's own)

What each level carries (docs/logs.md lists every field): ERROR a Case that failed for good (its id, the
step, the reason), WARNING a step that failed and will be retried, a tick that failed; INFO one line per
Case transition (opened, each step done, cancelled, retried, declined) and the service starting and
stopping; DEBUG scheduler ticks (ours and APScheduler's), FHIR requests.

Every line logged while the runner runs a step of a Case carries that Case's id (`case_context`, set by
loop.runner.run_pending), and every line logged while serving an HTTP request carries the request id
(`X-Request-ID`: the caller's, when it is a plain token, else a new one; sent back on the response). Other
lines about a Case pass `extra={"case_id": ...}`.

No PHI and no secrets: messages are written to name resources by type/id only (errors.py). As a second
line of defence the formatter masks bearer tokens, JWTs (SMART tokens and assertions, JWS, JWE) and URL
query strings (search parameters carry patient data; urllib3 logs them when it retries), and a traceback
keeps the message only of fhirbridge's own errors and OSErrors: another exception's text (a validator
quoting a field, say) may hold record content, so only its type is shown.
"""
from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from fhirbridge.errors import FhirbridgeError

CASE_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("fhirbridge_case_id", default=None)
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("fhirbridge_request_id", default=None)
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:-]{1,64}")

# Attributes every LogRecord has; anything else on a record came from `extra=` and is written as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

_MASKS = (
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    # JWS/JWT compact serialisation (access tokens, client assertions) and JWE: base64url "eyJ" headers.
    (re.compile(r"\beyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){1,4}"), "***"),
    (re.compile(r"(?i)\b(access_token|refresh_token|client_assertion|password|token)=[^&\s\"']+"), r"\1=***"),
    # A query string (something=... after "?"): search parameters name patients.
    (re.compile(r"\?(?=[^\s\"']*=)[^\s\"')]+"), "?…"),
)


def redact(text: str) -> str:
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text


@contextmanager
def case_context(case_id: str | None) -> Iterator[None]:
    """Every log line inside carries this Case id."""
    token = CASE_ID.set(case_id)
    try:
        yield
    finally:
        CASE_ID.reset(token)


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-ID when it is a plain token (so a chain of services shares one), else a new one."""
    if header and _REQUEST_ID_OK.fullmatch(header):
        return header
    return uuid.uuid4().hex


# --- formatting ------------------------------------------------------------------------------------------

def _exception(exc_info) -> dict:
    etype, value, tb = exc_info
    safe = isinstance(value, (FhirbridgeError, OSError))
    return {"type": etype.__name__ if etype else "Exception",
            "message": redact(str(value)) if safe else "(withheld: it may quote record content)",
            "stack": [f"{f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_tb(tb)]}


def fields(record: logging.LogRecord) -> dict:
    """What a line says, as a flat dict: time, level, logger, message, case_id, request_id, extras."""
    out: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(), "logger": record.name}
    a = record.args
    if record.name == "gunicorn.access" and isinstance(a, dict):
        # gunicorn's access line: its atoms become fields (path without the query string).
        out["message"] = "request"
        out.update(method=a.get("m"), path=a.get("U"), status=_int(a.get("s")), bytes=_int(a.get("B")),
                   duration_ms=_int(a.get("M")), remote=a.get("h"))
        rid = a.get("{x-request-id}o")
        if rid and rid != "-":
            out["request_id"] = rid
    else:
        out["message"] = redact(record.getMessage())
    case_id = getattr(record, "case_id", None) or CASE_ID.get()
    if case_id:
        out["case_id"] = case_id
    request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
    if request_id and "request_id" not in out:
        out["request_id"] = request_id
    for key, value in vars(record).items():
        if key not in _STANDARD and key not in out and key not in ("case_id", "request_id"):
            out[key] = redact(value) if isinstance(value, str) else value if isinstance(
                value, (int, float, bool, type(None))) else redact(str(value))
    if record.exc_info and record.exc_info[0] is not None:
        out["exception"] = _exception(record.exc_info)
    return out


def _int(value) -> int | str | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(fields(record), ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """For a person at a terminal: time, level, logger, [case, request], message, other fields."""

    def format(self, record: logging.LogRecord) -> str:
        f = fields(record)
        ids = " ".join(f"{k.split('_')[0]}={f.pop(k)}" for k in ("case_id", "request_id") if k in f)
        head = f"{f.pop('time')} {f.pop('level').upper():<7} {f.pop('logger')}"
        message = f.pop("message")
        exc = f.pop("exception", None)
        rest = " ".join(f"{k}={v}" for k, v in f.items() if v is not None)
        line = " ".join(p for p in (head, f"[{ids}]" if ids else "", message, rest) if p)
        if exc:
            line += f"\n  {exc['type']}: {exc['message']}\n" + "\n".join(f"    {s}" for s in exc["stack"])
        return line


def formatter(fmt: str | None = None, stream: TextIO | None = None) -> logging.Formatter:
    fmt = (fmt or os.environ.get("FHIRBRIDGE_LOG_FORMAT") or "auto").lower()
    if fmt not in ("auto", "json", "text"):
        raise ValueError(f"FHIRBRIDGE_LOG_FORMAT must be auto, json or text, not {fmt[:20]!r}")
    if fmt == "auto":
        stream = stream or sys.stderr
        fmt = "text" if hasattr(stream, "isatty") and stream.isatty() else "json"
    return JsonFormatter() if fmt == "json" else TextFormatter()


def setup(level: str | int | None = None, fmt: str | None = None, stream: TextIO | None = None) -> None:
    """Log to `stream` (stderr) from the root logger; FHIRBRIDGE_LOG_LEVEL and _FORMAT win over the defaults."""
    stream = stream or sys.stderr
    env_level = os.environ.get("FHIRBRIDGE_LOG_LEVEL")
    chosen = (env_level or level or "WARNING")
    chosen = chosen.upper() if isinstance(chosen, str) else chosen
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_fhirbridge", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(fmt, stream))
    handler._fhirbridge = True  # type: ignore[attr-defined]  # our marker, to find it again (above)
    root.addHandler(handler)
    root.setLevel(chosen)
    # urllib3 writes request lines (with query strings) at DEBUG: never that, whatever our level.
    logging.getLogger("urllib3").setLevel(max(logging.WARNING, root.level))
    # APScheduler says "Running job ..." and "... executed successfully" at INFO for every tick: some 5,000
    # lines an hour that say nothing happened. Its INFO is our DEBUG; its warnings (a missed run) stay.
    # On our handler: a logger's filter would not see its children's lines (apscheduler.executors.default).
    handler.addFilter(_Quieter("apscheduler"))


class _Quieter(logging.Filter):
    """Demotes the INFO lines of one library's loggers to DEBUG (kept only when the root logger wants DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and super().filter(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().getEffectiveLevel() <= logging.DEBUG
        return True
