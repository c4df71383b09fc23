"""A second-opinion order names the clinician who asks for it (issue 13, C4: BSeR's referral request has
`requester` 1..1), and that clinician must exist in the EHR; the placer identifier is assigned by the hospital."""
from __future__ import annotations

import pytest

from fhirbridge.ehr.order import place_order
from fhirbridge.errors import FhirbridgeError

pytestmark = pytest.mark.sekmet


def orders_for(fhir, patient: str) -> int:
    return len(list(fhir.search("ServiceRequest", {"subject": patient})))


def test_an_order_without_a_requester_is_refused_and_nothing_is_written(hospital, seeded, fhir):
    before = orders_for(fhir, seeded["patient"])
    for requester in (None, "", "Patient/x", "Organization/o", "Practitioner/a b"):
        with pytest.raises(FhirbridgeError, match=r"requester.*Practitioner/<id> or PractitionerRole/<id>"):
            place_order(hospital.app, patient=seeded["patient"], question="Fusion?", profile="spine",
                        requester=requester)  # type: ignore[arg-type]
    assert orders_for(fhir, seeded["patient"]) == before


def test_a_requester_the_ehr_does_not_hold_is_refused_before_anything_is_written(hospital, seeded, fhir):
    before = orders_for(fhir, seeded["patient"])
    for ref in ("Practitioner/no-such-doctor", "PractitionerRole/no-such-role"):
        with pytest.raises(FhirbridgeError) as refused:
            place_order(hospital.app, patient=seeded["patient"], question="Fusion?", profile="spine", requester=ref)
        base = hospital.app.hospital.fhir_base_url
        assert str(refused.value) == f"the requester {ref} does not exist in the EHR at {base}"
    assert orders_for(fhir, seeded["patient"]) == before


def test_the_order_names_its_requester_and_the_hospital_assigns_the_placer_identifier(hospital, seeded, fhir):
    role, _ = fhir.create({"resourceType": "PractitionerRole", "active": True,
                           "practitioner": {"reference": seeded["physician"]}})
    for requester in (seeded["physician"], f"PractitionerRole/{role['id']}"):
        sr = fhir.read_ref(f"ServiceRequest/{hospital.order(seeded['patient'], requester=requester)['id']}")
        assert sr["requester"] == {"reference": requester}
        [placer] = sr["identifier"]
        assert placer["type"]["coding"][0]["code"] == "PLAC"
        assert placer["assigner"] == hospital.app.hospital.organization_ref()


def test_the_demo_and_the_kit_order_as_a_physician_the_ehr_holds(hospital, seeded, fhir):
    assert fhir.read_ref(seeded["physician"])["resourceType"] == "Practitioner"
    sr = hospital.order(seeded["patient"])
    assert fhir.read_ref(sr["requester"]["reference"])["resourceType"] == "Practitioner"
