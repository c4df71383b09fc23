"""No PHI where it must not be: a patient with a distinctive name goes through the whole loop, and every log
line (all loggers, DEBUG), everything the commands print, the Case store and every file fhirbridge wrote
are searched for the name, birth date and street. Clinical content exists only encrypted, and every file
holding it is the owner's alone (0600 files, 0700 folders) whatever the umask (issue 13, S11)."""
from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

import pytest

from fhirbridge.cli import main as cli
from fhirbridge.demo.localehr import seed_patient
from fhirbridge.errors import SealError
from fhirbridge.exchange import envelope
from fhirbridge.exchange.reviewer import open_package
from fhirbridge.fhir.client import FhirClient
from fhirbridge.loop.receive import receive_file
from tests.kit.hospital import TestHospital

pytestmark = pytest.mark.sekmet

FAMILY, GIVEN = "Quixotlbrenner-Phiscan", "Wendelgard"


@pytest.fixture(scope="module")
def distinctive(ehr):
    with FhirClient(ehr.base_url) as client:
        seeded = seed_patient(ehr, client, family=FAMILY, given=GIVEN, profile="spine")
        patient = client.read(*seeded["patient"].split("/"))
    address = (patient.get("address") or [{}])[0]
    secrets = {FAMILY, GIVEN, FAMILY.upper()}
    if patient.get("birthDate"):
        secrets.add(patient["birthDate"])
    secrets.update(line for line in address.get("line", []) if len(line) > 6)
    return seeded, secrets


class _All(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))
        if record.exc_info:
            self.lines.append(logging.Formatter().formatException(record.exc_info))


def test_a_full_loop_leaves_no_phi_in_logs_output_store_or_files(hospital, distinctive, capsys, tmp_path):
    seeded, secrets = distinctive
    handler = _All()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        case = hospital.delivered_case(seeded["patient"])
        # The package really holds the patient (the scan below would otherwise prove nothing).
        opened = hospital.open(case)
        names = [n for e in opened.document["entry"] if e["resource"]["resourceType"] == "Patient"
                 for n in e["resource"].get("name", [])]
        assert any(n.get("family") == FAMILY for n in names)
        receive_file(hospital.app, hospital.answer(case))
        hospital.run(intake=False)
        assert hospital.app.store.get(case.id).step == "done"
        cfg = str(hospital.config_path)
        for argv in (["status"], ["status", case.id[:8]], ["audit", "--patient", seeded["patient"]],
                     ["run", "--now"]):
            assert cli.main(["--config", cfg, "-v", *argv]) in (0, 1)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    out = capsys.readouterr()

    assert len(handler.lines) > 20        # the loop did log (at DEBUG, every library too)
    texts = {"log": "\n".join(handler.lines), "stdout": out.out, "stderr": out.err}
    # Every file fhirbridge wrote: the store (SQLite, with its WAL), Case directories, outbox, inbox.
    written = [p for base in (hospital.app.config.data_dir, hospital.root / "outbox") for p in base.rglob("*")
               if p.is_file()]
    assert any(p.name.endswith(".db") for p in written) and any(p.name == "package.jwe" for p in written)
    for p in written:
        texts[str(p)] = p.read_bytes().decode("latin-1")
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"{secret!r} found in {where}"


def test_an_expired_package_is_refused_by_the_reviewer(hospital, seeded, monkeypatch):
    case = hospital.delivered_case(seeded["patient"])
    later = time.time() + (hospital.app.config.package_lifetime_days + 1) * 86400
    monkeypatch.setattr(envelope.time, "time", lambda: later)
    r = hospital.reviewers["spine-center"]
    with pytest.raises(SealError, match="expired"):
        open_package(hospital.package_path(case), r.key, r.trusted)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _open_to_others(*roots: Path) -> list[str]:
    """Every folder under `roots` (themselves included) that is not 0700 and every file that is not 0600."""
    found = []
    for root in roots:
        for p in [root, *root.rglob("*")]:
            want = 0o700 if p.is_dir() else 0o600
            if _mode(p) != want:
                found.append(f"{p.relative_to(root.parent)}: {_mode(p):03o}")
    return found


def test_every_file_and_folder_fhirbridge_writes_is_private_whatever_the_umask(tmp_path, ehr, seeded, capsys):
    """Under umask 0 (nothing masked: a mode left to the default would come out 0666/0777) the whole loop
    and the reviewer's `open --json --extract` leave nothing readable by another user."""
    old = os.umask(0o000)
    try:
        h = TestHospital(tmp_path, ehr.base_url)
        try:
            case = h.delivered_case(seeded["patient"])
            receive_file(h.app, h.answer(case))
            h.run(intake=False)
            assert h.app.store.get(case.id).step == "done"
            r = h.reviewers[case.reviewer]
            record, extracted = tmp_path / "record.json", tmp_path / "reviewer-work" / "attachments"
            assert cli.main(["reviewer", "open", str(h.package_path(case)), "--key", str(r.files["private_keys"]),
                             "--json", str(record), "--extract", str(extracted)]) == 0
            data_dir = h.app.config.data_dir
            # Looked at while the store is open: SQLite's -wal and -shm files exist only then.
            assert {"fhirbridge.db", "fhirbridge.db-wal", "fhirbridge.db-shm"} <= {p.name for p in data_dir.iterdir()}
            assert any(p.name == "collected.jwe" for p in data_dir.rglob("*"))
            open_to_others = _open_to_others(data_dir, tmp_path / "outbox", extracted.parent)
        finally:
            h.close()
    finally:
        os.umask(old)
    capsys.readouterr()
    assert open_to_others == []
    assert _mode(record) == 0o600                         # the decrypted record
    keys_dir = h.config_path.parent / "keys"
    assert _mode(keys_dir) == 0o700 and _mode(keys_dir / "hospital.private.jwks.json") == 0o600
    assert _mode(r.files["private_keys"]) == 0o600 and _mode(r.files["private_keys"].parent) == 0o700
    # What others must read stays readable: the configuration and the public keys.
    assert _mode(h.config_path) == 0o644 and _mode(keys_dir / "hospital.public.jwks.json") == 0o644


def test_an_older_install_is_made_private_when_it_starts(hospital, seeded, caplog):
    """An install made before this (or under a wide umask) had data_dir 0755, Case folders 0755, the store
    and the keys 0644: the next start narrows them, saying which path it changed and nothing it holds."""
    case = hospital.delivered_case(seeded["patient"])
    hospital.app.close()
    data_dir = hospital.app.config.data_dir
    case_dir = data_dir / "cases" / case.id
    db, key = data_dir / "fhirbridge.db", hospital.app.hospital.keys
    for p, m in ((data_dir, 0o755), (data_dir / "cases", 0o755), (case_dir, 0o755), (db, 0o644), (key, 0o644)):
        os.chmod(p, m)
    with caplog.at_level(logging.WARNING):
        assert cli.main(["--config", str(hospital.config_path), "status"]) == 0
    assert [_mode(p) for p in (data_dir, data_dir / "cases", case_dir)] == [0o700] * 3
    assert _mode(db) == 0o600 and _mode(key) == 0o600
    warned = "\n".join(r.getMessage() for r in caplog.records)
    for p in (data_dir, case_dir, db, key):
        assert f"{p} was mode" in warned
    assert FAMILY not in warned and seeded["patient"] not in warned
