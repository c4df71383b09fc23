"""Patient consent (FHIR R4 Consent): a whole denial stops the Case before anything is sent; category denials
withhold records and name them in the manifest. Loop tests write Consents to the real EHR (sekmet) for a
patient of their own; the provision rules are also tested on hand-made Consents."""
from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fhirbridge.demo.localehr import seed_patient
from fhirbridge.errors import ConsentDenied
from fhirbridge.loop.collect import Collected
from fhirbridge.loop.consent import (
    ACT_CODE,
    ACT_REASON,
    PARTICIPATION,
    POLICY,
    RESOURCE_TYPES,
    SCOPE_SYSTEM,
    Disclosure,
    evaluate,
)

REVIEWER = ("urn:ietf:rfc:3986", "urn:oid:2.999.9.1")      # spine-center in tests/kit/hospital.py
OTHER_ORG = ("urn:ietf:rfc:3986", "urn:oid:2.999.8.77")
NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
MEDS = ("MedicationStatement", "MedicationRequest")


def consent_resource(patient: str, provision: dict | None = None, *, policy: str = "OPTIN", status: str = "active",
                     **extra) -> dict:
    res = {"resourceType": "Consent", "status": status,
           "scope": {"coding": [{"system": SCOPE_SYSTEM, "code": "patient-privacy"}]},
           "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
           "patient": {"reference": patient}, "dateTime": "2024-01-01",
           "policyRule": {"coding": [{"system": ACT_CODE, "code": policy}]}}
    if provision is not None:
        res["provision"] = provision
    res.update(extra)
    return res


def actor(system_value: tuple[str, str], role: str = "IRCP") -> dict:
    return {"role": {"coding": [{"system": PARTICIPATION, "code": role}]},
            "reference": {"identifier": {"system": system_value[0], "value": system_value[1]}}}


def classes(*types: str) -> list[dict]:
    return [{"system": RESOURCE_TYPES, "code": t} for t in types]


# --- against the real EHR ------------------------------------------------------------------------


@pytest.fixture
def patient(ehr, fhir) -> dict:
    """A patient of this test's own: its Consents must not reach other tests' Cases."""
    return seed_patient(ehr, fhir, profile="spine")


def _events(hospital, case) -> list[str]:
    return [e["kind"] for e in hospital.app.store.events(case.id)]


def _outbox(hospital) -> list:
    box = hospital.root / "outbox" / "spine-center"
    return list(box.iterdir()) if box.exists() else []


@pytest.mark.sekmet
def test_root_deny_stops_the_case_and_nothing_is_sent(hospital, patient, fhir):
    stored, _ = fhir.create(consent_resource(patient["patient"], {"type": "deny"}))
    ref = f"Consent/{stored['id']}"
    sr = hospital.order(patient["patient"])
    report = hospital.run()
    case = hospital.case_for(sr)
    assert case.step == "failed" and report.errors
    assert f"patient consent {ref} denies disclosure to external parties: nothing was sent" in case.last_error
    assert case.data["failed_step"] == "collect"
    assert _outbox(hospital) == []
    assert not (hospital.app.case_dir(case.id) / "collected.jwe").exists()
    assert "consent.denied" in _events(hospital, case)
    assert hospital.app.store.list_audit(case_id=case.id) == []   # no disclosure to account for
    task = fhir.read_ref(case.task)
    assert task["status"] == "failed" and ref in task["statusReason"]["text"]
    # Permanent: running again does not retry it.
    hospital.run(intake=False, ignore_backoff=True)
    assert hospital.app.store.get(case.id).step == "failed" and _outbox(hospital) == []


@pytest.mark.sekmet
def test_opt_out_without_provisions_stops_the_case(hospital, patient, fhir):
    stored, _ = fhir.create(consent_resource(patient["patient"], policy="OPTOUT"))
    sr = hospital.order(patient["patient"])
    hospital.run()
    case = hospital.case_for(sr)
    assert case.step == "failed" and f"Consent/{stored['id']} denies disclosure" in case.last_error
    assert _outbox(hospital) == []


