"""The configuration reference (docs/configure.md), generated from the loader itself.

The keys, their types and defaults are not written down twice: `trace()` runs config/loader.py's own loader over
sample configurations that take every branch (each auth type's keys, each reviewer transport) and records
every key it reads, with the type and default it asks for. Only the meanings are written here, in
MEANINGS; tests/config/test_reference.py fails when a key is read that has no meaning here (or the other way
round), and when docs/configure.md differs from what this module generates.

    python -m fhirbridge.config.reference > docs/configure.md
"""
from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from fhirbridge.config import loader as config

_SMART = {"type": "smart", "client_id": "fhirbridge", "keys": "keys/smart.jwks.json",
          "token_url": "https://t.example/token", "scopes": ["system/Patient.rs"], "alg": "ES384"}
_REVIEWERS = [
    {"name": "a", "jwks": "a.jwks.json", "identifier": {"system": "s", "value": "1"},
     "transport": {"type": "outbox", "path": "out"}},
    {"name": "b", "jwks": "b.jwks.json", "identifier": {"system": "s", "value": "2"},
     "transport": {"type": "https", "url": "https://r.example/in", "token": "t"}},
    {"name": "c", "jwks": "c.jwks.json", "identifier": {"system": "s", "value": "3"},
     "transport": {"type": "pull"}, "api_token": "p" * 20},
    {"name": "d", "jwks_url": "https://d.example/jwks.json", "identifier": {"system": "s", "value": "4"},
     "transport": {"type": "pull"}},
]
_API = {"tokens": ["t" * 20],
        "keys": [{"name": "ehr", "sha256": "0" * 64, "scopes": ["orders:write"], "hospitals": ["H"]}],
        "oauth": {"issuer": "https://idp.example", "audience": "fhirbridge",
                  "jwks_url": "https://idp.example/jwks.json", "scope_claim": "scope"}}
SAMPLES = [
    {"hospital": {"name": "H", "fhir_base_url": "https://ehr.example/fhir", "keys": "k.json",
                  "identifier": {"system": "s", "value": "h"}, "auth": _SMART}, "reviewers": _REVIEWERS,
     "service": {"public_url": "https://fhirbridge.example"}, "api": _API,
     "physician_app": {"client_id": "fhirbridge-physician", "scope": "openid fhirUser",
                       "issuers": [{"url": "https://ehr.example/fhir", "hospital": "H"}]},
     "cds": {"enabled": True, "time_budget_ms": 500,
             "issuers": [{"iss": "https://ehr.example", "jwks_url": "https://ehr.example/cds.jwks.json",
                          "hospital": "H"}]}},
    {"hospital": {"name": "H", "fhir_base_url": "https://ehr.example/fhir", "keys": "k.json",
                  "identifier": {"system": "s", "value": "h"}},
     "reviewers": _REVIEWERS, "service": {"public_url": "https://fhirbridge.example"},
     "api": {"oauth": {"issuer": "https://idp.example", "audience": "fhirbridge",
                                                "jwks": "idp.jwks.json"}}},
    {"hospital": {"name": "H", "fhir_base_url": "https://ehr.example/fhir", "keys": "k.json",
                  "identifier": {"system": "s", "value": "h"},
                  "auth": {"type": "basic", "username": "u", "password": "p"},
                  "pacs": {"url": "https://pacs.example/dicom-web",
                           "auth": {"type": "basic", "username": "u", "password": "p"}}},
     "reviewers": _REVIEWERS, "service": {"public_url": "https://fhirbridge.example"}},
]

