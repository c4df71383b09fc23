"""Authentication for requests to the EHR's FHIR endpoint.

Secrets stay inside the auth objects: their repr and every error message name the auth type and the config
key, never a username, password or token.
"""
from __future__ import annotations

import requests
from requests.auth import AuthBase, HTTPBasicAuth


class BearerAuth(AuthBase):
    """`Authorization: Bearer <token>` (RFC 6750 section 2.1)."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BearerAuth) and other._token == self._token

    def __repr__(self) -> str:
        return "BearerAuth(token=***)"


class BasicAuth(HTTPBasicAuth):
    """HTTP Basic (RFC 7617) with a repr that hides the credentials."""

    def __repr__(self) -> str:
        return "BasicAuth(username=***, password=***)"


def make_auth(cfg: dict | None) -> AuthBase | None:
    """Build the auth for `cfg` ({"type": "none" | "basic" | "bearer", ...}); None means no auth."""
    if not cfg:
        return None
    if not isinstance(cfg, dict):
        raise ValueError("auth must be a mapping with a 'type' key (none, basic or bearer)")
    kind = cfg.get("type", "none")
    if kind == "none":
        return None
    if kind == "basic":
        return BasicAuth(_required(cfg, "username", kind), _required(cfg, "password", kind))
    if kind == "bearer":
        return BearerAuth(_required(cfg, "token", kind))
    # The type is a config word, not a secret, but a mistyped file could put anything here: cap it.
    raise ValueError(f"unknown auth type {str(kind)[:40]!r}: use one of none, basic, bearer")


def _required(cfg: dict, key: str, kind: str) -> str:
    value = cfg.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"auth type {kind} needs a non-empty '{key}'")
    return value
