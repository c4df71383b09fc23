"""LocalEhr (sekmet launcher) and seed_patient against the real simulator."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fhirbridge.demo import localehr
from fhirbridge.demo.localehr import LocalEhr
from fhirbridge.errors import FhirbridgeError
from fhirbridge.fhir.client import FhirClient


def _fake_sekmet(tmp_path: Path, script: str) -> str:
    exe = tmp_path / "fake-sekmet"
    exe.write_text("#!/bin/sh\n" + script + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(exe)


def test_missing_sekmet_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(localehr.shutil, "which", lambda *a, **k: None)
    with pytest.raises(FhirbridgeError) as err:
        LocalEhr.start(tmp_path)
    assert str(err.value) == "the local demo EHR needs sekmet-fhir: pip install 'fhirbridge[demo]'"


def test_server_that_dies_points_at_its_log(monkeypatch, tmp_path):
    monkeypatch.setattr(localehr, "find_sekmet", lambda: _fake_sekmet(tmp_path, "echo boom; exit 3"))
    with pytest.raises(FhirbridgeError) as err:
        LocalEhr.start(tmp_path / "ehr", startup_timeout=10)
    log = tmp_path / "ehr" / "sekmet.log"
    assert "exited with code 3" in str(err.value) and str(log) in str(err.value)
    assert "boom" in log.read_text()


def test_server_that_never_answers_times_out_and_is_stopped(monkeypatch, tmp_path):
    monkeypatch.setattr(localehr, "find_sekmet", lambda: _fake_sekmet(tmp_path, "exec sleep 30"))
    started = []
    real_launch = LocalEhr._launch.__func__

    def launch(cls, *args):
        ehr = real_launch(cls, *args)
        started.append(ehr)
        return ehr

    monkeypatch.setattr(LocalEhr, "_launch", classmethod(launch))
    with pytest.raises(FhirbridgeError, match=r"did not answer within 0.5 s; see .*sekmet.log"):
        LocalEhr.start(tmp_path / "ehr", port=localehr.free_port(), startup_timeout=0.5)
    assert not started[0].running


def test_settings_file_is_written_for_the_server(monkeypatch, tmp_path):
    monkeypatch.setattr(localehr, "find_sekmet", lambda: _fake_sekmet(tmp_path, "exit 1"))
    with pytest.raises(FhirbridgeError):
        LocalEhr.start(tmp_path / "ehr", port=12345, startup_timeout=5)
    settings = json.loads((tmp_path / "ehr" / "settings.yaml").read_text())  # JSON is YAML
    assert settings["base_url"] == "http://127.0.0.1:12345/fhir" and settings["port"] == 12345
    assert settings["simulator"] == {"enabled": False}
    assert settings["data_dir"] == str((tmp_path / "ehr" / "data").resolve())


@pytest.mark.sekmet
def test_port_in_use_is_reported(tmp_path):
    localehr.find_sekmet()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(FhirbridgeError, match=f"127.0.0.1:{port} .port in use.; see .*sekmet.log"):
            LocalEhr.start(tmp_path, port=port, startup_timeout=30)


@pytest.mark.sekmet
def test_running_server_and_cli(ehr: LocalEhr):
    assert ehr.running and ehr.base_url == f"http://127.0.0.1:{ehr.port}/fhir"
    assert ehr.settings_path.is_file() and ehr.settings_path.parent == ehr.data_dir
    assert "adt.register_patient" in ehr.run_sekmet("workflow", "list")
    with pytest.raises(FhirbridgeError) as err:
        ehr.run_sekmet("workflow", "run", "no.such.workflow")
    assert "sekmet workflow run no.such.workflow failed" in str(err.value)
    assert "Unknown workflow" in str(err.value)


@pytest.mark.sekmet
def test_stop_is_idempotent(tmp_path):
    server = LocalEhr.start(tmp_path)
    try:
        with FhirClient(server.base_url, retries=0) as client:
            assert client.capabilities()["resourceType"] == "CapabilityStatement"
    finally:
        server.stop()
    server.stop()
    assert not server.running


def _ids(client: FhirClient, type_: str, params: dict) -> set[str]:
    return {f"{r['resourceType']}/{r['id']}" for r in client.search(type_, params) if r["resourceType"] == type_}


@pytest.mark.sekmet
def test_seed_returns_what_the_server_holds(fhir: FhirClient, seeded: dict):
    # Subsets, not equality: other tests may add orders, tasks or documents for the same seeded patient.
    patient = seeded["patient"]
    assert fhir.read_ref(patient)["name"][0]["family"] == "Zeltwanger-Testpatient"
    by_patient = {"patient": patient}
    assert len(seeded["conditions"]) == 2
    assert set(seeded["conditions"]) <= _ids(fhir, "Condition", by_patient)
    assert len(seeded["service_requests"]) == 3  # two imaging orders and the lab order
    assert set(seeded["service_requests"]) <= _ids(fhir, "ServiceRequest", by_patient)
    assert len(seeded["imaging_studies"]) == 2
    assert set(seeded["imaging_studies"]) <= _ids(fhir, "ImagingStudy", by_patient)
    assert len(seeded["diagnostic_reports"]) == 3
    assert set(seeded["diagnostic_reports"]) <= _ids(fhir, "DiagnosticReport", by_patient)
    assert len(seeded["observations"]) >= 1
    assert set(seeded["observations"]) <= _ids(fhir, "Observation", by_patient)
    assert len(seeded["procedures"]) >= 1
    assert {*seeded["procedures"], seeded["old_procedure"]} <= _ids(fhir, "Procedure", by_patient)
    assert len(seeded["medication_requests"]) == 2
    assert set(seeded["medication_requests"]) <= _ids(fhir, "MedicationRequest", by_patient)
    assert len(seeded["medication_statements"]) == 1
    assert set(seeded["medication_statements"]) <= _ids(fhir, "MedicationStatement", by_patient)
    assert len(seeded["document_references"]) == 2
    assert set(seeded["document_references"]) <= _ids(fhir, "DocumentReference", by_patient)
    assert len(seeded["binaries"]) == 1


@pytest.mark.sekmet
def test_seeded_record_details(fhir: FhirClient, seeded: dict):
    radiology = [fhir.read_ref(r) for r in seeded["diagnostic_reports"][:2]]
    for report, study in zip(radiology, seeded["imaging_studies"], strict=True):
        assert report["category"][0]["coding"][0]["code"] == "RAD"
        assert report["presentedForm"][0]["contentType"] == "text/plain"
        assert report["imagingStudy"] == [{"reference": study}]
    study = fhir.read_ref(seeded["imaging_studies"][0])
    assert study["series"][0]["uid"] and study["series"][0]["instance"][0]["uid"]

    note, pdf_doc = (fhir.read_ref(r) for r in seeded["document_references"])
    assert note["type"]["coding"][0]["code"] == "11506-3"
    assert note["category"][0]["coding"][0]["code"] == "clinical-note"
    assert note["content"][0]["attachment"]["data"]
    attachment = pdf_doc["content"][0]["attachment"]
    assert attachment["url"] == seeded["binaries"][0] and attachment["contentType"] == "application/pdf"
    assert 290_000 < attachment["size"] < 320_000

    statement = fhir.read_ref(seeded["medication_statements"][0])
    assert statement["dosage"][0]["text"]

    old = fhir.read_ref(seeded["old_procedure"])
    assert old["performedDateTime"][:4] <= str(int(old["meta"]["lastUpdated"][:4]) - 5)
    recent = _ids(fhir, "Procedure", {"patient": seeded["patient"], "date": "ge" + _years_ago(2)})
    assert set(seeded["procedures"]) <= recent and seeded["old_procedure"] not in recent


def _years_ago(years: int) -> str:
    from datetime import date

    today = date.today()
    return today.replace(year=today.year - years).isoformat()


def test_a_detached_demo_ehr_outlives_the_process_that_started_it(tmp_path):
    """C9: `fhirbridge demo --keep-ehr` said the EHR kept running while an atexit handler had already stopped
    it. A detached server must still answer after its starter has exited, and stop by its process group."""
    starter = ("import sys; from pathlib import Path; from fhirbridge.demo.localehr import LocalEhr\n"
               "ehr = LocalEhr.start(Path(sys.argv[1]), startup_timeout=120)\n"
               "print(ehr.base_url, ehr.detach(), flush=True)\n")
    out = subprocess.run([sys.executable, "-c", starter, str(tmp_path)], capture_output=True, text=True,
                         timeout=180, check=True).stdout.split()
    base_url, pgid = out[0], int(out[1])
    try:
        assert requests.get(f"{base_url}/metadata", timeout=(5, 10)).status_code == 200   # the starter is gone
    finally:
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.killpg(pgid, signal.SIGKILL)
