"""`fhirbridge doctor` shows the capability set (value and origin of each), the write plan chosen from it and the
writes it makes, per profile, and warns where a profile or pin overrides what the EHR's statement says; against
the real sekmet, directly and through a statement edited to advertise less (tests/kit/capstatement.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhirbridge.cli import main as cli
from tests.kit.capstatement import advertise, no_task_write, no_transaction
from tests.kit.hospital import TestHospital

pytestmark = pytest.mark.sekmet


def doctor(capsys, hospital: TestHospital, *extra: str) -> tuple[int, dict[str, dict], str]:
    code = cli.main(["--config", str(hospital.config_path), "doctor", "--timeout", "2", "--json", *extra])
    out = capsys.readouterr().out
    return code, {c["name"]: c for c in json.loads(out)["checks"]}, out


def with_ehr(hospital: TestHospital, table: str) -> None:
    hospital.config_path.write_text(hospital.config_path.read_text() + "\n[hospital.ehr]\n" + table)


def test_sekmet_as_advertised_shows_the_atomic_plan_and_every_capability(hospital, capsys):
    code, checks, out = doctor(capsys, hospital)
    assert checks["write plan"]["status"] == "pass"
    assert checks["write plan"]["detail"].startswith("ATOMIC: atomic transaction; writes: update Binary, "
                                                     "update DocumentReference, create Provenance")
    assert checks["capability update_create"] == {"name": "capability update_create", "status": "pass",
                                                  "detail": "yes (advertised)", "fix": ""}
    assert checks["capability transaction_atomic"]["detail"] == "yes (assumed)"
    assert checks["capability max_attachments"]["detail"] == "no limit (default)"
    assert checks["transaction"]["status"] == checks["write-back (transaction)"]["status"] == "pass"
    assert "task writes" not in checks


def test_the_oracle_profile_shows_the_once_plan_and_warns_where_it_overrides_the_statement(hospital, capsys):
    with_ehr(hospital, 'profile = "oracle-millennium-r4"\n')
    code, checks, out = doctor(capsys, hospital)
    plan = checks["write plan"]
    assert plan["status"] == "pass" and plan["detail"].startswith("ONCE: POST once")
    assert "create DocumentReference" in plan["detail"] and "update DocumentReference" not in plan["detail"]
    over = checks["capability update_create"]
    assert over["status"] == "warn"
    assert over["detail"] == "no (profile oracle-millennium-r4); the CapabilityStatement says yes"
    assert checks["capability docref_identifier_search"]["status"] == "warn"
    assert checks["capability max_attachments"]["detail"] == "1 (profile oracle-millennium-r4)"
    assert checks["capability attachment_types"]["detail"] == ("application/pdf, text/plain "
                                                               "(profile oracle-millennium-r4)")
    assert checks["capability if_match"] == {"name": "capability if_match", "status": "pass",
                                             "detail": "yes (advertised)", "fix": ""}
    assert checks["write-back (transaction)"]["status"] == "skip"   # the ONCE plan posts no transaction
    # Millennium documents no `identifier` search: the probe leaves it out rather than failing on it.
    assert checks["search DocumentReference"]["detail"] == "allowed with patient"


def test_pins_without_transaction_and_task_writes_show_the_ledger_plan(hospital, capsys):
    with_ehr(hospital, "transaction = false\ntask_write = false\n")
    code, checks, out = doctor(capsys, hospital)
    assert checks["write plan"]["detail"].startswith("LEDGER: POST with a write ledger")
    assert "search DocumentReference" in checks["write plan"]["detail"]
    assert "update Task" not in checks["write plan"]["detail"]
    assert checks["task writes"]["status"] == "warn" and "lives in fhirbridge" in checks["task writes"]["detail"]
    assert checks["capability transaction"]["detail"] == "no (pinned); the CapabilityStatement says yes"
    assert checks["transaction"]["status"] == "pass"        # advertised, though the plan does not use it


def test_a_server_that_advertises_no_transaction_is_no_failure_any_more(tmp_path, proxy, capsys):
    advertise(proxy, no_transaction, no_task_write)
    h = TestHospital(tmp_path, proxy.base_url)
    try:
        assert h.app.store
        code, checks, out = doctor(capsys, h)
        assert checks["transaction"]["status"] == "pass" and "LEDGER" in checks["transaction"]["detail"]
        assert checks["capability transaction"]["detail"] == "no (advertised)"
        assert checks["write-back (transaction)"]["status"] == "skip"
        assert checks["task writes"]["status"] == "warn"
        assert code == 0, out
    finally:
        h.close()


def test_a_bad_pin_fails_the_write_plan_with_its_key(hospital, capsys):
    with_ehr(hospital, 'max_attachments = 0\n')
    code, checks, out = doctor(capsys, hospital)
    assert code == 1
    assert checks["write plan"]["status"] == "fail"
    assert "hospital.ehr.max_attachments" in checks["write plan"]["detail"]


def test_the_plan_is_shown_before_the_store_exists(tmp_path, ehr, capsys):
    h = TestHospital(tmp_path, ehr.base_url)
    try:
        with_ehr(h, 'profile = "sekmet"\n')
        db = Path(h.app.config.data_dir) / "fhirbridge.db"
        assert not db.exists()
        cli.main(["--config", str(h.config_path), "doctor", "--timeout", "2"])
        text = capsys.readouterr().out
        assert "PASS  write plan" in text and "ATOMIC: atomic transaction" in text
        assert "capability update_create" in text and "yes (profile sekmet)" in text
    finally:
        h.close()