@pytest.mark.sekmet
def test_nested_deny_of_medications_withholds_and_names_them(hospital, patient, fhir):
    stored, _ = fhir.create(consent_resource(
        patient["patient"], {"type": "permit", "provision": [{"type": "deny", "class": classes(*MEDS)}]}))
    ref = f"Consent/{stored['id']}"
    case = hospital.delivered_case(patient["patient"])
    opened = hospital.open(case)
    kinds = {e["resource"]["resourceType"] for e in opened.document["entry"]}
    assert not kinds & set(MEDS)
    assert {"Condition", "DiagnosticReport", "ImagingStudy", "Procedure", "DocumentReference"} <= kinds
    withheld = {w["reference"]: w["reason"] for w in opened.manifest["withheld"]}
    meds = patient["medication_requests"] + patient["medication_statements"]
    assert meds
    for m in meds:
        assert withheld[m] == f"patient consent ({ref}) denies disclosure of MedicationRequest, " \
                              "MedicationStatement records"
        assert m not in opened.manifest["shared"]
    # The narrative says so too, and the Medications section is empty because of it.
    comp = opened.document["entry"][0]["resource"]
    meds_section = next(s for s in comp["section"] if s["title"] == "Medications")
    assert meds_section["emptyReason"]["coding"][0]["code"] == "withheld"
    done = next(e for e in hospital.app.store.events(case.id) if e["kind"] == "collect.done")
    assert done["detail"]["consents"] == [ref]


@pytest.mark.sekmet
def test_deny_by_security_label_withholds_without_naming(hospital, patient, fhir):
    # A label the profile does not withhold (v3 ActCode TBOO: taboo), denied by the patient's Consent.
    label = {"system": ACT_CODE, "code": "TBOO"}
    doc = fhir.read_ref(patient["document_references"][0])
    doc.setdefault("meta", {})["security"] = [label]
    fhir.update(doc)
    fhir.create(consent_resource(patient["patient"], {"type": "permit",
                                                      "provision": [{"type": "deny", "securityLabel": [label]}]}))
    case = hospital.delivered_case(patient["patient"])
    opened = hospital.open(case)
    ref = patient["document_references"][0]
    assert ref not in opened.manifest["shared"]
    assert ref not in {w["reference"] for w in opened.manifest["withheld"]}   # not even named
    assert patient["document_references"][1] in opened.manifest["shared"]


@pytest.mark.sekmet
def test_deny_for_another_organisation_has_no_effect(hospital, patient, fhir):
    fhir.create(consent_resource(patient["patient"], {"type": "deny", "actor": [actor(OTHER_ORG)]}))
    # A literal reference to an Organization that is not the reviewer: read, and not a match.
    other, _ = fhir.create({"resourceType": "Organization", "name": "Another clinic",
                            "identifier": [{"system": OTHER_ORG[0], "value": OTHER_ORG[1]}]})
    fhir.create(consent_resource(patient["patient"], {"type": "deny", "actor": [
        {"role": {"coding": [{"system": PARTICIPATION, "code": "IRCP"}]},
         "reference": {"reference": f"Organization/{other['id']}"}}]}))
    case = hospital.delivered_case(patient["patient"])
    opened = hospital.open(case)
    assert set(patient["medication_requests"]) <= set(opened.manifest["shared"])
    assert not any("consent" in w["reason"] for w in opened.manifest["withheld"])
    done = next(e for e in hospital.app.store.events(case.id) if e["kind"] == "collect.done")
    assert "consents" not in done["detail"]


@pytest.mark.sekmet
def test_deny_naming_the_reviewer_stops_the_case(hospital, patient, fhir):
    fhir.create(consent_resource(patient["patient"], {"type": "deny", "actor": [actor(REVIEWER)]}))
    sr = hospital.order(patient["patient"])
    hospital.run()
    case = hospital.case_for(sr)
    assert case.step == "failed" and "denies disclosure to this reviewer (Spine Center)" in case.last_error


@pytest.mark.sekmet
def test_inactive_or_expired_consent_has_no_effect(hospital, patient, fhir):
    p = patient["patient"]
    fhir.create(consent_resource(p, {"type": "deny"}, status="inactive"))
    fhir.create(consent_resource(p, {"type": "deny", "period": {"start": "2001-01-01", "end": "2002-12-31"}}))
    fhir.create(consent_resource(p, {"type": "permit", "provision": [
        {"type": "deny", "class": classes(*MEDS), "period": {"end": "2003"}}]}))
    case = hospital.delivered_case(p)
    assert set(patient["medication_requests"]) <= set(hospital.open(case).manifest["shared"])


