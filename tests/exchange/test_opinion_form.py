"""The reviewer's structured answer against the shipped opinion form, and the Consult note document built from it."""
from __future__ import annotations

import json

import pytest

from fhirbridge.config import loader as config
from fhirbridge.config.mappings import load_opinion_form
from fhirbridge.errors import FhirbridgeError
from fhirbridge.exchange.opinion import (
    AnswerError,
    build_opinion_document,
    check_answer,
    load_answer,
    reviewer_organization,
)
from fhirbridge.fhir.validate import validate

PATIENT_URL = "urn:uuid:6f1c3a52-0d4e-4c7b-9b1e-2f0a7d1e9c11"
SR_URL = "urn:uuid:0b7d2c1e-5a44-4e3a-8f6e-9d2b1c3a4e55"
TIMESTAMP = "2024-06-01T12:00:00Z"
OPINION_CS = "http://fhirbridge.org/fhir/CodeSystem/opinion-observation"

COMPLETE = {
    "concordance": "partially-concordant",
    "diagnosis_comment": "Stenosis confirmed; the disc finding is less clear.",
    "recommendation": "less-invasive-procedure",
    "alternatives": ["Physiotherapy for 6 weeks", "Epidural injection"],
    "risks_benefits": "Decompression alone carries less risk <than> fusion & recovers faster.\nSecond line.",
    "answers": [{"question": "Is fusion needed?", "answer": "No."}],
    "urgency": "urgent",
    "free_text": "Happy to discuss.",
}
MINIMAL = {"concordance": "concordant", "recommendation": "proceed-as-planned", "urgency": "routine",
           "risks_benefits": "Benefits outweigh the risks."}


@pytest.fixture(scope="module")
def form():
    return load_opinion_form(config.PACKAGE_MAPPINGS)


def entries():
    patient = {"fullUrl": PATIENT_URL, "resource": {
        "resourceType": "Patient", "id": "pat-1", "name": [{"family": "Testpatient", "given": ["Anna"]}],
        "gender": "female", "birthDate": "1961-04-02"}}
    sr = {"fullUrl": SR_URL, "resource": {
        "resourceType": "ServiceRequest", "id": "sr-1", "status": "active", "intent": "order",
        "code": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0336", "code": "S"}]},
        "subject": {"reference": PATIENT_URL}, "note": [{"text": "Is the planned fusion indicated?"}]}}
    return patient, sr


def build(answer, form, opinion_id="op-1"):
    patient, sr = entries()
    org = reviewer_organization({"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.1.2",
                                 "display": "Spine Center"})
    return build_opinion_document(answer, form, opinion_id=opinion_id, timestamp=TIMESTAMP, patient_entry=patient,
                                  service_request_entry=sr, reviewer_org=org)


