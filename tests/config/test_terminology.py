"""fhirbridge's own code systems (issue 13, C6): every code it writes that no standard has is defined in a real
CodeSystem (canonical http url, versioned, complete), and the mappings and the Task's steps agree with them."""
from __future__ import annotations

import json
import shutil

import pytest

from fhirbridge.config.model import PACKAGE_MAPPINGS
from fhirbridge.config.terminology import (
    CANONICAL_BASE,
    LEGACY,
    REFERRAL_STEP,
    check_terminology,
    load_terminology,
    same_system,
)
from fhirbridge.ehr.task import BSER_CODES, STATUS
from fhirbridge.errors import ConfigError

SHIPPED = ("opinion-observation", "concordance", "recommendation", "referral-step", "opinion-answer", "radpeer",
           "outcome-measure")


def test_every_shipped_code_system_is_a_complete_versioned_codesystem_at_an_http_url():
    terminology = load_terminology(PACKAGE_MAPPINGS)
    assert CANONICAL_BASE.startswith("http://") and not CANONICAL_BASE.startswith("http://example")
    assert set(terminology.by_url) == {CANONICAL_BASE + i for i in (*SHIPPED, "collection-profile")}
    for url, cs in terminology.by_url.items():
        assert cs["resourceType"] == "CodeSystem" and cs["url"] == url == CANONICAL_BASE + cs["id"]
        assert cs["version"] and cs["status"] == "active" and cs["content"] == "complete"
        assert cs["count"] == len(cs["concept"]) > 0
        assert all(c["code"] and c["display"] and c.get("definition") for c in cs["concept"]), cs["id"]
    for name in SHIPPED:   # the shipped files are what is served, byte for byte the same resource
        on_disk = json.loads((PACKAGE_MAPPINGS / "codesystems" / f"{name}.json").read_text())
        assert terminology.by_id(name) == on_disk


def test_the_tasks_steps_are_bsers_codes_or_defined_in_the_referral_step_code_system():
    terminology = load_terminology(PACKAGE_MAPPINGS)
    for _status, code, display in STATUS.values():
        if code in BSER_CODES:
            assert not terminology.defines(REFERRAL_STEP, code), code    # ours only where BSeR has none
        else:
            assert terminology.display(REFERRAL_STEP, code) == display, code
    assert {c for c, _ in BSER_CODES.values()} == {"2.0", "4.0", "6.0", "7.0"}


def test_every_code_the_shipped_mappings_take_from_our_systems_is_defined():
    terminology = check_terminology(PACKAGE_MAPPINGS)
    form = (PACKAGE_MAPPINGS / "opinion" / "default.toml").read_text()
    assert "urn:fhirbridge:codes" not in form and CANONICAL_BASE + "concordance" in form
    assert terminology.defines(CANONICAL_BASE + "recommendation", "watchful-waiting")
    assert terminology.defines(CANONICAL_BASE + "collection-profile", "spine")


def test_a_choice_missing_from_its_code_system_is_a_config_error_naming_the_file(tmp_path):
    mappings = tmp_path / "mappings"
    shutil.copytree(PACKAGE_MAPPINGS, mappings)
    form = mappings / "opinion" / "default.toml"
    form.write_text(form.read_text().replace('code = "watchful-waiting"', 'code = "wachtful-waiting"'))
    with pytest.raises(ConfigError, match="'wachtful-waiting' is not defined") as err:
        check_terminology(mappings)
    assert str(form) in str(err.value)


def test_a_broken_code_system_file_is_a_config_error_naming_it(tmp_path):
    shipped = tmp_path / "codesystems"
    shutil.copytree(PACKAGE_MAPPINGS / "codesystems", shipped)
    (shipped / "concordance.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON") as err:
        load_terminology(PACKAGE_MAPPINGS, shipped)
    assert "concordance.json" in str(err.value)
    cs = json.loads((PACKAGE_MAPPINGS / "codesystems" / "recommendation.json").read_text())
    for change in ({"content": "fragment"}, {"url": "urn:fhirbridge:codes:recommendation"}, {"version": ""},
                   {"concept": cs["concept"] + [cs["concept"][0]]}):
        (shipped / "concordance.json").unlink(missing_ok=True)
        (shipped / "recommendation.json").write_text(json.dumps({**cs, **change}))
        with pytest.raises(ConfigError):
            load_terminology(PACKAGE_MAPPINGS, shipped)


def test_the_collection_profile_code_system_follows_the_profiles_and_its_version_with_them(tmp_path):
    mappings = tmp_path / "mappings"
    shutil.copytree(PACKAGE_MAPPINGS, mappings)
    before = load_terminology(mappings).by_id("collection-profile")
    assert {c["code"] for c in before["concept"]} == {p.stem for p in (PACKAGE_MAPPINGS / "collect").glob("*.toml")}
    (mappings / "collect" / "neuro.toml").write_text('description = "Neurology: notes"\n[resources.Condition]\n')
    after = load_terminology(mappings).by_id("collection-profile")
    assert "neuro" in {c["code"] for c in after["concept"]} and after["version"] != before["version"]


def test_the_systems_earlier_releases_wrote_are_read_as_their_replacements():
    assert LEGACY["urn:fhirbridge:codes:referral-step"] == REFERRAL_STEP
    assert same_system("urn:fhirbridge:codes:opinion", CANONICAL_BASE + "opinion-observation")
    assert same_system("urn:fhirbridge:collection-profile", CANONICAL_BASE + "collection-profile")
    assert not same_system("urn:fhirbridge:codes:concordance", CANONICAL_BASE + "recommendation")
    assert not same_system(None, REFERRAL_STEP)
