"""The README's main command: `fhirbridge demo` runs the whole loop on a fresh directory and cleans up."""
from __future__ import annotations

import os
import re

import pytest

from fhirbridge.cli.main import main
from fhirbridge.demo import orthanc
from fhirbridge.demo import run as demo_run
from fhirbridge.demo.localehr import find_sekmet

pytestmark = pytest.mark.sekmet


@pytest.mark.parametrize("pacs", ["orthanc", "stand-in"])
def test_demo_runs_the_whole_loop_and_stops_its_server(tmp_path, capsys, monkeypatch, pacs):
    """Both of the demo's PACS: Orthanc when it is installed (a real PACS, its process group stopped at the end),
    else the labelled stand-in (here: Orthanc hidden from the demo)."""
    try:
        find_sekmet()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(str(exc))
    if pacs == "orthanc" and orthanc.find_orthanc() is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    if pacs == "stand-in":
        monkeypatch.setattr(demo_run, "find_orthanc", lambda: None)
    started: list[int] = []
    real_start = orthanc.RunningOrthanc.start.__func__

    def recording(cls, *a, **kw):
        server = real_start(cls, *a, **kw)
        started.append(server.pid)
        return server

    monkeypatch.setattr(orthanc.RunningOrthanc, "start", classmethod(recording))
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--dir", "demo"]) == 0
    out = capsys.readouterr().out
    for step in ("Starting a local demo EHR", "CDS Hooks service (order-sign)", "fhirbridge run",
                 "opens the package", "answers", "files it in the EHR", "Checking the chart"):
        assert step in out
    # Issue 18: the card for the seeded spine-fusion order, and its suggestion starting the loop.
    assert re.search(r"order-sign answered in \d+ ms with one card \(info\)", out)
    assert "Elective spine surgery: consider a second opinion" in out
    assert re.search(r"suggestion: Order a second opinion from Demo Spine Center \(create ServiceRequest, "
                     r"reasonReference ServiceRequest/\S+\)", out)
    assert re.search(r"ServiceRequest/\S+ \(orders a second opinion; reason ServiceRequest/\S+; Case [0-9a-f-]{36}\)",
                     out)
    assert re.search(r"opinion in the EHR:\s+DocumentReference/\S+ \(Task Task/\S+ completed\)", out)
    assert "status completed" in out
    # The study travels (issue 15): the demo's PACS served it, collect fetched it, the package carries it.
    if pacs == "orthanc":
        assert "Orthanc DICOMweb at http://127.0.0.1:" in out and "DICOMweb stand-in" not in out
        assert "Stopped the demo PACS (Orthanc) and its process group." in out
        (pid,) = started
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)          # its whole process group is gone
    else:
        assert "DICOMweb stand-in at http://127.0.0.1:" in out and "Orthanc is not installed" in out
        assert started == []
    assert re.search(r"images: study [0-9.]+: included, 1 series, 16 instances", out)
    package = re.search(r"sealed package:\s+(\S+)", out).group(1)
    assert (tmp_path / "demo" / "outbox").exists() and package.startswith(str(tmp_path / "demo" / "outbox"))
    assert "Stopped the demo EHR" in out
    # The server it started is gone: its port no longer answers.
    url = re.search(r"FHIR R4 server at (http://127\.0\.0\.1:\d+)/fhir", out).group(1)
    import requests
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/fhir/metadata", timeout=2)
    # A second run replaces the demo directory it made before.
    assert main(["demo", "--dir", "demo"]) == 0


def test_demo_refuses_a_directory_it_did_not_make(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("mine")
    assert main(["demo", "--dir", "precious"]) != 0
    assert "was not made by the demo" in capsys.readouterr().err
    assert (tmp_path / "precious" / "notes.txt").read_text() == "mine"
