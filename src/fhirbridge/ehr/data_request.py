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
that it was asked (not the words: they may be clinical). Hospital staff act on it in the EHR (a new order
with a wider profile, or a document added to the chart).
"""
from __future__ import annotations

import re

from fhirbridge.ehr import task as ehr_task
from fhirbridge.ehr.context import App
from fhirbridge.errors import FhirbridgeError
from fhirbridge.steps import Step
from fhirbridge.store.store import Case

CDEX_TEMP = "http://hl7.org/fhir/us/davinci-cdex/CodeSystem/cdex-temp"
HREX_TEMP = "http://hl7.org/fhir/us/davinci-hrex/CodeSystem/hrex-temp"   # the input types CDex 2.0 reuses
PROFILE = "http://hl7.org/fhir/us/davinci-cdex/StructureDefinition/cdex-task-data-request"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
MAX_TEXT = 2000


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


def build(app: App, case: Case, text: str) -> dict:
    reviewer = app.config.reviewer(case.reviewer)
    return {
        "resourceType": "Task",
        "meta": {"profile": [PROFILE]},
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"system": CDEX_TEMP, "code": "data-request-code", "display": "Data Request Code"}]},
        "identifier": [{"system": ehr_task.CASE_ID_SYSTEM + ":data-request", "value": case.id}],
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


def request_records(app: App, case: Case, text: object) -> str:
    """Write the data request Task; returns its reference. Only while the Case awaits the opinion."""
    if case.step != Step.AWAIT_OPINION:
        raise BadRequest(f"Case {case.id[:8]} is {case.step}: more records can be asked for only while it awaits "
                         "your opinion")
    task = build(app, case, clean_text(text))
    if not task["partOf"]:
        del task["partOf"]
    stored, _ = app.ehr.create(task)
    ref = f"Task/{stored['id']}"
    app.store.add_event(case.id, "records.requested", {"task": ref})
    return ref
