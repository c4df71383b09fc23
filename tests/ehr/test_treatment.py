"""What the chart says about a planned treatment (ehr/treatment.py), read from the real EHR: the plan named by
the order, a changed operation under the plan, a re-order of the same plan followed, a planned Procedure."""
from __future__ import annotations

import time

import pytest

from fhirbridge.ehr.treatment import code_of, planned_treatment, what_happened

pytestmark = pytest.mark.sekmet

FUSION = {"coding": [{"system": "http://snomed.info/sct", "code": "55705006", "display": "Spinal fusion"}]}
OTHER = {"coding": [{"system": "urn:test:procedures", "code": "microdiscectomy"}]}


@pytest.fixture
def patient(fhir):
    p, _ = fhir.create({"resourceType": "Patient", "name": [{"family": "Treatment-Testpatient"}]})
    return f"Patient/{p['id']}"


def _order(fhir, patient, code=FUSION, **extra):
    sr, _ = fhir.create({"resourceType": "ServiceRequest", "status": "active", "intent": "order", "code": code,
                         "subject": {"reference": patient}, **extra})
    return sr


def test_the_plan_is_the_reason_then_the_supporting_info_and_never_the_order_itself():
    order = {"id": "so", "reasonReference": [{"reference": "Condition/1"}, {"reference": "ServiceRequest/so"}],
             "supportingInfo": [{"reference": "Procedure/p1"}, {"reference": "ServiceRequest/x"}]}
    assert planned_treatment(order) == "Procedure/p1"
    order["reasonReference"].append({"reference": "ServiceRequest/plan"})
    assert planned_treatment(order) == "ServiceRequest/plan"
    assert planned_treatment({"id": "so", "reasonCode": [{"text": "back pain"}]}) is None
    assert code_of({"code": FUSION}) == "http://snomed.info/sct|55705006"


def test_another_operation_under_the_plan_is_performed_other(fhir, patient):
    plan = _order(fhir, patient)
    ref = f"ServiceRequest/{plan['id']}"
    since = time.time() - 60
    assert what_happened(fhir, ref, plan, patient=patient, since=since).result is None
    proc, _ = fhir.create({"resourceType": "Procedure", "status": "completed", "code": OTHER,
                           "subject": {"reference": patient}, "basedOn": [{"reference": ref}],
                           "performedDateTime": "2026-12-01T09:30:00Z"})
    found = what_happened(fhir, ref, plan, patient=patient, since=since)
    assert (found.result, found.ref) == ("performed-other", f"Procedure/{proc['id']}")


def test_the_same_operation_re_ordered_is_followed_not_counted_as_a_change(fhir, patient):
    plan = _order(fhir, patient)
    ref = f"ServiceRequest/{plan['id']}"
    again = _order(fhir, patient, replaces=[{"reference": ref}])
    found = what_happened(fhir, ref, plan, patient=patient, since=time.time() - 60)
    assert (found.result, found.follow) == (None, f"ServiceRequest/{again['id']}")


def test_a_planned_procedure_not_done_is_a_decision_and_one_in_preparation_is_not(fhir, patient):
    proc, _ = fhir.create({"resourceType": "Procedure", "status": "preparation", "code": FUSION,
                           "subject": {"reference": patient}})
    ref = f"Procedure/{proc['id']}"
    assert what_happened(fhir, ref, proc, patient=patient, since=0).result is None
    proc["status"] = "not-done"
    proc = fhir.update(proc, if_match=proc["meta"]["versionId"])
    assert what_happened(fhir, ref, proc, patient=patient, since=0).result == "not-done"


def test_the_same_code_done_under_another_order_is_not_this_plan(fhir, patient):
    plan = _order(fhir, patient)
    other_order = _order(fhir, patient)
    fhir.create({"resourceType": "Procedure", "status": "completed", "code": FUSION, "subject": {"reference": patient},
                 "basedOn": [{"reference": f"ServiceRequest/{other_order['id']}"}],
                 "performedDateTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    ref = f"ServiceRequest/{plan['id']}"
    assert what_happened(fhir, ref, plan, patient=patient, since=time.time() - 3600).result is None
    unordered, _ = fhir.create({"resourceType": "Procedure", "status": "completed", "code": FUSION,
                                "subject": {"reference": patient},
                                "performedDateTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    found = what_happened(fhir, ref, plan, patient=patient, since=time.time() - 3600)
    assert (found.result, found.ref) == ("performed", f"Procedure/{unordered['id']}")
