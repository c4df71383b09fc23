"""What the EHR can do for the write-back (ehr/capabilities.py): read from the real sekmet's CapabilityStatement,
from a statement edited to advertise less (tests/kit/capstatement.py), from each vendor profile, and from pins;
with the origin of every value, and a clear error for an unknown profile or capability."""
from __future__ import annotations

import shutil
import tomllib

import pytest

from fhirbridge.config import loader as config
from fhirbridge.config.mappings import ehr_profile_names, load_ehr_profile
from fhirbridge.config.model import PACKAGE_MAPPINGS, EhrSettings
from fhirbridge.ehr.capabilities import ADVERTISABLE, Capabilities, resolve
from fhirbridge.ehr.write_plan import Kind
from fhirbridge.errors import ConfigError, FhirError
from tests.kit.capstatement import (
    advertise,
    no_identifier_search,
    no_task_write,
    no_transaction,
    no_update_create,
)
from tests.kit.hospital import TestHospital

pytestmark = pytest.mark.sekmet


def with_ehr(hospital: TestHospital, table: str, **env: str) -> None:
    """Give the hospital an [hospital.ehr] table and a fresh App."""
    hospital.config_path.write_text(hospital.config_path.read_text() + "\n[hospital.ehr]\n" + table)
    hospital.app.close()
    hospital.app = hospital.new_app(**env)


def test_sekmets_statement_gives_every_capability_and_the_atomic_plan(hospital):
    caps = hospital.app.capabilities
    assert caps == Capabilities()                       # sekmet advertises an ideal server
    assert {n: caps.origin[n] for n in ADVERTISABLE} == dict.fromkeys(ADVERTISABLE, "advertised")
    assert caps.origin["transaction_atomic"] == "assumed"
    assert caps.origin["max_attachments"] == "default"
    assert caps.disagreements() == []
    assert hospital.app.write_plan.kind is Kind.ATOMIC and hospital.app.write_plan.task_write


def test_a_server_advertising_no_transaction_and_no_task_write_gets_the_ledger_plan(tmp_path, proxy):
    advertise(proxy, no_transaction, no_task_write)
    h = TestHospital(tmp_path, proxy.base_url)
    try:
        caps = h.app.capabilities
        assert (caps.transaction, caps.transaction_atomic, caps.task_write) == (False, False, False)
        assert caps.origin["transaction"] == caps.origin["task_write"] == "advertised"
        plan = h.app.write_plan
        assert plan.kind is Kind.LEDGER and plan.task_write is False
        assert proxy.count("GET", "/metadata") == 1
        assert h.app.capabilities is caps and proxy.count("GET", "/metadata") == 1   # once per App
    finally:
        h.close()


def test_no_update_create_and_no_identifier_search_leave_only_the_once_plan(tmp_path, proxy):
    advertise(proxy, no_update_create, no_identifier_search)
    h = TestHospital(tmp_path, proxy.base_url)
    try:
        caps = h.app.capabilities
        assert caps.update_create is False and caps.docref_identifier_search is False
        assert caps.transaction is True                    # still advertised: but no PUT to a new id
        assert h.app.write_plan.kind is Kind.ONCE
    finally:
        h.close()


@pytest.mark.parametrize("name", ehr_profile_names(PACKAGE_MAPPINGS))
def test_each_shipped_profile_yields_its_documented_values(name):
    """Every value a profile file writes is what the resolved capability set holds, marked as the profile's;
    what the profile leaves out stays open for the statement."""
    profile = load_ehr_profile(PACKAGE_MAPPINGS, name)
    raw = tomllib.loads(profile.file.read_text())["capabilities"]
    caps = resolve(EhrSettings(profile=name), PACKAGE_MAPPINGS, None)
    for key, value in raw.items():
        assert getattr(caps, key) == (tuple(value) if isinstance(value, list) else value), key
        assert caps.origin[key] == f"profile {name}"
    assert all(caps.origin[k] == "default" for k in Capabilities.names() if k not in raw)
    assert profile.description and profile.source


def test_the_vendor_profiles_say_what_their_documentation_says():
    oracle = resolve(EhrSettings(profile="oracle-millennium-r4"), PACKAGE_MAPPINGS, None)
    assert (oracle.update_create, oracle.docref_identifier_search, oracle.max_attachments) == (False, False, 1)
    assert oracle.attachment_types == ("application/pdf", "text/plain")
    sekmet = resolve(EhrSettings(profile="sekmet"), PACKAGE_MAPPINGS, None)
    assert sekmet == Capabilities()


def test_a_profile_that_fixes_every_capability_reads_no_statement(tmp_path, proxy):
    h = TestHospital(tmp_path, proxy.base_url)
    try:
        with_ehr(h, 'profile = "sekmet"\n')
        assert h.app.write_plan.kind is Kind.ATOMIC
        assert proxy.count("GET", "/metadata") == 0
    finally:
        h.close()


