"""`[hospital.pacs]` and a profile's `[imaging]` table (issue 15): what the loader accepts and refuses."""
from __future__ import annotations

from pathlib import Path

import pytest

from fhirbridge.config import loader
from fhirbridge.config.mappings import _profile
from fhirbridge.errors import ConfigError

BASE = {"hospital": {"name": "H", "fhir_base_url": "https://ehr.example/fhir", "keys": "k.json",
                     "identifier": {"system": "s", "value": "h"}}}


def _with_pacs(pacs: dict, auth: dict | None = None) -> dict:
    raw = {"hospital": {**BASE["hospital"], "pacs": pacs}}
    if auth:
        raw["hospital"]["auth"] = auth
    return raw


def test_without_a_pacs_table_the_hospital_fetches_no_images():
    assert loader._build(BASE | {}, Path("/etc/f.toml")).hospital.pacs is None


def test_a_pacs_table_gives_url_auth_timeouts_and_the_parallel_limit():
    cfg = loader._build(_with_pacs({"url": "https://pacs.example/dicom-web/", "parallel_series": 3,
                                    "auth": {"type": "bearer", "token": "s3cr3t-token"}}), Path("/etc/f.toml"))
    pacs = cfg.hospital.pacs
    assert pacs.url == "https://pacs.example/dicom-web" and pacs.parallel_series == 3
    assert pacs.auth.type == "bearer" and "s3cr3t" not in repr(pacs)


@pytest.mark.parametrize("pacs, key", [
    ({"url": "http://pacs.example/dicom-web"}, "hospital.pacs.url"),          # credentials in clear
    ({"url": "ftp://pacs"}, "hospital.pacs.url"),
    ({"auth": {"type": "kerberos"}}, "hospital.pacs.auth.type"),
    ({"auth": {"type": "basic", "username": "u"}}, "hospital.pacs.auth.password"),
    ({"parallel_series": 0}, "hospital.pacs.parallel_series"),
    ({"urll": "https://pacs.example"}, "hospital.pacs.urll"),
    ({"auth": {"type": "smart"}}, "hospital.pacs.auth.type"),                 # the EHR has no SMART token
])
def test_bad_pacs_settings_are_refused_naming_the_key(pacs, key):
    with pytest.raises(ConfigError) as err:
        loader._build(_with_pacs(pacs), Path("/etc/f.toml"))
    assert err.value.key == key


def _raw(imaging: dict) -> dict:
    return {"name": "p", "resources": {"ImagingStudy": {}}, "imaging": imaging}


def test_an_imaging_table_is_read_with_its_defaults():
    rule = _profile(Path("p.toml"), _raw({"required": True, "most_recent": 1})).imaging
    assert rule is not None and rule.required and rule.most_recent == 1 and "localizer" in rule.skip_series


@pytest.mark.parametrize("imaging, key", [({"most_recent": 0}, "imaging.most_recent"),
                                          ({"required": "yes"}, "imaging.required"),
                                          ({"max_study_bytes": -1}, "imaging.max_study_bytes"),
                                          ({"modalities": "MR"}, "imaging.modalities"),
                                          ({"requried": True}, "imaging.requried")])
def test_a_bad_imaging_table_is_refused_naming_the_key(imaging, key):
    with pytest.raises(ConfigError) as err:
        _profile(Path("p.toml"), _raw(imaging))
    assert err.value.key == key
