"""The SMART App Launch (v2) EHR launch, on the app's side: discovery, authorize redirect, token exchange.

https://hl7.org/fhir/smart-app-launch/app-launch.html. The EHR opens `/physician/launch?iss=..&launch=..`;
we read `<iss>/.well-known/smart-configuration` (app-launch.html#retrieve-well-knownsmart-configuration),
send the browser to its authorization endpoint, and exchange the code it brings back for a token whose
response carries the launch context (`patient`) and an OpenID Connect `id_token` naming the user
(`fhirUser`, scopes-and-launch-context.html#fhiruser).

`fhirclient` does the OAuth part: the authorize URL with `state`, `aud`, `launch` and PKCE S256, checking
`state` on return, and the code exchange with the `code_verifier`. Its own discovery reads the
CapabilityStatement's oauth-uris extension, which SMART v2 no longer requires, so the endpoints found in
`.well-known` are handed to it as its saved state. It is used for nothing else: it has no retries or token
refresh, and fhirbridge reads the EHR with its own client (App.ehr). The access token is not kept at all.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import requests
from fhirclient import client as fc
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from requests.adapters import HTTPAdapter

from fhirbridge.crypto.urls import is_https_or_loopback

# fhirclient warns that it ignores the id_token on every launch; we verify and read it ourselves (_fhir_user).
logging.getLogger("fhirclient.client").setLevel(logging.ERROR)
TIMEOUT = (5, 15)
PENDING_SECONDS = 600         # an authorize round trip must come back within this
ID_PART = r"[A-Za-z0-9\-.]{1,64}"


class LaunchError(Exception):
    """The launch cannot go on; the message is for the physician (no tokens, codes or PHI in it)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Launched:
    iss: str
    patient: str                # Patient id in context
    user: str | None            # fhirUser as "Practitioner/<id>" (or PractitionerRole), when the EHR said
    need_patient_banner: bool
    expires_at: float
    # CDS Hooks 2.0: a card's link of type "smart" carries `appContext`, which the EHR hands to the app in the
    # token response. Only fhirbridge's own keys are kept (ehr/cds.py writes them), each checked for its shape.
    app_context: dict = field(default_factory=dict)


def _session() -> requests.Session:
    """Discovery and token requests must not hang a web worker: every request gets a timeout."""
    class _Timeout(HTTPAdapter):
        def send(self, request: requests.PreparedRequest, *args: Any, **kw: Any) -> requests.Response:
            kw["timeout"] = kw.get("timeout") or TIMEOUT
            return super().send(request, **kw)

    s = requests.Session()
    s.mount("http://", _Timeout())
    s.mount("https://", _Timeout())
    return s


def _allowed_url(url: object) -> bool:
    return isinstance(url, str) and is_https_or_loopback(url)


def discover(iss: str) -> dict:
    """The EHR's SMART configuration; refused unless it supports what this app needs."""
    try:
        with _session() as s:
            r = s.get(f"{iss}/.well-known/smart-configuration", headers={"Accept": "application/json"})
        config = r.json() if r.status_code == 200 else None
    except (requests.RequestException, ValueError):
        config = None
    if not isinstance(config, dict):
        raise LaunchError("the EHR's SMART configuration could not be read; try again, or ask IT", 502)
    for key in ("authorization_endpoint", "token_endpoint"):
        if not _allowed_url(config.get(key)):
            raise LaunchError(f"the EHR's SMART configuration has no usable {key}", 502)
    caps = config.get("capabilities") or []
    if "launch-ehr" not in caps:
        raise LaunchError("the EHR does not offer SMART EHR launch (capability launch-ehr)", 502)
    # SMART v2: servers and apps SHALL use PKCE with S256 (app-launch.html, "Considerations for PKCE").
    if "S256" not in (config.get("code_challenge_methods_supported") or []):
        raise LaunchError("the EHR does not support PKCE S256, which SMART App Launch v2 requires", 502)
    return config


def begin(*, iss: str, launch: str, client_id: str, scope: str, redirect_uri: str) -> tuple[str, dict]:
    """Returns (authorize URL, pending state to keep until the callback)."""
    smart = discover(iss)
    state = {"app_id": client_id, "scope": scope, "redirect": redirect_uri, "launch_token": launch,
             "server": {"base_uri": iss, "auth_type": "oauth2",
                        "auth": {"app_id": client_id, "aud": iss, "redirect_uri": redirect_uri,
                                 "authorize_uri": smart["authorization_endpoint"],
                                 "token_uri": smart["token_endpoint"]}}}
    client = fc.FHIRClient(state=state, save_func=lambda _s: None)
    url = client.authorize_url    # sets state and the PKCE verifier in the client's auth state
    auth = client.server.auth
    pending = {"client": _without_tokens(client.state), "state": auth.auth_state, "iss": iss,
               "issuer": smart.get("issuer"), "jwks_uri": smart.get("jwks_uri"), "at": time.time()}
    return url, pending