TABLES = {
    "fhirbridge": "Where fhirbridge keeps its state, and limits on what it sends.",
    "hospital": "The hospital and its EHR. A deployment serving several hospitals uses `[[hospitals]]` tables "
                "instead, each with these same keys (and the env name of its `name` in place of `HOSPITAL`: "
                "`FHIRBRIDGE_HOSPITALS__<NAME>__...`).",
    "hospital.auth": "How fhirbridge authenticates to the EHR's FHIR endpoint (docs/connect-ehr.md).",
    "hospital.http": "Timeouts, retries and paging against the EHR.",
    "hospital.pacs": ("The hospital's PACS over DICOMweb (docs/imaging.md). With this table the images of the "
                      "ImagingStudies a profile keeps travel with the package; without it only the ImagingStudy "
                      "resources do."),
    "hospital.pacs.auth": "How fhirbridge authenticates to the PACS.",
    "hospital.ehr": ("What the EHR can do for the write-back: a vendor profile, and any capability pinned by "
                     "name (see docs/ehr.md)."),
    "hospital.identifier": "The hospital's organisation identifier: Cases are filed under it, so it must never change.",
    "reviewers[]": "One `[[reviewers]]` table per reviewing organisation (docs/reviewers.md). From the environment: "
                   "`FHIRBRIDGE_REVIEWERS__<NAME>__<KEY>`, NAME being the reviewer's `name` in upper case with "
                   "anything but letters and digits as `_`.",
    "reviewers[].identifier": "The reviewer's organisation identifier (the Task's owner, the order's performer).",
    "reviewers[].transport": "How sealed packages reach the reviewer.",
    "service": "The service's scheduler (`fhirbridge serve` / `worker`).",
    "api": "Who may call the staff HTTP API (docs/architecture.md §8): admin tokens, scoped keys, OAuth2.",
    "api.keys[]": "Scoped staff API keys: one `[[api.keys]]` table each (`fhirbridge keys api-key` prints one).",
    "api.oauth": "OAuth2 JWT access tokens from the hospital's identity provider.",
    "routing": "Which reviewer gets an order that names none.",
    "audit": "The accounting of disclosures (BALP AuditEvents).",
    "metrics": "Prometheus metrics at /metrics (docs/operate.md).",
    "outcomes": "Following the planned treatment of each filed opinion in the chart (docs/outcomes.md).",
    "physician_app": "The physician's SMART on FHIR EHR-launch ordering app at /physician (unset: not served).",
    "physician_app.issuers[]": "EHRs allowed to launch the app: one `[[physician_app.issuers]]` table each.",
    "cds": "The CDS Hooks 2.0 services at /cds-services (docs/cds-hooks.md; unset: not served).",
    "cds.issuers[]": "EHRs trusted to call them: one `[[cds.issuers]]` table each.",
}

