"""`fhirbridge doctor` against real sekmet servers: a healthy connection passes; a SMART client missing scopes, an
unknown client, an unreachable EHR, a URL that is not the FHIR base and a missing reviewer key each fail with
the fix, and the exit code says so."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhirbridge.cli import main as cli
from fhirbridge.config import loader as config
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.demo.localehr import LocalEhr, free_port
from fhirbridge.fhir.auth import DEFAULT_SCOPES
from fhirbridge.ops import doctor
from tests.kit.hospital import TestHospital, require_sekmet, smart_ehr_running
from tests.kit.hospital import client_keys as new_client_keys
from tests.kit.processes import READY_SECONDS
from tests.kit.scopegate import EXACT_SCOPES

pytestmark = pytest.mark.sekmet

CLIENT_ID = "fhirbridge-doctor-test"
AUTH_LINE = 'type = "none"                          # none | basic | bearer | smart'


def run_cli(capsys, config_path: Path, *extra: str) -> tuple[int, str]:
    code = cli.main(["--config", str(config_path), "doctor", "--timeout", "2", *extra])
    return code, capsys.readouterr().out


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_healthy_connection_passes(hospital, capsys):
    assert hospital.app.store  # a store that has been started once (migrated)
    code, out = run_cli(capsys, hospital.config_path, "--json")
    report = json.loads(out)
    checks = by_name(report)
    assert code == 0 and report["ok"] is True, out
    for name in ("reachable", "fhir version", "resource types", "transaction", "search ServiceRequest",
                 "search DiagnosticReport", "read Binary", "write-back (transaction)", "keys: hospital",
                 "reviewer spine-center: keys", "reviewer spine-center: transport", "store"):
        assert checks[name]["status"] == "pass", checks[name]
    assert checks["search ServiceRequest"]["detail"] == "allowed with code, status, _lastUpdated, _sort"
    assert checks["tls"]["status"] == "warn"   # plain http, but to this machine
    assert all(c["status"] != "fail" for c in report["checks"])


def test_tls_is_required_off_this_machine():
    report = doctor.Report("h", "x")
    doctor._tls(type("H", (), {"fhir_base_url": "http://ehr.hospital.example/fhir"})(), report)
    doctor._tls(type("H", (), {"fhir_base_url": "http://demo-ehr:8090/fhir"})(), report)
    doctor._tls(type("H", (), {"fhir_base_url": "https://ehr.hospital.example/fhir"})(), report)
    assert [(c.status, "https://" in c.fix) for c in report.checks] == [("fail", True), ("warn", True), ("pass", False)]


@pytest.fixture(scope="module")
def client_keys(tmp_path_factory) -> Path:
    return new_client_keys(tmp_path_factory.mktemp("doctor-keys"))


@pytest.fixture(scope="module")
def narrow_smart_ehr(tmp_path_factory, client_keys):
    """An EHR enforcing SMART whose registration of our client allows every default scope but Condition's, and
    no transaction-wide create (system/*.c), so write-back would be refused."""
    require_sekmet()
    allowed = " ".join(s for s in DEFAULT_SCOPES if s != "system/Condition.rs")
    server = LocalEhr.start(tmp_path_factory.mktemp("doctor-ehr"), startup_timeout=READY_SECONDS, smart_client={
        "client_id": CLIENT_ID, "jwks": KeyRing.load(client_keys).public_jwks(), "scopes": allowed})
    try:
        yield server
    finally:
        server.stop()


def _smart_hospital(tmp_path, base_url: str, keys: Path, client_id: str = CLIENT_ID):
    h = TestHospital(tmp_path, base_url)
    text = h.config_path.read_text()
    assert AUTH_LINE in text
    h.config_path.write_text(text.replace(AUTH_LINE, f'type = "smart"\nclient_id = "{client_id}"\nkeys = "{keys}"'))
    return h


def test_smart_client_missing_a_scope_and_write_permission(tmp_path, narrow_smart_ehr, client_keys, capsys):
    h = _smart_hospital(tmp_path, narrow_smart_ehr.base_url, client_keys)
    try:
        code, out = run_cli(capsys, h.config_path, "--json")
    finally:
        h.close()
    checks = by_name(json.loads(out))
    assert code == 1
    assert checks["smart configuration"]["status"] == "pass"
    assert checks["smart token"]["status"] == "pass"
    assert checks["scopes granted"]["status"] == "fail"
    assert checks["scopes granted"]["detail"] == "asked for but not granted: system/Condition.rs"
    assert checks["search Condition"]["status"] == "fail" and "403" in checks["search Condition"]["detail"]
    assert "system/Condition.rs" in checks["search Condition"]["fix"]
    assert "system/Condition.read" in checks["search Condition"]["fix"]      # the v1 spelling too
    assert checks["search DiagnosticReport"]["status"] == "pass"
    assert checks["scopes for collect"]["status"] == "fail"     # the feature the missing scope breaks
    assert checks["scopes for collect"]["detail"] == ("not granted: system/Condition.rs: the record cannot be "
                                                      "collected")
    assert checks["write-back (transaction)"]["status"] == "fail"
    assert "system/*.c" in checks["write-back (transaction)"]["fix"]

    # The same as a table for a person: each failure with its fix on the next line.
    h = _smart_hospital(tmp_path / "again", narrow_smart_ehr.base_url, client_keys)
    try:
        code, table = run_cli(capsys, h.config_path)
    finally:
        h.close()
    assert code == 1
    rows = table.splitlines()
    row = next(i for i, line in enumerate(rows) if line.startswith("FAIL") and "search Condition" in line)
    assert "fix: grant scope system/Condition.rs" in rows[row + 1]
    assert rows[-1].startswith("4 failure(s)")


def test_unknown_smart_client_is_explained(tmp_path, narrow_smart_ehr, client_keys, capsys):
    h = _smart_hospital(tmp_path, narrow_smart_ehr.base_url, client_keys, client_id="not-registered")
    try:
        code, out = run_cli(capsys, h.config_path, "--json")
    finally:
        h.close()
    checks = by_name(json.loads(out))
    assert code == 1
    assert checks["smart token"]["status"] == "fail"
    assert "invalid_client" in checks["smart token"]["detail"]
    assert "register client_id 'not-registered'" in checks["smart token"]["fix"]
    assert "fhirbridge keys jwks" in checks["smart token"]["fix"]
    assert checks["searches"]["status"] == "skip"
    assert checks["reachable"]["status"] == "pass"


def test_unreachable_ehr_and_wrong_base_url(tmp_path, ehr, capsys):
    h = TestHospital(tmp_path, f"http://127.0.0.1:{free_port()}/fhir")
    try:
        code, out = run_cli(capsys, h.config_path, "--json")
    finally:
        h.close()
    checks = by_name(json.loads(out))
    assert code == 1
    assert checks["reachable"]["status"] == "fail" and "cannot connect" in checks["reachable"]["detail"]
    assert "fhir_base_url" in checks["reachable"]["fix"]
    assert not any(name.startswith("search ") for name in checks)     # nothing further is tried
    assert checks["keys: hospital"]["status"] == "pass"                  # local checks still run

    root = ehr.base_url.removesuffix("/fhir") + "/no-fhir-here"
    h = TestHospital(tmp_path / "root", root)
    try:
        code, out = run_cli(capsys, h.config_path, "--json")
    finally:
        h.close()
    check = by_name(json.loads(out))["reachable"]
    assert code == 1 and check["status"] == "fail" and "without a CapabilityStatement" in check["detail"]
    assert "FHIR base" in check["fix"]


def test_missing_reviewer_key_fails_with_its_fix(hospital, capsys):
    cfg = config.load(hospital.config_path)
    cfg.reviewers["spine-center"].jwks.unlink()
    code, out = run_cli(capsys, hospital.config_path, "--json")
    check = by_name(json.loads(out))["reviewer spine-center: keys"]
    assert code == 1 and check["status"] == "fail"
    assert "fhirbridge reviewer keys" in check["fix"]


def test_every_check_is_explained_in_troubleshooting():
    """docs/troubleshoot.md has a row for each check doctor can report."""
    import re
    root = Path(__file__).resolve().parents[2]
    source = (root / "src" / "fhirbridge" / "ops" / "doctor.py").read_text()
    names = set(re.findall(r'report\.add\(\s*"([^"]+)"', source))
    names |= {"search TYPE", "reviewer NAME: keys", "reviewer NAME: transport"}
    names -= {"searches", "reviewers"}   # "skipped" notes and "no reviewers configured" explain themselves
    page = (root / "docs" / "troubleshoot.md").read_text()
    missing = sorted(n for n in names if f"`{n}`" not in page)
    assert not missing, missing


# --------------------------------------------------------------------- scopes per feature, through the gate

@pytest.fixture
def gated_ehr(tmp_path, client_keys, request):
    """A sekmet granting our client `request.param` (a list of scopes) and no more, behind the gate that checks
    each transaction entry (tests/kit/scopegate.py)."""
    with smart_ehr_running(tmp_path / "ehr", CLIENT_ID, client_keys, scopes=request.param) as ehr:
        yield ehr


def _doctor_with_audit_copies(tmp_path, ehr, keys: Path, capsys, monkeypatch) -> tuple[int, dict]:
    monkeypatch.setenv("FHIRBRIDGE_AUDIT__WRITE_TO_EHR", "true")   # the command reads the process environment
    h = TestHospital(tmp_path, ehr.base_url)
    try:
        h.use_smart(CLIENT_ID, keys)
        code, out = run_cli(capsys, h.config_path, "--json")
    finally:
        h.close()
    return code, by_name(json.loads(out))


@pytest.mark.parametrize("gated_ehr", [EXACT_SCOPES], indirect=True)
def test_exact_grant_passes_every_check(tmp_path, gated_ehr, client_keys, capsys, monkeypatch):
    code, checks = _doctor_with_audit_copies(tmp_path, gated_ehr, client_keys, capsys, monkeypatch)
    assert code == 0, checks
    assert checks["scopes granted"]["status"] == "pass"
    assert checks["scopes per feature"]["status"] == "pass"
    assert "audit copies" in checks["scopes per feature"]["detail"]
    assert checks["write-back (transaction)"]["status"] == "pass"   # the gate checks entries, not *.c


@pytest.mark.parametrize("gated_ehr", [[s for s in EXACT_SCOPES if s != "system/AuditEvent.u"]], indirect=True)
def test_a_grant_minus_one_scope_names_the_feature_it_breaks(tmp_path, gated_ehr, client_keys, capsys,
                                                             monkeypatch):
    """Everything granted but AuditEvent.u (the PUT AuditEvent/<id> that creates each copy): doctor names the
    audit copies as what breaks, with the scope in both spellings, and nothing else."""
    code, checks = _doctor_with_audit_copies(tmp_path, gated_ehr, client_keys, capsys, monkeypatch)
    assert code == 1
    assert checks["scopes granted"]["detail"] == "asked for but not granted: system/AuditEvent.u"
    audit = checks["scopes for audit copies"]
    assert audit["status"] == "fail"
    assert audit["detail"] == ("not granted: system/AuditEvent.u: AuditEvents are not written to the EHR (they "
                               "stay in the store)")
    assert "system/AuditEvent.u" in audit["fix"] and "system/AuditEvent.write" in audit["fix"]
    assert [n for n in checks if n.startswith("scopes for ")] == ["scopes for audit copies"]
    assert "scopes per feature" not in checks