def _without_tokens(state: dict) -> dict:
    """fhirclient's state minus anything that would let someone act as the user: it goes into a cookie."""
    auth = dict(state.get("server", {}).get("auth") or {})
    for k in ("access_token", "refresh_token", "app_secret"):
        auth.pop(k, None)
    return {**state, "server": {**state.get("server", {}), "auth": auth}}


def finish(pending: dict, callback_url: str, *, client_id: str) -> Launched:
    """Check the callback against the pending launch and exchange the code (fhirclient: state, PKCE)."""
    if time.time() - pending.get("at", 0) > PENDING_SECONDS:
        raise LaunchError("the sign-in took too long; open the app again from the patient's chart")
    client = fc.FHIRClient(state=pending["client"], save_func=lambda _s: None)
    client.server.session = _session()
    try:
        client.handle_callback(callback_url)
    except requests.RequestException:
        raise LaunchError("the EHR did not accept the sign-in (token request refused); open the app again "
                          "from the patient's chart", 403) from None
    except Exception as exc:  # noqa: BLE001 - fhirclient raises plain Exception for OAuth errors and bad state
        reason = "the EHR refused the sign-in" if "state" not in str(exc) else "the sign-in did not match this launch"
        raise LaunchError(f"{reason}; open the app again from the patient's chart", 403) from None
    ctx = client.launch_context or {}
    if str(ctx.get("token_type", "")).lower() != "bearer":
        raise LaunchError("the EHR answered the sign-in without a bearer token", 403)
    patient = ctx.get("patient")
    if not isinstance(patient, str) or not re.fullmatch(ID_PART, patient):
        raise LaunchError("the EHR opened the app without a patient in context: open it from a patient's chart")
    user = None
    if ctx.get("id_token"):
        user = _fhir_user(ctx["id_token"], pending, client_id=client_id)
    expires = client.server.auth.expires_at
    return Launched(iss=pending["iss"], patient=patient, user=user,
                    need_patient_banner=ctx.get("need_patient_banner", True) is not False,
                    expires_at=expires.timestamp() if expires else time.time() + 3600,
                    app_context=app_context(ctx.get("appContext")))


_APP_CONTEXT = {"cdsCard": re.compile(r"[0-9a-f-]{36}"), "draftOrder": re.compile(r"[A-Za-z]{1,40}/" + ID_PART),
                "profile": re.compile(r"[a-z0-9-]{1,64}"), "reviewer": re.compile(r"[A-Za-z0-9 ._-]{1,100}")}
MAX_APP_QUESTION = 2000


def app_context(raw: object) -> dict:
    """The prefill a CDS card's smart link sent (a JSON string): cdsCard, draftOrder, profile, reviewer,
    question; anything else, or of another shape, is dropped (it came through the EHR, not from us directly)."""
    if not isinstance(raw, str) or len(raw) > 8192:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    out = {k: v for k, v in data.items() if k in _APP_CONTEXT and isinstance(v, str) and _APP_CONTEXT[k].fullmatch(v)}
    question = data.get("question")
    if isinstance(question, str) and question.strip() and len(question) <= MAX_APP_QUESTION:
        out["question"] = question.strip()
    return out


def _fhir_user(id_token: str, pending: dict, *, client_id: str) -> str | None:
    """The user from the OpenID Connect id_token, verified with the EHR's published keys (RS256, the
    algorithm SMART requires). A Patient or RelatedPerson user is refused: this app places orders."""
    if not _allowed_url(pending.get("jwks_uri")) or not pending.get("issuer"):
        raise LaunchError("the EHR sent an identity token but publishes no jwks_uri/issuer to check it", 403)
    try:
        with _session() as s:
            keys = KeySet.import_key_set(s.get(pending["jwks_uri"]).json())
        token = jwt.decode(id_token, keys, algorithms=["RS256"])
        jwt.JWTClaimsRegistry(iss={"essential": True, "value": pending["issuer"]},
                              aud={"essential": True, "value": client_id},
                              exp={"essential": True}).validate(token.claims)
    except (requests.RequestException, ValueError, JoseError):
        raise LaunchError("the EHR's identity token could not be verified; open the app again", 403) from None
    who = token.claims.get("fhirUser")
    if not isinstance(who, str):
        return None
    ref = who.removeprefix(pending["iss"].rstrip("/") + "/")
    if re.fullmatch(rf"(Practitioner|PractitionerRole)/{ID_PART}", ref):
        return ref
    if re.fullmatch(rf"(Patient|RelatedPerson)/{ID_PART}", ref):
        raise LaunchError("this app places orders: it is for clinicians, not for patients or their relatives", 403)
    return None