@pytest.mark.sekmet
def test_invalid_consent_stops_the_case(hospital, patient, fhir):
    # sekmet stores it as it is; fhirbridge must not read "unknown" as "allowed".
    stored, _ = fhir.create(consent_resource(patient["patient"], {"type": "perhaps"}))
    sr = hospital.order(patient["patient"])
    hospital.run()
    case = hospital.case_for(sr)
    assert case.step == "failed"
    assert f"patient consent Consent/{stored['id']} has a provision whose type is neither permit nor deny" \
        in case.last_error
    assert "cannot be evaluated, so nothing was sent" in case.last_error
    assert _outbox(hospital) == []


@pytest.mark.sekmet
def test_consent_recorded_after_collect_stops_delivery(hospital, patient, fhir):
    sr = hospital.order(patient["patient"])
    hospital.run(max_steps=2)   # intake, collect, seal: the package is sealed, not delivered
    case = hospital.case_for(sr)
    assert case.step == "deliver", case.last_error
    stored, _ = fhir.create(consent_resource(patient["patient"], {"type": "deny"}))
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "failed" and case.data["failed_step"] == "deliver"
    assert f"Consent/{stored['id']} denies disclosure" in case.last_error
    assert _outbox(hospital) == []
    assert fhir.read_ref(case.task)["status"] == "failed"


@pytest.mark.sekmet
def test_category_consent_recorded_after_collect_collects_again(hospital, patient, fhir):
    sr = hospital.order(patient["patient"])
    hospital.run(max_steps=2)
    case = hospital.case_for(sr)
    assert case.step == "deliver", case.last_error
    sealed_first = case.package_id
    fhir.create(consent_resource(patient["patient"], {"type": "permit", "provision": [
        {"type": "deny", "class": classes(*MEDS)}]}))
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "await_opinion", case.last_error
    assert "deliver.back" in _events(hospital, case) and case.package_id != sealed_first
    shared = hospital.open(case).manifest["shared"]
    assert not set(patient["medication_requests"]) & set(shared)
    assert [p.name for p in _outbox(hospital)] == [case.package_id]


# --- the provision rules, on hand-made Consents --------------------------------------------------

def rules(*provisions_or_consents, recipient=REVIEWER, resolve=lambda ref: None):
    consents = [c if c.get("resourceType") == "Consent" else consent_resource("Patient/1", c, id=f"c{i}")
                for i, c in enumerate(provisions_or_consents)]
    for i, c in enumerate(consents):
        c.setdefault("id", f"c{i}")
    return evaluate(consents, Disclosure(recipient=recipient, now=NOW, resolve=resolve), "Spine Center")


def denied(*provisions, **kw) -> str:
    with pytest.raises(ConsentDenied) as err:
        rules(*provisions, **kw)
    return str(err.value)


MED = {"resourceType": "MedicationRequest", "id": "m1", "status": "active", "authoredOn": "2024-05-01",
       "subject": {"reference": "Patient/1"}, "requester": {"reference": "Practitioner/dr-a"}}
COND = {"resourceType": "Condition", "id": "c1", "recordedDate": "2020-02-02", "subject": {"reference": "Patient/1"},
        "category": [{"coding": [{"system": "urn:cat", "code": "problem"}]}],
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "86406008"}]}}


def test_root_deny_is_a_whole_denial():
    assert "Consent/c0 denies disclosure to external parties" in denied({"type": "deny"})


def test_root_deny_with_an_applicable_permit_exception_withholds_the_rest():
    c = rules({"type": "deny", "provision": [{"type": "permit", "class": classes("Condition")}]})
    assert c.withhold_reason(COND) is None
    assert c.withhold_reason(MED) == "patient consent (Consent/c0) denies disclosure of records other than " \
                                     "those it permits"


def test_permit_exception_for_someone_else_does_not_lift_a_root_deny():
    denied({"type": "deny", "provision": [{"type": "permit", "actor": [actor(OTHER_ORG)]}]})
    denied({"type": "deny", "provision": [{"type": "permit", "purpose": [{"system": ACT_REASON, "code": "HRESCH"}]}]})


