"""Configuration: one TOML file plus environment overrides.

The file is found at `--config`, else `$FHIRBRIDGE_CONFIG`, else `./fhirbridge.toml`. Any key can be
overridden from the environment as `FHIRBRIDGE_<SECTION>__<KEY>` (double underscore between levels,
case-insensitive), e.g. `FHIRBRIDGE_HOSPITAL__FHIR_BASE_URL` or `FHIRBRIDGE_HOSPITAL__AUTH__TOKEN`; that
is how secrets stay out of the file. Reviewer entries are addressed by name:
`FHIRBRIDGE_REVIEWERS__SPINE_CENTER__TRANSPORT__URL`.

Every problem is reported as one `ConfigError` naming the file and the dotted key. Unknown keys are
errors too: a misspelt `fhir_base_ur1` silently ignored would send a hospital's data somewhere else.
"""
from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fhirbridge.config.mappings import ehr_profile_names
from fhirbridge.config.model import (
    DEFAULT_FILE,
    ENV_PREFIX,
    PACKAGE_MAPPINGS,
    STAFF_SCOPES,
    ApiKey,
    AuditSettings,
    Auth,
    CdsIssuer,
    CdsSettings,
    Config,
    EhrSettings,
    Hospital,
    Http,
    MetricsSettings,
    OAuthSettings,
    OutcomeSettings,
    Pacs,
    PhysicianApp,
    Reviewer,
    ServiceTimes,
    Transport,
    env_name,
)
from fhirbridge.crypto import certs, urls
from fhirbridge.crypto.keys import KeyRing, mixed_generations
from fhirbridge.errors import ConfigError, SealError

# --- loading -----------------------------------------------------------------------------------

def find_config_file(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_PREFIX + "CONFIG")
    if env:
        return Path(env)
    return Path.cwd() / DEFAULT_FILE


def load(path: str | os.PathLike | None = None, *, environ: Mapping[str, str] | None = None,
         check_files: bool = False) -> Config:
    """Load and check the configuration. With `check_files=True` the key files it names are checked too
    (see `check_files`) and the first problem is raised; by default they are not opened here."""
    file = find_config_file(path)
    environ = os.environ if environ is None else environ
    if not file.exists():
        raise ConfigError("file not found; create one with `fhirbridge init DIR` or set FHIRBRIDGE_CONFIG",
                          file=str(file))
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(file)) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text (TOML files must be UTF-8)", file=str(file)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(file)) from None
    apply_env_overrides(raw, environ, file)
    cfg = _build(raw, file)
    if check_files:
        problems = _file_problems(cfg)
        if problems:
            raise problems[0]
    return cfg


def check_files(cfg: Config) -> list[str]:
    """Problems with the key files the configuration names, one message each (empty: all good).

    Each reviewer's `jwks` must be a PUBLIC key set with at least one encryption key (to seal packages to)
    and one verification key (to check its opinions); the hospital's `keys` a private set that can sign
    and decrypt. Kept apart from `load` so a run can report these and still do the work they do not block.
    """
    return [str(p) for p in _file_problems(cfg)]


def _file_problems(cfg: Config) -> list[ConfigError]:
    # Imported here: reading the configuration alone needs no cryptography.
    file = str(cfg.file) if cfg.file else None
    problems: list[ConfigError] = []

    def ring(path: Path, key: str) -> KeyRing | None:
        try:
            return KeyRing.load(path)
        except ConfigError as exc:
            problems.append(ConfigError(f"{path}: {exc.detail}", file=file, key=key))
            return None

    for i, r in enumerate(cfg.reviewers.values()):
        key = f"reviewers[{i}].jwks"
        if r.jwks is None:
            continue  # published at jwks_url: fetched and checked when first needed
        kr = ring(r.jwks, key)
        if kr is None:
            continue
        if kr.has_private:
            problems.append(ConfigError(f"{r.jwks} holds private keys; a reviewer's jwks must be its PUBLIC key "
                                        "set (and its private keys should never have left the reviewer)",
                                        file=file, key=key))
        if (mixed := mixed_generations(kr)) is not None:
            problems.append(ConfigError(f"{r.jwks} {mixed}", file=file, key=key))
        if not kr.encryption_keys():
            problems.append(ConfigError(f"{r.jwks} has no encryption key: packages for {r.name} cannot be "
                                        "sealed", file=file, key=key))
        if not any(kr.verification_key(kid) for kid in kr.kids):
            problems.append(ConfigError(f"{r.jwks} has no signature verification key: opinions from {r.name} "
                                        "cannot be verified", file=file, key=key))
    for i, h in enumerate(cfg.hospitals.values()):
        key = "hospital.keys" if len(cfg.hospitals) == 1 else f"hospitals[{i}].keys"
        kr = ring(h.keys, key)
        if kr is None:
            continue
        if not kr.has_private:
            problems.append(ConfigError(f"{h.keys} holds only public keys; the hospital needs its "
                                        "private key set (made by `fhirbridge init`)", file=file, key=key))
            continue
        if not any(kr.decryption_key(kid) for kid in kr.kids):
            problems.append(ConfigError(f"{h.keys} has no private encryption key: opinions "
                                        "could not be decrypted", file=file, key=key))
        try:
            signing = kr.signing_key()
        except SealError:
            problems.append(ConfigError(f"{h.keys} has no private signing key: packages could "
                                        "not be signed", file=file, key=key))
            continue
        if h.certificate_chain is not None:
            chain_key = key.removesuffix(".keys") + ".certificate_chain"
            try:
                certs.load_x5c(h.certificate_chain, signing.public_key)
            except ConfigError as exc:
                problems.append(ConfigError(f"{h.certificate_chain}: {exc.detail}", file=file, key=chain_key))
    for i, h in enumerate(cfg.hospitals.values()):
        if h.auth.type == "smart":
            problems += _smart_key_problems(h, "hospital.auth" if len(cfg.hospitals) == 1 else f"hospitals[{i}].auth",
                                            file)
    return problems


