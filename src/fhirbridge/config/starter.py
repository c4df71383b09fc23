"""`fhirbridge init DIR`: a commented starter configuration and the hospital's key pair."""
from __future__ import annotations

import tomllib
import unicodedata
from pathlib import Path
from urllib.parse import urlsplit

from fhirbridge.crypto import files, keys, urls
from fhirbridge.errors import ConfigError, FhirbridgeError

STARTER = '''\
# fhirbridge configuration. Every key can be overridden from the environment as
# FHIRBRIDGE_<SECTION>__<KEY>, e.g. FHIRBRIDGE_HOSPITAL__AUTH__TOKEN=... (keep secrets out of this file).
# Relative paths are relative to this file.

[fhirbridge]
data_dir = "var"                      # Case store, work files, packages (clinical content only encrypted)
# store_url = "postgresql+psycopg://fhirbridge@db/fhirbridge"   # default: SQLite in data_dir
inbox = "var/inbox"                   # sealed opinions dropped here are received by `fhirbridge run`
inline_attachment_limit = 262144      # attachments up to this many bytes travel inside the document
max_attachment_bytes = 536870912      # a larger Binary fails the Case with a clear error
package_lifetime_days = 30            # a package (and the reviewer's window to answer) expires after this
# mappings_dir = "mappings"           # your own copy of the mappings (order codes, profiles, opinion form)

[hospital]
name = {hospital_name}
keys = "keys/hospital.private.jwks.json"   # signing + decryption keys (made by init; mode 0600)
# certificate_chain = "keys/hospital-signing-chain.pem"   # X.509 chain of the signing key (PEM, leaf first):
#                                       # sent as x5c so receivers without your JWKS can verify (Da Vinci CDex)
fhir_base_url = {fhir_base_url}

[hospital.identifier]                  # YOUR organisation identifier: it names you to reviewers and keys your
                                      # Cases (change it later and every open order is taken in again)
system = {identifier_system}
value = {identifier_value}

[hospital.auth]
type = "none"                          # none | basic | bearer | smart
# username = "fhirbridge"               # basic; password from FHIRBRIDGE_HOSPITAL__AUTH__PASSWORD
# token from FHIRBRIDGE_HOSPITAL__AUTH__TOKEN for bearer
# smart (SMART Backend Services): register the public keys (`fhirbridge keys jwks`) at the EHR, then
# client_id = "fhirbridge"              # what the EHR registered; the token endpoint is discovered
# token_url = "https://ehr.example.org/oauth2/token"   # only when the EHR does not publish it
# scopes = ["system/Patient.rs", ...]   # default: what fhirbridge reads and writes (docs/architecture.md)

[hospital.http]
timeout_connect = 5.0
timeout_read = 30.0
retries = 4                            # for 429/502/503/504 and connection errors
max_retry_after = 30.0                 # cap on a server's Retry-After, in seconds
page_size = 100                        # _count for searches

# [api]                                # who may call the staff API (fhirbridge serve)
# tokens = []                           # admin tokens: FHIRBRIDGE_API__TOKENS=... (every scope, every hospital)
# [[api.keys]]                          # scoped keys: `fhirbridge keys api-key NAME --scopes ...` prints a block
# [api.oauth]                           # or OAuth2 access tokens from the hospital's identity provider
# issuer = "https://idp.example.org"
# audience = "fhirbridge"
# jwks_url = "https://idp.example.org/.well-known/jwks.json"

# [audit]
# write_to_ehr = false                  # also write each AuditEvent (disclosure, opinion filed) to the EHR

# [physician_app]                      # the SMART on FHIR ordering app at <public_url>/physician/launch
# client_id = "fhirbridge-physician"    # registered at the EHR with redirect <public_url>/physician/callback
# [[physician_app.issuers]]             # EHR FHIR base URLs allowed to launch it (default: fhir_base_url)
# url = "https://ehr.example.org/fhir"
# hospital = "General Hospital"         # whose orders it places (optional with one hospital)

[routing]
{default_reviewer_line}

# One [[reviewers]] block per second-opinion provider. Its public keys (JWKS) come from the reviewer.
{reviewers}'''

REVIEWER_BLOCK = '''[[reviewers]]
name = {name}
display = {display}
jwks = {jwks}                         # the reviewer's PUBLIC keys
profiles = [{profiles}]                  # collection profiles this reviewer serves (routing)
[reviewers.identifier]
system = {system}
value = {value}
[reviewers.transport]
type = "outbox"                          # outbox (a directory) | https (url = "https://...")
path = {outbox}
'''

EXAMPLE_REVIEWER = '''# [[reviewers]]
# name = "spine-center"
# display = "Spine Center Second Opinions"
# jwks = "keys/spine-center.public.jwks.json"
# profiles = ["spine", "default"]
# [reviewers.identifier]
# system = "urn:ietf:rfc:3986"
# value = "urn:oid:2.999.1.2"
# [reviewers.transport]
# type = "https"
# url = "https://opinions.spine-center.example/fhirbridge/packages"
'''