def test_unrestricted_nested_deny_under_a_permit_is_a_whole_denial():
    denied({"type": "permit", "provision": [{"type": "deny"}]})
    # ... but one nested under a restricted permit is only about those records
    c = rules({"type": "deny", "provision": [{"type": "permit", "class": classes("Condition"),
                                              "provision": [{"type": "deny"}]}]})
    assert c.withhold_reason(COND).startswith("patient consent (Consent/c0) denies disclosure of Condition records")


def test_opt_out_policy_is_the_base_rule():
    denied(consent_resource("Patient/1", policy="OPTOUT", id="x"))
    assert rules(consent_resource("Patient/1", policy="OPTIN", id="x")).rules == []
    # the root provision overrides the base rule; outside a restricted root permit the base rule denies
    c = rules(consent_resource("Patient/1", {"type": "permit", "class": classes("Condition")}, policy="OPTOUT",
                               id="x"))
    assert c.withhold_reason(COND) is None and c.withhold_reason(MED) is not None
    # opted out, and a deny about some records on top: still nothing may go
    denied(consent_resource("Patient/1", {"type": "deny", "class": classes("Condition")}, policy="OPTOUT", id="x"))


def test_actor_recipient_matching():
    assert "to this reviewer (Spine Center)" in denied({"type": "deny", "actor": [actor(REVIEWER)]})
    assert rules({"type": "deny", "actor": [actor(OTHER_ORG)]}).rules == []
    # an actor we cannot identify counts for a deny
    unknown = {"role": {"coding": [{"system": PARTICIPATION, "code": "IRCP"}]},
               "reference": {"display": "some clinic"}}
    denied({"type": "deny", "actor": [unknown]})
    literal = {"role": {"coding": [{"system": PARTICIPATION, "code": "PRCP"}]},
               "reference": {"reference": "Organization/rev"}}
    denied({"type": "deny", "actor": [literal]}, resolve=lambda ref: ref == "Organization/rev")
    assert rules({"type": "deny", "actor": [literal]}, resolve=lambda ref: False).rules == []
    # ... and never for a permit
    denied({"type": "deny", "provision": [{"type": "permit", "actor": [unknown]}]})


def test_actor_in_another_role_restricts_records_not_recipients():
    author = {"role": {"coding": [{"system": PARTICIPATION, "code": "AUT"}]},
              "reference": {"reference": "Practitioner/dr-a"}}
    c = rules({"type": "permit", "provision": [{"type": "deny", "actor": [author]}]})
    assert c.withhold_reason(MED).startswith(POLICY)
    assert c.withhold_reason(COND) is None


def test_purpose_and_action():
    denied({"type": "deny", "purpose": [{"system": ACT_REASON, "code": "TREAT"}]})
    assert rules({"type": "deny", "purpose": [{"system": ACT_REASON, "code": "HMARKT"}]}).rules == []
    collect_only = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction",
                                 "code": "collect"}]}]
    assert rules({"type": "deny", "action": collect_only}).rules == []
    denied({"type": "deny", "action": [{"text": "share"}]})   # an action we cannot read counts for a deny...
    denied({"type": "deny", "provision": [{"type": "permit", "action": [{"text": "share"}]}]})  # not a permit
    disclose = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "disclose"}]}]
    assert rules({"type": "deny", "provision": [{"type": "permit", "action": disclose}]}).rules


def test_periods():
    assert rules({"type": "deny", "period": {"end": "2024-05-31"}}).rules == []
    denied({"type": "deny", "period": {"end": "2024-06-01"}})     # a date end includes that day
    assert rules({"type": "deny", "period": {"start": "2024-07"}}).rules == []
    denied({"type": "deny", "period": {"start": "2024-06-01T11:00:00Z", "end": "2024"}})


def test_deny_by_code_and_label_is_not_named():
    c = rules({"type": "permit", "provision": [
        {"type": "deny", "code": [{"coding": [{"system": "http://snomed.info/sct", "code": "86406008"}]}]}]})
    assert c.withhold_reason(COND) == f"{POLICY}patient consent (Consent/c0) denies disclosure of this record"
    assert c.withhold_reason(MED) is None
    labelled = dict(MED, meta={"security": [{"system": ACT_CODE, "code": "TBOO"}]})
    c = rules({"type": "permit", "provision": [{"type": "deny", "securityLabel": [{"system": ACT_CODE,
                                                                                  "code": "TBOO"}]}]})
    assert c.withhold_reason(labelled).startswith(POLICY) and c.withhold_reason(MED) is None
    # and it stays out of what the reviewer is told
    col = Collected(service_request={}, patient={},
                    withheld=[{"reference": "MedicationRequest/m1", "reason": c.withhold_reason(labelled)}])
    assert col.disclosable_withheld() == []


