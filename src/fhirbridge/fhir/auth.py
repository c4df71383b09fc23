"""Authentication for requests to the EHR's FHIR endpoint.

Secrets stay inside the auth objects: their repr and every error message name the auth type and the config
key, never a username, password or token.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import requests
from joserfc import jwk
from joserfc import jwt as jose_jwt
from requests.auth import AuthBase, HTTPBasicAuth

from fhirbridge.crypto.keys import KeyRing
from fhirbridge.crypto.urls import is_https_or_loopback
from fhirbridge.errors import FhirError, SealError
from fhirbridge.fhir.unreachable import why_unreachable

log = logging.getLogger(__name__)


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


def make_auth(cfg: dict | None, *, default_scopes: tuple[str, ...] | None = None) -> AuthBase | None:
    """Build the auth for `cfg` ({"type": "none" | "basic" | "bearer" | "smart", ...}); None means no auth.

    "smart" needs client_id, fhir_base_url and keys (a private JWKS file); token_url, scopes and alg are
    optional; without scopes it asks for `default_scopes` (what the configured features need: feature_needs),
    else DEFAULT_SCOPES. It returns one shared SmartBackendAuth per configuration, so all clients share the token."""
    if not cfg:
        return None
    if not isinstance(cfg, dict):
        raise ValueError("auth must be a mapping with a 'type' key (none, basic, bearer or smart)")
    kind = cfg.get("type", "none")
    if kind == "none":
        return None
    if kind == "basic":
        return BasicAuth(_required(cfg, "username", kind), _required(cfg, "password", kind))
    if kind == "bearer":
        return BearerAuth(_required(cfg, "token", kind))
    if kind == "smart":
        return _smart(cfg, default_scopes)
    # The type is a config word, not a secret, but a mistyped file could put anything here: cap it.
    raise ValueError(f"unknown auth type {str(kind)[:40]!r}: use one of none, basic, bearer, smart")


def _required(cfg: dict, key: str, kind: str) -> str:
    value = cfg.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"auth type {kind} needs a non-empty '{key}'")
    return value


# ====================================================================== SMART Backend Services

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SMART_ALGS = ("RS384", "ES384")  # SMART Backend Services: the client SHALL support RS384 or ES384
ASSERTION_LIFETIME = 300  # seconds; SMART says exp SHALL be no more than five minutes in the future
REFUSED_AFTER_REAUTH = ("the EHR refused our SMART token after re-authorisation: check client registration "
                        "and scopes")

# ---------------------------------------------------------------- the scopes fhirbridge needs, per feature
#
# ONE table of every request fhirbridge makes to the EHR: feature -> (resource type, interaction). The scopes it
# asks for are derived from the features a configuration uses (`feature_needs`, `scopes_for`), and `doctor`
# compares the granted scopes with the same table to name the feature a missing scope breaks. A new request to
# the EHR gets its row here (tests/fhir/test_smart_scopes.py runs the whole loop against an EHR granting exactly
# the derived scopes, each transaction entry checked on its own).
#
# SMART App Launch v2, "Scopes for requesting FHIR Resources" (scopes-and-launch-context.html): `c` is the
# type-level create (POST [type]); `r` read, vread and instance history; `u` instance-level update and patch:
# "Note that some servers allow for an update operation to create a new instance, and this is allowed by the
# update scope". So a PUT to an id fhirbridge chose (write-back's Binary and DocumentReference, the AuditEvent
# copies, a Task or ServiceRequest it changes) needs `u`, never just `c`; `d` delete; `s` type-level search.
READ, SEARCH, CREATE, UPDATE = "read", "search", "create", "update"
PERMISSION = {READ: "r", SEARCH: "s", CREATE: "c", UPDATE: "u"}
COLLECTED = "<collected>"   # stands for each type the collection profiles (and reference following) search

# The types the shipped collection profiles search, and the referenced types collect follows by `_id`
# (config.mappings.collected_types computes them for a configuration; a test keeps this in step).
COLLECTED_TYPES = ("Condition", "DiagnosticReport", "ImagingStudy", "Procedure", "MedicationStatement",
                   "MedicationRequest", "DocumentReference", "Practitioner", "PractitionerRole", "Organization",
                   "Observation", "Medication", "Endpoint", "Specimen", "Location")


@dataclass(frozen=True)
class Feature:
    name: str
    breaks: str                                  # what stops working without its scopes (doctor says it)
    needs: tuple[tuple[str, str], ...]           # (resource type or COLLECTED, interaction)
    optional: bool = False                       # only when configured (feature_needs says when)
    core: bool = True                            # the loop cannot run without it (doctor: fail, else warn)


FEATURES: tuple[Feature, ...] = (
    # loop/intake.py poll and the lost-store check (and ehr/cds.py's prior orders when prefetch is missing;
    # its Patient read is collect's); loop/guards.py and routing re-read the order before each
    # outbound step; routing reads an Organization performer named by reference.
    Feature("intake", "no new orders are found and open Cases cannot re-check their order",
            (("ServiceRequest", SEARCH), ("ServiceRequest", READ), ("Task", SEARCH), ("Organization", READ))),
    # ehr/task.py: the referral Task (conditional create on the Case identifier, then PUT with If-Match).
    Feature("referral Task", "the EHR's Task cannot show a Case's progress, so no Case can start",
            (("Task", CREATE), ("Task", READ), ("Task", UPDATE))),
    # loop/collect.py and loop/consent.py: the patient, each profile's searches, references by `_id`, the
    # patient's Consents and the Organizations they name.
    Feature("collect", "the record cannot be collected",
            (("Patient", READ), (COLLECTED, SEARCH), ("Consent", SEARCH), ("Organization", READ))),
    # loop/seal.py: attachments stored as Binary (DocumentReference.content.attachment.url).
    Feature("attachments", "attachments stored as Binary cannot be sealed", (("Binary", READ),), core=False),
    # loop/writeback.py: is it filed already, then ONE transaction: PUT Binary/<id>, PUT DocumentReference/<id>,
    # POST Provenance, PUT Task/<id> (If-Match). These are the atomic plan's; a configuration asks for the writes
    # of ITS write plan instead (ehr/write_plan.py WritePlan.writes, passed to feature_needs as `writeback`).
    Feature("write-back", "the opinion cannot be filed in the chart",
            (("Task", READ), ("DocumentReference", SEARCH), ("DocumentReference", READ), ("Binary", UPDATE),
             ("DocumentReference", UPDATE), ("Provenance", CREATE), ("Task", UPDATE))),
    # loop/followup.py (issue 16): a follow-up question is a Communication (basedOn the order, about the opinion
    # note), its answer an addendum note and a corrected opinion a new version (superseding the old one where the
    # plan can update). These are the atomic plan's; a configuration asks for its plan's
    # (WritePlan.followup_writes, passed as `followups`). The order is read for its requester (the sender).
    Feature("follow-ups", "follow-up questions, their answers and corrected opinions cannot reach the chart",
            (("ServiceRequest", READ), ("Communication", UPDATE), ("DocumentReference", READ), ("Binary", UPDATE),
             ("DocumentReference", UPDATE), ("Provenance", CREATE)), core=False),
    # ehr/order.py (`fhirbridge order`, POST /orders, the physician app, an accepted CDS Hooks suggestion: the
    # order found by its placer identifier is intake's search): read the patient and the requester
    # (required, BSeR), POST the order; with deselected records it is created as a draft and PUT active once the
    # EHR is seen to keep them.
    Feature("ordering", "orders cannot be placed through fhirbridge (CLI, API, physician app)",
            (("Patient", READ), ("Practitioner", READ), ("PractitionerRole", READ), ("ServiceRequest", CREATE),
             ("ServiceRequest", UPDATE)), core=False),
    # ehr/data_request.py: the reviewer asks for more records (a Task for the hospital).
    Feature("data requests", "a reviewer's request for more records cannot reach the EHR", (("Task", CREATE),),
            core=False),
    # ehr/subscriptions.py (`fhirbridge subscribe`) and service/notify.py (the order an event names).
    Feature("subscriptions", "`fhirbridge subscribe` cannot register (polling still works)",
            (("Basic", SEARCH), ("Subscription", SEARCH), ("Subscription", READ), ("Subscription", CREATE),
             ("Subscription", UPDATE), ("ServiceRequest", READ)), core=False),
    # ehr/audit.py send_one: PUT AuditEvent/<id> ([audit] write_to_ehr).
    Feature("audit copies", "AuditEvents are not written to the EHR (they stay in the store)",
            (("AuditEvent", UPDATE),), optional=True),
    # ui/physician.py and ui/physician_view.py ([physician_app]): the user (fhirUser), the records shown by
    # `_id`, the filed opinion and its Binary.
    Feature("physician app", "the physician app cannot show the user, the records or the opinion",
            (("Practitioner", READ), ("PractitionerRole", READ), (COLLECTED, SEARCH), ("ServiceRequest", READ),
             ("DocumentReference", READ), ("Binary", READ)), optional=True),
)


FEATURE = {f.name: f for f in FEATURES}


def feature_needs(collected: Iterable[str] = COLLECTED_TYPES, *, audit_copies: bool = False,
                  physician_app: bool = False, writeback: Iterable[tuple[str, str]] | None = None,
                  task_write: bool = True, followups: Iterable[tuple[str, str]] | None = None,
                  ) -> dict[str, tuple[tuple[str, str], ...]]:
    """Feature name -> the (resource type, interaction) pairs it needs, for a configuration whose collection
    profiles search `collected`, that writes AuditEvents to the EHR or not, with the physician app or not.

    `writeback`: the writes the write plan makes (default: the atomic plan's, as in FEATURES). `task_write`
    False: the EHR takes no Task writes, so no feature asks for Task create or update (a scope the EHR cannot
    grant may make it refuse the whole token request)."""
    enabled = {"audit copies": audit_copies, "physician app": physician_app}
    out: dict[str, tuple[tuple[str, str], ...]] = {}
    for f in FEATURES:
        if f.optional and not enabled.get(f.name):
            continue
        needs = tuple(writeback) if f.name == "write-back" and writeback is not None else \
            tuple(followups) if f.name == "follow-ups" and followups is not None else f.needs
        pairs: list[tuple[str, str]] = []
        for rtype, interaction in needs:
            if not task_write and rtype == "Task" and interaction in (CREATE, UPDATE):
                continue
            for t in (collected if rtype == COLLECTED else (rtype,)):
                if (t, interaction) not in pairs:
                    pairs.append((t, interaction))
        out[f.name] = tuple(pairs)
    return out


def _permissions(interactions: Iterable[str]) -> str:
    letters = {PERMISSION[i] for i in interactions}
    if letters & set("rs"):
        # A read and a search are both GETs: servers that authorise by HTTP method (sekmet 0.1.1 wants `rs` for
        # every GET) and SMART v1 `.read` (which means both) make `rs` the pairing that works everywhere; collect
        # and the physician view read by `_id` search as well as by id.
        letters |= set("rs")
    return "".join(ch for ch in "cruds" if ch in letters)   # SMART v2: a subset of the in-order string .cruds


def scopes_for(needs: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """`system/<Type>.<cruds>` scopes covering every (resource type, interaction) of `needs`, one per type."""
    by_type: dict[str, list[str]] = {}
    for rtype, interaction in needs:
        by_type.setdefault(rtype, []).append(interaction)
    return tuple(f"system/{t}.{_permissions(i)}" for t, i in by_type.items())


def needed_scopes(by_feature: dict[str, tuple[tuple[str, str], ...]]) -> tuple[str, ...]:
    """The scopes to ask for: what every feature of `by_feature` (feature_needs) needs, and nothing else."""
    return scopes_for(pair for pairs in by_feature.values() for pair in pairs)


def missing_scopes(scopes: Iterable[str], granted: Iterable[str]) -> tuple[str, ...]:
    """The part of `scopes` that the `granted` scopes (v2, v1, wildcards) do not cover, as scopes."""
    grants = []
    for g in granted:
        ctx, _, rest = g.partition("/")
        gtype, dot, perms = rest.partition(".")
        perms = perms.split("?", 1)[0]   # a granted scope narrowed by a search filter still covers its type
        if dot:
            grants.append((ctx, gtype, _V1.get(perms, perms)))
    out = []
    for scope in scopes:
        ctx, _, rest = scope.partition("/")
        rtype, _, perms = rest.partition(".")
        lacking = "".join(ch for ch in _V1.get(perms, perms)
                          if not any(gctx == ctx and gtype in ("*", rtype) and ch in gp for gctx, gtype, gp in grants))
        if lacking:
            out.append(f"{ctx}/{rtype}.{lacking}")
    return tuple(out)


_V1 = {"read": "rs", "write": "cud", "*": "cruds"}   # SMART v1 scopes in v2 letters (scopes-and-launch-context)
# What a configuration with the shipped profiles and no optional feature asks for (the App passes its own).
DEFAULT_SCOPES = needed_scopes(feature_needs())
_V2_PERMS = re.compile(r"^c?r?u?d?s?$")
_MAX_ERROR_TEXT = 300
_TOKEN_ERROR_BODY = 64 * 1024


def v1_scopes(scopes: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """SMART v2 scopes (system/Patient.rs) as v1 (system/Patient.read, .write), for servers without v2."""
    out: list[str] = []
    for scope in scopes:
        ctx, _, rest = scope.partition("/")
        rtype, dot, perms = rest.partition(".")
        perms = perms.split("?", 1)[0]
        if not dot or not perms or not _V2_PERMS.match(perms):
            out.append(scope)  # already v1 (or something we do not understand): keep as written
            continue
        if set(perms) & set("rs"):
            out.append(f"{ctx}/{rtype}.read")
        if set(perms) & set("cud"):
            out.append(f"{ctx}/{rtype}.write")
    return tuple(dict.fromkeys(out))


def _only_v1(smart_config: dict) -> bool:
    """True when the server's smart-configuration shows SMART v1 scopes only (no v2 permission letters)."""
    caps = smart_config.get("capabilities")
    if isinstance(caps, list) and "permission-v2" in caps:
        return False
    supported = smart_config.get("scopes_supported")
    if not isinstance(supported, list) or not supported:
        return False
    for scope in supported:
        perms = str(scope).partition("/")[2].partition(".")[2].split("?", 1)[0]
        if perms and perms != "*" and _V2_PERMS.match(perms):
            return False
    return True


def _clean(text: Any) -> str:
    """Text from the token endpoint for an error message: printable, short."""
    s = "".join(ch if ch.isprintable() else " " for ch in str(text))
    return s[:_MAX_ERROR_TEXT] + ("…" if len(s) > _MAX_ERROR_TEXT else "")


class SmartBackendAuth(AuthBase):
    """SMART Backend Services (client_credentials with a private_key_jwt client assertion).

    The access token is cached and shared by every request (and thread) using this object; it is minted again
    shortly before `expires_in` runs out. A 401 from the FHIR server drops the token, mints a new one and
    retries the request once; a second 401 raises FhirError(REFUSED_AFTER_REAUTH). Neither the token nor key
    material ever reaches a log line, a repr or an error message.
    """

    def __init__(self, *, client_id: str, fhir_base_url: str, signing_key: jwk.Key, kid: str,
                 alg: str | None = None, token_url: str | None = None, scopes: tuple[str, ...] | None = None,
                 default_scopes: tuple[str, ...] | None = None, timeout: tuple[float, float] = (5.0, 30.0),
                 clock: Callable[[], float] = time.time):
        if not client_id:
            raise ValueError("auth type smart needs a non-empty 'client_id'")
        self.client_id = client_id
        self.fhir_base_url = fhir_base_url.rstrip("/")
        self.alg = alg or _default_alg(signing_key)
        _check_alg(self.alg, signing_key)
        self._key = signing_key
        self._kid = kid
        self.token_url = token_url
        self._explicit_scopes = tuple(scopes) if scopes else None
        # Unless configured, what the configuration's features need (feature_needs; the App derives them).
        self._default_scopes = tuple(default_scopes) if default_scopes else DEFAULT_SCOPES
        self.scopes: tuple[str, ...] = self._explicit_scopes or self._default_scopes
        self._discovered = False
        self.timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        self.token_requests = 0  # how many times a token was minted (for tests and metrics)
        self.granted_scope: str | None = None
        self._http = requests.Session()  # token endpoint and discovery; never carries our access token
        self._http.headers.update({"Accept": "application/json", "User-Agent": "fhirbridge/0.1"})

    @classmethod
    def from_keys(cls, *, keys: str | os.PathLike, **kw: Any) -> SmartBackendAuth:
        """Sign with the first private signing key of the JWKS file `keys`."""
        ring = KeyRing.load(keys)
        try:
            key = ring.signing_key()
        except SealError:
            raise ValueError(f"auth type smart: the key set {os.fspath(keys)} has no private signing key") from None
        return cls(signing_key=key, kid=key.kid or ring.kids[0], **kw)

    def __repr__(self) -> str:
        return f"SmartBackendAuth(client_id={self.client_id!r}, token=***)"

    # ------------------------------------------------------------------ requests hooks

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.access_token()}"
        body = request.body
        position = None
        if body is not None and hasattr(body, "tell"):
            try:
                position = body.tell()
            except OSError:
                position = None
        request.register_hook("response", self._make_hook(position))
        return request

    def _make_hook(self, position: int | None) -> Callable[..., requests.Response]:
        def on_response(resp: requests.Response, **kwargs: Any) -> requests.Response:
            return self._on_response(resp, position, **kwargs)
        return on_response

    def _on_response(self, resp: requests.Response, position: int | None, **kwargs: Any) -> requests.Response:
        if resp.status_code != 401:
            return resp
        prep = resp.request.copy()
        body = prep.body
        if body is not None and not isinstance(body, (bytes, str)):
            if position is None or not hasattr(body, "seek"):
                return resp  # a one-shot stream cannot be sent again; the client reports the 401
            body.seek(position)
        used = (resp.request.headers.get("Authorization") or "").removeprefix("Bearer ")
        self.invalidate(used)
        log.info("EHR answered 401 to a request with our SMART token; re-authorising once")
        resp.content  # noqa: B018 - drain so the connection can be reused
        resp.close()
        prep.headers["Authorization"] = f"Bearer {self.access_token()}"
        prep.hooks = {"response": []}  # the retry is not retried again
        retry = resp.connection.send(prep, **kwargs)
        retry.history.append(resp)
        retry.request = prep
        if retry.status_code == 401:
            retry.close()
            raise FhirError(REFUSED_AFTER_REAUTH, status=401, transient=True)
        return retry

    # ------------------------------------------------------------------ tokens

    def invalidate(self, token: str | None = None) -> None:
        """Forget the cached token (only if it is still `token`, when given: another thread may have renewed)."""
        with self._lock:
            if token is None or token == self._token:
                self._token = None
                self._expires_at = 0.0

    def access_token(self) -> str:
        with self._lock:
            if self._token is None or self._clock() >= self._expires_at:
                self._mint()
            assert self._token is not None
            return self._token

    def _mint(self) -> None:
        """Get a new access token (caller holds the lock)."""
        self._discover()
        assert self.token_url is not None
        form = {"grant_type": "client_credentials", "scope": " ".join(self.scopes),
                "client_assertion_type": ASSERTION_TYPE, "client_assertion": self.client_assertion()}
        where = f"SMART token endpoint {self.token_url}"
        try:
            resp = self._http.post(self.token_url, data=form, timeout=self.timeout)
        except requests.Timeout:
            raise FhirError(f"{where} did not answer in time", transient=True) from None
        except requests.RequestException as exc:
            raise FhirError(f"could not reach the {where}: {why_unreachable(exc, self.token_url)}",
                            transient=True) from None
        self.token_requests += 1
        try:
            data = resp.json() if len(resp.content) <= _TOKEN_ERROR_BODY else None
        except ValueError:
            data = None
        finally:
            resp.close()
        if resp.status_code != 200:
            detail = ""
            if isinstance(data, dict) and data.get("error"):
                detail = f": {_clean(data['error'])}"
                if data.get("error_description"):
                    detail += f" ({_clean(data['error_description'])})"
            transient = resp.status_code in (408, 429) or resp.status_code >= 500
            raise FhirError(f"{where} refused client {self.client_id!r} (HTTP {resp.status_code}){detail}",
                            status=resp.status_code, transient=transient)
        token = data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(token, str) or not token:
            raise FhirError(f"{where} answered without an access_token", status=resp.status_code, transient=False)
        token_type = data.get("token_type", "bearer")
        if str(token_type).lower() != "bearer":
            raise FhirError(f"{where} issued a {_clean(token_type)!r} token; only bearer is supported",
                            transient=False)
        expires_in = data.get("expires_in")
        if not isinstance(expires_in, (int, float)) or isinstance(expires_in, bool) or expires_in <= 0:
            expires_in = 300  # RFC 6749 5.1 makes it optional; SMART says it SHALL be there (300 is typical)
        # Renew before it runs out: 20% of its life, at most a minute, so a request never leaves with a token
        # that expires on the way.
        self._token = token
        self._expires_at = self._clock() + expires_in - min(60.0, expires_in * 0.2)
        self.granted_scope = data.get("scope") if isinstance(data.get("scope"), str) else None
        log.info("obtained a SMART access token from %s for client %s (expires in %ss)",
                 self.token_url, self.client_id, expires_in)

    def client_assertion(self) -> str:
        """A fresh signed client assertion (RFC 7523 section 3; SMART Backend Services)."""
        assert self.token_url is not None
        now = int(time.time())  # real time even under a test clock: the server checks iat and exp
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
                  "exp": now + ASSERTION_LIFETIME, "iat": now, "jti": uuid.uuid4().hex + secrets.token_hex(8)}
        header = {"alg": self.alg, "kid": self._kid, "typ": "JWT"}
        return jose_jwt.encode(header, claims, self._key, algorithms=[self.alg])

    def _discover(self) -> None:
        """Token endpoint (when not configured) and scope version from <base>/.well-known/smart-configuration."""
        if self._discovered or (self.token_url and self._explicit_scopes):
            return
        url = f"{self.fhir_base_url}/.well-known/smart-configuration"
        try:
            resp = self._http.get(url, timeout=self.timeout)
            doc = resp.json() if resp.status_code == 200 else None
        except (requests.RequestException, ValueError) as exc:
            if self.token_url:
                self._discovered = True  # the scopes stay v2; the token endpoint is configured
                return
            transient = isinstance(exc, requests.RequestException)
            raise FhirError(f"could not read {url} to find the SMART token endpoint ({type(exc).__name__}); "
                            "set [hospital.auth] token_url", transient=transient) from None
        if not isinstance(doc, dict):
            if self.token_url:
                self._discovered = True
                return
            raise FhirError(f"{url} answered HTTP {resp.status_code} without a SMART configuration; set "
                            "[hospital.auth] token_url", status=resp.status_code, transient=resp.status_code >= 500)
        if not self.token_url:
            endpoint = doc.get("token_endpoint")
            if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
                raise FhirError(f"{url} names no http(s) token_endpoint; set [hospital.auth] token_url",
                                transient=False)
            if not is_https_or_loopback(endpoint):
                # The signed client assertion would go there in clear and the access token come back so:
                # whoever can alter this answer (it came over the EHR base URL) gets a token. SMART App
                # Launch 2.x, conformance "Using TLS": every endpoint is https (issue 13).
                raise FhirError(f"{url} names a token_endpoint that is not https ({endpoint}); refused, since the "
                                "client assertion and the access token would cross the network in clear (plain "
                                "http only to 127.0.0.1, localhost or ::1). Set [hospital.auth] token_url to the "
                                "EHR's https token endpoint", transient=False)
            self.token_url = endpoint
        if not self._explicit_scopes and _only_v1(doc):
            self.scopes = v1_scopes(self._default_scopes)
        self._discovered = True


