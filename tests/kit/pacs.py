"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin, on a free 127.0.0.1 port.

`Pacs.start(directory)` writes Orthanc's own JSON configuration into `directory` (storage and index there,
the DICOMweb plugin from the `orthanc-dicomweb` package, remote access off, the DICOM listener off) and runs
`Orthanc` in its own process group (tests/kit/processes.py), waiting until both its REST API and the
DICOMweb root answer. `stop()` stops the whole group; `start()` stops it too when the wait fails, so a setup
that breaks half-way leaves no Orthanc behind. `users={"name": "password"}` turns HTTP Basic authentication
on (the auth tests); without it Orthanc has no user at all and asks for none.

`find_orthanc()` names what is missing (the binary, the plugin) so that fixtures skip with that reason; `.ci/run`
installs both packages as it installs Chromium.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.kit.processes import READY_SECONDS, NotReady, start, stop, wait_for_http

# Where Debian's orthanc-dicomweb puts the plugin (`dpkg -L orthanc-dicomweb`); the versioned file in
# /usr/lib/orthanc is the same library.
PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7",
)
DICOMWEB_ROOT = "/dicom-web/"


def find_orthanc() -> tuple[str, str]:
    """(the Orthanc binary, the DICOMweb plugin) or RuntimeError saying what is missing and how to get it."""
    binary = os.environ.get("FHIRBRIDGE_ORTHANC") or shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)
    if not binary:
        raise RuntimeError("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does)")
    plugin = os.environ.get("FHIRBRIDGE_ORTHANC_DICOMWEB") or next(
        (p for p in PLUGIN_CANDIDATES if Path(p).is_file()), None)
    if not plugin:
        raise RuntimeError("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    return binary, plugin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Pacs:
    """One running Orthanc. `url` is its REST root, `dicomweb_url` the DICOMweb base (QIDO/WADO/STOW)."""

    proc: subprocess.Popen
    directory: Path
    port: int
    log: Path
    users: dict[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return self.url + DICOMWEB_ROOT.rstrip("/")

    @classmethod
    def start(cls, directory: Path, *, users: dict[str, str] | None = None,
              timeout: float = READY_SECONDS) -> Pacs:
        binary, plugin = find_orthanc()
        directory.mkdir(parents=True, exist_ok=True)
        # A port picked free can be taken before Orthanc binds it (other helpers' servers start too): try again.
        for attempt in range(3):
            port = free_port()
            config = directory / "orthanc.json"
            config.write_text(json.dumps(_config(directory, port, plugin, users), indent=2))
            log = directory / f"orthanc-{attempt}.log"
            proc = start([binary, config], log=log, cwd=directory)
            pacs = cls(proc=proc, directory=directory, port=port, log=log, users=users)
            try:
                pacs._wait(timeout)
                return pacs
            except NotReady:
                stop(proc)
                if attempt == 2 or "address already in use" not in log.read_text(errors="replace").lower():
                    raise
            except BaseException:
                stop(proc)
                raise
        raise AssertionError("unreachable")

    def _wait(self, timeout: float) -> None:
        auth = next(iter(self.users.items())) if self.users else None
        ok = (lambda r: r.status_code == 200) if auth is None else (lambda r: r.status_code in (200, 401))
        wait_for_http(self.url + "/system", what="Orthanc", proc=self.proc, log=self.log, timeout=timeout, ok=ok)
        # The plugin is loaded before the HTTP server starts, but say so plainly if it was not.
        with requests.Session() as http:
            http.trust_env = False
            r = http.get(self.dicomweb_url + "/studies", auth=auth, timeout=(2, 10))
            if r.status_code != 200:
                raise NotReady(f"Orthanc answers but its DICOMweb root {DICOMWEB_ROOT} does not "
                               f"(HTTP {r.status_code}); see {self.log}")

    def stop(self) -> None:
        stop(self.proc)

    # ---------------------------------------------------------------- the PACS's own REST API (test setup)

    def session(self) -> requests.Session:
        http = requests.Session()
        http.trust_env = False
        if self.users:
            http.auth = next(iter(self.users.items()))
        return http

    def upload(self, files: list[Path]) -> list[str]:
        """POST each file to Orthanc's /instances (its native upload); the Orthanc ids stored."""
        ids = []
        with self.session() as http:
            for path in files:
                r = http.post(self.url + "/instances", data=path.read_bytes(),
                              headers={"Content-Type": "application/dicom"}, timeout=(2, 60))
                r.raise_for_status()
                ids.append(r.json()["ID"])
        return ids

    def delete_study(self, study_uid: str) -> None:
        with self.session() as http:
            r = http.post(self.url + "/tools/lookup", data=study_uid, timeout=(2, 30))
            r.raise_for_status()
            for hit in r.json():
                if hit.get("Type") == "Study":
                    http.delete(self.url + f"/studies/{hit['ID']}", timeout=(2, 30)).raise_for_status()

    def instance_count(self) -> int:
        with self.session() as http:
            return int(http.get(self.url + "/statistics", timeout=(2, 10)).json()["CountInstances"])


def _config(directory: Path, port: int, plugin: str, users: dict[str, str] | None) -> dict:
    """Orthanc's configuration (its documented options, Orthanc Book "Configuration of Orthanc")."""
    storage = directory / "storage"
    storage.mkdir(mode=0o700, exist_ok=True)
    return {
        "Name": "fhirbridge-test-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "StorageCompression": False,
        "HttpPort": port,
        # Only loopback clients (RemoteAccessAllowed false); no DICOM (C-STORE/C-FIND) listener at all:
        # the tests speak DICOMweb only, and a second fixed port would collide between parallel runs.
        "RemoteAccessAllowed": False,
        "DicomServerEnabled": False,
        "DicomPort": free_port(),
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": dict(users or {}),
        "HttpThreadsCount": 16,
        "KeepAlive": True,
        "HttpTimeout": 60,
        "OverwriteInstances": True,
        "Plugins": [plugin],
        "DicomWeb": {
            "Enable": True,
            "Root": DICOMWEB_ROOT,
            "EnableWado": False,
            "Host": f"127.0.0.1:{port}",
            "Ssl": False,
            # QIDO answers from the index alone, not by reading each file back (plugin option "StudiesMetadata").
            "StudiesMetadata": "MainDicomTags",
            "SeriesMetadata": "MainDicomTags",
        },
    }


@contextlib.contextmanager
def running_pacs(directory: Path, **kw):
    pacs = Pacs.start(directory, **kw)
    try:
        yield pacs
    finally:
        pacs.stop()