MEANINGS = {
    "cds.enabled": "Serve the CDS Hooks services (needs `[service] public_url`, the audience of the EHR's JWTs).",
    "cds.time_budget_ms": "How long one hook call may take: the cap on fetching from the EHR when prefetch is "
                          "missing (when it runs out the answer has no card rather than coming late).",
    "cds.issuers[].iss": "The `iss` of the EHR's signed JWTs.",
    "cds.issuers[].jwks_url": "Where the EHR publishes its JWK Set (https; a JWT's `jku` header must name it).",
    "cds.issuers[].hospital": "The configured hospital whose EHR it is (unset: the only one).",
    "fhirbridge.data_dir": "Work directory: Case files (encrypted), sealed packages. Relative paths in this file are "
                           "relative to the file's directory. Every replica must share it.",
    "fhirbridge.store_url": "The Case store. Empty: SQLite at `<data_dir>/fhirbridge.db`. For several replicas: "
                            "`postgresql+psycopg://user:password@host/db` (set it from the environment: it holds a "
                            "password).",
    "fhirbridge.mappings_dir": "A copy of `mappings/` to use instead of the shipped one (order codes, collection "
                               "profiles, opinion form).",
    "fhirbridge.inline_attachment_limit": "Attachments up to this many bytes travel inside the package; larger ones "
                                          "as separate encrypted files.",
    "fhirbridge.max_attachment_bytes": "Largest attachment fetched from the EHR. A larger one is not withheld: the "
                                       "Case stops at `seal` (failed, nothing sent) with an error naming the Binary "
                                       "and the limit; raise the limit and `fhirbridge retry` the Case.",
    "fhirbridge.package_lifetime_days": "How long a sealed package is valid for the reviewer (its `exp`).",
    "fhirbridge.inbox": "Directory where sealed opinions are dropped to be received.",
    "hospital.name": "The hospital's display name (shown to reviewers; `--hospital NAME` picks it).",
    "hospital.fhir_base_url": "The EHR's FHIR R4 base URL: https (plain http only to 127.0.0.1, localhost or ::1, "
                              "unless `allow_plain_http`).",
    "hospital.allow_plain_http": "`true` lets `fhir_base_url` be plain http to another host: only for a demo EHR on "
                                 "a private container network (the compose demo); records and credentials cross "
                                 "it unencrypted, and `fhirbridge doctor` says so (default false).",
    "hospital.keys": "The hospital's private JWKS (made by `fhirbridge init`, mode 0600): signs packages, decrypts "
                     "opinions.",
    "hospital.time_zone": "The IANA time zone (e.g. `Europe/Berlin`) the dashboard shows this hospital's times in; "
                          "the UTC time shows on hover.",
    "hospital.certificate_chain": "A PEM file: the X.509 certificate of the signing key in `keys`, then its "
                                  "issuers (leaf first). Sent as `x5c` in every document signature (Da Vinci "
                                  "CDex) so a receiver without our JWKS can verify; checked to hold the signing "
                                  "key (unset: signatures name the key by `kid` only).",
    "hospital.identifier.system": "Identifier system of the hospital's organisation identifier.",
    "hospital.identifier.value": "Identifier value of the hospital's organisation identifier.",
    "hospital.auth.type": "`none`, `basic`, `bearer` or `smart` (SMART Backend Services).",
    "hospital.auth.username": "basic: the user name.",
    "hospital.auth.password": "basic: the password (from the environment: `FHIRBRIDGE_HOSPITAL__AUTH__PASSWORD`).",
    "hospital.auth.token": "bearer: the token (from the environment: `FHIRBRIDGE_HOSPITAL__AUTH__TOKEN`).",
    "hospital.auth.client_id": "smart: the client id the EHR registered for fhirbridge.",
    "hospital.auth.keys": "smart: the private JWKS that signs client assertions (unset: the hospital's `keys`).",
    "hospital.auth.token_url": "smart: the token endpoint, https (unset: discovered from "
                               "`<fhir_base_url>/.well-known/smart-configuration`, and refused unless https; plain "
                               "http only to 127.0.0.1, localhost or ::1).",
    "hospital.auth.scopes": "smart: the scopes to ask for, a list or one space-separated string, used as written "
                            "(unset: exactly what the configured features request, `fhir.auth.FEATURES`).",
    "hospital.auth.alg": "smart: `RS384` or `ES384` (unset: from the signing key's type).",
    "hospital.pacs.url": ("The PACS's DICOMweb base URL (QIDO-RS, WADO-RS), https (plain http only to loopback): "
                          "used for a study whose ImagingStudy names no reachable dicom-wado-rs Endpoint (unset: "
                          "the Endpoints only)."),
    "hospital.pacs.auth.type": ("`none`, `basic`, `bearer`, or `smart`: the EHR's SMART Backend Services token "
                                "(`[hospital.auth]`). Sent to `url`, and to an Endpoint's address only when it is "
                                "on the same origin."),
    "hospital.pacs.auth.username": "basic: the user name.",
    "hospital.pacs.auth.password": "basic: the password (from the environment: "
                                   "`FHIRBRIDGE_HOSPITAL__PACS__AUTH__PASSWORD`).",
    "hospital.pacs.auth.token": "bearer: the token (from the environment: `FHIRBRIDGE_HOSPITAL__PACS__AUTH__TOKEN`).",
    "hospital.pacs.timeout_connect": "Seconds to wait for a connection to the PACS.",
    "hospital.pacs.timeout_read": "Seconds to wait for each read of the PACS's answer (a slow PACS is transient: "
                                  "the Case resumes).",
    "hospital.pacs.retries": "Retries of a request on 429/502/503/504 and connection failures (0: none).",
    "hospital.pacs.parallel_series": "Series retrieved at once (WADO-RS) for one Case.",
    "hospital.http.timeout_connect": "Seconds to wait for a connection to the EHR.",
    "hospital.http.timeout_read": "Seconds to wait for the EHR's answer.",
    "hospital.http.retries": "Retries of a request on 429/502/503/504 and connection failures (0: none).",
    "hospital.http.max_retry_after": "The longest `Retry-After` wait honoured, in seconds.",
    "hospital.http.page_size": "`_count` asked for in searches.",
    "hospital.ehr.profile": ("The EHR's write profile: `auto` (what its CapabilityStatement says) or the name of a "
                             "profile in mappings/ehr/ (shipped: `generic-r4`, `oracle-millennium-r4`, `sekmet`). "
                             "Any other key of `[hospital.ehr]` pins the capability of that name (docs/ehr.md)."),
    "reviewers[].name": "Short name used in commands, logs and metrics.",
    "reviewers[].display": "The organisation's display name (unset: `name`).",
    "reviewers[].jwks": "The reviewer's PUBLIC JWKS: an encryption key (packages are sealed to it) and a "
                        "signature key (its opinions are verified with it).",
    "reviewers[].jwks_url": "Instead of `jwks`: where the reviewer publishes its public JWKS (https; cached in "
                            "data_dir/jwks-cache, re-read after an hour or when it signs with a new key).",
    "reviewers[].identifier.system": "Identifier system of the reviewer's organisation identifier.",
    "reviewers[].identifier.value": "Identifier value of the reviewer's organisation identifier.",
    "reviewers[].profiles": "Collection profiles (mappings/collect/) this reviewer takes, for orders naming no "
                            "reviewer.",
    "reviewers[].turnaround_days": "Target days from sending (sealing the package) to opinion; the package names "
                                   "that due date and later Cases are flagged overdue.",
    "reviewers[].follow_up_limit": "Follow-up questions the referring physician may ask this reviewer about one "
                                   "filed opinion (default 3; 0: none). Each is a Communication in the EHR and its "
                                   "answer an addendum note (docs/reviewers.md).",
    "reviewers[].api_token": "Optional static bearer token for /reviewer (at least 16 characters; from the "
                             "environment). Without it the reviewer signs a short-lived JWT per request.",
    "reviewers[].transport.type": "`outbox` (a directory), `https` (POST to the reviewer) or `pull` (the reviewer "
                                  "fetches from /reviewer).",
    "reviewers[].transport.path": "outbox: the directory (unset: `var/outbox/<name>`).",
    "reviewers[].transport.url": "https: the reviewer's endpoint (https; plain http only to this machine).",
    "reviewers[].transport.token": "https: a bearer token the reviewer's endpoint wants (from the environment).",
    "service.poll_seconds": "How often each EHR is polled for new and revoked orders.",
    "service.work_seconds": "How often due steps are claimed and run.",
    "service.inbox_seconds": "How often the inbox is read for opinions.",
    "service.overdue_seconds": "How often Cases past their turnaround target are flagged.",
    "service.outcomes_seconds": "How often the planned treatments of filed opinions are looked up in the EHR.",
    "service.lease_seconds": "How long a claimed step stays one worker's without renewal (unset: 300).",
    "service.public_url": "The URL at which the EHR and reviewers reach this service (subscription notifications; "
                          "<public_url>/reviewer is the audience reviewer tokens must name). Required when a "
                          "reviewer uses transport `pull`; without it no reviewer token is accepted.",
    "api.tokens": "Staff API bearer tokens, each at least 16 characters (from the environment: "
                  "`FHIRBRIDGE_API__TOKENS=a,b`).",
    "api.keys[].name": "What the key is for (shown in logs, never the key).",
    "api.keys[].sha256": "SHA-256 (hex) of the key; the key itself is never stored.",
    "api.keys[].scopes": "Some of `orders:write`, `cases:read`, `cases:write`, `audit:read`.",
    "api.keys[].hospitals": "Hospitals (by `name`) the key may act for (unset: all).",
    "api.oauth.issuer": "The identity provider's issuer (`iss` of its access tokens).",
    "api.oauth.audience": "The `aud` its access tokens must carry for fhirbridge.",
    "api.oauth.jwks": "A file with the issuer's public signing keys (or `jwks_url`).",
    "api.oauth.jwks_url": "Where the issuer publishes its signing keys (cached; re-read on a new kid).",
    "api.oauth.scope_claim": "The claim holding the scopes (`scope`: space-separated; or a list claim such as `scp`).",
    "routing.default_reviewer": "The reviewer for orders whose profile no reviewer lists.",
    "audit.write_to_ehr": "Also write each AuditEvent to the EHR.",
    "metrics.enabled": "Serve /metrics.",
    "outcomes.window_days": "Days after filing within which a decision on the planned treatment counts; none by "
                            "then is recorded as \"nothing within the window\".",
    "physician_app.client_id": "The client id the EHR registered for the app (a public client using PKCE).",
    "physician_app.scope": "Scopes asked for besides `launch` (who the user is, read access to the patient).",
    "physician_app.issuers[].url": "The EHR's FHIR base URL as it sends it in `iss` (https).",
    "physician_app.issuers[].hospital": "The configured hospital whose orders a launch from it places (unset: "
                                        "the only one).",
    "metrics.token": "/metrics wants `Authorization: Bearer <token>` (at least 16 characters; from the "
                     "environment: `FHIRBRIDGE_METRICS__TOKEN`). Unset, /metrics answers 401 unless "
                     "`unauthenticated` is true.",
    "metrics.unauthenticated": "Serve /metrics without a token: only where nothing but your scrape network reaches "
                               "the port (the figures name hospitals and reviewers).",
}

