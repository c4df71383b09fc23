"""docs/configure.md is generated from the loader (config_reference.py) and cannot drift from it."""
from __future__ import annotations

import re
from pathlib import Path

from fhirbridge.config import loader as config
from fhirbridge.config import reference as config_reference

ROOT = Path(__file__).resolve().parents[2]


def test_every_key_the_loader_reads_has_a_meaning_and_no_other():
    keys = set(config_reference.trace())
    assert keys == set(config_reference.MEANINGS), (
        f"keys without a meaning in config_reference.MEANINGS: {sorted(keys - set(config_reference.MEANINGS))}; "
        f"meanings of keys the loader no longer reads: {sorted(set(config_reference.MEANINGS) - keys)}")
    # The trace takes every branch: each auth type's keys and each transport's.
    assert {"hospital.auth.client_id", "hospital.auth.password", "reviewers[].transport.url",
            "reviewers[].transport.path", "reviewers[].api_token", "metrics.token"} <= keys


def test_docs_configure_md_is_up_to_date():
    page = (ROOT / "docs" / "configure.md").read_text()
    assert page == config_reference.generate(), \
        "docs/configure.md is stale: run `python -m fhirbridge.config.reference > docs/configure.md`"


def test_defaults_in_the_reference_are_the_loaders(tmp_path):
    """A minimal file loads with exactly the defaults the reference lists (a few spot checks across tables)."""
    path = tmp_path / "fhirbridge.toml"
    path.write_text('[hospital]\nname = "H"\nfhir_base_url = "https://ehr.example/fhir"\nkeys = "k.json"\n'
                    '[hospital.identifier]\nsystem = "s"\nvalue = "v"\n')
    cfg = config.load(path, environ={})
    keys = config_reference.trace()
    assert cfg.service.poll_seconds == keys["service.poll_seconds"].default
    assert cfg.hospital.http.retries == keys["hospital.http.retries"].default
    assert cfg.metrics.enabled is keys["metrics.enabled"].default
    assert cfg.data_dir == tmp_path / keys["fhirbridge.data_dir"].default


def test_every_process_variable_the_code_reads_is_documented():
    used = set()
    for path in (ROOT / "src" / "fhirbridge").rglob("*.py"):
        used |= {m for m in re.findall(r"\bFHIRBRIDGE_[A-Z][A-Z_]*[A-Z]\b", path.read_text()) if "__" not in m}
    assert used <= set(config_reference.ENVIRONMENT), sorted(used - set(config_reference.ENVIRONMENT))