def _smart_key_problems(h: Hospital, prefix: str, file: str | None) -> list[ConfigError]:
    """The SMART client assertion needs a private signing key that fits `alg` (RS384: RSA, ES384: EC P-384)."""
    key_name = f"{prefix}.keys"
    assert h.auth.keys is not None  # smart auth: the loader defaults it to the hospital's keys
    try:
        signing = KeyRing.load(h.auth.keys).signing_key()
    except ConfigError as exc:
        return [ConfigError(f"{h.auth.keys}: {exc.detail}", file=file, key=key_name)]
    except SealError:
        return [ConfigError(f"{h.auth.keys} has no private signing key for the SMART client assertion",
                            file=file, key=key_name)]
    alg = h.auth.alg or ("RS384" if signing.key_type == "RSA" else "ES384")
    if alg == "RS384" and signing.key_type != "RSA":
        return [ConfigError(f"{h.auth.keys}: alg RS384 needs an RSA signing key", file=file, key=f"{prefix}.alg")]
    if alg == "ES384" and (signing.key_type != "EC" or signing.as_dict(private=False).get("crv") != "P-384"):
        return [ConfigError(f"{h.auth.keys}: alg ES384 needs an EC P-384 signing key", file=file,
                            key=f"{prefix}.alg")]
    return []


def apply_env_overrides(raw: dict, environ: Mapping[str, str], file: Path) -> None:
    """Overlay FHIRBRIDGE_A__B__C=value onto raw["a"]["b"]["c"]. Entries of [[reviewers]] and [[hospitals]]
    are addressed by name, written as an env name: lower case, anything but letters and digits as "_"
    (reviewer "spine-center" -> FHIRBRIDGE_REVIEWERS__SPINE_CENTER__..)."""
    for name, value in environ.items():
        if not name.upper().startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        node: Any = raw
        if parts[0] in LIST_SECTIONS and len(parts) >= 3:
            match = [r for r in raw.get(parts[0], []) if isinstance(r, dict) and env_name(r.get("name")) == parts[1]]
            if not match:
                raise ConfigError(f"environment variable {name} names {LIST_SECTIONS[parts[0]]} {parts[1]!r}, which "
                                  "the file does not define", file=str(file), key=parts[0])
            node, parts = match[0], parts[2:]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name} overrides a non-table value", file=str(file),
                                  key=".".join(parts))
        # Kept as text: the reader converts it to the type the key needs (a digits-only token stays text).
        node[parts[-1]] = EnvValue(value, name)


LIST_SECTIONS = {"reviewers": "reviewer", "hospitals": "hospital"}


class EnvValue(str):
    """A value that came from the environment: text, converted when its key wants a number or boolean.
    `var` is the variable's name, so that a value of the wrong type names where it came from."""

    var: str

    def __new__(cls, value: str, var: str = "") -> EnvValue:
        self = super().__new__(cls, value)
        self.var = var
        return self


# How a type is named to the operator (not `int`, `float`, `EnvValue`).
_TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text", list: "a list",
               dict: "a table"}


