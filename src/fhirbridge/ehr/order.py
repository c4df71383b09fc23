"""Place a second-opinion order in the EHR as an EHR does when a physician orders one.

The ServiceRequest follows HL7 BSeR's referral request: status active, intent order, category "Patient
referral", code from mappings/codes/orders.toml, the question in `note`, the reviewer organisation in
`performer` (by identifier), the collection profile in `orderDetail`, a placer identifier (v2-0203 PLAC)
assigned by the hospital. The `requester` is required: BSeR's referral request has it 1..1, and a referral
nobody asked for cannot be answered to anyone. It must be a Practitioner or PractitionerRole the EHR holds,
read before the order is written.
"""
from __future__ import annotations

import re
import uuid

from fhirbridge.config.mappings import profile_names
from fhirbridge.ehr.context import App
from fhirbridge.ehr.task import now_iso
from fhirbridge.errors import FhirbridgeError, FhirError

PLACER_SYSTEM = "urn:fhirbridge:placer-order"
# One per record the referring physician chose not to share (valueReference "Type/id"); collect withholds
# them. An extension (R4 extensibility.html) because no ServiceRequest element says "do not send this".
EXCLUDED_RECORD = "urn:fhirbridge:extension:excluded-record"
# R4 ServiceRequest.requester may name others, but a referral is asked for by a clinician (BSeR).
REQUESTER = re.compile(r"(Practitioner|PractitionerRole)/[A-Za-z0-9\-.]{1,64}")


def build_order(app: App, *, patient: str, question: str, requester: str, reviewer: str | None = None,
                profile: str | None = None, priority: str = "routine", placer: str | None = None,
                reason_reference: dict | None = None, reason_code: list[dict] | None = None) -> dict:
    """The second-opinion ServiceRequest as `place_order` writes it, not yet written and with nothing read from
    the EHR: the one shape for `fhirbridge order`, POST /api/orders, the physician app and the CDS Hooks
    suggestion (ehr/cds.py), whose EHR writes it itself. `placer`: the placer identifier's value (default: a new
    UUID). `reason_reference`/`reason_code`: the planned treatment the second opinion is about (R4
    ServiceRequest.reasonReference/reasonCode; for a CDS card, the draft order being signed)."""
    if not question.strip():
        raise FhirbridgeError("the question must not be empty: say what the reviewer should answer")
    if not requester or not REQUESTER.fullmatch(requester):
        raise FhirbridgeError("an order needs its requester, the ordering clinician: Practitioner/<id> or "
                              "PractitionerRole/<id> (BSeR: a referral's requester is required)")
    patient_ref = patient if patient.startswith("Patient/") else f"Patient/{patient}"
    codes = app.order_codes
    sr = {
        "resourceType": "ServiceRequest",
        "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                             "code": "PLAC", "display": "Placer Identifier"}]},
                        "system": PLACER_SYSTEM, "value": placer or str(uuid.uuid4()),
                        "assigner": app.hospital.organization_ref()}],
        "status": "active",
        "intent": "order",
        "category": [{"coding": [codes.order_category]}],
        "code": {"coding": [codes.order_code], "text": codes.order_code.get("display", "Second opinion")},
        "priority": priority,
        "subject": {"reference": patient_ref},
        "authoredOn": now_iso(),
        "note": [{"text": question.strip()}],
        "requester": {"reference": requester},
    }
    if reason_code:
        sr["reasonCode"] = reason_code
    if reason_reference:
        sr["reasonReference"] = [reason_reference]
    if reviewer:
        sr["performer"] = [app.config.reviewer(reviewer).organization_ref()]
    if profile:
        if profile not in profile_names(app.config.mappings_dir):
            raise FhirbridgeError(f"no collection profile {profile!r} (known: "
                                  f"{', '.join(profile_names(app.config.mappings_dir))})")
        sr["orderDetail"] = [{"coding": [{"system": codes.profile_system, "code": profile}]}]
    return sr


def place_order(app: App, *, patient: str, question: str, requester: str, reviewer: str | None = None,
                profile: str | None = None, priority: str = "routine",
                exclude: tuple[str, ...] | list[str] = (), placer: str | None = None,
                reason_reference: dict | None = None, reason_code: list[dict] | None = None) -> dict:
    """`requester`: the ordering clinician, "Practitioner/<id>" or "PractitionerRole/<id>" (required).
    `exclude`: records ("Type/id") the physician deselected; the order carries them (EXCLUDED_RECORD).
    `placer`: a placer identifier value decided beforehand (a CDS suggestion's, an accepted order's id): the
    order is then written once only, however often this is called with it (`find_placed`, else a conditional
    create on the identifier)."""
    sr = build_order(app, patient=patient, question=question, requester=requester, reviewer=reviewer,
                     profile=profile, priority=priority, placer=placer, reason_reference=reason_reference,
                     reason_code=reason_code)
    if placer and (found := find_placed(app, placer)) is not None:
        return found
    _must_exist(app, sr["subject"]["reference"])
    _must_exist(app, requester, "the requester ")
    if exclude:
        return _with_exclusions(app, sr, sorted(set(exclude)))
    stored, _ = app.ehr.create(sr, if_none_exist=f"identifier={PLACER_SYSTEM}|{placer}" if placer else None)
    return stored


def find_placed(app: App, placer: str) -> dict | None:
    """The order with this placer identifier value, if the EHR has it (any status: a draft waiting for its
    exclusions to be confirmed counts, so it is never written twice)."""
    for sr in app.ehr.search("ServiceRequest", {"identifier": f"{PLACER_SYSTEM}|{placer}"}):
        if sr.get("resourceType") == "ServiceRequest":
            return sr
    return None


def _must_exist(app: App, ref: str, what: str = "") -> None:
    try:
        app.ehr.read_ref(ref)
    except FhirError as exc:
        if exc.status in (404, 410):
            raise FhirbridgeError(f"{what}{ref} does not exist in the EHR at {app.hospital.fhir_base_url}") from None
        raise


def _with_exclusions(app: App, sr: dict, exclude: list[str]) -> dict:
    """Written as a draft first and made active only once the EHR is seen to keep every exclusion: a server
    that drops unknown extensions would otherwise have intake send the records the physician held back
    (intake takes active orders only, request-status)."""
    sr["extension"] = [{"url": EXCLUDED_RECORD, "valueReference": {"reference": ref}} for ref in exclude]
    sr["status"] = "draft"
    stored, _ = app.ehr.create(sr)
    if excluded_records(stored) != set(exclude):
        stored["status"] = "revoked"
        app.ehr.update(stored, if_match=stored.get("meta", {}).get("versionId"))
        raise FhirbridgeError("the EHR did not keep the list of records to hold back on the order, so it was "
                              "not placed; order again sharing every record, or ask IT")
    stored["status"] = "active"
    return app.ehr.update(stored, if_match=stored.get("meta", {}).get("versionId"))


def excluded_records(sr: dict) -> set[str]:
    """The records the referring physician deselected when ordering (EXCLUDED_RECORD extensions)."""
    return {e.get("valueReference", {}).get("reference") for e in sr.get("extension", [])
            if e.get("url") == EXCLUDED_RECORD and e.get("valueReference", {}).get("reference")}
