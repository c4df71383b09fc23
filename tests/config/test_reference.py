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


def test_no_default_is_a_value_of_the_samples():
    """A default computed from another key (a reviewer's `display` from its `name`) is written in words: the
    page showed `"a"`, the name of the trace's sample reviewer (issue 17, part 4)."""
    assert config_reference.trace_derived() == set(config_reference.DERIVED)
    page = config_reference.generate()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", page, re.M)}
    assert rows["display"].strip() == "the reviewer's `name`"
    assert rows["path"].strip() == "`var/outbox/<name>`"
    for sample_name in ('`"a"`', '`"b"`', '`"H"`', '"var/outbox/a"'):
        assert sample_name not in page


def test_an_oversized_attachment_is_described_as_it_behaves():
    """configure.md said an attachment over max_attachment_bytes "is withheld and named in the manifest"; the
    Case in fact fails at seal, nothing sent (tests/loop/test_oversized_attachment.py runs it)."""
    page = (ROOT / "docs" / "configure.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| `max_attachment_bytes`"))
    assert "withheld and named in the manifest" not in row
    assert "the Case stops at `seal` (failed, nothing sent)" in row and "fhirbridge retry" in row
