"""`fhirbridge doctor`: check one hospital's EHR connection and the reviewers, and say how to fix what fails.

Every check is harmless: reads of the CapabilityStatement and the SMART configuration, one access token,
searches that match nothing (`_id=fhirbridge-doctor-probe`, with the search parameters fhirbridge really uses
and `Prefer: handling=strict`, so an unsupported parameter shows), a read of a Binary that does not exist,
and one EMPTY transaction Bundle (it writes nothing; it shows whether we may post transactions at all).
Nothing is created, nothing is sent to a reviewer.

Result per check: pass, warn (works, but look at it), fail (fhirbridge will not work until it is fixed; exit
code 1) or skip (not applicable, or blocked by an earlier failure).

The write plan (how the opinion will be filed) is chosen in the EHR context from the capability set (ehr/), which
this layer may not import: the caller passes `plan_for`, which turns the CapabilityStatement read here into a
`PlanView` (ehr/plan_view.py). doctor prints each capability with where its value came from, the plan and its
writes, warns where a profile or pin overrides what the statement says, and asks for the plan's scopes.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests

from fhirbridge.config import loader as config_mod
from fhirbridge.config.mappings import FOLLOW_TYPES, collected_types, load_order_codes, load_profile, profile_names
from fhirbridge.config.model import Config, Hospital
from fhirbridge.fhir.auth import (
    FEATURE,
    SmartBackendAuth,
    feature_needs,
    make_auth,
    missing_scopes,
    needed_scopes,
    scopes_for,
    v1_scopes,
)
from fhirbridge.fhir.unreachable import why_unreachable
from fhirbridge.store import migrations
from fhirbridge.store.store import Store, ping

PROBE_ID = "fhirbridge-doctor-probe"
FHIR_JSON = "application/fhir+json"
# Types only some features need: missing ones are warnings. Binary: attachments referenced by URL;
# Subscription and Basic: `fhirbridge subscribe` only.
OPTIONAL_TYPES = {"Binary": "attachments stored as Binary cannot be collected",
                  "Subscription": "`fhirbridge subscribe` cannot register (polling still works)",
                  "Basic": "subscription topics cannot be discovered (give --topic)"}


@dataclass
class Check:
    name: str
    status: str        # pass | warn | fail | skip
    detail: str
    fix: str = ""


@dataclass
class Report:
    hospital: str
    fhir_base_url: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    def add(self, name: str, status: str, detail: str, fix: str = "") -> Check:
        check = Check(name, status, detail, fix if status in ("fail", "warn") else "")
        self.checks.append(check)
        return check

    def as_dict(self) -> dict:
        return {"hospital": self.hospital, "fhir_base_url": self.fhir_base_url, "ok": self.ok,
                "checks": [asdict(c) for c in self.checks]}


@dataclass(frozen=True)
class PlanView:
    """The write plan as doctor shows it (made by ehr/plan_view.py from ehr.capabilities and ehr.write_plan)."""

    kind: str                                       # the plan's name: ATOMIC | LEDGER | ONCE
    description: str                                # what it does, in a phrase
    task_write: bool                                # the Case's status is kept in an EHR Task
    writes: tuple[tuple[str, str], ...]             # (resource type, interaction) it makes: its scopes
    capabilities: tuple[tuple[str, Any, str], ...]  # (capability, value, origin)
    disagreements: tuple[tuple[str, Any, Any, str], ...] = ()   # (capability, advertised, used, origin)
    profile: str = "auto"


PlanFor = Callable[[dict | None], PlanView]      # the CapabilityStatement (None: not read) -> the plan


# --- what fhirbridge needs from the EHR -------------------------------------------------------------------

def smart_needs(cfg: Config, plan: PlanView | None = None) -> dict[str, tuple[tuple[str, str], ...]]:
    """Feature -> what it asks of the EHR, for this configuration and write plan (as ehr.context.App.smart_needs;
    without a plan: the atomic plan's writes)."""
    return feature_needs(collected_types(cfg.mappings_dir), audit_copies=cfg.audit.write_to_ehr,
                         physician_app=cfg.physician_app is not None,
                         writeback=plan.writes if plan else None, task_write=plan.task_write if plan else True)


def needed_searches(cfg: Config, plan: PlanView | None = None) -> dict[str, list[tuple[str, str]]]:
    """Resource type -> the search parameters fhirbridge sends for it, with harmless probe values. The
    DocumentReference `identifier` search only where the write plan may use it (an EHR without it is no failure
    when the capability set says so)."""
    patient = f"Patient/{PROBE_ID}"
    codes = load_order_codes(cfg.mappings_dir).search_token()
    by_identifier = plan is None or dict((n, v) for n, v, _o in plan.capabilities).get("docref_identifier_search")
    needs: dict[str, list[tuple[str, str]]] = {
        "Patient": [],
        # intake.poll / run_intake; _sort is a result parameter but strict servers refuse it when unsupported.
        "ServiceRequest": [("code", codes), ("status", "active"), ("_lastUpdated", "ge2000-01-01"),
                           ("_sort", "_lastUpdated")],
        "Task": [("identifier", f"urn:fhirbridge:doctor|{PROBE_ID}")],               # intake: a Case's Task
        # writeback: already filed?
        "DocumentReference": [("identifier", f"urn:fhirbridge:doctor|{PROBE_ID}")] if by_identifier else [],
    }
    for name in profile_names(cfg.mappings_dir):
        for rtype in load_profile(cfg.mappings_dir, name).rules:
            needs.setdefault(rtype, [])
            if ("patient", patient) not in needs[rtype]:
                needs[rtype].append(("patient", patient))
    for rtype in FOLLOW_TYPES:
        needs.setdefault(rtype, [])
    needs["Subscription"] = [("url", "https://fhirbridge.invalid/doctor")]
    needs["Basic"] = [("code", "http://hl7.org/fhir/fhir-types|SubscriptionTopic")]
    return needs


# --- running the checks ----------------------------------------------------------------------------------

def run(cfg: Config, hospital: Hospital, *, timeout: tuple[float, float] = (5.0, 15.0),
        plan_for: PlanFor | None = None) -> Report:
    report = Report(hospital.name, hospital.fhir_base_url)
    reviewer_key_problems = _key_files(cfg, hospital, report)
    session = requests.Session()
    session.headers.update({"Accept": FHIR_JSON, "User-Agent": "fhirbridge-doctor"})
    try:
        _tls(hospital, report)
        cs = _capabilities(hospital, session, timeout, report)
        plan = _write_plan(plan_for, cs, report) if plan_for is not None else None
        if cs is not None:
            _capability_contents(cfg, cs, report, plan)
        auth = _auth(cfg, hospital, session, timeout, report, reachable=cs is not None, plan=plan)
        if auth is not False and cs is not None:
            session.auth = auth
            _access(cfg, hospital, session, timeout, report, plan)
            if plan is None or plan.kind == "ATOMIC":
                _write_access(cfg, hospital, session, timeout, report, plan)
            else:
                report.add("write-back (transaction)", "skip", f"the {plan.kind} write plan posts no transaction")
        elif cs is not None:
            report.add("searches", "skip", "no usable credentials (see above)")
        _reviewers(cfg, session, timeout, report, reviewer_key_problems)
        _store(cfg, report)
        _audit_owed(cfg, hospital, report)
    finally:
        session.close()
    return report


def _key_files(cfg: Config, hospital: Hospital, report: Report) -> dict:
    """The hospital's key files (reported here) and the reviewers' problems (returned, reported with them)."""
    # config's own checks, as ConfigErrors: their keys tell whose file each problem is about.
    problems = config_mod._file_problems(cfg)
    prefix = "hospital" if len(cfg.hospitals) == 1 else f"hospitals[{list(cfg.hospitals).index(hospital.name)}]"
    mine = [p for p in problems if (p.key or "").startswith(prefix)]
    if mine:
        for p in mine:
            report.add(f"keys: {p.key}", "fail", p.detail,
                       "make the hospital's key set with `fhirbridge init DIR` (or restore it from the backup); "
                       "its path goes in [hospital] keys")
    else:
        report.add("keys: hospital", "pass", f"{hospital.keys} can sign and decrypt")
    return {p.key: p for p in problems if (p.key or "").startswith("reviewers[")}


def _loopback(url: str) -> bool:
    return urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")


def _tls(hospital: Hospital, report: Report) -> None:
    url = hospital.fhir_base_url
    if url.startswith("https://"):
        report.add("tls", "pass", "https")
    elif _loopback(url) or "." not in (urlsplit(url).hostname or "."):
        # A single-label host (a compose or pod-local service name) never leaves the private network.
        report.add("tls", "warn", "plain http, to this machine or a container on its private network (a demo EHR)",
                   "use the EHR's https:// base URL for anything but a local test server")
    else:
        report.add("tls", "fail", f"plain http to {urlsplit(url).hostname}: patient records would cross the network "
                   "unencrypted", "set [hospital] fhir_base_url to the EHR's https:// FHIR base URL")


def _connect_failure(exc: requests.RequestException, what: str, url: str) -> tuple[str, str]:
    host = urlsplit(url).netloc
    why = why_unreachable(exc, url)
    if isinstance(exc, requests.exceptions.SSLError) and "plain HTTP" in why:
        # An https:// URL naming a plain-http port: the handshake fails, but no certificate is at fault.
        return (f"{why}", "give the EHR's https port in fhir_base_url (or, for a demo EHR on this machine, "
                "http://127.0.0.1:<port>)")
    if isinstance(exc, requests.exceptions.SSLError):
        return (f"TLS handshake with {host} failed: {why}",
                "if the EHR uses a hospital CA, point REQUESTS_CA_BUNDLE at that CA's PEM file (or add it to the "
                "system trust store); check the certificate's name matches the URL's host")
    if why.startswith("DNS:"):
        return (f"{why} for {what}", "check the host name in fhir_base_url, and this machine's DNS "
                "(/etc/resolv.conf; `getent hosts <name>`)")
    if isinstance(exc, requests.Timeout):
        return (f"{host} did not answer {what} in time",
                "check the EHR is up and that a firewall or proxy (HTTPS_PROXY, NO_PROXY) lets this host through")
    return (f"cannot connect to {host} for {what}: {why}",
            "check fhir_base_url (host, port, path), DNS, and that a firewall or proxy lets this host through")


def _capabilities(hospital: Hospital, session: requests.Session, timeout, report: Report) -> dict | None:
    url = f"{hospital.fhir_base_url}/metadata"
    try:
        resp = session.get(url, timeout=timeout)
        if resp.status_code == 401:
            # http.html#capabilities lets a server protect /metadata; try once with our credentials.
            resp = session.get(url, timeout=timeout, auth=_plain_auth(hospital))
    except requests.RequestException as exc:
        detail, fix = _connect_failure(exc, "GET metadata", url)
        report.add("reachable", "fail", detail, fix)
        return None
    except Exception as exc:  # noqa: BLE001 - SMART token failures while retrying with credentials
        report.add("reachable", "fail", f"GET metadata needed credentials, which failed: {exc}",
                   "see the auth checks below")
        return None
    try:
        cs = resp.json() if resp.status_code == 200 else None
    except ValueError:
        cs = None
    if not isinstance(cs, dict) or cs.get("resourceType") != "CapabilityStatement":
        report.add("reachable", "fail", f"GET {url} answered HTTP {resp.status_code} without a CapabilityStatement",
                   "fhir_base_url must be the FHIR base (the URL that /metadata and /Patient hang off, often ending "
                   "in /fhir or /R4), not the EHR's web page")
        return None
    report.add("reachable", "pass", f"{urlsplit(url).netloc} answered with its CapabilityStatement")
    return cs


def _plain_auth(hospital: Hospital):
    return make_auth(hospital.auth.as_dict())


def _server_rest(cs: dict) -> dict:
    for rest in cs.get("rest") or []:
        if isinstance(rest, dict) and rest.get("mode") == "server":
            return rest
    return {}


_INTERACTION = {"create": "create", "update": "update", "read": "read", "search": "search-type"}


def _write_plan(plan_for: PlanFor, cs: dict | None, report: Report) -> PlanView | None:
    """Each capability with its origin, the plan chosen from them, and where a profile or pin overrides what the
    EHR's statement says."""
    try:
        plan = plan_for(cs)
    except Exception as exc:  # noqa: BLE001 - a bad profile or pin (ConfigError) is reported with its fix
        report.add("write plan", "fail", str(exc),
                   "fix [hospital.ehr] or the profile file it names (docs/ehr.md lists every capability)")
        return None
    overridden = {d[0]: d for d in plan.disagreements}
    for name, value, origin in plan.capabilities:
        if name in overridden:
            _n, said, _used, _o = overridden[name]
            report.add(f"capability {name}", "warn", f"{_shown(value)} ({origin}); the CapabilityStatement says "
                       f"{_shown(said)}", "check that the profile or pin is right for this EHR (servers advertise "
                       "badly, but an override that is wrong files the opinion the wrong way): docs/ehr.md")
        else:
            report.add(f"capability {name}", "pass", f"{_shown(value)} ({origin})")
    writes = ", ".join(f"{i} {t}" for t, i in plan.writes)
    detail = f"{plan.kind}: {plan.description}; writes: {writes}"
    if cs is None:
        report.add("write plan", "warn", detail + " (the CapabilityStatement could not be read: what neither the "
                   f"profile {plan.profile!r} nor a pin fixes is taken as an ideal server's)",
                   "make GET [base]/metadata reachable, or fix every capability by profile and pins (docs/ehr.md)")
    else:
        report.add("write plan", "pass", detail)
    if not plan.task_write:
        report.add("task writes", "warn", "the EHR takes no Task writes: each Case's status lives in fhirbridge "
                   "(`fhirbridge status`, the physician page, the dashboard), not in an EHR Task; the note still "
                   "files", "nothing to fix if the EHR has no Task write; otherwise correct the profile or pin")
    if cs is not None:
        rest = _server_rest(cs)
        declared = {r.get("type"): r for r in rest.get("resource") or [] if isinstance(r, dict)}
        unlisted = []
        for rtype, interaction in plan.writes:
            if rtype in declared:   # a type the statement leaves out says nothing (Binary often is)
                codes = {i.get("code") for i in declared[rtype].get("interaction") or [] if isinstance(i, dict)}
                if _INTERACTION[interaction] not in codes:
                    unlisted.append(f"{interaction} {rtype}")
        if unlisted:
            report.add("write plan vs statement", "warn", f"the plan makes {', '.join(unlisted)}, which the "
                       "CapabilityStatement does not list", "ask the vendor whether the endpoint allows it; if not, "
                       "pin the capability that makes the plan need it (docs/ehr.md)")
    return plan


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    return "no limit" if value is None else str(value)


def _capability_contents(cfg: Config, cs: dict, report: Report, plan: PlanView | None = None) -> None:
    version = str(cs.get("fhirVersion") or "")
    if version.startswith("4.0"):
        report.add("fhir version", "pass", f"FHIR {version} (R4)")
    else:
        report.add("fhir version", "fail", f"the server speaks FHIR {version or '(not stated)'}, not R4 (4.0.x)",
                   "use the EHR's FHIR R4 endpoint (vendors often serve DSTU2, STU3, R4 at different paths)")
    rest = _server_rest(cs)
    declared = {r.get("type"): r for r in rest.get("resource") or [] if isinstance(r, dict)}
    needs = needed_searches(cfg, plan)
    missing = [t for t in needs if t not in declared and t not in OPTIONAL_TYPES]
    if missing:
        report.add("resource types", "fail", f"not offered: {', '.join(missing)}",
                   "fhirbridge reads these types; ask the EHR vendor to enable them on this endpoint (or remove them "
                   "from mappings/collect/ if the hospital does not record them)")
    else:
        report.add("resource types", "pass",
                   f"all {len(needs) - len(OPTIONAL_TYPES)} types fhirbridge reads are offered")
    # Optional types are left to their probes below: statements often omit Binary though it is served.
    unlisted = []
    for rtype, params in needs.items():
        if rtype in declared:
            names = {p.get("name") for p in declared[rtype].get("searchParam") or [] if isinstance(p, dict)}
            # Common parameters (_id, _lastUpdated, _sort) are often left out of the statement.
            unlisted += [f"{rtype}:{n}" for n, _v in params if not n.startswith("_") and n not in names]
    if unlisted:
        report.add("search parameters", "warn", f"not listed in the CapabilityStatement: {', '.join(unlisted)}",
                   "statements are often incomplete: the searches below settle it (a parameter the server really "
                   "lacks fails there with HTTP 400)")
    else:
        report.add("search parameters", "pass", "every search parameter fhirbridge uses is listed")
    interactions = {i.get("code") for i in rest.get("interaction") or [] if isinstance(i, dict)}
    if "transaction" in interactions:
        report.add("transaction", "pass", "the server takes transaction Bundles"
                   + (" (the opinion is filed in one)" if plan is None or plan.kind == "ATOMIC" else ""))
    elif plan is not None and plan.kind != "ATOMIC":
        report.add("transaction", "pass", f"the CapabilityStatement lists no transaction interaction: the {plan.kind} "
                   "write plan files one resource at a time (see write plan)")
    elif plan is not None:
        report.add("transaction", "warn", "the CapabilityStatement lists no transaction interaction, but the "
                   "profile or a pin says there is one: the ATOMIC write plan posts one",
                   "check that the EHR takes transactions (see capability transaction); if not, remove the override")
    else:
        report.add("transaction", "fail", "the CapabilityStatement lists no transaction interaction",
                   "fhirbridge files an opinion (Binary, DocumentReference, Provenance, Task) in ONE transaction; "
                   "ask the vendor to enable transactions on this endpoint")


def _auth(cfg: Config, hospital: Hospital, session: requests.Session, timeout, report: Report, *, reachable: bool,
          plan: PlanView | None = None):
    """The credentials to probe with: an auth object, None (no auth), or False (they do not work)."""
    kind = hospital.auth.type
    if kind != "smart":
        report.add("auth", "pass" if kind != "none" else "warn",
                   {"none": "no credentials configured", "basic": "HTTP Basic",
                    "bearer": "a static bearer token"}[kind],
                   "most EHRs require SMART Backend Services: set [hospital.auth] type = \"smart\" (see "
                   "docs/connect-ehr.md)")
        return _plain_auth(hospital)
    if not reachable:
        report.add("smart configuration", "skip", "the EHR is not reachable")
        return False
    a = hospital.auth
    url = f"{hospital.fhir_base_url}/.well-known/smart-configuration"
    doc = None
    try:
        resp = session.get(url, timeout=timeout, headers={"Accept": "application/json"})
        doc = resp.json() if resp.status_code == 200 else None
    except (requests.RequestException, ValueError):
        doc = None
    if not isinstance(doc, dict):
        status = "warn" if a.token_url else "fail"
        report.add("smart configuration", status, f"{url} gave no SMART configuration",
                   "set [hospital.auth] token_url to the EHR's OAuth token endpoint (the vendor's documentation "
                   "names it)")
    else:
        problems = []
        methods = doc.get("token_endpoint_auth_methods_supported")
        if isinstance(methods, list) and "private_key_jwt" not in methods:
            problems.append("private_key_jwt is not among token_endpoint_auth_methods_supported")
        grants = doc.get("grant_types_supported")
        if isinstance(grants, list) and "client_credentials" not in grants:
            problems.append("client_credentials is not among grant_types_supported")
        algs = doc.get("token_endpoint_auth_signing_alg_values_supported")
        if not a.token_url and not isinstance(doc.get("token_endpoint"), str):
            problems.append("no token_endpoint")
        if problems:
            report.add("smart configuration", "fail", "; ".join(problems),
                       "the EHR must support SMART Backend Services (client_credentials with private_key_jwt): ask "
                       "the vendor to enable it for this endpoint")
        else:
            report.add("smart configuration", "pass", f"token endpoint {a.token_url or doc.get('token_endpoint')}"
                       + (f"; signing algorithms {', '.join(map(str, algs))}" if isinstance(algs, list) else ""))
    assert a.keys is not None  # smart auth: the loader defaults it to the hospital's keys
    needs = smart_needs(cfg, plan)
    try:
        smart = SmartBackendAuth.from_keys(keys=a.keys, client_id=a.client_id, fhir_base_url=hospital.fhir_base_url,
                                           token_url=a.token_url, scopes=a.scopes, default_scopes=needed_scopes(needs),
                                           alg=a.alg, timeout=timeout)
        smart.access_token()
    except Exception as exc:  # noqa: BLE001 - every failure here is reported with its fix
        text = str(exc)
        if "invalid_client" in text or "Unknown client" in text or "(HTTP 401)" in text:
            fix = (f"register client_id {a.client_id!r} at the EHR as a SMART backend service with the public key set "
                   "`fhirbridge keys jwks` prints (or its URL), and check [hospital.auth] client_id and keys")
        elif "invalid_scope" in text:
            fix = "the EHR refused the scopes asked for: have the client's registration allow them, or set scopes"
        else:
            fix = "check the token endpoint is reachable from here and the client registration at the EHR"
        report.add("smart token", "fail", text, fix)
        return False
    granted = (smart.granted_scope or "").split()
    report.add("smart token", "pass", f"client {a.client_id!r} got an access token"
               + (f" with {len(granted)} scope(s)" if granted else ""))
    if granted:
        missing = missing_scopes(smart.scopes, granted)
        if missing:
            report.add("scopes granted", "fail", f"asked for but not granted: {' '.join(missing)}",
                       "have the EHR's registration of this client allow these scopes")
        else:
            report.add("scopes granted", "pass", "every scope asked for was granted")
        _feature_scopes(report, needs, granted, a.client_id)
    else:
        report.add("scopes per feature", "warn", "the token response named no granted scope (SMART says it SHALL)",
                   "the searches below show what is refused; ask the vendor which scopes the client holds")
    return smart


def _feature_scopes(report: Report, needs: dict[str, tuple[tuple[str, str], ...]], granted: list[str],
                    client_id: str | None) -> None:
    """Each feature whose requests (fhir.auth.FEATURES) the granted scopes do not cover, named with what breaks:
    a grant narrower than what was asked for, or an explicit [hospital.auth] scopes that leaves something out."""
    short = 0
    for name, pairs in needs.items():
        missing = missing_scopes(scopes_for(pairs), granted)
        if not missing:
            continue
        short += 1
        feature = FEATURE[name]
        report.add(f"scopes for {name}", "fail" if feature.core or feature.optional else "warn",
                   f"not granted: {' '.join(missing)}: {feature.breaks}",
                   f"have the EHR's registration of client {client_id!r} allow {' '.join(missing)} (SMART v1: "
                   f"{' '.join(v1_scopes(missing))}); docs/operate.md lists every scope per feature")
    if not short:
        report.add("scopes per feature", "pass", f"the grant covers {', '.join(needs)}")


def _scope_hint(hospital: Hospital, rtype: str, perms: str) -> str:
    if hospital.auth.type == "smart":
        v1 = "read" if set(perms) & set("rs") else "write"
        return f"grant scope system/{rtype}.{perms} (SMART v1: system/{rtype}.{v1}) to fhirbridge's client at the EHR"
    return "the credentials lack this permission: have the EHR grant it to fhirbridge's account"


def _access(cfg: Config, hospital: Hospital, session: requests.Session, timeout, report: Report,
            plan: PlanView | None = None) -> None:
    """One harmless search per type, with the parameters fhirbridge uses; a read for Binary."""
    base = hospital.fhir_base_url
    for rtype, params in needed_searches(cfg, plan).items():
        name = f"search {rtype}"
        optional = rtype in OPTIONAL_TYPES
        query = [("_id", PROBE_ID), *params, ("_count", "1")]
        try:
            resp = session.get(f"{base}/{rtype}", params=query, timeout=timeout, headers={"Prefer": "handling=strict"})
        except Exception as exc:  # noqa: BLE001
            report.add(name, "fail", f"no answer ({type(exc).__name__})", "check the EHR is reachable (above)")
            continue
        _probe_result(report, hospital, name, rtype, "rs", resp, optional, [n for n, _v in params])
    try:
        resp = session.get(f"{base}/Binary/{PROBE_ID}", timeout=timeout)
        if resp.status_code == 404:
            report.add("read Binary", "pass", "allowed (the probe id does not exist: 404)")
        else:
            _probe_result(report, hospital, "read Binary", "Binary", "r", resp, True, [])
    except Exception as exc:  # noqa: BLE001
        report.add("read Binary", "fail", f"no answer ({type(exc).__name__})", "check the EHR is reachable (above)")


def _probe_result(report: Report, hospital: Hospital, name: str, rtype: str, perms: str, resp, optional: bool,
                  params: list[str]) -> None:
    status = resp.status_code
    bad = "warn" if optional else "fail"
    why = f" ({OPTIONAL_TYPES[rtype]})" if optional and rtype in OPTIONAL_TYPES else ""
    if 200 <= status < 300:
        report.add(name, "pass", "allowed" + (f" with {', '.join(params)}" if params else ""))
    elif status in (401, 403):
        report.add(name, bad, f"refused: HTTP {status}{_diagnostics(resp)}{why}", _scope_hint(hospital, rtype, perms))
    elif status == 400:
        report.add(name, bad, f"HTTP 400{_diagnostics(resp)}: a search parameter ({', '.join(params) or '_id'}) is "
                   f"not supported{why}", "ask the vendor which of these parameters the endpoint supports; fhirbridge "
                   "sends searches with handling=strict so an unsupported one cannot widen a search")
    else:
        report.add(name, bad, f"HTTP {status}{_diagnostics(resp)}{why}", "see the EHR's log for this request")


def _diagnostics(resp) -> str:
    try:
        outcome = resp.json()
    except ValueError:
        return ""
    if not isinstance(outcome, dict):
        return ""
    texts = [str(i.get("diagnostics") or "") for i in outcome.get("issue") or [] if isinstance(i, dict)]
    text = " ".join(" ".join(texts).split())[:200]
    return f": {text}" if text else ""


def _write_access(cfg: Config, hospital: Hospital, session: requests.Session, timeout, report: Report,
                  plan: PlanView | None = None) -> None:
    """An empty transaction writes nothing; a server that authorises transactions refuses it all the same
    when fhirbridge may not post them (write-back needs that)."""
    empty = {"resourceType": "Bundle", "type": "transaction", "entry": []}
    try:
        resp = session.post(hospital.fhir_base_url, json=empty, timeout=timeout,
                            headers={"Content-Type": FHIR_JSON})
    except Exception as exc:  # noqa: BLE001
        report.add("write-back (transaction)", "fail", f"no answer ({type(exc).__name__})",
                   "check the EHR is reachable (above)")
        return
    if 200 <= resp.status_code < 300:
        report.add("write-back (transaction)", "pass", "an empty transaction was accepted (nothing written)")
    elif resp.status_code in (401, 403):
        writes = " ".join(scopes_for(smart_needs(cfg, plan)["write-back"]))
        hint = (f"grant the write-back scopes ({writes}); a server that authorises a transaction as a whole (as "
                "a create on every type) needs system/*.c in [hospital.auth] scopes as well") \
            if hospital.auth.type == "smart" else \
            ("fhirbridge's account needs permission to post transactions and to create or update DocumentReference, "
             "Binary, Provenance and Task")
        report.add("write-back (transaction)", "fail", f"refused: HTTP {resp.status_code}{_diagnostics(resp)}", hint)
    else:
        report.add("write-back (transaction)", "warn", f"HTTP {resp.status_code} to an empty transaction"
                   f"{_diagnostics(resp)}: permission could not be told apart from the server disliking an empty "
                   "Bundle", "file one test opinion against a test patient to be sure")


def _reviewers(cfg: Config, session: requests.Session, timeout, report: Report, problems: dict) -> None:
    if not cfg.reviewers:
        report.add("reviewers", "fail", "no [[reviewers]] configured", "add one (docs/reviewers.md)")
    for i, r in enumerate(cfg.reviewers.values()):
        mine = [p for k, p in problems.items() if k.startswith(f"reviewers[{i}].")]
        if mine:
            report.add(f"reviewer {r.name}: keys", "fail", "; ".join(p.detail for p in mine),
                       f"put the reviewer's PUBLIC key set (with an encryption and a signature key) at {r.jwks}; "
                       "the reviewer makes it with `fhirbridge reviewer keys DIR`")
        else:
            report.add(f"reviewer {r.name}: keys", "pass", f"{r.jwks}: can seal to it and verify its opinions")
        t = r.transport
        name = f"reviewer {r.name}: transport"
        if t.type == "outbox":
            where = t.path
            assert where is not None  # the loader gives every outbox a path
            existing = next((p for p in (where, *where.parents) if p.exists()), None)
            if existing is not None and os.access(existing, os.W_OK | os.X_OK):
                report.add(name, "pass", f"outbox {where}" + ("" if where.exists() else " (made at first delivery)"))
            else:
                report.add(name, "fail", f"outbox {where} is not writable by this user",
                           f"create {where} and give the fhirbridge user write access")
        elif t.type == "https":
            assert t.url is not None  # the loader requires it of https
            try:
                resp = session.options(t.url, timeout=timeout, auth=None)
                report.add(name, "pass", f"{urlsplit(t.url).netloc} answered over TLS (HTTP {resp.status_code})")
            except requests.RequestException as exc:
                detail, fix = _connect_failure(exc, "a connection", t.url)
                report.add(name, "fail", detail, fix)
        else:
            report.add(name, "pass", "pull: fetches its packages from /reviewer with its own token")


def _store(cfg: Config, report: Report) -> None:
    try:
        store = Store(cfg.store_url, create=False)
    except Exception as exc:  # noqa: BLE001
        report.add("store", "fail", f"cannot open ({type(exc).__name__})", "check [fhirbridge] store_url")
        return
    try:
        ping(store)
        rev, head = store.schema_revision(), migrations.head()
        if rev == head:
            report.add("store", "pass", f"answers; schema at {rev}")
        else:
            report.add("store", "warn", f"answers; schema at {rev or 'none'}, newest is {head}",
                       "`fhirbridge db upgrade` (every start does it too)")
    except Exception as exc:  # noqa: BLE001
        report.add("store", "fail", f"does not answer ({type(exc).__name__})",
                   "check the database is up and store_url (host, user, password via FHIRBRIDGE_FHIRBRIDGE__STORE_URL)")
    finally:
        store.close()


def _audit_owed(cfg: Config, hospital: Hospital, report: Report) -> None:
    """AuditEvents recorded but not yet accepted by the EHR ([audit] write_to_ehr): a warning with the
    count and the EHR's last refusal, so a copy the EHR keeps refusing cannot go unnoticed."""
    if not cfg.audit.write_to_ehr:
        report.add("audit: EHR copy", "skip", "[audit] write_to_ehr is off")
        return
    try:
        store = Store(cfg.store_url, create=False)
    except Exception:  # noqa: BLE001 - reported by the store check
        report.add("audit: EHR copy", "skip", "the store cannot be opened (see above)")
        return
    try:
        debt = store.audit_owed(hospital=hospital.key)
    except Exception as exc:  # noqa: BLE001 - an old schema or a store that does not answer: said above
        report.add("audit: EHR copy", "skip", f"cannot read the audit trail ({type(exc).__name__})")
        return
    finally:
        store.close()
    if not debt["count"]:
        report.add("audit: EHR copy", "pass", "every AuditEvent recorded is in the EHR")
        return
    report.add("audit: EHR copy", "warn",
               f"{debt['count']} AuditEvent(s) not yet in the EHR; "
               f"last refusal: {debt['last_error'] or 'not tried yet'}",
               "each is tried again with backoff (`fhirbridge run --now` tries at once); if the EHR refuses the "
               "AuditEvent itself (4xx), fix what its OperationOutcome says (a profile it enforces, a write "
               "permission for AuditEvent)")


# --- output ----------------------------------------------------------------------------------------------

def render(report: Report) -> str:
    width = max(len(c.name) for c in report.checks) if report.checks else 10
    lines = [f"fhirbridge doctor: {report.hospital} ({report.fhir_base_url})", ""]
    for c in report.checks:
        lines.append(f"{c.status.upper():<4}  {c.name:<{width}}  {c.detail}")
        if c.fix:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    fails = sum(c.status == "fail" for c in report.checks)
    warns = sum(c.status == "warn" for c in report.checks)
    lines += ["", f"{fails} failure(s), {warns} warning(s)" + ("" if fails else ": fhirbridge can work with this EHR")]
    return "\n".join(lines)

