"""The specialty opinion forms (issue 16, part 4): each loads, is chosen by the Case's collection profile, asks
its specialty's questions with codes that resolve, and ends with the outcome every form shares (what the
dashboard counts)."""
from __future__ import annotations

from pathlib import Path

import pytest

from fhirbridge.config.mappings import load_opinion_form, opinion_form_names, profile_names
from fhirbridge.config.model import PACKAGE_MAPPINGS
from fhirbridge.config.terminology import check_terminology
from fhirbridge.errors import ConfigError
from fhirbridge.exchange.opinion import check_answer
from fhirbridge.exchange.reviewer import OpenedPackage, form_for
from tests.config.test_mappings import assert_config_error, copy_mappings, edit

SPECIALTIES = ("cardiac", "oncology", "radiology", "spine")
OUTCOME = ("concordance", "diagnosis_comment", "recommendation", "alternatives", "risks_benefits", "answers",
           "urgency", "free_text")
CS = "http://fhirbridge.org/fhir/CodeSystem/"


def test_every_specialty_has_a_form_and_a_collection_profile_of_the_same_name():
    assert set(SPECIALTIES) | {"default"} == set(opinion_form_names(PACKAGE_MAPPINGS))
    assert set(SPECIALTIES) <= set(profile_names(PACKAGE_MAPPINGS))
    check_terminology(PACKAGE_MAPPINGS)        # every code of ours a form names is defined and served


@pytest.mark.parametrize("name", SPECIALTIES)
def test_each_form_ends_with_the_default_forms_outcome_field_for_field(name):
    default, form = load_opinion_form(PACKAGE_MAPPINGS), load_opinion_form(PACKAGE_MAPPINGS, name)
    assert list(form.fields)[-len(OUTCOME):] == list(OUTCOME) == list(default.fields)
    for f in OUTCOME:
        assert form.fields[f] == default.fields[f], f
    specialty = [f for f in form.fields.values() if f.name not in OUTCOME]
    assert specialty and not any(f.required for f in specialty)   # an answer to the default form stays valid
    assert any(f.observation_code for f in specialty)
    assert form.title.startswith("Second opinion: ")


def test_the_forms_ask_what_the_issue_names():
    oncology = load_opinion_form(PACKAGE_MAPPINGS, "oncology")
    for f in ("histology", "grade", "tnm_stage"):
        assert set(oncology.fields[f].choices) == {"confirmed", "revised", "not-assessable"}
    assert {"treatment_sequencing", "clinical_trials"} <= set(oncology.fields)
    radiology = load_opinion_form(PACKAGE_MAPPINGS, "radiology")
    study = radiology.fields["study_agreement"]
    assert study.kind == "studies" and list(study.choices) == ["1", "2a", "2b", "3a", "3b"]
    assert all(c["system"] == CS + "radpeer" for c in study.choices.values())
    assert {c["code"] for c in radiology.fields["missed_findings"].choices.values()} == {"373066001", "373067005"}
    spine = load_opinion_form(PACKAGE_MAPPINGS, "spine")
    assert {"surgical_indication", "levels", "conservative_tried", "conservative_advised"} <= set(spine.fields)
    cardiac = load_opinion_form(PACKAGE_MAPPINGS, "cardiac")
    assert {"intervention_indication", "medical_therapy", "further_tests"} <= set(cardiac.fields)


@pytest.mark.parametrize(("profile", "form"), [("spine", "spine"), ("oncology", "oncology"),
                                               ("radiology", "radiology"), ("default", "default"),
                                               ("neuro", "default"), (None, "default")])
def test_the_form_is_chosen_by_the_packages_collection_profile(profile, form):
    opened = OpenedPackage(Path("."), claims={"manifest": {"profile": profile}}, document={})
    assert form_for(opened, PACKAGE_MAPPINGS) == form


def test_a_studies_answer_is_checked_entry_by_entry():
    form = load_opinion_form(PACKAGE_MAPPINGS, "radiology")
    base = {"concordance": "concordant", "recommendation": "proceed-as-planned", "risks_benefits": "x",
            "urgency": "routine"}
    assert check_answer({**base, "study_agreement": [{"study": "ImagingStudy/1", "score": "2a"}]}, form) == []
    problems = check_answer({**base, "study_agreement": [{"study": "Patient/1", "score": "4", "colour": "red"}]},
                            form)
    assert any("ImagingStudy/<id>" in p for p in problems) and any("'4' is not one of" in p for p in problems)
    assert any("unknown key 'colour'" in p for p in problems)
    assert check_answer({**base, "study_agreement": "all fine"}, form)


def test_a_studies_field_needs_choices_and_only_choice_kinds_record_observations(tmp_path):
    m = copy_mappings(tmp_path)
    path = m / "opinion" / "radiology.toml"
    edit(path, "[fields.study_agreement.choices]", "[fields.study_agreement.options]")
    with pytest.raises(ConfigError) as info:
        load_opinion_form.__wrapped__(m, "radiology")
    assert_config_error(info, path, "fields.study_agreement.choices")