def toml_string(value: str, what: str) -> str:
    """`value` as a TOML basic string (toml.io v1.0.0, "String"): backslash and quotation mark escaped.
    Control characters are refused rather than escaped: none belongs in a name, URL, identifier or path, and
    one there is a paste accident the user should see."""
    if not isinstance(value, str):
        raise ConfigError(f"must be text, got {type(value).__name__}", key=what)
    bad = next((ch for ch in value if unicodedata.category(ch) == "Cc"), None)
    if bad is not None:
        raise ConfigError(f"contains the control character U+{ord(bad):04X}; remove it", key=what)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_base_url(url: str, what: str = "--fhir-base-url") -> None:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise ConfigError("is not a valid URL, e.g. https://ehr.example.org/fhir", key=what) from None
    if parts.scheme not in ("http", "https") or not host:
        # The URL itself is not echoed: it may carry credentials (https://user:password@host/...).
        raise ConfigError(f"must be an http:// or https:// URL with a host (got {parts.scheme[:20] or 'no'} scheme"
                          f"{'' if host else ', no host'}), e.g. https://ehr.example.org/fhir",
                          key=what)
    # What the loader would refuse at the first start (issue 13, S11), refused before anything is written.
    urls.https_or_loopback(url, what)


def render_starter(cfg_path: Path, *, fhir_base_url: str, hospital_name: str, identifier_system: str,
                   identifier_value: str, reviewers: list[dict] | None) -> str:
    """The starter configuration's text, checked to parse as TOML and read back the values given before
    anything is written. (Whether the values make a valid configuration is `config.load`'s business, and
    `check_starter_args` checks the ones `fhirbridge init` takes from its command line.)"""
    blocks = []
    for i, r in enumerate(reviewers or []):
        values = {k: toml_string(str(v), f"reviewers[{i}].{k}") for k, v in r.items() if k != "profiles"}
        profiles = ", ".join(toml_string(p, f"reviewers[{i}].profiles") for p in r.get("profiles", []))
        blocks.append(REVIEWER_BLOCK.format(profiles=profiles, **values))
    default_line = (f"default_reviewer = {toml_string(reviewers[0]['name'], 'reviewers[0].name')}" if reviewers
                    else '# default_reviewer = "spine-center"   # when no reviewer serves an order\'s profile')
    text = STARTER.format(fhir_base_url=toml_string(fhir_base_url, "--fhir-base-url"),
                          hospital_name=toml_string(hospital_name, "--hospital-name"),
                          identifier_system=toml_string(identifier_system, "hospital.identifier.system"),
                          identifier_value=toml_string(identifier_value, "hospital.identifier.value"),
                          default_reviewer_line=default_line, reviewers="\n".join(blocks) or EXAMPLE_REVIEWER)
    # Proof that what we write is TOML and that the values survived the quoting, rather than a file the user
    # finds broken at their first `fhirbridge run` (a name like St "X" used to end the string early).
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the starter configuration would not be valid TOML ({exc}); this is a bug",
                          file=str(cfg_path)) from None
    hospital = raw["hospital"]
    if (hospital["name"], hospital["fhir_base_url"]) != (hospital_name, fhir_base_url) or \
            [r["name"] for r in raw.get("reviewers", [])] != [r["name"] for r in reviewers or []]:
        raise ConfigError("the starter configuration does not read back the values given; this is a bug",
                          file=str(cfg_path))
    return text


def check_starter_args(*, fhir_base_url: str, hospital_name: str) -> None:
    """What `fhirbridge init` is given on its command line, checked before anything is written."""
    check_base_url(fhir_base_url)
    if not hospital_name.strip():
        raise ConfigError("must not be empty", key="--hospital-name")
    toml_string(hospital_name, "--hospital-name")


def write_starter(directory: Path, *, fhir_base_url: str = "http://127.0.0.1:8090/fhir",
                  hospital_name: str = "General Hospital", identifier_system: str = "urn:ietf:rfc:3986",
                  identifier_value: str = "urn:oid:2.999.1.1", reviewers: list[dict] | None = None,
                  force: bool = False) -> dict[str, Path]:
    """Write DIR/fhirbridge.toml and the hospital's key pair. Every value is checked (and the configuration
    rendered and parsed) before any file is written, so a bad argument leaves nothing behind."""
    directory = Path(directory)
    cfg_path = directory / "fhirbridge.toml"
    private = directory / "keys" / "hospital.private.jwks.json"
    public = directory / "keys" / "hospital.public.jwks.json"
    text = render_starter(cfg_path, fhir_base_url=fhir_base_url, hospital_name=hospital_name,
                          identifier_system=identifier_system, identifier_value=identifier_value,
                          reviewers=reviewers)
    for p in (cfg_path, private):
        if p.exists() and not force:
            raise FhirbridgeError(f"{p} already exists; refusing to overwrite it (use --force to replace)")
    files.private_dir(directory / "keys")
    jwks = keys.generate_jwks()
    keys.write_private_jwks(private, jwks, overwrite=force)
    keys.write_public_jwks(public, keys.public_jwks(jwks))
    # Not secret (secrets come from the environment) and read by operators and tools: 0644 whatever the
    # umask, next to keys that are 0600 whatever the umask.
    files.write_atomic(cfg_path, text.encode("utf-8"), mode=files.PUBLIC_FILE)
    return {"config": cfg_path, "private_keys": private, "public_keys": public}