def test_pins_win_over_the_profile_and_the_statement_and_are_marked_pinned(hospital):
    with_ehr(hospital, 'profile = "oracle-millennium-r4"\ndocref_identifier_search = true\ntransaction = false\n')
    caps = hospital.app.capabilities
    assert caps.origin["docref_identifier_search"] == caps.origin["transaction"] == "pinned"
    assert caps.origin["update_create"] == "profile oracle-millennium-r4"
    assert caps.origin["if_match"] == "advertised"     # the profile leaves it to sekmet's statement
    assert hospital.app.write_plan.kind is Kind.LEDGER
    assert ("transaction", True, False, "pinned") in caps.disagreements()
    assert ("update_create", True, False, "profile oracle-millennium-r4") in caps.disagreements()


def test_an_unknown_or_mistyped_capability_in_a_profile_names_the_file(hospital):
    ehr_dir = hospital.app.config.mappings_dir / "ehr"
    (ehr_dir / "local.toml").write_text('description = "x"\n[capabilities]\ntransactions = false\n')
    with_ehr(hospital, 'profile = "local"\n')
    with pytest.raises(ConfigError) as err:
        _ = hospital.app.capabilities
    assert err.value.file.endswith("local.toml") and err.value.key == "capabilities.transactions"
    assert "is not an EHR capability" in str(err.value) and "update_create" in str(err.value)
    (ehr_dir / "local.toml").write_text('[capabilities]\nmax_attachments = "one"\n')
    with pytest.raises(ConfigError, match="positive integer"):
        _ = hospital.new_app().capabilities
    (ehr_dir / "local.toml").write_text('[capabilities]\ntask_write = false\n[extra]\n')
    with pytest.raises(ConfigError, match="unknown key"):
        _ = hospital.new_app().capabilities


def test_an_unknown_pin_names_its_key(hospital):
    with_ehr(hospital, 'update_creat = false\n')
    with pytest.raises(ConfigError) as err:
        _ = hospital.app.capabilities
    assert err.value.key == "hospital.ehr.update_creat"


def test_an_unknown_profile_is_refused_at_load_with_the_known_ones(hospital):
    hospital.config_path.write_text(hospital.config_path.read_text() + '\n[hospital.ehr]\nprofile = "epic-r9"\n')
    with pytest.raises(ConfigError) as err:
        config.load(hospital.config_path)
    assert err.value.key == "hospital.ehr.profile"
    assert "epic-r9" in str(err.value)
    assert all(n in str(err.value) for n in ("auto", "generic-r4", "oracle-millennium-r4", "sekmet"))


def test_a_mappings_folder_from_before_ehr_profiles_still_finds_the_shipped_ones(hospital):
    shutil.rmtree(hospital.app.config.mappings_dir / "ehr")
    with_ehr(hospital, 'profile = "sekmet"\n')
    assert hospital.app.capabilities.origin["transaction"] == "profile sekmet"


def test_unreadable_metadata_is_transient_and_read_again_next_time(tmp_path, proxy):
    proxy.add(method="GET", path=r"/metadata", status=503, times=1)
    h = TestHospital(tmp_path, proxy.base_url, env={"FHIRBRIDGE_HOSPITAL__HTTP__RETRIES": "0"})
    try:
        with pytest.raises(FhirError) as err:
            _ = h.app.write_plan
        assert err.value.transient and "CapabilityStatement" in str(err.value)
        assert h.app.write_plan.kind is Kind.ATOMIC      # not cached: the next use reads it again
    finally:
        h.close()


def test_a_client_without_smart_reads_no_statement_to_make_its_requests(tmp_path, proxy):
    """Only SMART needs the scopes (and so the plan) before its first request: with other auth the EHR client
    makes no metadata request of its own (the fault and crash suites count requests)."""
    h = TestHospital(tmp_path, proxy.base_url)
    try:
        h.app.ehr.search("Patient", {"_id": "nobody"})
        assert proxy.count("GET", "/metadata") == 0
    finally:
        h.close()


def _use_basic(hospital: TestHospital) -> None:
    text = hospital.config_path.read_text()
    old = next(line for line in text.splitlines() if line.startswith('type = "none"'))
    hospital.config_path.write_text(text.replace(old, 'type = "basic"\nusername = "bridge"\npassword = "secret"'))
    hospital.app.close()
    hospital.app = hospital.new_app()


def test_metadata_is_read_without_credentials_and_again_with_basic_ones_after_a_401(tmp_path, proxy):
    proxy.add(method="GET", path=r"/metadata", status=401, times=1)
    h = TestHospital(tmp_path, proxy.base_url)
    try:
        _use_basic(h)
        assert h.app.write_plan.kind is Kind.ATOMIC
        assert [s for m, p, s in proxy.log if m == "GET" and "/metadata" in p] == [401, 200]
    finally:
        h.close()


def test_a_401_on_metadata_without_credentials_to_fall_back_on_is_an_error_that_says_what_to_do(tmp_path, proxy):
    proxy.add(method="GET", path=r"/metadata", status=401, times=1)
    h = TestHospital(tmp_path, proxy.base_url, env={"FHIRBRIDGE_HOSPITAL__HTTP__RETRIES": "0"})
    try:
        with pytest.raises(FhirError) as err:
            _ = h.app.capabilities
        assert err.value.status == 401 and "[hospital.ehr]" in str(err.value)
        assert proxy.count("GET", "/metadata") == 1
    finally:
        h.close()
