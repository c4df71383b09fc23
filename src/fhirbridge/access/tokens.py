"""Who is calling the HTTP API: reviewers (signed JWTs), hospital staff (OAuth2 tokens or scoped keys), and
EHRs calling the CDS Hooks services (their signed JWTs: `cds_client_from_jwt`, docs/cds-hooks.md).

**Reviewers** authenticate with a short-lived JWT signed by a signing key of their registered key set (the
`jwks` / `jwks_url` the hospital configured for them), the way SMART Backend Services clients authenticate
to a token endpoint (RFC 7523 section 3):

    header  {"alg": "ES384" | "ES256" | "RS384" | "PS256", "kid": <a signing key of the reviewer>, "typ": "JWT"}
    claims  {"iss": <the reviewer's organisation identifier value>, "sub": the same,
             "aud": "<public_url>/reviewer", "iat", "exp" (at most 5 minutes after iat), "jti" (used once)}

The static `reviewers[].api_token`, where configured, is still accepted (a reviewer without signing
tooling); the JWT is preferred: nothing secret is stored at the hospital and a stolen token dies in minutes.

**Staff** send `Authorization: Bearer <token>`, one of:
- a token of `[api] tokens`: every scope, every hospital (the deployment's administrators);
- a scoped API key (`[[api.keys]]`, only its SHA-256 configured): its scopes, and its hospitals if listed;
- an OAuth2 JWT access token from the hospital's identity provider (`[api.oauth]`): signature against the
  issuer's keys, `iss`, `aud`, `exp`/`nbf`, and the scopes in its `scope` (or configured) claim.

Scopes: orders:write, cases:read, cases:write, audit:read (config.STAFF_SCOPES). A token that is not valid is
a 401; a valid one without the endpoint's scope a 403; a Case of a hospital the token does not cover a 404.

**Page sessions** (the dashboard) are signed in with the same credentials. A session remembers which
credential signed in as a keyed fingerprint (`session_grant`), never the credential, and every request
re-checks it against the configuration in force (`staff_from_session`): an admin token or API key removed or
rotated ends the sessions it opened, a key's scopes and hospitals are the configured ones of now, and a
session opened with an OAuth token ends at that token's `exp` (and with the issuer's configuration).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
import uuid
from dataclasses import dataclass

from joserfc import jwt as jose_jwt
from joserfc.errors import JoseError

from fhirbridge.config.model import STAFF_SCOPES, CdsIssuer, Config, Reviewer
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.crypto.remote_jwks import RemoteJwks
from fhirbridge.errors import ConfigError, SealError
from fhirbridge.exchange.envelope import peek_claims, peek_header

log = logging.getLogger("fhirbridge.access")
REVIEWER_JWT_ALGS = ("ES384", "ES256", "RS384", "PS256")
OAUTH_ALGS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384")
MAX_TOKEN_LIFETIME = 300
CLOCK_SKEW = 60


class Unauthorized(Exception):
    """The caller did not prove who it is (HTTP 401)."""


@dataclass(frozen=True)
class Staff:
    name: str
    scopes: frozenset[str]
    hospitals: frozenset[str] | None     # hospital names; None: every hospital
    expires: float | None = None         # an OAuth token's exp; None: the credential does not expire

    def may_see(self, hospital_name: str) -> bool:
        return self.hospitals is None or hospital_name in self.hospitals


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


# --- reviewers ----------------------------------------------------------------------------------------

def mint_reviewer_token(keys: KeyRing, *, issuer: str, audience: str, lifetime: int = 120) -> str:
    """A reviewer's API token (what `fhirbridge reviewer token` prints): signed with its first signing key."""
    key = keys.signing_key()
    alg = "ES384" if key.key_type == "EC" and key.as_dict(private=False).get("crv") == "P-384" else (
        "ES256" if key.key_type == "EC" else "PS256")
    now = int(time.time())
    claims = {"iss": issuer, "sub": issuer, "aud": audience, "iat": now, "exp": now + min(lifetime, MAX_TOKEN_LIFETIME),
              "jti": uuid.uuid4().hex + secrets.token_hex(4)}
    return jose_jwt.encode({"alg": alg, "kid": key.kid, "typ": "JWT"}, claims, key, algorithms=[alg])