def test_deny_by_category_code_matches_category_codings():
    c = rules({"type": "permit", "provision": [{"type": "deny", "code": [{"coding": [{"system": "urn:cat",
                                                                                      "code": "problem"}]}]}]})
    assert c.withhold_reason(COND) is not None


def test_data_period_and_instances():
    c = rules({"type": "permit", "provision": [{"type": "deny", "dataPeriod": {"start": "2020", "end": "2020"}}]})
    assert c.withhold_reason(COND) == "patient consent (Consent/c0) denies disclosure of records dated " \
                                      "2020-01-01 to 2021-01-01"
    assert c.withhold_reason(MED) is None
    assert c.withhold_reason({"resourceType": "Procedure", "id": "p"}) is not None   # no date: deny wins
    c = rules({"type": "permit", "provision": [{"type": "deny", "data": [
        {"meaning": "instance", "reference": {"reference": "http://ehr/fhir/Condition/c1"}}]}]})
    assert c.withhold_reason(COND).startswith(POLICY) and c.withhold_reason(MED) is None


def test_most_specific_provision_decides_and_deny_wins_among_siblings():
    c = rules({"type": "permit", "provision": [
        {"type": "deny", "class": classes("MedicationRequest"),
         "provision": [{"type": "permit", "dataPeriod": {"start": "2024-01-01"}}]}]})
    assert c.withhold_reason(MED) is None                                   # recent: permitted again
    assert c.withhold_reason(dict(MED, authoredOn="2019-01-01")) is not None
    c = rules({"type": "deny", "provision": [{"type": "permit", "class": classes("Condition")},
                                             {"type": "deny", "class": classes("Condition")}]})
    assert c.withhold_reason(COND) is not None


def test_several_consents_all_apply():
    c = rules({"type": "permit", "provision": [{"type": "deny", "class": classes("Condition")}]},
              {"type": "permit", "provision": [{"type": "deny", "class": classes("MedicationRequest")}]})
    assert "Consent/c0" in c.withhold_reason(COND) and "Consent/c1" in c.withhold_reason(MED)
    # a record denied by type in one Consent and by code in another is not named
    c = rules({"type": "permit", "provision": [{"type": "deny", "class": classes("Condition")}]},
              {"type": "permit", "provision": [{"type": "deny", "code": [COND["code"]]}]})
    assert c.withhold_reason(COND) == f"{POLICY}patient consent (Consent/c1) denies disclosure of this record"


def test_profile_urls_as_class():
    url = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-condition"
    c = rules({"type": "permit", "provision": [{"type": "deny", "class": [{"system": "urn:ietf:rfc:3986",
                                                                           "code": url}]}]})
    assert c.withhold_reason(dict(COND, meta={"profile": [url]})) == \
        "patient consent (Consent/c0) denies disclosure of us-core-condition records"
    assert c.withhold_reason(COND) is None


def test_consents_about_something_else_are_ignored():
    treatment = consent_resource("Patient/1", {"type": "deny"}, id="t")
    treatment["scope"] = {"coding": [{"system": SCOPE_SYSTEM, "code": "treatment"}]}
    assert rules(treatment).rules == []
    assert rules(consent_resource("Patient/1", {"type": "deny"}, status="proposed", id="p")).rules == []


@pytest.mark.parametrize("provision", [
    {"type": "perhaps"},
    {"type": "permit", "provision": [{"class": classes("Condition")}]},     # an exception without a type
    {"type": "deny", "period": {"start": "last spring"}},
    {"type": "permit", "provision": [{"type": "deny", "class": [{"system": "http://loinc.org", "code": "x"}]}]},
    {"type": "permit", "provision": [{"type": "deny", "code": [{"text": "mental health"}]}]},
])
def test_a_consent_that_cannot_be_evaluated_stops_the_case(provision):
    assert "cannot be evaluated, so nothing was sent" in denied(provision)


def test_a_privacy_consent_missing_required_elements_stops_the_case():
    broken = consent_resource("Patient/1", {"type": "permit"}, id="b")
    del broken["category"]
    assert "Consent/b is not valid FHIR" in denied(broken)
