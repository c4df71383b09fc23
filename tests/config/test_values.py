"""Configuration values: non-finite floats are refused from the file and the environment; check_files reports
each reviewer key problem (missing, private, no encryption key) naming the file and the key."""
from __future__ import annotations

import pytest

from fhirbridge.config import loader as config
from fhirbridge.crypto.keys import generate_jwks, public_jwks, write_private_jwks, write_public_jwks
from fhirbridge.errors import ConfigError
from fhirbridge.exchange.reviewer import write_reviewer_keys
from tests.kit.cli import init_site


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_floats_from_the_environment_are_refused(tmp_path, capsys, value):
    path = init_site(tmp_path, capsys)
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={"FHIRBRIDGE_HOSPITAL__HTTP__TIMEOUT_READ": value})
    assert info.value.key == "hospital.http.timeout_read" and "finite" in str(info.value)


def test_non_finite_floats_in_the_file_are_refused(tmp_path, capsys):
    path = init_site(tmp_path, capsys)
    path.write_text(path.read_text().replace("max_retry_after = 30.0", "max_retry_after = inf"))
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={})
    assert info.value.key == "hospital.http.max_retry_after"


def test_check_files_reports_reviewer_key_problems(tmp_path):
    from fhirbridge.config.starter import write_starter
    good = write_reviewer_keys(tmp_path / "good", None)
    private_only = tmp_path / "leaked.private.jwks.json"
    write_private_jwks(private_only, generate_jwks())
    sig_only = tmp_path / "sig-only.jwks.json"
    jwks = public_jwks(generate_jwks())
    write_public_jwks(sig_only, {"keys": [k for k in jwks["keys"] if k["use"] == "sig"]})
    base = {"display": "R", "profiles": [], "system": "urn:ietf:rfc:3986", "outbox": "outbox/x"}
    reviewers = [{**base, "name": "good", "jwks": str(good["public_keys"]), "value": "urn:oid:1"},
                 {**base, "name": "missing", "jwks": str(tmp_path / "nope.jwks.json"), "value": "urn:oid:2"},
                 {**base, "name": "leaked", "jwks": str(private_only), "value": "urn:oid:3"},
                 {**base, "name": "sig-only", "jwks": str(sig_only), "value": "urn:oid:4"}]
    path = write_starter(tmp_path / "site", reviewers=reviewers)["config"]
    cfg = config.load(path, environ={})            # the default does not open key files
    problems = config.check_files(cfg)
    assert len(problems) == 3, problems
    assert "reviewers[1].jwks" in problems[0] and "not found" in problems[0]
    assert "reviewers[2].jwks" in problems[1] and "private keys" in problems[1]
    assert "reviewers[3].jwks" in problems[2] and "no encryption key" in problems[2]
    assert all(str(path) in p for p in problems)
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={}, check_files=True)
    assert info.value.key == "reviewers[1].jwks"


def test_check_files_is_empty_for_a_good_configuration(tmp_path):
    from fhirbridge.config.starter import write_starter
    good = write_reviewer_keys(tmp_path / "good", None)
    path = write_starter(tmp_path / "site", reviewers=[{
        "name": "good", "display": "R", "jwks": str(good["public_keys"]), "profiles": [],
        "system": "urn:ietf:rfc:3986", "value": "urn:oid:1", "outbox": "outbox/x"}])["config"]
    assert config.check_files(config.load(path, environ={}, check_files=True)) == []
