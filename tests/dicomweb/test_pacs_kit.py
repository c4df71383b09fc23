"""The PACS of the tests (tests/kit/pacs.py) itself: locked down as configured, and a start that fails leaves
no Orthanc behind."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from tests.kit.pacs import Pacs, find_orthanc
from tests.kit.processes import NotReady, group_alive


def test_the_session_pacs_serves_dicomweb_on_loopback_only(pacs: Pacs):
    config = json.loads((pacs.directory / "orthanc.json").read_text())
    assert config["RemoteAccessAllowed"] is False and config["DicomServerEnabled"] is False
    assert config["AuthenticationEnabled"] is False and config["RegisteredUsers"] == {}
    assert Path(config["StorageDirectory"]).is_relative_to(pacs.directory)
    r = requests.get(pacs.dicomweb_url + "/studies", headers={"Accept": "application/dicom+json"}, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/dicom+json")


def test_a_pacs_that_cannot_start_is_reported_and_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    try:
        find_orthanc()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    broken = tmp_path / "not-a-plugin.so"
    broken.write_bytes(b"not a shared library")
    monkeypatch.setenv("FHIRBRIDGE_ORTHANC_DICOMWEB", str(broken))
    started = []
    original = Pacs.__init__

    def remember(self, *a, **kw):
        original(self, *a, **kw)
        started.append(self.proc)
    monkeypatch.setattr(Pacs, "__init__", remember)
    with pytest.raises(NotReady) as err:
        Pacs.start(tmp_path / "pacs", timeout=20)
    assert "Orthanc" in str(err.value)
    assert started and not any(group_alive(proc.pid) for proc in started)
