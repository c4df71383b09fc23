"""The CDS Hooks rules (mappings/cds/*.toml) and the [cds] settings: the shipped ones load, and a broken copy is a
ConfigError naming the file and the key."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fhirbridge.config import loader as config
from fhirbridge.config.mappings import check_all, load_cds_rules
from fhirbridge.config.starter import write_starter
from fhirbridge.errors import ConfigError

SHIPPED_RULES = "second-opinion.toml"


def copy_mappings(tmp_path: Path) -> Path:
    dst = tmp_path / "mappings"
    shutil.copytree(config.PACKAGE_MAPPINGS.resolve(), dst)
    return dst


def test_the_shipped_rules_cover_every_high_stakes_treatment_of_the_issue():
    rules = {r.id: r for r in load_cds_rules(config.PACKAGE_MAPPINGS)}
    assert set(rules) == {"spine-elective", "coronary-revascularisation", "cancer-treatment"}
    snomed, cpt = "http://snomed.info/sct", "http://www.ama-assn.org/go/cpt"
    assert (snomed, "55705006") in rules["spine-elective"].codes            # spinal fusion
    assert (cpt, "63047") in rules["spine-elective"].codes                  # lumbar decompression
    assert {(snomed, "415070008"), (snomed, "232717009")} <= rules["coronary-revascularisation"].codes
    assert {(snomed, "367336001"), (snomed, "108290001")} <= rules["cancer-treatment"].codes
    for rule in rules.values():
        assert "stat" not in rule.priorities and "asap" not in rule.priorities
        assert len(rule.summary) < 140 and rule.lookback_months == 6


@pytest.mark.parametrize(("old", "new", "key", "words"), [
    ('indicator = "info"', 'indicator = "critical"', "rules[0].indicator", "not one of info, warning"),
    ('profile = "spine"', 'profile = "spines"', "rules[0].profile", "not in collect/"),
    ('"http://snomed.info/sct|55705006",', '"55705006",', "rules[0].codes", '"system|code"'),
    ('id = "spine-elective"', 'id = "spine-elective"\ncolour = "red"', "rules[0].colour", "unknown key"),
    ('priorities = ["routine", "urgent"]', 'priorities = ["routine", "stat"]', "rules[0].priorities",
     "must not include stat"),
    ('priorities = ["routine", "urgent"]', 'priorities = ["soon"]', "rules[0].priorities", "request-priority"),
    ('lookback_months = 6', 'lookback_months = "six"', "rules[0].lookback_months", "whole number"),
    ('summary = "Elective spine surgery: consider a second opinion before signing"', 'summary = "' + "x" * 140 + '"',
     "rules[0].summary", "shorter than 140"),
    ('id = "coronary-revascularisation"', 'id = "spine-elective"', "rules[1].id", "used twice"),
])
def test_a_broken_rule_file_names_the_file_and_the_key(tmp_path, old, new, key, words):
    mappings = copy_mappings(tmp_path)
    path = mappings / "cds" / SHIPPED_RULES
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_cds_rules(mappings)
    err = info.value
    assert err.file == str(path) and err.key == key, str(err)
    assert words in str(err) and str(path) in str(err)
    with pytest.raises(ConfigError):
        check_all(mappings)            # found at start-up, not at the first hook call


def test_no_rule_files_means_no_rules(tmp_path):
    mappings = copy_mappings(tmp_path)
    (mappings / "cds" / SHIPPED_RULES).unlink()
    assert load_cds_rules(mappings) == ()


def _site(tmp_path: Path, extra: str) -> Path:
    path = write_starter(tmp_path / "site")["config"]
    path.write_text(path.read_text() + extra)
    return path


def test_the_cds_section_loads_and_names_its_hospital(tmp_path):
    path = _site(tmp_path, '\n[service]\npublic_url = "https://fb.example"\n[cds]\ntime_budget_ms = 300\n'
                           '[[cds.issuers]]\niss = "https://ehr.example/"\njwks_url = "https://ehr.example/jwks"\n')
    cfg = config.load(path, environ={})
    assert cfg.cds is not None and cfg.cds.enabled and cfg.cds.time_budget_ms == 300
    [issuer] = cfg.cds.issuers
    assert (issuer.iss, issuer.hospital) == ("https://ehr.example", cfg.hospital.name)
    assert cfg.cds.issuer("https://ehr.example/") is issuer and cfg.cds.issuer("https://evil") is None


@pytest.mark.parametrize(("extra", "key", "words"), [
    ('[cds]\n[[cds.issuers]]\niss = "https://e"\njwks_url = "https://e/j"\n', "cds.enabled", "public_url"),
    ('[service]\npublic_url = "https://fb"\n[cds]\n', "cds.issuers", "at least one EHR"),
    ('[service]\npublic_url = "https://fb"\n[cds]\n[[cds.issuers]]\niss = "https://e"\njwks_url = "http://e/j"\n',
     "cds.issuers[0].jwks_url", "https://"),
    ('[service]\npublic_url = "https://fb"\n[cds]\n[[cds.issuers]]\niss = "https://e"\njwks_url = "https://e/j"\n'
     'hospital = "nowhere"\n', "cds.issuers[0].hospital", "configured hospital"),
    ('[service]\npublic_url = "https://fb"\n[cds]\n[[cds.issuers]]\niss = "https://e"\njwks_url = "https://e/j"\n'
     'kid = "x"\n', "cds.issuers[0].kid", "unknown"),
])
def test_a_bad_cds_section_names_the_key(tmp_path, extra, key, words):
    path = _site(tmp_path, "\n" + extra)
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={})
    assert info.value.key == key, str(info.value)
    assert words in str(info.value)


def test_a_disabled_cds_section_needs_neither_public_url_nor_issuers(tmp_path):
    cfg = config.load(_site(tmp_path, "\n[cds]\nenabled = false\n"), environ={})
    assert cfg.cds is not None and cfg.cds.enabled is False and cfg.cds.issuers == ()