def reviewer_from_jwt(token: str, cfg: Config, *, audiences: tuple[str, ...], keys_for, remember) -> Reviewer:
    """The reviewer that signed this API token, or Unauthorized with the reason.

    `keys_for(reviewer, kid)` returns that reviewer's KeyRing; `remember(jti, reviewer)` records the token id
    and says False when it was used before (a replay)."""
    try:
        claims, header = peek_claims(token), peek_header(token)
    except SealError:
        raise Unauthorized("the reviewer token is not a signed JWT") from None
    issuer = claims.get("iss")
    reviewer = next((r for r in cfg.reviewers.values() if isinstance(issuer, str) and r.identifier_value == issuer),
                    None)
    if reviewer is None:
        raise Unauthorized("the token's iss is not a registered reviewer's identifier")
    verified = _verified_claims(token, header, REVIEWER_JWT_ALGS, lambda kid: keys_for(reviewer, kid),
                                what="the token", keys_of="the reviewer's keys",
                                not_ours="not signed by a signing key registered for this reviewer")
    _check_times(verified, max_lifetime=MAX_TOKEN_LIFETIME)
    if verified.get("sub") != issuer:
        raise Unauthorized("the token's sub must equal its iss (the reviewer's identifier)")
    aud = verified.get("aud")
    if not audiences:
        raise Unauthorized("reviewer tokens are not accepted here: the service has no [service] public_url, "
                           "the audience they must name")
    if not any(a in audiences for a in (aud if isinstance(aud, list) else [aud])):
        raise Unauthorized(f"the token's aud must be {audiences[0]}")
    jti = verified.get("jti")
    if not isinstance(jti, str) or not 16 <= len(jti) <= 150:
        raise Unauthorized("the token needs a unique jti (16 to 150 characters)")
    if not remember(jti, reviewer):
        raise Unauthorized("this token was used before (a replay): sign a new one for each request")
    return reviewer


def _verified_claims(token: str, header: dict, algs: tuple[str, ...], ring_for, *, what: str, keys_of: str,
                     not_ours: str) -> dict:
    """The claims of a JWT whose signature a key of `ring_for(kid)` verifies (alg from an allow-list: never
    "none", never an HMAC that a public key could be mistaken for)."""
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in algs:
        raise Unauthorized(f"{what}'s alg must be one of {', '.join(algs)}")
    try:
        ring = ring_for(kid)
    except (ConfigError, SealError) as exc:
        # Why is the operator's business (a file, a URL, a cache path), not the caller's (issue 13, S9).
        log.warning("%s are not available to check a token: %s", keys_of, exc)
        raise Unauthorized(f"{keys_of} are not available right now") from None
    key = ring.verification_key(kid) if isinstance(kid, str) else None
    if key is None:
        raise Unauthorized(f"{what} is {not_ours}")
    try:
        return jose_jwt.decode(token, key, algorithms=[alg]).claims
    except (JoseError, ValueError):
        raise Unauthorized(f"{what}'s signature is not valid") from None


def _check_times(claims: dict, *, max_lifetime: float | None) -> None:
    now = time.time()
    exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise Unauthorized("the token has no exp")
    if exp + CLOCK_SKEW < now:
        raise Unauthorized("the token has expired")
    if isinstance(nbf, (int, float)) and nbf - CLOCK_SKEW > now:
        raise Unauthorized("the token is not valid yet (nbf)")
    if max_lifetime is not None:
        if not isinstance(iat, (int, float)) or isinstance(iat, bool):
            raise Unauthorized("the token has no iat")
        if iat - CLOCK_SKEW > now:
            raise Unauthorized("the token was issued in the future: check the clock")
        if exp - iat > max_lifetime:
            raise Unauthorized(f"the token lives longer than {max_lifetime:.0f} s")


# --- EHRs calling the CDS Hooks services -------------------------------------------------------------

# CDS Hooks 2.0 "Trusting CDS Clients": clients sign with ES384 or RS384 (both MUST be supported by services).
CDS_JWT_ALGS = ("ES384", "RS384")


