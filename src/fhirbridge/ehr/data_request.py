"""A reviewer asks the hospital for more records: a Da Vinci CDex data request Task in the EHR.

CDex STU 2.0.0 (task-based-approach.html; profile cdex-task-data-request) models "please send me these data"
as a Task with `code` from CDex's own temporary code system (cdex-temp): `data-request-code` when the wanted
data is named by a code or free text, `data-request-query` for a FHIR query. `requester` is the party asking,
`owner` the party holding the data, `for` the patient, `authoredOn` and `reasonCode.text` are required, and
one input says what is wanted: the `code` slice, typed HRex `data-code`, whose CodeableConcept may be text
alone. A reviewer writes in words, so the request is `data-request-code` with the text. The profile
forbids `focus` (max 0): the order that authorises the request is `basedOn`. The optional purpose-of-use
input (cdex-temp `purpose-of-use`) says TREAT. *Changed:* CDex 1.x's HRex-based Task used HRex's
`data-request` code and allowed `focus`, which older versions of this module wrote.

The Task is `partOf` the referral Task, so the EHR shows it with the referral; the Case's event log records
that it was asked (not the words: they may be clinical).

A reviewer who can name the records as a FHIR query (`query`) gets `data-request-query` with the query in the
HRex `data-query` input (valueString), as CDex's query examples do; fhirbridge runs it, restricted to the
Case's patient and to what the collection profile lets out, and proposes the result (loop/supplement.py).
The request is open while its status is requested/received/accepted/in-progress: `open_requests` finds it
(by the data-request identifier, which carries the Case id) for the physician page, the dashboard and
`status`. Answered, it is `completed` with one `output` per record sent (type HRex `data-value`,
valueReference), as the CDex completed-task examples do (`complete`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from fhirbridge.config.mappings import COLLECTABLE
from fhirbridge.ehr import task as ehr_task
from fhirbridge.ehr.context import App
from fhirbridge.errors import FhirbridgeError, FhirError
from fhirbridge.steps import Step
from fhirbridge.store.store import Case

CDEX_TEMP = "http://hl7.org/fhir/us/davinci-cdex/CodeSystem/cdex-temp"
HREX_TEMP = "http://hl7.org/fhir/us/davinci-hrex/CodeSystem/hrex-temp"   # the input types CDex 2.0 reuses
PROFILE = "http://hl7.org/fhir/us/davinci-cdex/StructureDefinition/cdex-task-data-request"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
MAX_TEXT = 2000
IDENTIFIER_SYSTEM = ehr_task.CASE_ID_SYSTEM + ":data-request"
OPEN = ("requested", "received", "accepted", "in-progress")   # R4 task-status values of a request not yet answered


class BadRequest(FhirbridgeError):
    """The request text is not acceptable (empty, too long, or markup)."""


def clean_text(text: object) -> str:
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("say which records you need (a short text)")
    text = text.strip()
    if len(text) > MAX_TEXT:
        raise BadRequest(f"the request is at most {MAX_TEXT} characters")
    if re.search(r"<\s*[a-zA-Z/!]", text):
        raise BadRequest("the request is plain text: no markup")
    return "".join(ch for ch in text if ch.isprintable() or ch in "\n\t")


def clean_query(query: object, patient: str) -> str | None:
    """A reviewer's FHIR query: `Type?param=value&...` of a collectable type, for this patient only. The
    patient parameter is ours to set: a query naming another patient is refused, not narrowed."""
    if query is None or query == "":
        return None
    if not isinstance(query, str) or len(query) > MAX_TEXT or any(ch.isspace() for ch in query.strip()):
        raise BadRequest("the query is one FHIR search, e.g. DocumentReference?type=http://loinc.org|18842-5")
    rtype, params = parse_query(query.strip())
    if rtype not in COLLECTABLE:
        raise BadRequest(f"a query may ask for {', '.join(COLLECTABLE)}; not {rtype or 'that'}")
    for name, value in params:
        if name in ("patient", "subject") and value not in (patient, patient.split("/", 1)[-1]):
            raise BadRequest("the query names another patient")
        if name.startswith("_") and name not in ("_lastUpdated", "_id"):
            raise BadRequest(f"the query parameter {name} is not allowed")
    return query.strip()


def parse_query(query: str) -> tuple[str, list[tuple[str, str]]]:
    parts = urlsplit(query)
    return parts.path.strip("/").split("/")[-1], parse_qsl(parts.query, keep_blank_values=True)


def build(app: App, case: Case, text: str, query: str | None = None) -> dict:
    reviewer = app.config.reviewer(case.reviewer)
    code = "data-request-query" if query else "data-request-code"
    display = "Data Request Query" if query else "Data Request Code"
    task: dict[str, Any] = {
        "resourceType": "Task",
        "meta": {"profile": [PROFILE]},
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"system": CDEX_TEMP, "code": code, "display": display}]},
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": case.id}],
        "basedOn": [{"reference": case.service_request}],
        "partOf": [{"reference": case.task}] if case.task else [],
        "for": {"reference": case.patient},
        "authoredOn": ehr_task.now_iso(),
        "requester": reviewer.organization_ref(),
        "owner": app.hospital.organization_ref(),
        "reasonCode": {"text": "The second-opinion reviewer needs more records to answer"},
        "input": [{"type": {"coding": [{"system": HREX_TEMP, "code": "data-code"}]},
                   "valueCodeableConcept": {"text": text}},
                  {"type": {"coding": [{"system": CDEX_TEMP, "code": "purpose-of-use"}]},
                   "valueCodeableConcept": {"coding": [{"system": ACT_REASON, "code": "TREAT",
                                                        "display": "treatment"}]}}],
    }
    if query:
        task["input"].insert(1, {"type": {"coding": [{"system": HREX_TEMP, "code": "data-query"}]},
                                 "valueString": query})
    return task


def request_records(app: App, case: Case, text: object, query: object = None) -> str:
    """Write the data request Task; returns its reference. Only while the Case awaits the opinion."""
    if case.step != Step.AWAIT_OPINION:
        raise BadRequest(f"Case {case.id[:8]} is {case.step}: more records can be asked for only while it awaits "
                         "your opinion")
    task = build(app, case, clean_text(text), clean_query(query, case.patient))
    if not task["partOf"]:
        del task["partOf"]
    stored, _ = app.ehr.create(task)
    ref = f"Task/{stored['id']}"
    # The Case row names its open requests (references only: the words stay in the EHR), so `status`, the
    # dashboard and the physician's list show them without a search per Case.
    app.store.update(case.id, data={"open_requests": [*open_refs(case), ref]}, event_kind="records.requested",
                     detail={"task": ref, **({"query": True} if task["code"]["coding"][0]["code"].endswith("query")
                                            else {})})
    return ref


def open_refs(case: Case) -> list[str]:
    """The Case's requests not answered yet, as the store has them (request_records adds, supplement removes)."""
    return [str(r) for r in (case.data or {}).get("open_requests", [])]