# Process settings read from the environment only (no "__": they are not config keys).
ENVIRONMENT = {
    "FHIRBRIDGE_CONFIG": ("./fhirbridge.toml", "The configuration file (`--config` wins)."),
    "FHIRBRIDGE_BIND": ("127.0.0.1:8080", "`serve`: the address gunicorn listens on, `host:port` or a port alone "
                        "(then on 127.0.0.1; the image: 0.0.0.0:8080). Checked before gunicorn starts: a port in "
                        "use is one error line and exit code 6."),
    "FHIRBRIDGE_PROBE_BIND": ("unset (the image: 0.0.0.0:8081)", "`serve --probe-bind`: also answer `/healthz` and "
                              "`/readyz` on this `host:port`, from a thread of their own in each worker that busy API "
                              "requests never delay (service/probes.py); point orchestrator probes here."),
    "FHIRBRIDGE_ORTHANC": ("Orthanc on PATH, else /usr/sbin/Orthanc", "`demo`: the Orthanc binary the demo runs as "
                           "its PACS (demo/orthanc.py); with no Orthanc (or no plugin) the demo serves its study "
                           "from a labelled read-only stand-in instead."),
    "FHIRBRIDGE_ORTHANC_DICOMWEB": ("Debian's plugin path", "`demo`: the Orthanc DICOMweb plugin "
                                    "(`libOrthancDicomWeb.so`) the demo's Orthanc loads."),
    "FHIRBRIDGE_PACS_PASSWORD": ("unset", "`reviewer import-pacs --auth basic`: the password for the reviewer's own "
                                 "PACS (never on the command line)."),
    "FHIRBRIDGE_PACS_TOKEN": ("unset", "`reviewer import-pacs --auth bearer`: the bearer token for the reviewer's own "
                              "PACS (never on the command line)."),
    "FHIRBRIDGE_WORKERS": ("2", "`serve`: gunicorn worker processes, each with its own scheduler."),
    "FHIRBRIDGE_THREADS": ("4", "`serve`: threads per worker for HTTP requests."),
    "FHIRBRIDGE_TIMEOUT": ("120", "`serve`: gunicorn's worker timeout, seconds."),
    "FHIRBRIDGE_GRACEFUL_TIMEOUT": ("60", "`serve`: seconds a stopping worker gets to finish the step in hand."),
    "FHIRBRIDGE_STOP_DEADLINE": ("45", "Seconds the scheduler waits for a running step on stop before releasing "
                                       "its claims (keep it below the graceful timeout)."),
    "FHIRBRIDGE_SCHEDULER": ("on", "`off`: serve HTTP without the scheduler (`serve --no-scheduler`)."),
    "FHIRBRIDGE_LOG_FORMAT": ("auto", "`json`, `text`, or `auto`: text on a terminal, JSON otherwise."),
    "FHIRBRIDGE_LOG_LEVEL": ("warning (`serve`, `worker`: info)", "`debug`, `info`, `warning` or `error`."),
    "FHIRBRIDGE_KEY_PASSPHRASE": ("unset", "The passphrase of private key files kept encrypted (`fhirbridge keys "
                                           "generate` / `rotate` encrypt them when it is set); never on the command "
                                           "line."),
    "FHIRBRIDGE_PORTAL_TOKEN": ("unset", "`reviewer serve`: the token the reviewer's staff sign in to the portal "
                                         "with (at least 16 characters)."),
    "FHIRBRIDGE_TEST_CRASH_AT": ("unset", "Tests only (the crash suite): `<point>[:n]` makes the process kill itself "
                                          "the n-th time it reaches that point. Never set it in production."),
    "PROMETHEUS_MULTIPROC_DIR": ("a new temporary directory", "`serve`: where workers keep their metrics; a "
                                 "directory of its own per server (the Kubernetes manifest uses an emptyDir)."),
}