def cds_client_from_jwt(token: str | None, cfg: Config, *, audience: str, keys_for, remember) -> CdsIssuer:
    """The trusted EHR that signed this CDS Hooks JWT, or Unauthorized with the reason.

    CDS Hooks 2.0: `iss` a trusted issuer ([[cds.issuers]]), the signature by a key of its JWK Set (`kid`;
    a `jku` header must be the configured URL: the header must never send us to another key), `aud` the service
    endpoint being called (`audience`), `exp` and `iat` (at most 5 minutes apart), a `jti` used once
    (`remember(jti, issuer)` says False for a replay). `keys_for(issuer, kid)` gives the issuer's KeyRing."""
    cds = cfg.cds
    if not token or not _looks_like_jwt(token):
        raise Unauthorized("a JWT signed by a trusted EHR is required (CDS Hooks: Authorization: Bearer <JWT>)")
    try:
        claims, header = peek_claims(token), peek_header(token)
    except SealError:
        raise Unauthorized("the token is not a signed JWT") from None
    issuer = cds.issuer(claims.get("iss")) if cds else None
    if issuer is None:
        raise Unauthorized("the token's iss is not a trusted CDS client ([[cds.issuers]])")
    if "jku" in header and header["jku"] != issuer.jwks_url:
        raise Unauthorized("the token's jku is not the JWK Set configured for its issuer")
    verified = _verified_claims(token, header, CDS_JWT_ALGS, lambda kid: keys_for(issuer, kid),
                                what="the token", keys_of="the EHR's keys",
                                not_ours="not signed by a key of its issuer")
    _check_times(verified, max_lifetime=MAX_TOKEN_LIFETIME)
    aud = verified.get("aud")
    if audience not in (aud if isinstance(aud, list) else [aud]):
        raise Unauthorized(f"the token's aud must be the endpoint called, {audience}")
    jti = verified.get("jti")
    if not isinstance(jti, str) or not 8 <= len(jti) <= 150:
        raise Unauthorized("the token needs a unique jti (8 to 150 characters)")
    if not remember(jti, issuer):
        raise Unauthorized("this token was used before (a replay): sign a new one for each request")
    return issuer


def cds_keyring(cfg: Config, issuer: CdsIssuer, kid: object) -> KeyRing:
    """A trusted EHR's public keys: its JWK Set URL, cached (in memory and on disk), re-read on an unknown kid."""
    cache = cfg.data_dir / "jwks-cache" / f"cds-{hashlib.sha256(issuer.iss.encode()).hexdigest()[:16]}.jwks.json"
    return RemoteJwks.shared(issuer.jwks_url, cache, needs_encryption=False).keys(kid)


# --- staff --------------------------------------------------------------------------------------------

def reviewer_from_bearer(token: str | None, cfg: Config, *, audiences: tuple[str, ...], keys_for,
                         remember) -> Reviewer:
    """The reviewer behind a bearer token: a signed JWT (`reviewer_from_jwt`), or the static `api_token` of a
    reviewer that has one. Unauthorized otherwise."""
    if token and _looks_like_jwt(token):
        return reviewer_from_jwt(token, cfg, audiences=audiences, keys_for=keys_for, remember=remember)
    for r in cfg.reviewers.values():
        if r.api_token and token and _same(token, r.api_token):
            return r
    raise Unauthorized("a valid reviewer token is required: a JWT signed with your registered key "
                       "(`fhirbridge reviewer token`), as Authorization: Bearer ...")


def oauth_keyring(cfg: Config, kid: object) -> KeyRing:
    """The identity provider's public keys ([api.oauth]): its file, or its published set (cached, re-read on
    an unknown kid)."""
    oauth = cfg.oauth
    assert oauth is not None  # asked for only when [api.oauth] is configured
    if oauth.jwks is not None:
        return KeyRing.load(oauth.jwks)
    assert oauth.jwks_url is not None  # the loader requires jwks or jwks_url
    return RemoteJwks.shared(oauth.jwks_url, cfg.data_dir / "jwks-cache" / "oauth-issuer.jwks.json",
                             needs_encryption=False).keys(kid)


def staff_from_token(token: str, cfg: Config, *, oauth_keys=None) -> Staff:
    """The staff principal behind a bearer token, or Unauthorized. `oauth_keys(kid)` gives the identity
    provider's KeyRing when [api.oauth] is configured (default: `oauth_keyring`)."""
    oauth_keys = oauth_keys or (lambda kid: oauth_keyring(cfg, kid))
    for admin in cfg.api_tokens:
        if _same(token, admin):
            return Staff("api token", frozenset(STAFF_SCOPES), None)
    digest = hashlib.sha256(token.encode()).hexdigest()
    for key in cfg.api_keys:
        if _same(digest, key.sha256):
            return Staff(f"api key {key.name}", frozenset(key.scopes), frozenset(key.hospitals) or None)
    if cfg.oauth is not None and _looks_like_jwt(token):
        return _staff_from_oauth(token, cfg, oauth_keys)
    raise Unauthorized("a valid staff bearer token is required (Authorization: Bearer ...)")