# --- the hospital's side: the open requests, and completing one ---------------------------------------------

@dataclass(frozen=True)
class Request:
    task: str                   # "Task/<id>"
    status: str
    text: str                   # the reviewer's words (clinical: shown on pages for staff, never logged)
    query: str | None           # data-request-query: the FHIR search the reviewer gave
    authored: str
    outputs: tuple[str, ...] = ()

    @property
    def is_open(self) -> bool:
        return self.status in OPEN


def parse(task: dict) -> Request:
    text, query = "", None
    for item in task.get("input", []):
        codes = {c.get("code") for c in (item.get("type") or {}).get("coding", [])}
        if "data-code" in codes:
            text = (item.get("valueCodeableConcept") or {}).get("text") or text
        elif "data-query" in codes:
            query = item.get("valueString") or query
    outputs = tuple(str((o.get("valueReference") or {}).get("reference")) for o in task.get("output", [])
                    if (o.get("valueReference") or {}).get("reference"))
    return Request(task=f"Task/{task.get('id')}", status=str(task.get("status")), text=text, query=query,
                   authored=str(task.get("authoredOn") or ""), outputs=outputs)


def requests_for(app: App, case: Case) -> list[Request]:
    """The Case's data requests in the EHR, oldest first (found by the identifier that carries the Case id)."""
    found = [parse(t) for t in app.ehr.search("Task", {"identifier": f"{IDENTIFIER_SYSTEM}|{case.id}"})
             if t.get("resourceType") == "Task" and _is_ours(t, case)]
    return sorted(found, key=lambda r: r.authored)


def open_requests(app: App, case: Case) -> list[Request]:
    return [r for r in requests_for(app, case) if r.is_open]


def read_request(app: App, case: Case, task_ref: str) -> tuple[dict, Request]:
    """The request Task, checked to be this Case's (a reference from a form is never trusted as is)."""
    if not re.fullmatch(r"Task/[A-Za-z0-9\-.]{1,64}", task_ref or ""):
        raise BadRequest("no such request")
    try:
        task = app.ehr.read_ref(task_ref)
    except FhirError as exc:
        if exc.status in (404, 410):
            raise BadRequest("no such request") from None
        raise
    if not _is_ours(task, case):
        raise BadRequest("no such request for this Case")
    return task, parse(task)


def _is_ours(task: dict, case: Case) -> bool:
    return (any(i.get("system") == IDENTIFIER_SYSTEM and i.get("value") == case.id for i in task.get("identifier", []))
            and (task.get("for") or {}).get("reference") == case.patient)


def completed(task: dict, sent: list[str]) -> dict:
    """The request Task answered: `completed`, one HRex data-value output per record sent."""
    out = {k: v for k, v in task.items() if k != "meta"}
    out["status"] = "completed"
    out["lastModified"] = ehr_task.now_iso()
    out["output"] = [{"type": {"coding": [{"system": HREX_TEMP, "code": "data-value"}]},
                      "valueReference": {"reference": ref}} for ref in sent]
    return out


def complete(app: App, case: Case, task_ref: str, sent: list[str]) -> bool:
    """Complete the request with what was sent; False when it already was (a repeated step). If-Match on the
    version read: an edit made in the EHR meanwhile is never overwritten; a conflict is read again."""
    task, req = read_request(app, case, task_ref)
    if req.status == "completed":
        return False
    version = (task.get("meta") or {}).get("versionId")
    try:
        app.ehr.update(completed(task, sent), if_match=version if version and app.capabilities.if_match else None)
    except FhirError as exc:
        if exc.status in (409, 412) or exc.status is None or exc.status >= 500:
            if read_request(app, case, task_ref)[1].status == "completed":
                return False
            raise FhirError(f"the request Task could not be completed yet ({exc}); will retry", status=exc.status,
                            transient=True) from None
        raise
    return True