def _type_words(typ: type | tuple) -> str:
    """`a whole number (int)`: the words, and TOML's and Python's name of the type for those who look it up."""
    types = typ if isinstance(typ, tuple) else (typ,)
    return " or ".join(f"{_TYPE_WORDS.get(t, t.__name__)} ({t.__name__})" for t in types)


def _from_env(value: EnvValue, typ: type | tuple) -> Any:
    types = typ if isinstance(typ, tuple) else (typ,)
    if str in types:
        return str(value)
    if list in types:  # FHIRBRIDGE_API__TOKENS="a,b"
        return [v.strip() for v in value.split(",") if v.strip()]
    if bool in types and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    for t in (int, float):
        if t in types:
            try:
                return t(value)
            except ValueError:
                pass
    return value


class _Section:
    """Reads typed keys out of one TOML table, remembering which were used to flag unknown ones."""

    def __init__(self, data: Any, file: Path, prefix: str):
        if not isinstance(data, dict):
            raise ConfigError("must be a table", file=str(file), key=prefix or None)
        self.data, self.file, self.prefix = data, file, prefix
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def err(self, name: str, message: str) -> ConfigError:
        return ConfigError(message, file=str(self.file), key=self.key(name))

    def get(self, name: str, typ: type | tuple, default: Any = None, *, required: bool = False) -> Any:
        self.used.add(name)
        if name not in self.data:
            if required:
                raise self.err(name, "is required")
            return default
        value = raw = self.data[name]
        if isinstance(value, EnvValue):
            value = _from_env(value, typ)
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            if isinstance(raw, EnvValue):
                # The environment holds only text: say which variable, and what it held.
                raise self.err(name, f"must be {_type_words(typ)}, but {raw.var}={str(raw)!r} is not")
            got = _TYPE_WORDS.get(type(value), type(value).__name__)
            # The value is quoted only where the key wants no text: a key that wants text may be a secret.
            wants_text = str in (typ if isinstance(typ, tuple) else (typ,))
            shown = "" if wants_text or isinstance(value, (dict, list)) else f" {value!r}"
            raise self.err(name, f"must be {_type_words(typ)}, got {got}{shown}")
        if isinstance(value, float) and not math.isfinite(value):
            # TOML allows nan and inf, and float() parses them from the environment; a nan timeout compares
            # false with everything (so passes "> 0") and an infinite one never times out.
            raise self.err(name, f"must be a finite number, got {value}")
        if isinstance(value, str) and required and not value.strip():
            raise self.err(name, "must not be empty")
        return value

    def sub(self, name: str) -> _Section:
        self.used.add(name)
        return _Section(self.data.get(name, {}), self.file, self.key(name))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.err(unknown[0], "unknown key (check the spelling; see `fhirbridge init` for a commented "
                                       "example)")


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _positive(sec: _Section, name: str, typ: type, default: Any) -> Any:
    value = sec.get(name, typ, default)
    if value <= 0:
        raise sec.err(name, "must be greater than 0")
    return value


def _non_negative(sec: _Section, name: str, default: int) -> int:
    value = sec.get(name, int, default)
    if value < 0:
        raise sec.err(name, "must be 0 or more")
    return value