def _staff_from_oauth(token: str, cfg: Config, oauth_keys) -> Staff:
    oauth = cfg.oauth
    assert oauth is not None  # staff_from_token calls this only with [api.oauth] configured
    try:
        header = peek_header(token)
    except SealError:
        raise Unauthorized("the access token is not a signed JWT") from None
    claims = _verified_claims(token, header, OAUTH_ALGS, oauth_keys, what="the access token",
                              keys_of="the identity provider's keys",
                              not_ours="not signed by a key of the configured issuer")
    if str(claims.get("iss", "")).rstrip("/") != oauth.issuer:
        raise Unauthorized("the access token is from another issuer")
    aud = claims.get("aud")
    if oauth.audience not in (aud if isinstance(aud, list) else [aud]):
        raise Unauthorized("the access token is not meant for fhirbridge (aud)")
    _check_times(claims, max_lifetime=None)
    raw = claims.get(oauth.scope_claim)
    scopes = raw.split() if isinstance(raw, str) else [s for s in raw if isinstance(s, str)] \
        if isinstance(raw, list) else []
    return Staff(f"oauth {str(claims.get('sub', '?'))[:80]}", frozenset(s for s in scopes if s in STAFF_SCOPES),
                 None, expires=float(claims["exp"]))


# --- page sessions -----------------------------------------------------------------------------------

def _fingerprint(digest: str, secret: bytes) -> str:
    """A credential's fingerprint in a session: keyed with the session secret, so the (readable, signed)
    cookie gives nothing to guess the credential offline from. `digest` is the credential's SHA-256, which is
    all the configuration holds of an API key."""
    return hmac.new(secret, f"fhirbridge/staff-session/{digest}".encode(), hashlib.sha256).hexdigest()


def session_grant(token: str, staff: Staff, cfg: Config, secret: bytes, *, lifetime: float) -> dict:
    """What a page session keeps about the credential that signed in (`staff`, just checked from `token`):
    its kind, a fingerprint, a session id for revocation, and until when it holds (`lifetime` seconds, never
    past an OAuth token's exp)."""
    now = time.time()
    grant: dict = {"sid": secrets.token_urlsafe(18), "name": staff.name,
                   "fp": _fingerprint(hashlib.sha256(token.encode()).hexdigest(), secret),
                   "until": now + lifetime if staff.expires is None else min(now + lifetime, staff.expires)}
    if any(_same(token, admin) for admin in cfg.api_tokens):
        grant["kind"] = "admin"
    elif staff.expires is None:
        grant["kind"] = "key"
    else:
        oauth = cfg.oauth
        assert oauth is not None  # an expiring Staff comes only from [api.oauth]
        grant.update(kind="oauth", iss=oauth.issuer, aud=oauth.audience, scopes=sorted(staff.scopes),
                     kid=peek_header(token).get("kid"))
    return grant


def staff_from_session(grant: object, cfg: Config, secret: bytes, *, oauth_keys=None) -> Staff:
    """The staff principal of a page session, re-checked against the configuration in force, or Unauthorized.

    The credential itself is not in the session, so what is re-checked is what can change without it: an
    admin token or API key must still be configured (rotation or removal ends its sessions; a key's scopes
    and hospitals are read anew); an OAuth session holds until its token's exp, while the same issuer and
    audience are configured and the issuer still publishes the key that signed the token."""
    if not isinstance(grant, dict) or not isinstance(grant.get("fp"), str) or not isinstance(grant.get("sid"), str):
        raise Unauthorized("no sign-in")
    until = grant.get("until")
    if not isinstance(until, (int, float)) or until <= time.time():
        raise Unauthorized("your sign-in has expired: sign in again")
    fp, kind = grant["fp"], grant.get("kind")
    if kind == "admin":
        if any(_same(fp, _fingerprint(hashlib.sha256(t.encode()).hexdigest(), secret)) for t in cfg.api_tokens):
            return Staff("api token", frozenset(STAFF_SCOPES), None)
    elif kind == "key":
        for key in cfg.api_keys:
            if _same(fp, _fingerprint(key.sha256, secret)):
                return Staff(f"api key {key.name}", frozenset(key.scopes), frozenset(key.hospitals) or None)
    elif kind == "oauth" and cfg.oauth is not None and grant.get("iss") == cfg.oauth.issuer \
            and grant.get("aud") == cfg.oauth.audience:
        kid = grant.get("kid")
        oauth_keys = oauth_keys or (lambda k: oauth_keyring(cfg, k))
        try:
            known = isinstance(kid, str) and oauth_keys(kid).verification_key(kid) is not None
        except (ConfigError, SealError):
            known = False
        if known:
            scopes = grant.get("scopes")
            return Staff(str(grant.get("name", "oauth"))[:90],
                         frozenset(s for s in scopes if s in STAFF_SCOPES) if isinstance(scopes, list) else frozenset(),
                         None, expires=float(until))
    raise Unauthorized("the credentials you signed in with are no longer valid here: sign in again")
