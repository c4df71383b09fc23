"""Why a server could not be reached, in words an operator acts on: one short phrase per kind of failure
(DNS, refused, timed out, TLS spoken to a plain-http port, an untrusted certificate), never the
`HTTPConnectionPool(host=..., port=...): Max retries exceeded ...` text of requests/urllib3.

Used by the FHIR client's errors, `fhirbridge doctor` and the pages, so one failure reads the same everywhere.
No URL query string and no response content is ever quoted: only the host and port the caller names.
"""
from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

import requests

# OpenSSL's words when a TLS ClientHello was answered by something that is not TLS (an HTTP server answers
# "400 Bad Request" in plain text): 1.1/3.0 say WRONG_VERSION_NUMBER, 3.2+ "record layer failure", some
# builds "packet length too long" or "http request".
_NOT_TLS = ("wrong_version_number", "wrong version number", "record layer failure", "packet length too long",
            "http_request", "http request", "unknown protocol")
_UNTRUSTED = ("certificate_verify_failed", "certificate verify failed", "self signed", "self-signed",
              "unable to get local issuer")
_NAME_MISMATCH = ("hostname mismatch", "doesn't match", "not valid for")


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and what it wraps: urllib3's MaxRetryError.reason, __cause__, __context__, args."""
    seen: list[BaseException] = []
    todo: list[object] = [exc]
    while todo and len(seen) < 12:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [getattr(e, "reason", None), e.__cause__, e.__context__, *[a for a in e.args if
                                                                          isinstance(a, BaseException)]]
    return seen


def why_unreachable(exc: BaseException, url: str | None = None) -> str:
    """A short phrase (no URL beyond host:port) saying why `url` could not be reached."""
    parts = urlsplit(url) if url else None
    where = parts.netloc if parts else "the server"
    chain = _chain(exc)
    text = " ".join(str(e) for e in chain).lower()
    names = {type(e).__name__ for e in chain}
    if isinstance(exc, requests.exceptions.SSLError) or any(isinstance(e, ssl.SSLError) for e in chain):
        if any(w in text for w in _NOT_TLS):
            return (f"{where} answered in plain HTTP, not TLS: that port does not speak https (the URL must "
                    "name the server's https port, or start with http:// for a plain-http server on this machine)")
        if any(w in text for w in _NAME_MISMATCH):
            return f"the TLS certificate of {where} is for another name than the URL's host"
        if any(w in text for w in _UNTRUSTED):
            return (f"the TLS certificate of {where} is not trusted here (a hospital CA? point REQUESTS_CA_BUNDLE "
                    "at its PEM file)")
        return f"the TLS handshake with {where} failed"
    if "NameResolutionError" in names or any(isinstance(e, socket.gaierror) for e in chain) \
            or "failed to resolve" in text or "name or service not known" in text:
        host = parts.hostname if parts else "the host name"
        return f"DNS: the name {host!r} does not resolve (check the URL's host name and this machine's DNS)"
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "connection refused" in text:
        return f"connection refused by {where}: nothing listens on that port (is the server running?)"
    if isinstance(exc, requests.exceptions.ConnectTimeout) or "ConnectTimeoutError" in names:
        return f"connecting to {where} timed out (down, or a firewall drops the packets)"
    if isinstance(exc, requests.Timeout) or "ReadTimeoutError" in names:
        return f"{where} accepted the connection, then the read timed out (no answer in time)"
    if any(isinstance(e, ConnectionResetError) for e in chain) or "reset by peer" in text:
        return f"{where} closed the connection (reset)"
    if any(isinstance(e, OSError) and getattr(e, "errno", None) for e in chain):
        err = next(e for e in chain if isinstance(e, OSError) and getattr(e, "errno", None))
        return f"cannot connect to {where}: {err.strerror or type(err).__name__}"
    return f"cannot connect to {where} ({type(exc).__name__})"