def _build(raw: dict, file: Path) -> Config:
    base = file.resolve().parent
    top = _Section(raw, file, "")
    fb = top.sub("fhirbridge")
    data_dir = _path(base, fb.get("data_dir", str, "var"))
    store_url = fb.get("store_url", str, "") or f"sqlite:///{data_dir / 'fhirbridge.db'}"
    if not store_url.startswith(("sqlite:", "postgresql")):
        raise fb.err("store_url", "must be a sqlite:/// or postgresql+psycopg:// URL")
    mappings_value = fb.get("mappings_dir", str, "")
    mappings_dir = _path(base, mappings_value) if mappings_value else PACKAGE_MAPPINGS
    if not (mappings_dir / "collect").is_dir():
        raise fb.err("mappings_dir", f"{mappings_dir} has no collect/ folder of profiles")
    inline_limit = _positive(fb, "inline_attachment_limit", int, 256 * 1024)
    max_att = _positive(fb, "max_attachment_bytes", int, 512 * 1024 * 1024)
    lifetime = _positive(fb, "package_lifetime_days", int, 30)
    inbox = _path(base, fb.get("inbox", str, "var/inbox"))
    fb.finish()

    hospitals = _hospitals(top, base, file)
    known_ehr = ehr_profile_names(mappings_dir)
    for i, h in enumerate(hospitals.values()):
        if h.ehr.profile != "auto" and h.ehr.profile not in known_ehr:
            where = "hospital" if "hospitals" not in top.data else f"hospitals[{i}]"
            raise ConfigError(f"no EHR profile {h.ehr.profile!r} in mappings/ehr/ (known: auto, "
                              f"{', '.join(known_ehr)})", file=str(file), key=f"{where}.ehr.profile")
    reviewers = _reviewers(top, base, file)
    svc = top.sub("service")
    lease = svc.get("lease_seconds", float, None)
    if lease is not None and lease <= 0:
        raise svc.err("lease_seconds", "must be greater than 0")
    service = ServiceTimes(**{k: _positive(svc, k, float, getattr(ServiceTimes, k))
                              for k in ("poll_seconds", "work_seconds", "inbox_seconds", "overdue_seconds",
                                        "outcomes_seconds")},
                           lease_seconds=lease)
    public_url = svc.get("public_url", str, None)
    if public_url and not public_url.startswith(("http://", "https://")):
        raise svc.err("public_url", "must be the http(s) URL at which the EHR reaches this service")
    pulling = [r.name for r in reviewers.values() if r.transport.type == "pull"]
    if pulling and not public_url:
        # The audience a reviewer's API token must name is <public_url>/reviewer. Taken from a request's Host
        # header instead, a token minted for another service would be accepted here (RFC 7519 §4.1.3).
        raise svc.err("public_url", f"is required: reviewer {pulling[0]!r} uses transport \"pull\", whose "
                                    "tokens must name <public_url>/reviewer as their audience")
    svc.finish()
    api = top.sub("api")
    tokens = api.get("tokens", list, [])
    if not all(isinstance(t, str) and len(t) >= 16 for t in tokens):
        raise api.err("tokens", "must be a list of tokens of at least 16 characters (FHIRBRIDGE_API__TOKENS=a,b)")
    api_keys = _api_keys(api, file, hospitals)
    oauth = _oauth(api, base)
    api.finish()
    routing = top.sub("routing")
    default_reviewer = routing.get("default_reviewer", str, None)
    if default_reviewer and default_reviewer not in reviewers:
        raise routing.err("default_reviewer", f"names {default_reviewer!r}, which is not in [[reviewers]]")
    routing.finish()
    audit_sec = top.sub("audit")
    audit = AuditSettings(write_to_ehr=audit_sec.get("write_to_ehr", bool, False))
    audit_sec.finish()
    metrics = _metrics(top.sub("metrics"))
    outcomes_sec = top.sub("outcomes")
    outcome_settings = OutcomeSettings(window_days=_positive(outcomes_sec, "window_days", float,
                                                             OutcomeSettings.window_days))
    outcomes_sec.finish()
    physician_app = _physician_app(top, hospitals)
    cds = _cds(top, hospitals, public_url)
    top.finish()
    return Config(file=file, base_dir=base, data_dir=data_dir, store_url=store_url, mappings_dir=mappings_dir,
                  inbox=inbox, hospitals=hospitals, reviewers=reviewers, default_reviewer=default_reviewer,
                  inline_attachment_limit=inline_limit, max_attachment_bytes=max_att,
                  package_lifetime_days=lifetime, service=service, api_tokens=tuple(tokens),
                  public_url=public_url.rstrip("/") if public_url else None, audit=audit,
                  api_keys=api_keys, oauth=oauth, metrics=metrics, physician_app=physician_app,
                  outcomes=outcome_settings, cds=cds)


def _api_keys(api: _Section, file: Path, hospitals: dict) -> tuple[ApiKey, ...]:
    api.used.add("keys")
    items = api.data.get("keys", [])
    if not isinstance(items, list):
        raise api.err("keys", "must be an array of tables ([[api.keys]])")
    out: list[ApiKey] = []
    for i, item in enumerate(items):
        sec = _Section(item, file, f"api.keys[{i}]")
        name = sec.get("name", str, required=True)
        digest = sec.get("sha256", str, required=True).lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise sec.err("sha256", "must be the 64 hex digits of the key's SHA-256 (`fhirbridge keys api-key`)")
        scopes = sec.get("scopes", list, required=True)
        bad = [x for x in scopes if x not in STAFF_SCOPES]
        if not scopes or bad:
            raise sec.err("scopes", f"{bad[0]!r} is not a scope; use some of {', '.join(STAFF_SCOPES)}" if bad
                          else f"name at least one of {', '.join(STAFF_SCOPES)}")
        names = sec.get("hospitals", list, [])
        unknown = [h for h in names if h not in hospitals]
        if unknown:
            raise sec.err("hospitals", f"{unknown[0]!r} is not a configured hospital")
        if any(k.name == name for k in out) or any(k.sha256 == digest for k in out):
            raise sec.err("name", "two API keys share a name or a key")
        out.append(ApiKey(name=name, sha256=digest, scopes=tuple(dict.fromkeys(scopes)), hospitals=tuple(names)))
        sec.finish()
    return tuple(out)