@dataclass(frozen=True)
class Key:
    name: str
    type: Any
    default: Any
    required: bool


# Defaults computed from another key: the trace sees them computed from its samples' values (a reviewer
# named "a" showed `display` default "a"), so each is written in words here. A default that changes with the
# samples' names (trace_derived) must have an entry: generate() refuses otherwise.
DERIVED = {
    "reviewers[].display": "the reviewer's `name`",
    "reviewers[].transport.path": "`var/outbox/<name>`",
}


def _normal(key: str) -> str:
    return re.sub(r"\[\d+\]", "[]", key)


def trace(samples: list[dict] | None = None) -> dict[str, Key]:
    """Every key config/loader.py reads, in the order it reads them, with the type and default it asks for."""
    seen: dict[str, Key] = {}
    original = config._Section.get

    def recording(self, name, typ, default=None, *, required=False):
        key = _normal(self.key(name))
        seen.setdefault(key, Key(key, typ, default, required))
        return original(self, name, typ, default, required=required)

    with mock.patch.object(config._Section, "get", recording):
        for raw in SAMPLES if samples is None else samples:
            config._build(copy.deepcopy(raw), Path("/etc/fhirbridge/fhirbridge.toml"))
    return seen


def _renamed(raw: dict) -> dict:
    """A sample whose names (hospital, reviewers) are other words, to tell computed defaults from literal ones."""
    out = copy.deepcopy(raw)
    for r in out.get("reviewers", []):
        r["name"] = f"renamed-{r['name']}"
    out["hospital"]["name"] = "Renamed"
    for key in out.get("api", {}).get("keys", []):
        key["hospitals"] = ["Renamed"]
    for issuer in out.get("physician_app", {}).get("issuers", []) + out.get("cds", {}).get("issuers", []):
        issuer["hospital"] = "Renamed"
    return out


