"""The demo's PACS when one is installed: Debian's Orthanc with its DICOMweb plugin, for the length of the demo.

`fhirbridge demo` shows a study travelling from a real PACS when it can (issue 15 part 6): `find_orthanc()` looks
for the `Orthanc` binary and the `orthanc-dicomweb` plugin (Debian's packages; `FHIRBRIDGE_ORTHANC` and
`FHIRBRIDGE_ORTHANC_DICOMWEB` name others); without them the demo uses its labelled stand-in
(demo/dicomweb_standin.py) instead.

`RunningOrthanc.start(directory, files)` writes Orthanc's configuration into `directory` (storage and index
there, 0700), on a free 127.0.0.1 port, remote access off, no DICOM listener, no users (loopback only: the demo
study is synthetic, and nothing else can reach it), runs it in its own process group (a new session), waits until
its REST API and DICOMweb root answer (a deadline, never one short timeout), and uploads the demo study through
Orthanc's REST API (`POST /instances`). `stop()` stops the whole process group (SIGTERM, then SIGKILL after a
grace period) and is safe to call twice; a start that fails half-way stops it too. The options are Orthanc's
documented ones (Orthanc Book, "Configuration of Orthanc"; the DICOMweb plugin's "DicomWeb" section).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

from fhirbridge.crypto import files
from fhirbridge.errors import FhirbridgeError

# Where Debian's orthanc-dicomweb puts the plugin (`dpkg -L orthanc-dicomweb`).
PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7")
DICOMWEB_ROOT = "/dicom-web/"
NAME = "Demo PACS (Orthanc with its DICOMweb plugin, loopback only)"
READY_SECONDS = 90.0       # a loaded machine starts Orthanc slowly: the deadline, not a single timeout
_STOP_GRACE = 10.0


def find_orthanc() -> tuple[str, str] | None:
    """(the Orthanc binary, its DICOMweb plugin), or None when either is not installed."""
    binary = os.environ.get("FHIRBRIDGE_ORTHANC") or shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)
    plugin = os.environ.get("FHIRBRIDGE_ORTHANC_DICOMWEB") or next(
        (p for p in PLUGIN_CANDIDATES if Path(p).is_file()), None)
    if not binary or not Path(binary).is_file() or not plugin or not Path(plugin).is_file():
        return None
    return binary, plugin


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _PortTaken(Exception):
    pass


class RunningOrthanc:
    """One Orthanc of the demo's; `url` is its DICOMweb base URL."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self._proc: subprocess.Popen | None = proc
        self.port, self.log = port, log
        self.rest = f"http://127.0.0.1:{port}"
        self.url = self.rest + DICOMWEB_ROOT.rstrip("/")
        atexit.register(self.stop)   # its own session would outlive a demo that exits without stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @classmethod
    def start(cls, directory: Path, instances: list[Path], *, found: tuple[str, str] | None = None,
              timeout: float = READY_SECONDS) -> RunningOrthanc:
        found = found or find_orthanc()
        if found is None:
            raise FhirbridgeError("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
        binary, plugin = found
        directory = files.private_dir(directory)
        # A port picked free can be taken before Orthanc binds it: try again with another.
        for attempt in range(3):
            port = _free_port()
            config = directory / "orthanc.json"
            config.write_text(json.dumps(_config(directory, port, plugin), indent=2))
            log = directory / "orthanc.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen([binary, str(config)], cwd=directory, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            pacs = cls(proc, port, log)
            try:
                pacs._wait(timeout)
                pacs._upload(instances)
                return pacs
            except _PortTaken:
                pacs.stop()
                if attempt == 2:
                    raise FhirbridgeError(f"Orthanc could not bind a free port; see {log}") from None
            except BaseException:
                pacs.stop()
                raise
        raise AssertionError("unreachable")

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with requests.Session() as http:
            http.trust_env = False   # a proxy from the environment must not sit between us and 127.0.0.1
            while True:
                code = self._proc.poll() if self._proc else -1
                if code is not None:
                    text = self.log.read_text(errors="replace").lower() if self.log.exists() else ""
                    if "address already in use" in text:
                        raise _PortTaken()
                    raise FhirbridgeError(f"Orthanc exited with code {code} while starting; see {self.log}")
                try:
                    # Short timeouts per attempt; the deadline bounds the wait.
                    if http.get(self.rest + "/system", timeout=(1, 3)).status_code == 200 \
                            and http.get(self.url + "/studies", timeout=(1, 5)).status_code == 200:
                        return
                except (requests.RequestException, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise FhirbridgeError(f"Orthanc did not answer within {timeout:g} s; see {self.log}")
                time.sleep(0.2)

    def _upload(self, instances: list[Path]) -> None:
        with requests.Session() as http:
            http.trust_env = False
            for path in instances:
                r = http.post(self.rest + "/instances", data=path.read_bytes(),
                              headers={"Content-Type": "application/dicom"}, timeout=(5, 60))
                if r.status_code != 200:
                    raise FhirbridgeError(f"Orthanc refused the demo study's instance {path.name} "
                                          f"(HTTP {r.status_code}); see {self.log}")

    def stop(self) -> None:
        """SIGTERM Orthanc's process group, SIGKILL after a grace period. Safe to call more than once."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(_STOP_GRACE)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(_STOP_GRACE)
        _signal_group(proc, signal.SIGKILL)   # whatever else it started in its group goes too


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)   # start_new_session: the group's id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass


def _config(directory: Path, port: int, plugin: str) -> dict:
    storage = files.private_dir(directory / "storage")
    return {
        "Name": "fhirbridge-demo-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "StorageCompression": False,
        "HttpPort": port,
        # Loopback clients only, no DICOM (C-STORE/C-FIND) listener, no users: the demo speaks DICOMweb only.
        "RemoteAccessAllowed": False,
        "DicomServerEnabled": False,
        "DicomPort": _free_port(),
        "AuthenticationEnabled": False,
        "HttpThreadsCount": 8,
        "OverwriteInstances": True,
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT, "EnableWado": False, "Host": f"127.0.0.1:{port}",
                     "Ssl": False, "StudiesMetadata": "MainDicomTags", "SeriesMetadata": "MainDicomTags"},
    }