def _oauth(api: _Section, base: Path) -> OAuthSettings | None:
    if "oauth" not in api.data:
        return None
    sec = api.sub("oauth")
    issuer = sec.get("issuer", str, required=True)
    audience = sec.get("audience", str, required=True)
    jwks = sec.get("jwks", str, None)
    jwks_url = sec.get("jwks_url", str, None)
    if (jwks is None) == (jwks_url is None):
        raise sec.err("jwks", "set exactly one of jwks (a file with the issuer's public keys) and jwks_url")
    if jwks_url is not None and not urls.is_https_or_loopback(jwks_url):
        raise sec.err("jwks_url", "must be an https:// URL (plain http only to 127.0.0.1 / localhost, for tests)")
    claim = sec.get("scope_claim", str, "scope")
    sec.finish()
    return OAuthSettings(issuer=issuer.rstrip("/"), audience=audience, jwks=_path(base, jwks) if jwks else None,
                         jwks_url=jwks_url, scope_claim=claim)


def _metrics(sec: _Section) -> MetricsSettings:
    token = sec.get("token", str, None)
    if token is not None and len(token) < 16:
        raise sec.err("token", "must be at least 16 characters (FHIRBRIDGE_METRICS__TOKEN)")
    unauthenticated = sec.get("unauthenticated", bool, False)
    if token and unauthenticated:
        raise sec.err("unauthenticated", "contradicts token: say either, not both")
    settings = MetricsSettings(enabled=sec.get("enabled", bool, True), token=token, unauthenticated=unauthenticated)
    sec.finish()
    return settings


def _physician_app(top: _Section, hospitals: dict[str, Hospital]) -> PhysicianApp | None:
    if "physician_app" not in top.data:
        return None
    sec = top.sub("physician_app")
    client_id = sec.get("client_id", str, required=True).strip()
    scope = " ".join(s for s in sec.get("scope", str, PhysicianApp.scope).split() if s != "launch")
    sec.used.add("issuers")
    items = sec.data.get("issuers", [])
    if not isinstance(items, list):
        raise sec.err("issuers", "must be an array of tables ([[physician_app.issuers]] url = ..., hospital = ...)")
    issuers = []
    for i, item in enumerate(items):
        it = _Section(item, sec.file, f"physician_app.issuers[{i}]")
        url = it.get("url", str, required=True).rstrip("/")
        # The issuer is where tokens and the launch context come from: a typo here must not let another
        # server launch the app, and plain http only on loopback (tests).
        if not urls.is_https_or_loopback(url):
            raise it.err("url", "must be the https:// FHIR base URL of the EHR that launches the app")
        name = it.get("hospital", str, None)
        if name is None and len(hospitals) == 1:
            name = next(iter(hospitals))
        if name not in hospitals:
            raise it.err("hospital", f"must name a configured hospital ({', '.join(hospitals)})")
        it.finish()
        issuers.append((url, name))
    sec.finish()
    return PhysicianApp(client_id=client_id, issuers=tuple(issuers), scope=scope)


def _cds(top: _Section, hospitals: dict[str, Hospital], public_url: str | None) -> CdsSettings | None:
    if "cds" not in top.data:
        return None
    sec = top.sub("cds")
    enabled = sec.get("enabled", bool, True)
    budget = _positive(sec, "time_budget_ms", int, CdsSettings.time_budget_ms)
    sec.used.add("issuers")
    items = sec.data.get("issuers", [])
    if not isinstance(items, list):
        raise sec.err("issuers", "must be an array of tables ([[cds.issuers]] iss, jwks_url, hospital)")
    issuers: list[CdsIssuer] = []
    for i, item in enumerate(items):
        it = _Section(item, sec.file, f"cds.issuers[{i}]")
        iss = it.get("iss", str, required=True).strip().rstrip("/")
        jwks_url = it.get("jwks_url", str, required=True).strip()
        # The keys that decide who may ask for cards and create orders: fetched over TLS only (http on
        # loopback for tests).
        if not urls.is_https_or_loopback(jwks_url):
            raise it.err("jwks_url", "must be the https:// URL of the EHR's JWK Set")
        name = it.get("hospital", str, None)
        if name is None and len(hospitals) == 1:
            name = next(iter(hospitals))
        if name not in hospitals:
            raise it.err("hospital", f"must name a configured hospital ({', '.join(hospitals)})")
        if not iss or any(o.iss == iss for o in issuers):
            raise it.err("iss", "must be set, once per issuer")
        it.finish()
        issuers.append(CdsIssuer(iss=iss, jwks_url=jwks_url, hospital=name))
    if enabled and not public_url:
        # CDS Hooks: a JWT's aud is the service endpoint being called. Taken from the request's Host header,
        # a token minted for another service would be accepted here.
        raise sec.err("enabled", "needs [service] public_url: the EHR's JWTs must name <public_url>/cds-services/<id> "
                                 "as their audience")
    if enabled and not issuers:
        raise sec.err("issuers", "name at least one EHR ([[cds.issuers]]): without one every call is refused")
    sec.finish()
    return CdsSettings(enabled=enabled, issuers=tuple(issuers), time_budget_ms=budget)


