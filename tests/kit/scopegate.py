"""A SMART-enforcing EHR for the tests: the real sekmet granting exactly the scopes fhirbridge derives, behind a
gate that authorises each entry of a transaction or batch the way servers that check entries one by one do.

sekmet 0.1.1 enforces scopes on every request, but authorises a Bundle posted to the base as ONE create on `*`
(it would want `system/*.c`, a scope that lets a client create anything). The gate in front (a FaultProxy, so
fault rules can be added to it too) reads the scopes of the request's access token and, for a transaction or
batch, refuses it with 403 and an OperationOutcome when any entry's (resource type, interaction) is not
granted; a Bundle it admits goes on with the server's static token, which only the gate and the seeder hold.
Every other request goes on with the client's own token, and sekmet checks that itself. The token endpoint is
sekmet's own URL (a client assertion's `aud` must be it), so the SMART configuration passes through unchanged.

The gate checks the scopes the way SMART App Launch v2 defines them ("Scopes for requesting FHIR Resources"):
POST [type] `c`; GET [type]/[id] `r`; PUT or PATCH `u` (an update that creates is still an update); DELETE `d`;
GET [type]?... or POST [type]/_search `s`; v1 `.read` = `rs`, `.write` = `cud`, `.*` = all.
"""
from __future__ import annotations

import base64
import json
import secrets
import time
from pathlib import Path

from fhirbridge.crypto.keys import KeyRing
from fhirbridge.demo.localehr import LocalEhr
from fhirbridge.fhir.auth import BearerAuth
from tests.kit import processes
from tests.kit.faultproxy import FaultProxy
from tests.kit.sekmet_workflows import run_in_process

V1 = {"read": "rs", "write": "cud", "*": "cruds"}
# Exactly what a hospital with the shipped profiles and [audit] write_to_ehr needs (SMART v2, in .cruds order),
# written out so that the grant does not come from the code under test (tests/fhir/test_smart_scopes.py checks
# the derivation against it). Note the `u` on DocumentReference, Binary, ServiceRequest, Task and AuditEvent:
# each is PUT to an id fhirbridge chose. This is the ATOMIC write plan's list (sekmet advertises everything); the
# POST-only plans and an EHR without Task writes ask for the changes test_smart_scopes.py writes out.
EXACT_SCOPES = tuple(
    "system/ServiceRequest.crus system/Task.crus system/Organization.rs system/Patient.rs system/Condition.rs "
    "system/DiagnosticReport.rs system/ImagingStudy.rs system/Procedure.rs system/MedicationStatement.rs "
    "system/MedicationRequest.rs system/DocumentReference.rus system/Practitioner.rs system/PractitionerRole.rs "
    "system/Observation.rs system/Medication.rs system/Endpoint.rs system/Specimen.rs system/Location.rs "
    "system/Consent.rs system/Binary.rus system/Provenance.c system/Communication.u system/Basic.rs "
    "system/Subscription.crus "
    "system/AuditEvent.u".split())


def token_scopes(authorization: str | None) -> list[str] | None:
    """The `scope` claim of a bearer JWT (the server verifies its signature on every request it sees; here only
    what it grants is read), or None when there is no live token."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or token.count(".") != 2:
        return None
    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except ValueError:
        return None
    if not isinstance(claims, dict) or float(claims.get("exp", 0)) < time.time():
        return None
    return str(claims.get("scope", "")).split()


def interaction(method: str, url: str) -> tuple[str, str]:
    """(resource type, SMART v2 permission letter) of one request, by method and relative URL."""
    path, _, query = url.partition("?")
    parts = [p for p in path.strip("/").split("/") if p]
    rtype = parts[0] if parts else "*"
    method = method.upper()
    if method == "POST":
        return rtype, "s" if parts[-1:] == ["_search"] else "c"
    if method in ("PUT", "PATCH"):
        return rtype, "u"
    if method == "DELETE":
        return rtype, "d"
    return rtype, "r" if len(parts) >= 2 and not parts[1].startswith("_") else "s"


def allowed(scopes: list[str], rtype: str, perm: str) -> bool:
    for scope in scopes:
        ctx, _, rest = scope.partition("/")
        stype, dot, letters = rest.partition(".")
        letters = letters.split("?", 1)[0]
        if ctx == "system" and dot and stype in ("*", rtype) and perm in V1.get(letters, letters):
            return True
    return False


def outcome(code: str, text: str) -> bytes:
    return json.dumps({"resourceType": "OperationOutcome",
                       "issue": [{"severity": "error", "code": code, "diagnostics": text}]}).encode()


class ScopeGate(FaultProxy):
    """The gate in front of the SMART sekmet; `refused` lists each Bundle entry it refused ((type, letter))."""

    def __init__(self, upstream_base: str, static_token: str):
        super().__init__(upstream_base)
        self._static = static_token
        self.base_path = self.upstream[len(self.upstream_root):].rstrip("/")
        self.refused: list[tuple[str, str]] = []

    def keeps_urls(self, path: str) -> bool:
        return "/.well-known/smart-configuration" in path

    def admit(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, bytes] | dict | None:
        if method != "POST" or path.split("?", 1)[0].rstrip("/") != self.base_path:
            return None   # not a Bundle for the base: sekmet checks the client's own token
        try:
            bundle = json.loads(body or b"null")
        except ValueError:
            bundle = None
        if not isinstance(bundle, dict) or bundle.get("type") not in ("transaction", "batch"):
            return None
        scopes = token_scopes(next((v for k, v in headers.items() if k.lower() == "authorization"), None))
        if scopes is None:
            return 401, outcome("login", "a live SMART access token is required")
        for i, entry in enumerate(bundle.get("entry") or []):
            request = entry.get("request") or {} if isinstance(entry, dict) else {}
            rtype, perm = interaction(str(request.get("method", "")), str(request.get("url", "")))
            if not allowed(scopes, rtype, perm):
                self.refused.append((rtype, perm))
                return 403, outcome("forbidden", f"entry {i} ({request.get('method')} {request.get('url')}) needs "
                                    f"'{perm}' on {rtype}, which the token's scopes do not grant")
        return {"Authorization": f"Bearer {self._static}"}


class SmartEhr:
    """A sekmet enforcing SMART for one client (granted `scopes`, nothing more) behind a ScopeGate.

    `base_url` is the gate's FHIR base (give it to fhirbridge), `token_url` the server's token endpoint,
    `gate` the proxy (fault rules can be added to it), `admin` a bearer auth with no scope limits for seeding."""

    def __init__(self, directory: Path, client_id: str, keys: Path, *, scopes: str | tuple[str, ...] | list[str],
                 token_lifetime: int | None = None):
        self.static_token = secrets.token_urlsafe(24)
        jwks = KeyRing.load(keys).public_jwks()
        self.ehr = LocalEhr.start(directory, token_lifetime=token_lifetime, startup_timeout=processes.READY_SECONDS,
                                  smart_client={"client_id": client_id, "jwks": jwks, "scopes": scopes,
                                                "static_token": self.static_token})
        run_in_process(self.ehr)
        self.gate = ScopeGate(self.ehr.base_url, self.static_token)
        self.base_url = self.gate.base_url
        self.direct_url = self.ehr.base_url
        self.token_url = self.ehr.base_url.removesuffix("/fhir") + "/auth/token"
        self.admin = BearerAuth(self.static_token)

    def stop(self) -> None:
        self.gate.close()
        self.ehr.stop()
