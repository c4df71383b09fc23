"""`fhirbridge init` values: the hospital name is quoted whatever it holds; a bad URL or name is refused before
anything is written, without echoing credentials."""
from __future__ import annotations

import pytest

from fhirbridge.config import loader as config
from tests.kit.cli import init_site, run


@pytest.mark.parametrize("name", ['St "X" Hospital', "Back\\slash Clinic", "Hôpital Sainte-Anne"])
def test_init_quotes_the_hospital_name(tmp_path, capsys, name):
    path = init_site(tmp_path, capsys, "--hospital-name", name)
    assert config.load(path, environ={}).hospital.name == name


@pytest.mark.parametrize("argv, key", [
    (["--fhir-base-url", "ftp://ehr.example/fhir"], "--fhir-base-url"),
    (["--fhir-base-url", "https:///fhir"], "--fhir-base-url"),
    (["--fhir-base-url", "http://user:hunter2@ehr.hospital.example/fhir"], "--fhir-base-url"),   # S11
    (["--hospital-name", "Line\nbreak"], "--hospital-name"),
    (["--hospital-name", "  "], "--hospital-name"),
])
def test_init_refuses_bad_values_before_writing_anything(tmp_path, capsys, argv, key):
    code, _out, err = run(capsys, "init", tmp_path / "site", *argv)
    assert code == 2 and key in err and "Traceback" not in err
    assert not (tmp_path / "site").exists()


def test_init_refuses_a_url_without_echoing_credentials(tmp_path, capsys):
    code, _out, err = run(capsys, "init", tmp_path / "site", "--fhir-base-url", "ftp://user:hunter2@ehr.example/")
    assert code == 2 and "hunter2" not in err and "ftp" in err


def test_init_refuses_a_plain_http_ehr_on_another_host_without_echoing_it(tmp_path, capsys):
    code, _out, err = run(capsys, "init", tmp_path / "site", "--fhir-base-url", "http://user:hunter2@ehr.example/")
    assert code == 2 and "hunter2" not in err and "https://" in err
    assert not (tmp_path / "site").exists()