def trace_derived() -> set[str]:
    """Keys whose default changes when the samples' names do: computed from them, not a literal."""
    first, seen = trace(), trace([_renamed(raw) for raw in SAMPLES])
    return {k for k, key in first.items() if k in seen and seen[k].default != key.default}


def _type(typ: Any) -> str:
    names = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list"}
    types = typ if isinstance(typ, tuple) else (typ,)
    return " or ".join(names.get(t, t.__name__) for t in types)


def _default(key: Key) -> str:
    if key.required:
        return "**required**"
    if key.name in DERIVED:
        return DERIVED[key.name]
    if key.default is None or key.default == "":
        return "unset"
    if isinstance(key.default, bool):
        return f"`{str(key.default).lower()}`"
    if isinstance(key.default, str):
        return f'`"{key.default}"`'
    return f"`{key.default}`"


def _env(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "reviewers[]":
        return "`FHIRBRIDGE_REVIEWERS__<NAME>__" + "__".join(p.upper() for p in parts[1:]) + "`"
    return "`FHIRBRIDGE_" + "__".join(p.upper() for p in parts) + "`"


def generate() -> str:
    keys = trace()
    undescribed = trace_derived() - set(DERIVED)
    if undescribed:
        raise RuntimeError(f"defaults computed from other keys need words in DERIVED: {sorted(undescribed)}")
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m fhirbridge.config.reference > docs/configure.md`; do not edit by hand:",
        "     tests/config/test_reference.py fails when this page and the loader (config/loader.py) disagree. -->",
        "",
        "fhirbridge reads one TOML file: `--config FILE`, else `$FHIRBRIDGE_CONFIG`, else `./fhirbridge.toml`.",
        "`fhirbridge init DIR` writes a commented starter file and the hospital's keys. Any key can be set from the",
        "environment as `FHIRBRIDGE_<TABLE>__<KEY>` (double underscore between levels), which is how secrets stay",
        "out of the file; a list from the environment is comma-separated. Unknown keys are errors, and every",
        "error names the file and the key, e.g. `config error: /etc/fhirbridge/fhirbridge.toml: "
        "hospital.fhir_base_url: is required`.",
        "",
        "Relative paths are relative to the directory of the configuration file.",
        "",
    ]
    tables: dict[str, list[Key]] = {}
    for key in keys.values():
        table, _, _name = key.name.rpartition(".")
        tables.setdefault(table, []).append(key)
    for table, members in tables.items():
        heading = f"[[{table[:-2]}]]" if table.endswith("[]") else f"[{table.replace('[]', '')}]"
        out += [f"## `{heading}`", "", TABLES.get(table, ""), "",
                "| key | type | default | environment | meaning |", "| --- | --- | --- | --- | --- |"]
        for key in members:
            name = key.name.rpartition(".")[2]
            out.append(f"| `{name}` | {_type(key.type)} | {_default(key)} | {_env(key.name)} | "
                       f"{MEANINGS.get(key.name, '')} |")
        out.append("")
    out += ["## Process environment", "",
            "Read from the environment only (they are not keys of the file).", "",
            "| variable | default | meaning |", "| --- | --- | --- |"]
    for name, (default, meaning) in ENVIRONMENT.items():
        out.append(f"| `{name}` | {default} | {meaning} |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(generate())
