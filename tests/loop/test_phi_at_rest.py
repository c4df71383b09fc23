"""No PHI where it must not be: a patient with a distinctive name goes through the whole loop, and every log
line (all loggers, DEBUG), everything the commands print, the Case store and every file fhirbridge wrote
are searched for the name, birth date and street. Clinical content exists only encrypted."""
from __future__ import annotations

import logging
import time

import pytest

from fhirbridge.cli import main as cli
from fhirbridge.demo.localehr import seed_patient
from fhirbridge.errors import SealError
from fhirbridge.exchange import envelope
from fhirbridge.exchange.reviewer import open_package
from fhirbridge.fhir.client import FhirClient
from fhirbridge.loop.receive import receive_file

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
