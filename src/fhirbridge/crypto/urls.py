"""Where credentials and patient records may be sent: https, or plain http to this machine only.

One rule for every URL fhirbridge sends a secret or a record to: the EHR's FHIR base and its token endpoint
(configured or discovered from .well-known/smart-configuration), the reviewers' endpoints and published key
sets, the OAuth issuer's keys, a hospital's reviewer API (issue 13, S11). Plain http shows a bearer token, a
client assertion or a patient's record to anyone on the way, and lets them answer in the other side's place.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from fhirbridge.errors import ConfigError

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
RULE = "must be an https:// URL (plain http only to 127.0.0.1, localhost or ::1, for a server on this machine)"


def is_https_or_loopback(url: str) -> bool:
    """Whether a URL is safe to send credentials or records to: https, or plain http to this machine only."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # an unclosed IPv6 bracket, a bad port
        return False
    if parts.scheme == "https" and host:
        return True
    # Plain http only when the host itself is loopback: "http://127.0.0.1.evil.example" and
    # "http://127.0.0.1@evil.example" start with the same characters but go elsewhere.
    return parts.scheme == "http" and host in LOOPBACK_HOSTS and not parts.username


def https_or_loopback(url: str, what: str, *, file: str | None = None) -> str:
    """`url` when it is https (or plain http to loopback); otherwise a ConfigError naming `what`, the setting
    or option it came from (and the file, when given)."""
    if not isinstance(url, str) or not is_https_or_loopback(url):
        raise ConfigError(f"{RULE}: credentials or patient records go to it, and plain http shows them to "
                          "anyone on the way", file=file, key=what)
    return url
