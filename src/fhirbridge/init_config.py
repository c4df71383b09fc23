"""`fhirbridge init DIR`: a commented starter configuration and the hospital's key pair."""
from __future__ import annotations

from pathlib import Path

from .crypto import keys
from .errors import FhirbridgeError

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
name = "{hospital_name}"
keys = "keys/hospital.private.jwks.json"   # signing + decryption keys (made by init; mode 0600)
fhir_base_url = "{fhir_base_url}"

[hospital.identifier]                  # YOUR organisation identifier: it names you to reviewers and keys your
                                      # Cases (change it later and every open order is taken in again)
system = "{identifier_system}"
value = "{identifier_value}"

[hospital.auth]
type = "none"                          # none | basic | bearer
# username = "fhirbridge"               # basic; password from FHIRBRIDGE_HOSPITAL__AUTH__PASSWORD
# token from FHIRBRIDGE_HOSPITAL__AUTH__TOKEN for bearer

[hospital.http]
timeout_connect = 5.0
timeout_read = 30.0
retries = 4                            # for 429/502/503/504 and connection errors
max_retry_after = 30.0                 # cap on a server's Retry-After, in seconds
page_size = 100                        # _count for searches

[routing]
{default_reviewer_line}

# One [[reviewers]] block per second-opinion provider. Its public keys (JWKS) come from the reviewer.
{reviewers}'''

REVIEWER_BLOCK = '''[[reviewers]]
name = "{name}"
display = "{display}"
jwks = "{jwks}"                         # the reviewer's PUBLIC keys
profiles = [{profiles}]                  # collection profiles this reviewer serves (routing)
[reviewers.identifier]
system = "{system}"
value = "{value}"
[reviewers.transport]
type = "outbox"                          # outbox (a directory) | https (url = "https://...")
path = "{outbox}"
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


def write_starter(directory: Path, *, fhir_base_url: str = "http://127.0.0.1:8090/fhir",
                  hospital_name: str = "General Hospital", identifier_system: str = "urn:ietf:rfc:3986",
                  identifier_value: str = "urn:oid:2.999.1.1", reviewers: list[dict] | None = None,
                  force: bool = False) -> dict[str, Path]:
    directory = Path(directory)
    cfg_path = directory / "fhirbridge.toml"
    private = directory / "keys" / "hospital.private.jwks.json"
    public = directory / "keys" / "hospital.public.jwks.json"
    for p in (cfg_path, private):
        if p.exists() and not force:
            raise FhirbridgeError(f"{p} already exists; refusing to overwrite it (use --force to replace)")
    (directory / "keys").mkdir(parents=True, exist_ok=True, mode=0o700)
    jwks = keys.generate_jwks()
    keys.write_private_jwks(private, jwks, overwrite=force)
    keys.write_public_jwks(public, keys.public_jwks(jwks))
    blocks = [REVIEWER_BLOCK.format(profiles=", ".join(f'"{p}"' for p in r.get("profiles", [])), **{
        k: v for k, v in r.items() if k != "profiles"}) for r in (reviewers or [])]
    default_line = (f'default_reviewer = "{reviewers[0]["name"]}"' if reviewers
                    else '# default_reviewer = "spine-center"   # when no reviewer serves an order\'s profile')
    cfg_path.write_text(STARTER.format(fhir_base_url=fhir_base_url, hospital_name=hospital_name,
                                       identifier_system=identifier_system, identifier_value=identifier_value,
                                       default_reviewer_line=default_line,
                                       reviewers="\n".join(blocks) or EXAMPLE_REVIEWER), encoding="utf-8")
    return {"config": cfg_path, "private_keys": private, "public_keys": public}


def write_reviewer_keys(directory: Path, hospital_public_jwks: Path | None = None, *, rsa: bool = True) -> dict:
    """A reviewer's key pair (EC signing, EC + RSA encryption) and, optionally, its trusted hospital keys.

    The trust file is checked before any key is written, so a wrong path can simply be corrected and rerun.
    """
    directory = Path(directory)
    trust = None
    if hospital_public_jwks:
        ring = keys.KeyRing.load(hospital_public_jwks)
        if ring.has_private:
            raise FhirbridgeError(f"{hospital_public_jwks} holds private keys: a reviewer must be given only the "
                                  "hospital's PUBLIC keys (`fhirbridge keys jwks`)")
        trust = ring.public_jwks()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    jwks = keys.generate_jwks(rsa_enc=rsa)
    private = directory / "reviewer.private.jwks.json"
    public = directory / "reviewer.public.jwks.json"
    keys.write_private_jwks(private, jwks)
    keys.write_public_jwks(public, keys.public_jwks(jwks))
    out = {"private_keys": private, "public_keys": public}
    if trust is not None:
        out["trusted"] = directory / "trusted.jwks.json"
        keys.write_public_jwks(out["trusted"], trust)
    return out
