"""An EHR capability proxy for the tests: the real sekmet behind a FaultProxy that makes it write the way a
less capable EHR does (issue 14), so each write plan runs against the behaviour it was chosen for.

Each behaviour emulates what vendors' R4 documentation describes; none weakens a check fhirbridge makes:
- `no_transaction`: POST of a `transaction` Bundle to [base] answers 405, and the CapabilityStatement served at
  /metadata lists no `transaction` interaction (R4 capabilitystatement rest.interaction);
- `batch_transactions`: a `transaction` is run as a `batch` (each entry on its own, nothing rolled back) and
  answered HTTP 200 as a `transaction-response`, entry statuses as they came (200/200/201/412);
- `no_rollback`: as batch_transactions, but a refused entry makes the HTTP answer that entry's status (the
  entries before it stay written);
- `no_update_create`: PUT to an id that does not exist yet answers 405 (R4 http.html#update: "the resource did
  not exist prior to the update, and the server does not allow client defined ids"); updateCreate false;
- `ignore_if_none_exist`: the If-None-Exist header is dropped (the server creates regardless);
- `requires_encounter`: a DocumentReference without context.encounter is refused 422;
- `one_attachment`: a DocumentReference keeps its first `content` only (the others are silently dropped);
- `no_task_write`: POST/PUT/PATCH of a Task answers 405 (Task is read-only at that vendor);
- `no_identifier_search`: DocumentReference?identifier= and Provenance?target= answer 400 (unknown search
  parameter under `Prefer: handling=strict`, search.html#errors);
- lost answers after commit: the FaultProxy's `lose-response` rules, unchanged.
`EhrProxy.writes` counts the resources the proxy forwarded a create/update of, by type: "how many POSTs of a
DocumentReference reached the EHR" is what a duplicate would show.

PROFILES names the combinations the tests run, each with the `[hospital.ehr]` pins that describe it to
fhirbridge (tests/kit/hospital.py `TestHospital(..., ehr_pins=...)`).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, fields

import requests

from tests.kit.faultproxy import FaultProxy

_BASE = re.compile(r"^/fhir/?(\?.*)?$")
_TYPE_ID = re.compile(r"^/fhir/([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})/?(\?.*)?$")
_TYPE = re.compile(r"^/fhir/([A-Z][A-Za-z]+)/?(\?.*)?$")


@dataclass(frozen=True)
class Behaviour:
    no_transaction: bool = False
    batch_transactions: bool = False
    no_rollback: bool = False
    no_update_create: bool = False
    ignore_if_none_exist: bool = False
    requires_encounter: bool = False
    one_attachment: bool = False
    no_task_write: bool = False
    no_identifier_search: bool = False


@dataclass(frozen=True)
class Profile:
    name: str
    behaviour: Behaviour
    pins: dict          # [hospital.ehr] pins that tell fhirbridge what this EHR does
    plan: str           # the write plan fhirbridge must choose (ehr.write_plan.Kind name)


POST_ONLY = dict(no_transaction=True, no_update_create=True)
# The FHIR document and the text: what most profiles here keep (the PDF rendering has a test of its own).
DOC_TEXT = {"attachment_types": ["application/fhir+json", "text/plain"]}
PROFILES = {p.name: p for p in (
    Profile("ideal", Behaviour(), {}, "ATOMIC"),
    Profile("batch-transactions", Behaviour(batch_transactions=True), {"transaction_atomic": False, **DOC_TEXT},
            "LEDGER"),
    Profile("post-only", Behaviour(**POST_ONLY, ignore_if_none_exist=True),
            {"transaction": False, "update_create": False, "conditional_create": False, **DOC_TEXT}, "LEDGER"),
    Profile("post-only-encounter-one-attachment",
            Behaviour(**POST_ONLY, requires_encounter=True, one_attachment=True),
            {"transaction": False, "update_create": False, "requires_encounter": True, "max_attachments": 1,
             "attachment_types": ["text/plain"]}, "LEDGER"),
    Profile("post-only-no-search", Behaviour(**POST_ONLY, ignore_if_none_exist=True, no_identifier_search=True),
            {"transaction": False, "update_create": False, "conditional_create": False,
             "docref_identifier_search": False, "provenance_target_search": False, **DOC_TEXT}, "ONCE"),
    Profile("atomic-no-task-write", Behaviour(no_task_write=True), {"task_write": False}, "ATOMIC"),
    Profile("no-task-write", Behaviour(**POST_ONLY, no_task_write=True),
            {"transaction": False, "update_create": False, "task_write": False, **DOC_TEXT}, "LEDGER"),
)}


def _outcome(status: int, code: str, text: str) -> tuple[int, bytes]:
    return status, json.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": code, "diagnostics": text}]}).encode()


class EhrProxy(FaultProxy):
    def __init__(self, upstream_base: str, behaviour: Behaviour | None = None, *, seed: int = 0):
        super().__init__(upstream_base, seed=seed)
        self.behaviour = behaviour or Behaviour()
        self.writes: Counter = Counter()     # (method, resource type) forwarded upstream

    # ------------------------------------------------------------------ refusals (before any rule)

    def admit(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, bytes] | dict | None:
        b = self.behaviour
        if method == "POST" and _BASE.match(path) and b.no_transaction and _bundle_type(body) == "transaction":
            return _outcome(405, "not-supported", "transaction is not supported at this endpoint")
        if method in ("POST", "PUT", "PATCH") and b.no_task_write and re.match(r"^/fhir/Task(/|\?|$)", path):
            return _outcome(405, "not-supported", "Task is read-only at this endpoint")
        if method == "POST" and _BASE.match(path) and b.no_task_write and any(
                (e.get("resource") or {}).get("resourceType") == "Task" for e in _json(body).get("entry") or []):
            return _outcome(405, "not-supported", "Task is read-only at this endpoint")
        if method == "PUT" and b.no_update_create:
            m = _TYPE_ID.match(path)
            if m and not self._exists(m.group(1), m.group(2), headers):
                return _outcome(405, "not-supported", "the resource does not exist and this server does not "
                                                      "allow client-defined ids (update as create)")
        if method == "GET" and b.no_identifier_search:
            if re.match(r"^/fhir/DocumentReference\?(.*&)?identifier=", path) or \
                    re.match(r"^/fhir/Provenance\?(.*&)?target=", path):
                return _outcome(400, "not-supported", "unknown search parameter")
        if method in ("POST", "PUT") and b.requires_encounter:
            m = _TYPE_ID.match(path) or _TYPE.match(path)
            if m and m.group(1) == "DocumentReference":
                doc = _json(body)
                if not ((doc.get("context") or {}).get("encounter")):
                    return _outcome(422, "required", "DocumentReference.context.encounter is required")
        return None

    def _exists(self, type_: str, id_: str, headers: dict) -> bool:
        auth = {k: v for k, v in headers.items() if k.lower() == "authorization"}
        r = requests.get(f"{self.upstream}/{type_}/{id_}", headers={"Accept": "application/fhir+json", **auth},
                         timeout=30)
        return r.status_code == 200

    # ------------------------------------------------------------------ rewrites

    def transform_request(self, method: str, path: str, headers: dict, body: bytes) -> tuple[dict, bytes]:
        b = self.behaviour
        if b.ignore_if_none_exist:
            headers = {k: v for k, v in headers.items() if k.lower() != "if-none-exist"}
        if method == "POST" and _BASE.match(path) and (b.batch_transactions or b.no_rollback) \
                and _bundle_type(body) == "transaction":
            bundle = _json(body)
            bundle["type"] = "batch"
            body = json.dumps(bundle).encode()
        if method in ("POST", "PUT") and b.one_attachment:
            m = _TYPE_ID.match(path) or _TYPE.match(path)
            if m and m.group(1) == "DocumentReference":
                doc = _json(body)
                doc["content"] = (doc.get("content") or [])[:1]
                body = json.dumps(doc).encode()
        if method in ("POST", "PUT"):
            m = _TYPE_ID.match(path) or _TYPE.match(path)
            if m:
                self.writes[(method, m.group(1))] += 1
            elif _BASE.match(path):
                for e in _json(body).get("entry") or []:
                    req = e.get("request") or {}
                    self.writes[(req.get("method"), (e.get("resource") or {}).get("resourceType"))] += 1
        return headers, body

    def transform_response(self, method: str, path: str, status: int, content: bytes) -> tuple[int, bytes]:
        b = self.behaviour
        if method == "GET" and re.match(r"^/fhir/metadata/?(\?.*)?$", path) and status == 200:
            return status, self._capability_statement(content)
        if method == "POST" and _BASE.match(path) and (b.batch_transactions or b.no_rollback) and status == 200:
            bundle = _json(content)
            if bundle.get("type") == "batch-response":
                bundle["type"] = "transaction-response"
                if b.no_rollback:
                    for e in bundle.get("entry") or []:
                        code = str((e.get("response") or {}).get("status", "")).split(" ")[0]
                        if code and not code.startswith("2"):
                            return _outcome(int(code), "conflict", "an entry of the transaction was refused")
                return status, json.dumps(bundle).encode()
        return status, content

    def _capability_statement(self, content: bytes) -> bytes:
        """What this EHR advertises: no transaction, no updateCreate, no conditional create, per behaviour."""
        cs = _json(content)
        b = self.behaviour
        for rest in cs.get("rest") or []:
            if b.no_transaction:
                rest["interaction"] = [i for i in rest.get("interaction") or [] if i.get("code") != "transaction"]
            for res in rest.get("resource") or []:
                if b.no_update_create:
                    res["updateCreate"] = False
                if b.ignore_if_none_exist:
                    res["conditionalCreate"] = False
                if b.no_task_write and res.get("type") == "Task":
                    res["interaction"] = [i for i in res.get("interaction") or []
                                          if i.get("code") not in ("create", "update", "patch")]
                if b.no_identifier_search and res.get("type") in ("DocumentReference", "Provenance"):
                    gone = {"DocumentReference": "identifier", "Provenance": "target"}[res["type"]]
                    res["searchParam"] = [p for p in res.get("searchParam") or [] if p.get("name") != gone]
        return json.dumps(cs).encode()

    def written(self, type_: str, method: str | None = None) -> int:
        """Creates/updates of `type_` forwarded to the EHR (POST and PUT, or only `method`)."""
        return sum(n for (m, t), n in self.writes.items() if t == type_ and method in (None, m))


def _bundle_type(body: bytes) -> str | None:
    return _json(body).get("type")


def _json(body: bytes) -> dict:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def behaviours() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Behaviour))