def _hospitals(top: _Section, base: Path, file: Path) -> dict[str, Hospital]:
    """One `[hospital]` table, or several `[[hospitals]]` served by one deployment."""
    if "hospital" in top.data and "hospitals" in top.data:
        raise ConfigError("use either [hospital] or [[hospitals]], not both", file=str(file), key="hospitals")
    if "hospitals" not in top.data:
        h = _hospital(top.sub("hospital"), base)
        return {h.name: h}
    top.used.add("hospitals")
    items = top.data["hospitals"]
    if not isinstance(items, list) or not items:
        raise ConfigError("must be a non-empty array of tables ([[hospitals]])", file=str(file), key="hospitals")
    out: dict[str, Hospital] = {}
    for i, item in enumerate(items):
        h = _hospital(_Section(item, file, f"hospitals[{i}]"), base)
        if h.name in out:
            raise ConfigError(f"hospital {h.name!r} is defined twice", file=str(file), key=f"hospitals[{i}].name")
        if any(o.key == h.key for o in out.values()):
            raise ConfigError("two hospitals share one organisation identifier", file=str(file),
                              key=f"hospitals[{i}].identifier")
        if any(o.fhir_base_url == h.fhir_base_url for o in out.values()):
            # Both would poll the same EHR and each order would be sent twice, once signed by the wrong hospital.
            raise ConfigError("two hospitals share one EHR (fhir_base_url): one [[hospitals]] entry per EHR",
                              file=str(file), key=f"hospitals[{i}].fhir_base_url")
        _unique_env_name(h.name, [o.name for o in out.values()], file, f"hospitals[{i}].name")
        out[h.name] = h
    return out


def _unique_env_name(name: str, others: list[str], file: Path, key: str) -> None:
    """Names are addressed in environment variables and URLs by their env form: it must be unique and
    must not contain the "__" that separates levels."""
    en = env_name(name)
    if "__" in en or not en.strip("_"):
        raise ConfigError(f"{name!r} cannot be addressed from the environment ({en!r}): use letters, digits and "
                          "single separators", file=str(file), key=key)
    if any(env_name(o) == en for o in others):
        raise ConfigError(f"{name!r} and another name both become {en!r} in environment variables and URLs",
                          file=str(file), key=key)


SMART_KEYS = ("client_id", "keys", "token_url", "scopes", "alg")


def _smart_auth(sec: _Section, auth_type: str, base: Path, hospital_keys: Path, fhir_base_url: str) -> dict:
    """The SMART Backend Services keys of [hospital.auth] (an error when set for another auth type)."""
    if auth_type != "smart":
        for name in SMART_KEYS:
            if name in sec.data:
                raise sec.err(name, f"only used with type = \"smart\" (type is {auth_type!r})")
        return {}
    client_id = sec.get("client_id", str)
    if not client_id or not client_id.strip():
        raise sec.err("client_id", "smart auth needs the client_id the EHR registered for fhirbridge")
    keys_value = sec.get("keys", str, None)
    token_url = sec.get("token_url", str, None)
    if token_url is not None and (not token_url.startswith(("http://", "https://")) or not _hostname(token_url)):
        raise sec.err("token_url", "must be the http(s) URL of the EHR's OAuth token endpoint")
    if token_url is not None:
        # The signed client assertion goes there and the access token comes back (issue 13, S11).
        urls.https_or_loopback(token_url, sec.key("token_url"), file=str(sec.file))
    raw_scopes = sec.get("scopes", (str, list), None)
    scopes = None
    if raw_scopes is not None:
        items = raw_scopes.split() if isinstance(raw_scopes, str) else raw_scopes
        if not items or not all(isinstance(x, str) and x.strip() and " " not in x.strip() for x in items):
            raise sec.err("scopes", "must be a non-empty list of SMART scopes (or one space-separated string)")
        scopes = tuple(x.strip() for x in items)
    alg = sec.get("alg", str, None)
    if alg is not None and alg not in ("RS384", "ES384"):
        raise sec.err("alg", f"{alg!r} is not one of RS384, ES384")
    return {"client_id": client_id.strip(), "keys": _path(base, keys_value) if keys_value else hospital_keys,
            "token_url": token_url.rstrip("/") if token_url else None, "scopes": scopes, "alg": alg,
            "fhir_base_url": fhir_base_url}