def _default_alg(key: jwk.Key) -> str:
    return "RS384" if key.key_type == "RSA" else "ES384"


def _check_alg(alg: str, key: jwk.Key) -> None:
    if alg not in SMART_ALGS:
        raise ValueError(f"auth type smart: alg must be one of {', '.join(SMART_ALGS)}")
    if alg == "RS384" and key.key_type != "RSA":
        raise ValueError("auth type smart: alg RS384 needs an RSA signing key")
    if alg == "ES384" and (key.key_type != "EC" or key.as_dict(private=False).get("crv") != "P-384"):
        raise ValueError("auth type smart: alg ES384 needs an EC P-384 signing key")


_shared: dict[tuple, SmartBackendAuth] = {}
_shared_lock = threading.Lock()


def _smart(cfg: dict, default_scopes: tuple[str, ...] | None) -> SmartBackendAuth:
    client_id = _required(cfg, "client_id", "smart")
    base = _required(cfg, "fhir_base_url", "smart")
    keys = cfg.get("keys")
    if not keys:
        raise ValueError("auth type smart needs 'keys' (a private JWKS to sign the client assertion with)")
    scopes = tuple(cfg.get("scopes") or ()) or None
    default_scopes = tuple(default_scopes) if default_scopes else None
    key = (client_id, base, os.fspath(keys), cfg.get("token_url"), scopes, default_scopes, cfg.get("alg"))
    # One object per configuration and process: every client (and thread) shares its token.
    with _shared_lock:
        auth = _shared.get(key)
        if auth is None:
            auth = SmartBackendAuth.from_keys(keys=keys, client_id=client_id, fhir_base_url=base,
                                              token_url=cfg.get("token_url"), scopes=scopes,
                                              default_scopes=default_scopes, alg=cfg.get("alg"))
            _shared[key] = auth
        return auth
