"""Issue 18 part 2 against the real EHR: each filed opinion's planned treatment is followed in the chart, and what
became of it is stored (loop/outcomes.py, ehr/treatment.py, docs/outcomes.md)."""
from __future__ import annotations

import time

import pytest

from fhirbridge.loop.outcomes import follow_outcomes, record_filed
from fhirbridge.loop.receive import opinion_path, receive_file
from tests.kit.hospital import SAMPLE_ANSWER

pytestmark = pytest.mark.sekmet

SNOMED = "http://snomed.info/sct"
FUSION = {"coding": [{"system": SNOMED, "code": "55705006", "display": "Spinal fusion"}]}
NON_SURGICAL = SAMPLE_ANSWER.replace('recommendation = "proceed-as-planned"', 'recommendation = "non-surgical-care"')
LESS_INVASIVE = SAMPLE_ANSWER.replace('recommendation = "proceed-as-planned"',
                                      'recommendation = "less-invasive-procedure"')


def _planned_fusion(fhir, patient: str, code: dict = FUSION) -> dict:
    """The operation the referring surgeon means to do: an active order (what a CDS Hooks Case's draft order
    becomes once signed)."""
    planned, _ = fhir.create({"resourceType": "ServiceRequest", "status": "active", "intent": "order", "code": code,
                              "subject": {"reference": patient}, "authoredOn": "2026-11-01"})
    return planned


def _filed(hospital, fhir, seeded, answer: str = SAMPLE_ANSWER, *, element: str = "reasonReference"):
    """A Case whose second-opinion order names the planned fusion (`element`), its opinion filed."""
    patient = f"Patient/{seeded['patient']}" if not str(seeded["patient"]).startswith("Patient/") else seeded["patient"]
    planned = _planned_fusion(fhir, patient)
    sr = hospital.order(seeded["patient"])
    sr[element] = [{"reference": f"ServiceRequest/{planned['id']}"}]
    fhir.update(sr, if_match=sr["meta"]["versionId"])
    hospital.run()
    case = hospital.case_for(sr)
    assert case.step == "await_opinion", case.last_error
    receive_file(hospital.app, hospital.answer(case, answer))
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "done", case.last_error
    return case, planned, patient


def _outcome(hospital, case):
    return hospital.app.store.outcomes.get(case.id)


def test_surgery_performed_on_the_planned_order_is_recorded_as_performed(hospital, fhir, seeded):
    case, planned, patient = _filed(hospital, fhir, seeded)
    row = _outcome(hospital, case)
    # Opened at filing with the opinion's coded outcome, before any look at the chart.
    assert (row.state, row.recommendation, row.concordance) == ("unresolved", "proceed-as-planned", "concordant")
    assert row.window_ends == pytest.approx(row.filed_at + 180 * 86400)
    assert record_filed(hospital.app, case) is False        # a repeated file step keeps the one row

    follow_outcomes(hospital.app)
    row = _outcome(hospital, case)
    assert (row.state, row.plan, row.plan_code, row.result) == ("open", f"ServiceRequest/{planned['id']}",
                                                                f"{SNOMED}|55705006", None)

    proc, _ = fhir.create({"resourceType": "Procedure", "status": "completed", "code": FUSION,
                           "subject": {"reference": patient},
                           "basedOn": [{"reference": f"ServiceRequest/{planned['id']}"}],
                           "performedDateTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 5))})
    # The next check is an interval away: a tick now checks nothing; one at that time finds the operation.
    assert follow_outcomes(hospital.app)["checked"] == 0
    follow_outcomes(hospital.app, now=time.time() + hospital.app.config.service.outcomes_seconds + 1)
    row = _outcome(hospital, case)
    assert (row.state, row.result, row.result_ref) == ("closed", "performed", f"Procedure/{proc['id']}")
    assert row.decided_at == pytest.approx(time.time() + 5, abs=30)
    assert follow_outcomes(hospital.app, now=time.time() + 10**6)["checked"] == 0    # closed rows are left alone


def test_an_order_revoked_after_a_non_surgical_recommendation_is_recorded_as_revoked(hospital, fhir, seeded):
    case, planned, _ = _filed(hospital, fhir, seeded, NON_SURGICAL, element="supportingInfo")
    assert _outcome(hospital, case).recommendation == "non-surgical-care"
    planned["status"] = "revoked"
    fhir.update(planned, if_match=planned["meta"]["versionId"])
    follow_outcomes(hospital.app)
    row = _outcome(hospital, case)
    assert (row.state, row.result, row.result_ref) == ("closed", "revoked", f"ServiceRequest/{planned['id']}")
    assert row.filed_at - 60 <= row.decided_at <= time.time() + 1


def test_nothing_within_the_window_is_an_outcome_too(hospital, fhir, seeded):
    case, _planned, _ = _filed(hospital, fhir, seeded)
    follow_outcomes(hospital.app)
    row = _outcome(hospital, case)
    assert row.state == "open" and row.next_check_at <= row.window_ends
    # The injectable clock: the window has passed, nothing was decided in the chart.
    follow_outcomes(hospital.app, now=row.window_ends + 1)
    row = _outcome(hospital, case)
    assert (row.state, row.result, row.decided_at) == ("closed", "none-in-window", None)


def test_a_replacing_order_of_another_procedure_is_recorded_as_replaced(hospital, fhir, seeded):
    case, planned, patient = _filed(hospital, fhir, seeded, LESS_INVASIVE)
    other, _ = fhir.create({"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                            "code": {"coding": [{"system": "urn:test:procedures", "code": "microdiscectomy"}]},
                            "replaces": [{"reference": f"ServiceRequest/{planned['id']}"}],
                            "subject": {"reference": patient}})
    follow_outcomes(hospital.app)
    row = _outcome(hospital, case)
    assert (row.state, row.result, row.result_ref) == ("closed", "replaced", f"ServiceRequest/{other['id']}")


def test_an_order_naming_no_planned_treatment_closes_as_no_plan_and_a_filed_case_is_backfilled(hospital, fhir,
                                                                                                seeded):
    sr = hospital.order(seeded["patient"])
    hospital.run()
    case = hospital.case_for(sr)
    receive_file(hospital.app, hospital.answer(case))
    hospital.run(intake=False)
    # A Case filed before outcomes were followed has no row: the tick opens it from the opinion file.
    with hospital.app.store.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM outcomes")
    counts = follow_outcomes(hospital.app)
    assert counts["opened"] == 1
    row = _outcome(hospital, case)
    assert (row.state, row.result, row.recommendation) == ("closed", "no-plan", "proceed-as-planned")
    # An opinion file that cannot be read any more: the row is opened without its codes, not retried forever.
    with hospital.app.store.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM outcomes")
    opinion_path(hospital.app, hospital.app.store.get(case.id)).unlink()
    assert follow_outcomes(hospital.app)["opened"] == 1
    row = _outcome(hospital, case)
    assert (row.state, row.result, row.recommendation, row.concordance) == ("closed", "no-plan", None, None)
    assert follow_outcomes(hospital.app)["opened"] == 0
