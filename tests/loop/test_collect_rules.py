"""The pure rules in collect.py, on hand-made resources: what is withheld and why, dates, references."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fhirbridge.config import loader as config
from fhirbridge.config.mappings import Profile, ResourceRule, load_profile
from fhirbridge.fhir.elements import clinical_date, iter_references, parse_fhir_date, question_of
from fhirbridge.loop.collect import withhold_reason

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
V3 = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"


@pytest.fixture(scope="module")
def spine() -> Profile:
    return load_profile(config.PACKAGE_MAPPINGS, "spine")


@pytest.fixture(scope="module")
def default() -> Profile:
    return load_profile(config.PACKAGE_MAPPINGS, "default")


def cutoff(profile: Profile) -> datetime:
    return NOW - timedelta(days=profile.lookback_days)


def reason(res: dict, profile: Profile) -> str | None:
    return withhold_reason(res, profile.rules[res["resourceType"]], profile, cutoff(profile))


def recent(days: int = 10) -> str:
    return (NOW - timedelta(days=days)).strftime("%Y-%m-%d")


def report(**kw) -> dict:
    res = {"resourceType": "DiagnosticReport", "id": "dr1", "status": "final",
           "code": {"text": "MRI lumbar spine"},
           "category": [{"coding": [{"system": V2_0074, "code": "RAD"}]}],
           "effectiveDateTime": recent()}
    res.update(kw)
    return res


# --- withhold_reason -------------------------------------------------------------------------------

def test_recent_report_in_an_allowed_category_is_kept(spine):
    assert reason(report(), spine) is None


@pytest.mark.parametrize("system, code", [(V3, "PSY"), (V3, "HIV"), (V3, "ETH"),
                                          ("http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "R")])
def test_sensitive_security_label_is_withheld(spine, system, code):
    res = report(meta={"security": [{"system": "urn:other", "code": "X"}, {"system": system, "code": code}]})
    why = reason(res, spine)
    assert why is not None
    assert f"{system}|{code}" in why and "spine" in why


def test_security_label_needs_system_and_code_to_match(spine):
    # same code in another system, or a non-sensitive code in the v3 system: not withheld
    assert reason(report(meta={"security": [{"system": "urn:local", "code": "PSY"}]}), spine) is None
    assert reason(report(meta={"security": [{"system": V3, "code": "TBOO"}]}), spine) is None


def test_security_label_wins_over_everything_else(spine):
    # an active medication is "always current", but a sensitive label still withholds it
    med = {"resourceType": "MedicationRequest", "id": "m", "status": "active", "authoredOn": "2001-01-01",
           "meta": {"security": [{"system": V3, "code": "ETH"}]}}
    assert "security label" in reason(med, spine)


def test_entered_in_error_is_withheld(spine):
    assert reason(report(status="entered-in-error"), spine) == "status entered-in-error"
    med = {"resourceType": "MedicationRequest", "id": "m", "status": "entered-in-error", "authoredOn": recent()}
    assert reason(med, spine) == "status entered-in-error"
    assert reason(study(modality=["MR"]) | {"status": "entered-in-error"}, spine) == "status entered-in-error"


def test_condition_entered_in_error_is_withheld(spine):
    cond = {"resourceType": "Condition", "id": "c", "recordedDate": recent(),
            "verificationStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "code": "entered-in-error"}]},
            "code": {"text": "Lumbar disc herniation"}, "subject": {"reference": "Patient/1"}}
    assert reason(cond, spine) is not None


def test_custom_excluded_statuses():
    rule = ResourceRule(type="Procedure", statuses_excluded=("entered-in-error", "not-done"))
    prof = Profile(name="p", description="", lookback_days=30, rules={"Procedure": rule})
    cut = NOW - timedelta(days=30)
    proc = {"resourceType": "Procedure", "id": "p", "performedDateTime": recent()}
    assert withhold_reason(dict(proc, status="not-done"), rule, prof, cut) == "status not-done"
    assert withhold_reason(dict(proc, status="completed"), rule, prof, cut) is None


def test_category_filter(spine, default):
    lab = report(category=[{"coding": [{"system": V2_0074, "code": "LAB"}]}])
    cardio = report(category=[{"coding": [{"system": V2_0074, "code": "EC"}]}])
    loinc = report(category=[{"coding": [{"system": "urn:x", "code": "y"},
                                         {"system": "http://loinc.org", "code": "LP29684-5"}]}])
    wrong_system = report(category=[{"coding": [{"system": "urn:local", "code": "RAD"}]}])
    uncategorised = report(category=[])
    del uncategorised["category"]
    assert reason(lab, spine) is None
    assert reason(loinc, spine) is None  # any coding of any category may match
    assert reason(cardio, spine) == "category not in profile spine"
    assert reason(wrong_system, spine) == "category not in profile spine"
    assert reason(uncategorised, spine) == "category not in profile spine"
    # the default profile has no category filter
    assert reason(cardio, default) is None and reason(uncategorised, default) is None


def test_document_type_filter():
    loinc = "http://loinc.org"
    rule = ResourceRule(type="DocumentReference", types=((loinc, "11506-3"),))
    prof = Profile(name="notes", description="", lookback_days=365, rules={"DocumentReference": rule})
    doc = {"resourceType": "DocumentReference", "id": "d", "status": "current", "date": recent() + "T08:00:00Z"}
    keep = dict(doc, type={"coding": [{"system": loinc, "code": "11506-3"}]})
    drop = dict(doc, type={"coding": [{"system": loinc, "code": "34117-2"}]})
    cut = NOW - timedelta(days=365)
    assert withhold_reason(keep, rule, prof, cut) is None
    assert withhold_reason(drop, rule, prof, cut) == "document type not in profile notes"
    assert withhold_reason(doc, rule, prof, cut) == "document type not in profile notes"


def study(modality=None, series=()) -> dict:
    res = {"resourceType": "ImagingStudy", "id": "is1", "status": "available", "started": recent() + "T09:00:00Z",
           "subject": {"reference": "Patient/1"}}
    if modality:
        res["modality"] = [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": m} for m in modality]
    if series:
        res["series"] = [{"uid": f"1.2.{i}", "modality": {"code": m}} for i, m in enumerate(series)]
    return res


def test_imaging_modality_filter_on_the_study(spine):
    assert reason(study(modality=["MR"]), spine) is None
    assert reason(study(modality=["US", "CT"]), spine) is None  # one allowed modality is enough
    assert reason(study(modality=["US"]), spine) == "imaging modality not in profile spine"
    assert reason(study(modality=["US", "XA"]), spine) == "imaging modality not in profile spine"


def test_imaging_modality_only_on_series(spine):
    assert reason(study(series=["SR", "MR"]), spine) is None
    assert reason(study(series=["US"]), spine) == "imaging modality not in profile spine"


def test_imaging_without_any_modality_is_withheld_when_the_profile_filters(spine, default):
    assert reason(study(), spine) == "imaging modality not in profile spine"
    assert reason(study(), default) is None  # no modality filter in the default profile


def test_lookback_old_withheld_recent_kept(spine):
    old = (NOW - timedelta(days=spine.lookback_days + 1)).strftime("%Y-%m-%d")
    inside = (NOW - timedelta(days=spine.lookback_days - 1)).strftime("%Y-%m-%d")
    assert reason(report(effectiveDateTime=old), spine) == "older than the 1095-day lookback window"
    assert reason(report(effectiveDateTime=inside), spine) is None
    proc = {"resourceType": "Procedure", "id": "p", "status": "completed", "performedDateTime": "2015-03-02"}
    assert "lookback" in reason(proc, spine)


def test_lookback_uses_the_first_date_path_present(spine):
    # DiagnosticReport: effectiveDateTime, then effectivePeriod.start, then issued
    res = report(effectivePeriod={"start": "2010-01-01"}, issued=NOW.isoformat())
    del res["effectiveDateTime"]
    assert "lookback" in reason(res, spine)
    del res["effectivePeriod"]
    assert reason(res, spine) is None  # only the recent `issued` is left
    assert clinical_date(res) == NOW


def test_old_but_active_medication_request_is_kept(spine):
    med = {"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
           "authoredOn": "2012-02-03"}
    assert reason(med, spine) is None
    assert reason(dict(med, status="on-hold"), spine) is None
    assert "lookback" in reason(dict(med, status="completed"), spine)
    assert "lookback" in reason(dict(med, status="stopped"), spine)


def test_old_but_active_medication_statement_is_kept(spine):
    ms = {"resourceType": "MedicationStatement", "id": "s", "status": "active", "effectiveDateTime": "2005"}
    assert reason(ms, spine) is None
    assert "lookback" in reason(dict(ms, status="completed"), spine)


def test_condition_without_lookback_is_kept_however_old(spine):
    cond = {"resourceType": "Condition", "id": "c", "recordedDate": "1990-04-01",
            "onsetDateTime": "1989", "clinicalStatus": {"coding": [{"code": "resolved"}]}}
    assert spine.rules["Condition"].lookback is False
    assert reason(cond, spine) is None


def test_condition_with_lookback_enabled_is_filtered():
    rule = ResourceRule(type="Condition", lookback=True)
    prof = Profile(name="p", description="", lookback_days=30, rules={"Condition": rule})
    cond = {"resourceType": "Condition", "id": "c", "recordedDate": "1990-04-01"}
    assert "30-day" in withhold_reason(cond, rule, prof, NOW - timedelta(days=30))


@pytest.mark.parametrize("rtype", ["DiagnosticReport", "Procedure", "MedicationRequest", "DocumentReference",
                                   "MedicationStatement"])
def test_resource_without_any_date_is_kept(default, rtype):
    res = {"resourceType": rtype, "id": "x", "status": "completed"}
    assert clinical_date(res) is None
    assert reason(res, default) is None


def test_unparseable_date_is_treated_as_no_date(default):
    res = {"resourceType": "Procedure", "id": "x", "status": "completed", "performedDateTime": "last spring",
           "performedPeriod": {"start": "2001-01-01"}}
    # the garbage value is skipped and the next path is used
    assert clinical_date(res) == datetime(2001, 1, 1, tzinfo=UTC)
    assert "lookback" in reason(res, default)


# --- parse_fhir_date -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("2020", datetime(2020, 1, 1, tzinfo=UTC)),
    ("2020-05", datetime(2020, 5, 1, tzinfo=UTC)),
    ("2020-05-17", datetime(2020, 5, 17, tzinfo=UTC)),
    ("2020-05-17T10:00:00+02:00", datetime(2020, 5, 17, 8, 0, tzinfo=UTC)),
    ("2020-05-17T10:00:00Z", datetime(2020, 5, 17, 10, 0, tzinfo=UTC)),
    ("2020-05-17T10:00:00.250-05:00", datetime(2020, 5, 17, 15, 0, 0, 250000, tzinfo=UTC)),
])
def test_parse_fhir_date(text, expected):
    parsed = parse_fhir_date(text)
    assert parsed == expected
    assert parsed.tzinfo is not None  # always comparable with an aware cutoff


def test_parse_fhir_date_keeps_the_offset():
    parsed = parse_fhir_date("2020-05-17T10:00:00+02:00")
    assert parsed.utcoffset() == timedelta(hours=2) and parsed.hour == 10


@pytest.mark.parametrize("text", ["", "garbage", "abcd", "2020-5", "2020-13", "2020-05-40", "20-05-17",
                                  "yesterday at noon"])
def test_parse_fhir_date_garbage(text):
    assert parse_fhir_date(text) is None


# --- question_of -----------------------------------------------------------------------------------

def test_question_from_notes():
    sr = {"note": [{"text": "Is surgery indicated?"}, {"text": ""}, {"authorString": "x"},
                   {"text": "Alternatives?"}],
          "reasonCode": [{"text": "ignored when there are notes"}]}
    assert question_of(sr) == "Is surgery indicated?\nAlternatives?"


def test_question_from_reason_code_text_then_display():
    sr = {"reasonCode": [{"text": "Lumbar stenosis"},
                         {"coding": [{"system": "http://snomed.info/sct", "code": "1"},
                                     {"system": "http://snomed.info/sct", "code": "2", "display": "Back pain"}]},
                         {"coding": [{"code": "3"}]}]}
    assert question_of(sr) == "Lumbar stenosis\nBack pain"


def test_question_when_there_is_none():
    assert question_of({}) == ""
    assert question_of({"note": [{"text": ""}], "reasonCode": []}) == ""


# --- iter_references -------------------------------------------------------------------------------

def test_iter_references_finds_nested_references_and_skips_contained():
    res = {
        "resourceType": "DiagnosticReport", "id": "d",
        "subject": {"reference": "Patient/1"},
        "performer": [{"reference": "Practitioner/7"}, {"display": "no reference"}],
        "result": [{"reference": "Observation/a"}, {"reference": "#inline"}],
        "extension": [{"url": "x", "valueReference": {"reference": "Organization/9"}}],
        "contained": [{"resourceType": "Observation", "id": "inline",
                       "performer": [{"reference": "Practitioner/hidden"}]}],
        "presentedForm": [{"url": "Binary/5"}],
    }
    refs = list(iter_references(res))
    assert refs == ["Patient/1", "Practitioner/7", "Observation/a", "#inline", "Organization/9"]
    assert "Practitioner/hidden" not in refs
    assert "Binary/5" not in refs  # attachment urls are not references


def test_iter_references_ignores_non_string_reference_values():
    assert list(iter_references({"a": {"reference": {"nested": "x"}}, "b": [1, "s", None]})) == []