def by_type(bundle, rtype):
    return [e for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


# --- check_answer ----------------------------------------------------------------------------------

def test_complete_answer_has_no_problems(form):
    assert check_answer(COMPLETE, form) == []
    assert check_answer(MINIMAL, form) == []


def test_empty_answer_lists_every_required_field_with_its_choices(form):
    problems = check_answer({}, form)
    assert len(problems) == 4
    by_field = {p.split(":", 1)[0]: p for p in problems}
    assert set(by_field) == {"concordance", "recommendation", "risks_benefits", "urgency"}
    assert "required" in by_field["concordance"]
    assert "concordant, partially-concordant, discordant" in by_field["concordance"]
    assert "Concordance with the referring diagnosis" in by_field["concordance"]  # the label
    assert "watchful-waiting" in by_field["recommendation"]
    assert "routine, urgent, asap" in by_field["urgency"]
    assert "one of" not in by_field["risks_benefits"]  # a text field has no choices to list


@pytest.mark.parametrize("empty", [None, "", []])
def test_empty_values_count_as_missing(form, empty):
    problems = check_answer(dict(MINIMAL, risks_benefits=empty), form)
    assert len(problems) == 1 and problems[0].startswith("risks_benefits: required")


def test_optional_fields_may_be_empty(form):
    assert check_answer(dict(MINIMAL, alternatives=[], free_text="", answers=[]), form) == []


def test_bad_choice_value(form):
    problems = check_answer(dict(MINIMAL, urgency="whenever"), form)
    assert len(problems) == 1
    assert problems[0].startswith("urgency:") and "'whenever'" in problems[0]
    assert "routine, urgent, asap" in problems[0]


def test_choice_keys_not_displays(form):
    # the display text of a choice is not a valid value: the key is
    problems = check_answer(dict(MINIMAL, concordance="Concordant: diagnosis confirmed"), form)
    assert len(problems) == 1 and problems[0].startswith("concordance:")


def test_unknown_field(form):
    problems = check_answer(dict(MINIMAL, recomendation="x"), form)
    assert len(problems) == 1
    assert problems[0].startswith("recomendation: unknown field")
    assert "recommendation" in problems[0]  # lists the form's fields


@pytest.mark.parametrize("field, value, says", [
    ("risks_benefits", 42, "must be text"),
    ("risks_benefits", ["a", "b"], "must be text"),
    ("free_text", {"text": "x"}, "must be text"),
    ("alternatives", "Physiotherapy", "must be a list of text items"),
    ("alternatives", ["ok", 3], "must be a list of text items"),
    ("answers", ["Is fusion needed? No."], "question = ..., answer = ..."),
    ("answers", [{"question": "Q"}], "question = ..., answer = ..."),
    ("answers", [{"question": "Q", "answer": 1}], "question = ..., answer = ..."),
    ("answers", {"question": "Q", "answer": "A"}, "question = ..., answer = ..."),
    ("urgency", 1, "is not one of"),
])
def test_wrong_kinds(form, field, value, says):
    problems = check_answer(dict(MINIMAL, **{field: value}), form)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{field}:") and says in problems[0]


@pytest.mark.parametrize("value", [["concordant"], {"code": "concordant"}])
def test_choice_given_a_list_or_table_is_a_problem_not_a_crash(form, value):
    problems = check_answer(dict(MINIMAL, concordance=value), form)
    assert len(problems) == 1 and problems[0].startswith("concordance:")


def test_several_problems_are_all_reported(form):
    problems = check_answer({"concordance": "maybe", "alternatives": "x", "extra": 1, "urgency": "routine"}, form)
    fields = sorted(p.split(":", 1)[0] for p in problems)
    assert fields == ["alternatives", "concordance", "extra", "recommendation", "risks_benefits"]


def test_answer_error_lists_the_problems(form):
    err = AnswerError("answer.toml", check_answer({}, form))
    assert err.exit_code == 2
    assert str(err).startswith("answer.toml: the answer is not complete:")
    assert str(err).count("\n  - ") == 4


# --- build_opinion_document ------------------------------------------------------------------------

def test_document_bundle_is_valid_fhir(form):
    bundle = build(COMPLETE, form)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "document"
    assert bundle["timestamp"] == TIMESTAMP
    assert bundle["identifier"] == {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:op-1"}
    assert bundle["entry"][0]["resource"]["resourceType"] == "Composition"  # a document starts with it
    for entry in bundle["entry"]:
        assert validate(entry["resource"]) == [], entry["fullUrl"]
    assert validate(bundle) == []
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(full_urls)) == len(full_urls)
    for entry in bundle["entry"]:
        if entry["fullUrl"].startswith("urn:uuid:") and entry["resource"]["resourceType"] not in ("Patient",
                                                                                                  "ServiceRequest"):
            assert entry["fullUrl"] == f"urn:uuid:{entry['resource']['id']}"


def test_validator_is_not_a_rubber_stamp(form):
    bundle = build(MINIMAL, form)
    comp = bundle["entry"][0]["resource"]
    assert validate({k: v for k, v in comp.items() if k != "type"}) != []  # Composition.type is 1..1
    assert validate(dict(comp, section=[{"title": 5, "focus": "ServiceRequest/1"}])) != []
    obs = by_type(bundle, "Observation")[0]["resource"]
    assert validate({k: v for k, v in obs.items() if k != "code"}) != []


def test_composition_is_a_consult_note_about_the_patient(form):
    bundle = build(COMPLETE, form)
    comp = bundle["entry"][0]["resource"]
    assert comp["type"]["coding"][0]["system"] == "http://loinc.org"
    assert comp["type"]["coding"][0]["code"] == "11488-4"
    assert comp["status"] == "final" and comp["title"] == "Second opinion"
    assert comp["subject"] == {"reference": PATIENT_URL}
    assert comp["date"] == TIMESTAMP
    org_entry = by_type(bundle, "Organization")[0]
    assert comp["author"] == [{"reference": org_entry["fullUrl"]}]
    assert org_entry["resource"]["name"] == "Spine Center"
    assert org_entry["resource"]["identifier"] == [{"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.1.2"}]
    # the Patient and ServiceRequest entries are carried over unchanged
    patient, sr = entries()
    assert by_type(bundle, "Patient") == [patient] and by_type(bundle, "ServiceRequest") == [sr]


def test_every_section_focuses_on_the_service_request(form):
    comp = build(COMPLETE, form)["entry"][0]["resource"]
    titles = [s["title"] for s in comp["section"]]
    assert titles == ["Diagnosis review", "Recommendation", "Answers to the referring physician", "Comments"]
    for s in comp["section"]:
        assert s["focus"] == {"reference": SR_URL}
        assert s["code"]["coding"][0] == form.section_codes[s["title"]]
        assert s["text"]["status"] == "generated"
        assert s["text"]["div"].startswith('<div xmlns="http://www.w3.org/1999/xhtml">')


def test_section_narrative_is_escaped_and_has_the_labels(form):
    comp = build(COMPLETE, form)["entry"][0]["resource"]
    rec = next(s for s in comp["section"] if s["title"] == "Recommendation")["text"]["div"]
    assert "less risk &lt;than&gt; fusion &amp; recovers faster.<br/>Second line." in rec
    assert "<than>" not in rec
    assert "A less invasive procedure" in rec  # the choice's display, not its key
    assert "<li>Physiotherapy for 6 weeks</li>" in rec
    answers = next(s for s in comp["section"] if s["title"] == "Answers to the referring physician")["text"]["div"]
    assert "Is fusion needed?" in answers and "No." in answers


def test_only_answered_sections_appear(form):
    comp = build(MINIMAL, form)["entry"][0]["resource"]
    assert [s["title"] for s in comp["section"]] == ["Diagnosis review", "Recommendation"]


def test_observations_for_the_coded_choices(form):
    bundle = build(COMPLETE, form)
    obs = {e["resource"]["code"]["coding"][0]["code"]: e for e in by_type(bundle, "Observation")}
    assert set(obs) == {"concordance", "recommendation", "urgency"}
    expect = {"concordance": ("http://fhirbridge.org/fhir/CodeSystem/concordance", "partially-concordant"),
              "recommendation": ("http://fhirbridge.org/fhir/CodeSystem/recommendation", "less-invasive-procedure"),
              "urgency": ("http://hl7.org/fhir/request-priority", "urgent")}
    org_url = by_type(bundle, "Organization")[0]["fullUrl"]
    for name, entry in obs.items():
        r = entry["resource"]
        assert r["code"]["coding"][0]["system"] == OPINION_CS
        value = r["valueCodeableConcept"]["coding"][0]
        assert (value["system"], value["code"]) == expect[name]
        assert r["status"] == "final"
        assert r["subject"] == {"reference": PATIENT_URL}
        assert r["basedOn"] == [{"reference": SR_URL}]
        assert r["performer"] == [{"reference": org_url}]
        assert r["effectiveDateTime"] == TIMESTAMP
    # each Observation is an entry of the section its field belongs to
    comp = bundle["entry"][0]["resource"]
    section_of = {ref["reference"]: s["title"] for s in comp["section"] for ref in s.get("entry", [])}
    assert section_of == {obs["concordance"]["fullUrl"]: "Diagnosis review",
                          obs["recommendation"]["fullUrl"]: "Recommendation",
                          obs["urgency"]["fullUrl"]: "Recommendation"}


def test_ids_are_stable_per_opinion_and_differ_between_opinions(form):
    a1, a2, b = build(MINIMAL, form, "op-A"), build(MINIMAL, form, "op-A"), build(MINIMAL, form, "op-B")
    assert [e["fullUrl"] for e in a1["entry"]] == [e["fullUrl"] for e in a2["entry"]]
    assert a1["entry"][0]["fullUrl"] != b["entry"][0]["fullUrl"]
    ids = lambda bundle: {e["fullUrl"] for e in by_type(bundle, "Observation")}  # noqa: E731
    assert not ids(a1) & ids(b)


# --- load_answer -----------------------------------------------------------------------------------

def test_load_toml_answer(tmp_path, form):
    p = tmp_path / "answer.toml"
    p.write_text('concordance = "concordant"\nrecommendation = "proceed-as-planned"\nurgency = "routine"\n'
                 'risks_benefits = """Multi\nline"""\nalternatives = ["PT"]\n'
                 '[[answers]]\nquestion = "Q1"\nanswer = "A1"\n', encoding="utf-8")
    data = load_answer(p)
    assert data["risks_benefits"] == "Multi\nline"
    assert data["answers"] == [{"question": "Q1", "answer": "A1"}]
    assert check_answer(data, form) == []


@pytest.mark.parametrize("name", ["answer.json", "ANSWER.JSON"])
def test_load_json_answer(tmp_path, form, name):
    p = tmp_path / name
    p.write_text(json.dumps(COMPLETE), encoding="utf-8")
    assert load_answer(p) == COMPLETE


def test_bad_toml_answer(tmp_path):
    p = tmp_path / "answer.toml"
    p.write_text('concordance = "concordant\n', encoding="utf-8")
    with pytest.raises(FhirbridgeError) as info:
        load_answer(p)
    assert str(p) in str(info.value) and "not valid TOML" in str(info.value)


def test_bad_json_answer(tmp_path):
    p = tmp_path / "answer.json"
    p.write_text('{"concordance": "concordant",}', encoding="utf-8")
    with pytest.raises(FhirbridgeError) as info:
        load_answer(p)
    assert str(p) in str(info.value) and "not valid JSON" in str(info.value)


def test_json_answer_must_be_an_object(tmp_path):
    p = tmp_path / "answer.json"
    p.write_text('["concordant"]', encoding="utf-8")
    with pytest.raises(FhirbridgeError) as info:
        load_answer(p)
    assert "table/object" in str(info.value)


def test_missing_answer_file(tmp_path):
    p = tmp_path / "nope.toml"
    with pytest.raises(FhirbridgeError) as info:
        load_answer(p)
    assert str(info.value) == f"{p}: no such file"


def test_non_utf8_answer_is_a_clear_error(tmp_path):
    p = tmp_path / "answer.toml"
    p.write_bytes('risks_benefits = "Rückenschmerzen"\n'.encode("latin-1"))
    with pytest.raises(FhirbridgeError):
        load_answer(p)
