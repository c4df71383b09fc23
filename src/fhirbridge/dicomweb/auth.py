"""Authentication to a PACS's DICOMweb endpoint: none, HTTP Basic, a fixed bearer token, or a callable token
source (e.g. the EHR's SMART access token, issue 15 "[hospital.pacs] auth"), asked before every request so a
renewed token is used at once.

Secrets stay inside the auth objects: their repr and every error name the auth type, never a credential.
"""
from __future__ import annotations

from collections.abc import Callable

import requests
from requests.auth import AuthBase, HTTPBasicAuth


class BearerAuth(AuthBase):
    """`Authorization: Bearer <token>` (RFC 6750 section 2.1)."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(token=***)"


class TokenSourceAuth(AuthBase):
    """A bearer token from `source()` on every request (the source caches and renews it)."""

    def __init__(self, source: Callable[[], str]):
        self._source = source

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        token = self._source()
        if not isinstance(token, str) or not token:
            raise ValueError("the PACS token source gave no token")
        request.headers["Authorization"] = f"Bearer {token}"
        return request

    def __repr__(self) -> str:
        return "TokenSourceAuth(source=***)"


class BasicAuth(HTTPBasicAuth):
    """HTTP Basic (RFC 7617) with a repr that hides the credentials."""

    def __repr__(self) -> str:
        return "BasicAuth(username=***, password=***)"


def make_auth(cfg: dict | Callable[[], str] | None) -> AuthBase | None:
    """None or {"type": "none"}: no auth; {"type": "basic", "username", "password"};
    {"type": "bearer", "token"}; a callable: a token source (TokenSourceAuth)."""
    if cfg is None:
        return None
    if callable(cfg):
        return TokenSourceAuth(cfg)
    if not isinstance(cfg, dict):
        raise ValueError("PACS auth must be a mapping with a 'type' key (none, basic, bearer) or a token source")
    kind = cfg.get("type", "none")
    if kind == "none":
        return None
    if kind == "basic":
        return BasicAuth(_required(cfg, "username", kind), _required(cfg, "password", kind))
    if kind == "bearer":
        return BearerAuth(_required(cfg, "token", kind))
    raise ValueError(f"unknown PACS auth type {str(kind)[:40]!r}: use one of none, basic, bearer")


def _required(cfg: dict, key: str, kind: str) -> str:
    value = cfg.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"PACS auth type {kind} needs a non-empty '{key}'")
    return value