def _hospital(sec: _Section, base: Path) -> Hospital:
    url = sec.get("fhir_base_url", str, required=True).rstrip("/")
    if not url.startswith(("http://", "https://")) or not _hostname(url):
        raise sec.err("fhir_base_url", "must start with http:// or https:// and name a host")
    # Every patient record comes from there and the credentials go there (issue 13, S11). allow_plain_http
    # is for a demo EHR on a container network only (deploy/compose.yaml's demo-ehr); `doctor` still warns.
    if not sec.get("allow_plain_http", bool, False):
        urls.https_or_loopback(url, sec.key("fhir_base_url"), file=str(sec.file))
    keys = _path(base, sec.get("keys", str, required=True))
    chain = sec.get("certificate_chain", str)
    auth_sec = sec.sub("auth")
    auth_type = auth_sec.get("type", str, "none")
    if auth_type not in ("none", "basic", "bearer", "smart"):
        raise auth_sec.err("type", f"{auth_type!r} is not one of none, basic, bearer, smart")
    auth = Auth(type=auth_type, username=auth_sec.get("username", str), password=auth_sec.get("password", str),
                token=auth_sec.get("token", str), **_smart_auth(auth_sec, auth_type, base, keys, url))
    if auth_type == "basic" and not (auth.username and auth.password):
        raise auth_sec.err("password", "basic auth needs username and password "
                                       "(set the password with FHIRBRIDGE_HOSPITAL__AUTH__PASSWORD)")
    if auth_type == "bearer" and not auth.token:
        raise auth_sec.err("token", "bearer auth needs a token (FHIRBRIDGE_HOSPITAL__AUTH__TOKEN)")
    auth_sec.finish()
    http_sec = sec.sub("http")
    http = Http(timeout_connect=_positive(http_sec, "timeout_connect", float, 5.0),
                timeout_read=_positive(http_sec, "timeout_read", float, 30.0),
                retries=_non_negative(http_sec, "retries", 4),
                max_retry_after=_positive(http_sec, "max_retry_after", float, 30.0),
                page_size=_positive(http_sec, "page_size", int, 100))
    http_sec.finish()
    ehr_sec = sec.sub("ehr")
    ehr = EhrSettings(profile=ehr_sec.get("profile", str, "auto"),
                      pins={k: v for k, v in ehr_sec.data.items() if k != "profile"})
    time_zone = sec.get("time_zone", str, "UTC")
    try:
        ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise sec.err("time_zone", f"{time_zone!r} is not an IANA time zone (e.g. \"Europe/Berlin\")") from None
    pacs = _pacs(sec, base, keys, url) if "pacs" in sec.data else None
    if pacs is not None and pacs.auth.type == "smart" and auth_type != "smart":
        raise sec.err("pacs.auth.type", "\"smart\" sends the EHR's SMART token, but [hospital.auth] type is "
                                        f"{auth_type!r}")
    ident = sec.sub("identifier")
    hospital = Hospital(name=sec.get("name", str, required=True),
                        identifier_system=ident.get("system", str, required=True),
                        identifier_value=ident.get("value", str, required=True),
                        fhir_base_url=url, keys=keys, auth=auth, http=http,
                        certificate_chain=_path(base, chain) if chain else None, ehr=ehr,
                        time_zone=time_zone, pacs=pacs)
    ident.finish()
    sec.finish()
    return hospital


