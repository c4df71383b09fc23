"""The shipped mappings load, and a broken copy is a ConfigError naming the file and the key."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fhirbridge.config import loader as config
from fhirbridge.config.mappings import COLLECTABLE, load_opinion_form, load_order_codes, load_profile, profile_names
from fhirbridge.errors import ConfigError

SHIPPED = config.PACKAGE_MAPPINGS
V3 = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


def copy_mappings(tmp_path: Path) -> Path:
    dst = tmp_path / "mappings"
    shutil.copytree(SHIPPED.resolve(), dst)
    return dst


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"test setup: {old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def assert_config_error(exc_info, path: Path, key: str | None) -> ConfigError:
    err = exc_info.value
    assert err.file == str(path)
    assert str(path) in str(err)
    if key is not None:
        assert err.key == key, str(err)
        assert key in str(err)
    return err


# --- the shipped mappings --------------------------------------------------------------------------

def test_shipped_mappings_dir_is_the_project_mappings():
    assert (SHIPPED / "collect").is_dir() and (SHIPPED / "opinion" / "default.toml").is_file()
    assert profile_names(SHIPPED) == ["cardiac", "default", "oncology", "radiology", "spine"]


def test_shipped_order_codes():
    codes = load_order_codes(SHIPPED)
    v2_0336 = "http://terminology.hl7.org/CodeSystem/v2-0336"
    assert [(c["system"], c["code"]) for c in codes.match] == [(v2_0336, "S")]
    assert codes.search_token() == f"{v2_0336}|S"
    assert (codes.order_code["system"], codes.order_code["code"]) == (v2_0336, "S")
    assert codes.order_category == {"system": "http://snomed.info/sct", "code": "3457005",
                                    "display": "Patient referral"}
    assert codes.profile_system == "http://fhirbridge.org/fhir/CodeSystem/collection-profile"
    sct = "http://snomed.info/sct"
    assert codes.profile_by_specialty == {(sct, "394801008"): "spine", (sct, "394579002"): "cardiac",
                                          (sct, "394593009"): "oncology"}
    assert set(codes.profile_by_specialty.values()) <= set(profile_names(SHIPPED))


def test_order_codes_match_a_service_request():
    codes = load_order_codes(SHIPPED)
    yes = {"code": {"coding": [{"system": "urn:local", "code": "X"},
                               {"system": "http://terminology.hl7.org/CodeSystem/v2-0336", "code": "S"}]}}
    other_system = {"code": {"coding": [{"system": "urn:local", "code": "S"}]}}
    assert codes.matches(yes)
    assert not codes.matches(other_system)
    assert not codes.matches({})


@pytest.mark.parametrize("name, lookback, labels", [
    ("default", 730, 5), ("spine", 1095, 5), ("cardiac", 730, 5), ("oncology", 1825, 5)])
def test_shipped_profiles_load(name, lookback, labels):
    p = load_profile(SHIPPED, name)
    assert p.name == name
    assert p.lookback_days == lookback
    assert p.file == SHIPPED / "collect" / f"{name}.toml"
    assert p.description
    assert set(p.rules) == set(COLLECTABLE)
    assert len(p.withhold_labels) == labels
    assert (V3, "PSY") in p.withhold_labels and (V3, "HIV") in p.withhold_labels
    assert ("http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "R") in p.withhold_labels
    assert p.rules["Condition"].lookback is False  # the problem list matters whatever its age
    for rule in p.rules.values():
        assert rule.statuses_excluded == ("entered-in-error",)


def test_shipped_profile_details():
    spine = load_profile(SHIPPED, "spine")
    assert spine.rules["ImagingStudy"].modalities == ("MR", "CT", "CR", "DX", "RF", "NM")
    assert ("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD") in spine.rules["DiagnosticReport"].categories
    assert ("http://loinc.org", "LP29684-5") in spine.rules["DiagnosticReport"].categories
    default = load_profile(SHIPPED, "default")
    assert default.rules["DiagnosticReport"].categories == ()
    assert default.rules["ImagingStudy"].modalities == ()
    assert default.rules["Procedure"].lookback is True
    assert "XA" in load_profile(SHIPPED, "cardiac").rules["ImagingStudy"].modalities
    onco = load_profile(SHIPPED, "oncology")
    assert ("http://terminology.hl7.org/CodeSystem/v2-0074", "PAT") in onco.rules["DiagnosticReport"].categories


def test_unknown_profile_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        load_profile(SHIPPED, "dermatology")
    err = assert_config_error(info, SHIPPED / "collect" / "dermatology.toml", None)
    assert "dermatology" in err.detail and "spine" in err.detail and "oncology" in err.detail


def test_shipped_opinion_form():
    form = load_opinion_form(SHIPPED)
    assert form.doc_type == {"system": "http://loinc.org", "code": "11488-4", "display": "Consult note"}
    assert form.doc_category["code"] == "clinical-note"
    assert form.title == "Second opinion"
    assert list(form.fields) == ["concordance", "diagnosis_comment", "recommendation", "alternatives",
                                 "risks_benefits", "answers", "urgency", "free_text"]
    required = {n for n, f in form.fields.items() if f.required}
    assert required == {"concordance", "recommendation", "risks_benefits", "urgency"}
    kinds = {n: f.kind for n, f in form.fields.items()}
    assert kinds["alternatives"] == "list" and kinds["answers"] == "answers" and kinds["free_text"] == "text"
    conc = form.fields["concordance"]
    assert conc.kind == "choice" and set(conc.choices) == {"concordant", "partially-concordant", "discordant"}
    assert conc.observation_code["code"] == "concordance"
    assert form.fields["recommendation"].observation_code["code"] == "recommendation"
    assert form.fields["urgency"].observation_code["code"] == "urgency"
    assert form.fields["free_text"].observation_code is None
    assert form.section_codes["Recommendation"]["code"] == "18776-5"
    for f in form.fields.values():
        assert f.section in form.section_codes


def test_missing_opinion_form():
    with pytest.raises(ConfigError) as info:
        load_opinion_form(SHIPPED, "no-such-form")
    assert_config_error(info, SHIPPED / "opinion" / "no-such-form.toml", None)


# --- broken profiles -------------------------------------------------------------------------------

def load_broken_profile(tmp_path, old, new, name="spine"):
    m = copy_mappings(tmp_path)
    path = m / "collect" / f"{name}.toml"
    edit(path, old, new)
    with pytest.raises(ConfigError) as info:
        load_profile(m, name)
    return info, path


def test_unknown_resource_type_in_profile(tmp_path):
    info, path = load_broken_profile(tmp_path, "[resources.Procedure]", "[resources.Observation]")
    err = assert_config_error(info, path, "resources.Observation")
    assert "Observation" in err.detail and "DiagnosticReport" in err.detail  # says what is collectable


def test_bad_category_token(tmp_path):
    info, path = load_broken_profile(tmp_path, '"http://terminology.hl7.org/CodeSystem/v2-0074|RAD"', '"RAD"')
    err = assert_config_error(info, path, "resources.DiagnosticReport.categories")
    assert "system|code" in err.detail


def test_categories_not_a_list(tmp_path):
    info, path = load_broken_profile(tmp_path, "[resources.Procedure]",
                                     '[resources.Procedure]\ncategories = "http://x|y"')
    assert_config_error(info, path, "resources.Procedure.categories")


def test_bad_security_label_token(tmp_path):
    info, path = load_broken_profile(tmp_path, f'"{V3}|PSY"', '"PSY"')
    assert_config_error(info, path, "withhold.security_labels")


@pytest.mark.parametrize("value", ["0", "-30", '"two years"', "1.5"])
def test_non_positive_or_non_integer_lookback(tmp_path, value):
    info, path = load_broken_profile(tmp_path, "lookback_days = 1095", f"lookback_days = {value}")
    err = assert_config_error(info, path, "lookback_days")
    assert "positive" in err.detail


def test_unknown_key_in_resource_rule(tmp_path):
    info, path = load_broken_profile(tmp_path, "[resources.Condition]\nlookback = false",
                                     "[resources.Condition]\nlookbak = false")
    assert_config_error(info, path, "resources.Condition.lookbak")


def test_modalities_must_be_strings(tmp_path):
    info, path = load_broken_profile(tmp_path, 'modalities = ["MR", "CT", "CR", "DX", "RF", "NM"]',
                                     "modalities = [1, 2]")
    assert_config_error(info, path, "resources.ImagingStudy.modalities")


def test_profile_without_resources(tmp_path):
    m = copy_mappings(tmp_path)
    path = m / "collect" / "empty.toml"
    path.write_text('name = "empty"\nlookback_days = 10\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_profile(m, "empty")
    assert_config_error(info, path, "resources")


def test_profile_with_invalid_toml(tmp_path):
    info, path = load_broken_profile(tmp_path, "[resources.Procedure]", "[resources.Procedure")
    err = assert_config_error(info, path, None)
    assert "not valid TOML" in err.detail


@pytest.mark.parametrize("old, new, key", [
    ("security_labels = [", "security_label = [", "withhold.security_label"),
    ("lookback_days = 1095", "lookback_day = 30", "lookback_day"),
])
def test_misspelt_profile_keys_are_errors(tmp_path, old, new, key):
    info, path = load_broken_profile(tmp_path, old, new)
    assert_config_error(info, path, key)


def test_statuses_excluded_must_be_a_list(tmp_path):
    info, path = load_broken_profile(tmp_path, "[resources.Procedure]",
                                     '[resources.Procedure]\nstatuses_excluded = "entered-in-error"')
    assert_config_error(info, path, "resources.Procedure.statuses_excluded")


# --- broken order codes ----------------------------------------------------------------------------

def test_no_order_codes(tmp_path):
    m = copy_mappings(tmp_path)
    path = m / "codes" / "orders.toml"
    edit(path, "\n[[order_codes]]\nsystem", "\n[[not_order_codes]]\nsystem")
    with pytest.raises(ConfigError) as info:
        load_order_codes(m)
    err = assert_config_error(info, path, "order_codes")
    assert "[[order_codes]]" in err.detail


def test_order_code_without_code(tmp_path):
    m = copy_mappings(tmp_path)
    path = m / "codes" / "orders.toml"
    edit(path, 'code = "S"\ndisplay = "Second Opinion"', 'display = "Second Opinion"')
    with pytest.raises(ConfigError) as info:
        load_order_codes(m)
    assert_config_error(info, path, "order_codes[0]")


def test_order_category_missing(tmp_path):
    m = copy_mappings(tmp_path)
    path = m / "codes" / "orders.toml"
    edit(path, "category = {", "# category = {")
    with pytest.raises(ConfigError) as info:
        load_order_codes(m)
    assert_config_error(info, path, "order.category")


def test_order_codes_file_missing(tmp_path):
    m = copy_mappings(tmp_path)
    (m / "codes" / "orders.toml").unlink()
    with pytest.raises(ConfigError) as info:
        load_order_codes(m)
    assert_config_error(info, m / "codes" / "orders.toml", None)


def test_specialty_mapped_to_unknown_profile(tmp_path):
    m = copy_mappings(tmp_path)
    path = m / "codes" / "orders.toml"
    edit(path, 'profile = "spine"', 'profile = "spnie"')
    with pytest.raises(ConfigError) as info:
        load_order_codes(m)
    assert_config_error(info, path, "profile.by_specialty[0].profile")


# --- broken opinion forms --------------------------------------------------------------------------

def load_broken_form(tmp_path, old, new):
    m = copy_mappings(tmp_path)
    path = m / "opinion" / "default.toml"
    edit(path, old, new)
    with pytest.raises(ConfigError) as info:
        load_opinion_form(m)
    return info, path


def test_choice_field_without_choices(tmp_path):
    info, path = load_broken_form(tmp_path, "[fields.urgency.choices]", "[fields.urgency.nochoices]")
    err = assert_config_error(info, path, "fields.urgency.choices")
    assert "choices" in err.detail


def test_choice_without_code(tmp_path):
    info, path = load_broken_form(
        tmp_path, 'routine = { system = "http://hl7.org/fhir/request-priority", code = "routine", ',
        'routine = { system = "http://hl7.org/fhir/request-priority", ')
    assert_config_error(info, path, "fields.urgency.choices.routine")


def test_unknown_field_kind(tmp_path):
    info, path = load_broken_form(tmp_path, '[fields.free_text]\nkind = "text"', '[fields.free_text]\nkind = "essay"')
    err = assert_config_error(info, path, "fields.free_text.kind")
    assert "choice" in err.detail and "answers" in err.detail


def test_observation_without_code(tmp_path):
    system = "http://fhirbridge.org/fhir/CodeSystem/opinion-observation"
    info, path = load_broken_form(tmp_path, f'observation_code = {{ system = "{system}", code = "urgency", ',
                                  f'observation_kode = {{ system = "{system}", code = "urgency", ')
    assert_config_error(info, path, "fields.urgency.observation_code")


def test_form_without_fields(tmp_path):
    m = copy_mappings(tmp_path)
    path = m / "opinion" / "default.toml"
    text = path.read_text(encoding="utf-8")
    path.write_text(text[:text.index("[fields.concordance]")], encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_opinion_form(m)
    assert_config_error(info, path, "fields")


def test_form_document_type_missing(tmp_path):
    info, path = load_broken_form(tmp_path, "type = {", "typ = {")
    assert_config_error(info, path, "document.type")


# --- the opinion form is strict at every level (review fix) -------------------------------------------

@pytest.mark.parametrize("old, new, key", [
    ("[fields.risks_benefits]\nkind = \"text\"\nrequired = true",
     "[fields.risks_benefits]\nkind = \"text\"\nrequried = true", "fields.risks_benefits.requried"),
    ('label = "Urgency"', 'lable = "Urgency"', "fields.urgency.lable"),
    ('title = "Second opinion"', 'titel = "Second opinion"', "document.titel"),
    ("[sections]", "[section]", "section"),
    ('code = "11488-4", display = "Consult note"', 'code = "11488-4", dispaly = "Consult note"',
     "document.type.dispaly"),
    ('urgent = { system = "http://hl7.org/fhir/request-priority", code = "urgent", display = "Urgent" }',
     'urgent = { system = "http://hl7.org/fhir/request-priority", code = "urgent", dispaly = "Urgent" }',
     "fields.urgency.choices.urgent.dispaly"),
])
def test_misspelt_opinion_form_keys_are_errors(tmp_path, old, new, key):
    info, path = load_broken_form(tmp_path, old, new)
    err = assert_config_error(info, path, key)
    assert "unknown key" in err.detail


@pytest.mark.parametrize("old, new, key", [
    ("[fields.free_text]\nkind = \"text\"\nrequired = false\nlabel = \"Comments\"\nsection = \"Comments\"",
     "[fields]\nfree_text = \"text\"", "fields.free_text"),
    ("[document]\ntype = {", "document = \"consult\"\n[documentx]\ntype = {", "document"),
    ("[fields.risks_benefits]\nkind = \"text\"\nrequired = true",
     "[fields.risks_benefits]\nkind = \"text\"\nrequired = \"false\"", "fields.risks_benefits.required"),
    ('label = "Urgency"', "label = 3", "fields.urgency.label"),
    ("[fields.free_text]\nkind = \"text\"", "[fields.free_text]\nkind = \"text\"\nobservation = true",
     "fields.free_text.observation"),
    ("[fields.free_text]\nkind = \"text\"", "[fields.free_text]\nkind = \"text\"\nchoices = { a = 1 }",
     "fields.free_text.choices"),
])
def test_opinion_form_values_of_the_wrong_shape_are_errors(tmp_path, old, new, key):
    info, path = load_broken_form(tmp_path, old, new)
    assert_config_error(info, path, key)


def test_check_all_loads_every_mapping_file():
    from fhirbridge.config.mappings import check_all
    check_all(SHIPPED)   # the shipped mappings are all fine


@pytest.mark.parametrize("rel, old, new, key", [
    ("collect/cardiac.toml", "lookback_days", "lookback_dayz", "lookback_dayz"),
    ("codes/orders.toml", "[order]", "[ordre]", None),
    ("opinion/default.toml", 'label = "Urgency"', 'lable = "Urgency"', "fields.urgency.lable"),
])
def test_check_all_finds_a_typo_in_any_mapping_file(tmp_path, rel, old, new, key):
    from fhirbridge.config.mappings import check_all
    m = copy_mappings(tmp_path)
    edit(m / rel, old, new)
    with pytest.raises(ConfigError) as info:
        check_all(m)
    assert_config_error(info, m / rel, key)


def test_check_all_reads_every_opinion_form_not_just_the_default(tmp_path):
    from fhirbridge.config.mappings import check_all
    m = copy_mappings(tmp_path)
    extra = m / "opinion" / "short.toml"
    extra.write_text((m / "opinion" / "default.toml").read_text().replace("\nrequired = true", "\nrequried = true", 1))
    with pytest.raises(ConfigError) as info:
        check_all(m)
    assert_config_error(info, extra, None)


def test_check_all_needs_a_default_profile(tmp_path):
    from fhirbridge.config.mappings import check_all
    m = copy_mappings(tmp_path)
    (m / "collect" / "default.toml").rename(m / "collect" / "general.toml")
    with pytest.raises(ConfigError) as info:
        check_all(m)
    assert "default.toml" in str(info.value)
