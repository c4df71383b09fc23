"""Place a second-opinion order in the EHR as an EHR does when a physician orders one.

The ServiceRequest follows HL7 BSeR's referral request: status active, intent order, category "Patient
referral", code from mappings/codes/orders.toml, the question in `note`, the reviewer organisation in
`performer` (by identifier), the collection profile in `orderDetail`, a placer identifier (v2-0203 PLAC).
"""
from __future__ import annotations

import uuid

from .context import App
from .ehr_task import now_iso
from .errors import FhirbridgeError, FhirError
from .mappings_load import profile_names

PLACER_SYSTEM = "urn:fhirbridge:placer-order"


def place_order(app: App, *, patient: str, question: str, reviewer: str | None = None,
                profile: str | None = None, requester: str | None = None, priority: str = "routine") -> dict:
    if not question.strip():
        raise FhirbridgeError("the question must not be empty: say what the reviewer should answer")
    patient_ref = patient if patient.startswith("Patient/") else f"Patient/{patient}"
    try:
        app.ehr.read_ref(patient_ref)
    except FhirError as exc:
        if exc.status == 404:
            raise FhirbridgeError(f"{patient_ref} does not exist in the EHR at {app.hospital.fhir_base_url}") \
                from None
        raise
    codes = app.order_codes
    sr = {
        "resourceType": "ServiceRequest",
        "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                             "code": "PLAC", "display": "Placer Identifier"}]},
                        "system": PLACER_SYSTEM, "value": str(uuid.uuid4())}],
        "status": "active",
        "intent": "order",
        "category": [{"coding": [codes.order_category]}],
        "code": {"coding": [codes.order_code], "text": codes.order_code.get("display", "Second opinion")},
        "priority": priority,
        "subject": {"reference": patient_ref},
        "authoredOn": now_iso(),
        "note": [{"text": question.strip()}],
    }
    if requester:
        sr["requester"] = {"reference": requester}
    if reviewer:
        sr["performer"] = [app.config.reviewer(reviewer).organization_ref()]
    if profile:
        if profile not in profile_names(app.config.mappings_dir):
            raise FhirbridgeError(f"no collection profile {profile!r} (known: "
                                  f"{', '.join(profile_names(app.config.mappings_dir))})")
        sr["orderDetail"] = [{"coding": [{"system": codes.profile_system, "code": profile}]}]
    stored, _ = app.ehr.create(sr)
    return stored