def _pacs(sec: _Section, base: Path, hospital_keys: Path, fhir_base_url: str) -> Pacs:
    """`[hospital.pacs]` (issue 15): the DICOMweb base and how to authenticate there. Images and credentials go
    over it, so https (plain http to loopback only), as for the EHR."""
    pacs_sec = sec.sub("pacs")
    url = pacs_sec.get("url", str, None)
    if url is not None:
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")) or not _hostname(url):
            raise pacs_sec.err("url", "must be the http(s) DICOMweb base URL of the PACS")
        urls.https_or_loopback(url, pacs_sec.key("url"), file=str(pacs_sec.file))
    auth_sec = pacs_sec.sub("auth")
    auth_type = auth_sec.get("type", str, "none")
    if auth_type not in ("none", "basic", "bearer", "smart"):
        raise auth_sec.err("type", f"{auth_type!r} is not one of none, basic, bearer, smart (the EHR's token)")
    auth = Auth(type=auth_type, username=auth_sec.get("username", str), password=auth_sec.get("password", str),
                token=auth_sec.get("token", str))
    if auth_type == "basic" and not (auth.username and auth.password):
        raise auth_sec.err("password", "basic auth needs username and password "
                                       "(set the password with FHIRBRIDGE_HOSPITAL__PACS__AUTH__PASSWORD)")
    if auth_type == "bearer" and not auth.token:
        raise auth_sec.err("token", "bearer auth needs a token (FHIRBRIDGE_HOSPITAL__PACS__AUTH__TOKEN)")
    auth_sec.finish()
    pacs = Pacs(url=url, auth=auth, timeout_connect=_positive(pacs_sec, "timeout_connect", float, 5.0),
                timeout_read=_positive(pacs_sec, "timeout_read", float, 60.0),
                retries=_non_negative(pacs_sec, "retries", 4),
                parallel_series=_positive(pacs_sec, "parallel_series", int, 2))
    pacs_sec.finish()
    return pacs


def _hostname(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return None


def _reviewer_jwks(sec: _Section, base: Path) -> Path | None:
    path, url = sec.get("jwks", str, None), sec.data.get("jwks_url")
    if (path is None) == (url is None):
        raise sec.err("jwks", "set exactly one of jwks (a file with the reviewer's public keys) and jwks_url "
                              "(where the reviewer publishes them)")
    if url is not None and not (isinstance(url, str) and urls.is_https_or_loopback(url)):
        raise sec.err("jwks_url", "must be an https:// URL (plain http only to 127.0.0.1 / localhost, for tests)")
    return _path(base, path) if path is not None else None


def _reviewers(top: _Section, base: Path, file: Path) -> dict[str, Reviewer]:
    top.used.add("reviewers")
    items = top.data.get("reviewers", [])
    if not isinstance(items, list):
        raise ConfigError("must be an array of tables ([[reviewers]])", file=str(file), key="reviewers")
    out: dict[str, Reviewer] = {}
    for i, item in enumerate(items):
        sec = _Section(item, file, f"reviewers[{i}]")
        name = sec.get("name", str, required=True)
        if name in out:
            raise sec.err("name", f"reviewer {name!r} is defined twice")
        ident = sec.sub("identifier")
        t = sec.sub("transport")
        ttype = t.get("type", str, "outbox")
        if ttype == "outbox":
            transport = Transport("outbox", path=_path(base, t.get("path", str, f"var/outbox/{name}")))
        elif ttype == "https":
            url = t.get("url", str, required=True)
            if not urls.is_https_or_loopback(url):
                raise t.err("url", "must be an https:// URL (plain http only to 127.0.0.1 / localhost, for tests)")
            transport = Transport("https", url=url, token=t.get("token", str))
        elif ttype == "pull":
            # The reviewer has no endpoint of its own: it fetches packages from our reviewer API.
            transport = Transport("pull")
        else:
            raise t.err("type", f"{ttype!r} is not one of outbox, https, pull")
        t.finish()
        profiles = sec.get("profiles", list, [])
        if not all(isinstance(p, str) for p in profiles):
            raise sec.err("profiles", "must be a list of profile names")
        out[name] = Reviewer(name=name, display=sec.get("display", str, name),
                             identifier_system=ident.get("system", str, required=True),
                             identifier_value=ident.get("value", str, required=True),
                             jwks=_reviewer_jwks(sec, base),
                             transport=transport, profiles=tuple(profiles),
                             turnaround_days=_positive(sec, "turnaround_days", float, 14.0),
                             api_token=sec.get("api_token", str), jwks_url=sec.get("jwks_url", str, None),
                             follow_up_limit=_non_negative(sec, "follow_up_limit", 3))
        _unique_env_name(name, [o for o in out if o != name], file, f"reviewers[{i}].name")
        token = out[name].api_token
        if token is not None and len(token) < 16:
            raise sec.err("api_token", "must be at least 16 characters")
        if token is not None and any(o.api_token == token for n, o in out.items() if n != name):
            raise sec.err("api_token", "is the same as another reviewer's: each reviewer needs its own")
        ident.finish()
        sec.finish()
    return out
