"""A local stand-in EHR: the sekmet-fhir hospital simulator as a FHIR R4 server, plus a seeded patient.

Used by `fhirbridge demo` and by the test-suite. sekmet is an optional dependency (the `demo` extra); nothing
here imports it: it runs as its own process, driven through its CLI, so its stack never mixes with ours.
All data is synthetic.
"""
from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests

from fhirbridge.crypto.keys import public_jwks
from fhirbridge.errors import FhirbridgeError
from fhirbridge.fhir.client import FhirClient

INSTALL_HINT = "the local demo EHR needs sekmet-fhir: pip install 'fhirbridge[demo]'"
# Environment variables sekmet lets override its settings file; ours must win for the server we start.
_SEKMET_ENV_OVERRIDES = ("SEKMET_BASE_URL", "SEKMET_DB", "SEKMET_PUBLIC_URL", "SEKMET_PORT")
_STOP_GRACE = 10.0
_PORT_ATTEMPTS = 3


def find_sekmet() -> str:
    """The `sekmet` console script of our own environment, else the first on PATH."""
    here = Path(sys.executable).parent
    found = shutil.which("sekmet", path=str(here)) or shutil.which("sekmet")
    if not found:
        raise FhirbridgeError(INSTALL_HINT)
    return found


def free_port() -> int:
    """A port free on 127.0.0.1 right now (another process could still take it before sekmet binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalEhr:
    """A running sekmet server on 127.0.0.1. Create with `LocalEhr.start(data_dir)`; stop with `stop()`."""

    def __init__(self, *, data_dir: Path, port: int, executable: str, process: subprocess.Popen, log_file):
        self._data_dir = data_dir
        self._port = port
        self._exe = executable
        self._proc: subprocess.Popen | None = process
        self._log_file = log_file
        # `workflow` runs `sekmet workflow run` as a process (~0.8 s each, mostly interpreter start). A caller
        # that has sekmet in its own interpreter may set a runner (key, args) -> result doing the same in
        # process: the test-suite does (tests/kit/sekmet_workflows.py), seeding dozens of patients.
        self.workflow_runner: Callable[[str, dict[str, str]], dict] | None = None

    # ------------------------------------------------------------------ start / stop

    @classmethod
    def start(cls, data_dir: Path, *, port: int | None = None, startup_timeout: float = 60,
              smart_client: dict | None = None, token_lifetime: int | None = None) -> LocalEhr:
        """Start sekmet with its settings and database under `data_dir`; return once it answers FHIR.

        With `port=None` a free port is picked (and re-picked if another process grabs it first).
        Raises FhirbridgeError when sekmet is missing, exits, or does not answer within `startup_timeout`.

        `smart_client` ({"client_id", "jwks", "scopes"}: a JWKS, public or private - only its public parts are
        written; scopes a list or space-separated string, default "system/*.*") makes the server enforce SMART
        Backend Services on /fhir with that one client registered; without it the server needs no auth. Its
        optional "static_token" is a bearer token the server accepts besides SMART, with no scope check (to seed
        the EHR, or for a gateway in front that authorises requests itself).
        `token_lifetime` (seconds) sets how long its access tokens live (sekmet's default: 3600).
        """
        data_dir = Path(data_dir).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        exe = find_sekmet()
        attempts = 1 if port is not None else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            chosen = port if port is not None else free_port()
            ehr = cls._launch(data_dir, chosen, exe, smart_client, token_lifetime)
            try:
                ehr._wait_ready(startup_timeout)
                return ehr
            except _PortTaken:
                ehr.stop()
                if attempt == attempts:
                    raise FhirbridgeError(f"the local demo EHR could not listen on 127.0.0.1:{chosen} (port in "
                                          f"use); see {ehr.log_path}") from None
            except BaseException:
                ehr.stop()
                raise
        raise AssertionError("unreachable")

    @classmethod
    def _launch(cls, data_dir: Path, port: int, exe: str, smart_client: dict | None = None,
                token_lifetime: int | None = None) -> LocalEhr:
        settings = _write_settings(data_dir, port, smart_client, token_lifetime)
        log_path = data_dir / "sekmet.log"
        log_file = open(log_path, "ab")  # lives as long as the server
        try:
            proc = subprocess.Popen(
                [exe, "serve"], cwd=data_dir, env=_sekmet_env(settings), stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() can signal uvicorn and any children
            )
        except OSError as exc:
            log_file.close()
            raise FhirbridgeError(f"could not start the local demo EHR ({exe}): {exc.strerror}") from exc
        ehr = cls(data_dir=data_dir, port=port, executable=exe, process=proc, log_file=log_file)
        # The server runs in its own session, so it would outlive a demo that exits without stop().
        atexit.register(ehr.stop)
        return ehr

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with requests.Session() as http:
            http.trust_env = False  # a proxy from the environment must not sit between us and 127.0.0.1
            while True:
                code = self._proc.poll() if self._proc else -1
                if code is not None:
                    if _log_says_port_taken(self.log_path):
                        raise _PortTaken()
                    raise FhirbridgeError(f"the local demo EHR (sekmet) exited with code {code} while starting; "
                                          f"see {self.log_path}{_last_log_line(self.log_path)}")
                try:
                    # Short timeouts per attempt; the deadline bounds the wait. A slow or refused attempt on a
                    # loaded machine is one more try, whatever the error.
                    if http.get(f"{self.base_url}/metadata", timeout=(1, 3)).status_code == 200:
                        return
                except (requests.RequestException, OSError):
                    pass  # not listening yet, or not answering yet
                if time.monotonic() > deadline:
                    raise FhirbridgeError(f"the local demo EHR (sekmet) did not answer within {timeout:g} s; "
                                          f"see {self.log_path} (waited for GET {self.base_url}/metadata)"
                                          f"{_last_log_line(self.log_path)}")
                time.sleep(0.1)

    def detach(self) -> int:
        """Leave the server running after this process exits (`fhirbridge demo --keep-ehr`): no stop at exit.
        Returns its process group id, which is what stops it (`kill -TERM -<pgid>`)."""
        atexit.unregister(self.stop)
        if self._proc is None or self._proc.poll() is not None:
            raise FhirbridgeError("the local demo EHR is not running; nothing to keep")
        pgid = os.getpgid(self._proc.pid)
        self._proc = None   # ours no more: a later stop() leaves it alone
        if self._log_file is not None:
            self._log_file.close()   # the server writes to its own copy of the descriptor
            self._log_file = None
        return pgid

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL after 10 s. Safe to call more than once."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(_STOP_GRACE)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(_STOP_GRACE)
            # The server has exited; whatever else it started in its process group goes too (usually nothing).
            _signal_group(proc, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> LocalEhr:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalEhr({self.base_url!r}, running={self.running})"

    # ------------------------------------------------------------------ properties

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/fhir"

    @property
    def port(self) -> int:
        return self._port

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def settings_path(self) -> Path:
        return self._data_dir / "settings.yaml"

    @property
    def log_path(self) -> Path:
        return self._data_dir / "sekmet.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ CLI

    def run_sekmet(self, *args: str, timeout: float = 120) -> str:
        """Run `sekmet <args>` against this server's settings; return stdout, raise with stderr's tail."""
        what = " ".join(args[:3])
        try:
            done = subprocess.run([self._exe, *args], cwd=self._data_dir, env=_sekmet_env(self.settings_path),
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise FhirbridgeError(f"sekmet {what} did not finish within {timeout:g} s") from None
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
            raise FhirbridgeError(f"sekmet {what} failed (exit code {done.returncode}):\n{tail}")
        return done.stdout

    def workflow(self, key: str, **args: Any) -> dict:
        """Run a sekmet workflow (`sekmet workflow list`) and return its JSON result."""
        if self.workflow_runner is not None:
            return self.workflow_runner(key, {name: str(value) for name, value in args.items() if value is not None})
        argv = ["workflow", "run", key]
        for name, value in args.items():
            if value is not None:
                argv += ["-a", f"{name}={value}"]
        out = self.run_sekmet(*argv)
        start = out.find("{")  # the JSON document; anything before it is chatter
        try:
            return json.loads(out[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            raise FhirbridgeError(f"sekmet workflow {key} printed something that is not its JSON result") from None


class _PortTaken(Exception):
    pass


def _write_settings(data_dir: Path, port: int, smart_client: dict | None = None,
                    token_lifetime: int | None = None) -> Path:
    # JSON is valid YAML: no YAML dependency here and no quoting surprises with odd paths.
    settings: dict[str, Any] = {
        "base_url": f"http://127.0.0.1:{port}/fhir",
        "host": "127.0.0.1",
        "port": port,
        "data_dir": str(data_dir / "data"),
        "own_private_key_path": str(data_dir / "keys" / "sekmet_private.pem"),
        # The simulator would otherwise react to new orders with its own results after a delay.
        "simulator": {"enabled": False},
        "log_inbound": False,  # its traffic log would keep every request body
    }
    server_auth = _smart_server_auth(smart_client) if smart_client is not None else {}
    if token_lifetime is not None:
        server_auth["token_lifetime"] = int(token_lifetime)
    if server_auth:
        settings["server_auth"] = server_auth
    path = data_dir / "settings.yaml"
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return path


def _smart_server_auth(client: dict) -> dict:
    """sekmet's server_auth enforcing SMART Backend Services for one registered client."""
    # Imported here: the demo EHR itself needs no crypto.
    client_id = client.get("client_id")
    if not isinstance(client_id, str) or not client_id:
        raise ValueError("smart_client needs a client_id")
    jwks = client.get("jwks")
    if not isinstance(jwks, dict):
        raise ValueError("smart_client needs a jwks (the client's key set; only its public keys are registered)")
    # Only signature keys: the server verifies client assertions with them and cannot use encryption keys.
    keys = [k for k in public_jwks(jwks)["keys"] if k.get("use", "sig") == "sig"]
    scopes = client.get("scopes") or "system/*.*"
    if not isinstance(scopes, str):
        scopes = " ".join(scopes)
    auth: dict[str, Any] = {"types": ["smart"], "enforce_scopes": True,
                            "smart_clients": [{"client_id": client_id, "jwks": {"keys": keys}, "scopes": scopes}]}
    static = client.get("static_token")
    if static:
        auth.update(types=["smart", "bearer"], tokens=[str(static)])
    return auth


def _sekmet_env(settings: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SEKMET_ENV_OVERRIDES}
    env["SEKMET_CONFIG"] = str(settings)
    # Plain output: stdout is parsed, and a failure's last stderr line should be the error, not rich art.
    env["NO_COLOR"] = "1"
    env["TYPER_STANDARD_TRACEBACK"] = "1"
    env["TYPER_USE_RICH"] = "0"
    return env


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session made the server its own group leader
    except ProcessLookupError:
        pass


def _last_log_line(log_path: Path) -> str:
    """'; last log line: ...' from the server's log, for a start that failed ('' when the log is empty)."""
    try:
        lines = log_path.read_bytes()[-4000:].decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return f"; last log line: {lines[-1].strip()[:300]}" if lines else ""


def _log_says_port_taken(log_path: Path) -> bool:
    try:
        tail = log_path.read_bytes()[-4000:].decode("utf-8", "replace").lower()
    except OSError:
        return False
    return "address already in use" in tail or "errno 98" in tail


# ====================================================================== seeding

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
DOC_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"
BINARY_SIZE = 300 * 1024
LOOKBACK_OUTSIDE_YEARS = 5


@dataclass(frozen=True)
class _Profile:
    conditions: tuple[tuple[str, str], ...]  # SNOMED code, display
    imaging: tuple[tuple[str, str], ...]  # sekmet imaging order code (LOINC), report conclusion
    lab_panel: str  # sekmet lab test code (LOINC)
    procedures: tuple[tuple[str, str], ...]  # SNOMED code, display (recent, within a 2-year lookback)
    prescriptions: tuple[str, ...]  # sekmet medication codes (RxNorm)
    statement: tuple[str, str, str]  # RxNorm code, display, dosage text
    note: str  # progress-note text


# sekmet's catalogue has only chest/head/abdomen imaging (XR chest, CT chest, CT head, US abdomen) and a few
# conditions, procedures and drugs, none spine-specific: imaging uses its codes (a pre-operative chest work-up),
# while conditions, procedures and the MedicationStatement are created here with fitting codes.
PROFILES: dict[str, _Profile] = {
    "spine": _Profile(
        conditions=(("76107001", "Prolapsed lumbar intervertebral disc"),
                    ("18347007", "Spinal stenosis of lumbar region")),
        imaging=(("36643-5", "Pre-operative chest radiograph: no acute cardiopulmonary abnormality."),
                 ("24627-2", "No pulmonary nodules; no contraindication to general anaesthesia.")),
        lab_panel="58410-2",
        procedures=(("91251008", "Physical therapy procedure"),),
        prescriptions=("313782", "197361"),
        statement=("849574", "Naproxen sodium 220 MG Oral Tablet",
                   "220 mg by mouth twice daily as needed for back pain, with food"),
        note=("Progress note (synthetic demo data). Nine months of low back pain radiating to the left leg, "
              "L5 distribution. Twelve weeks of physiotherapy with partial relief. MRI: L4/5 disc prolapse "
              "with lateral recess stenosis. Planned: L4/5 microdiscectomy. Second opinion requested."),
    ),
    "cardiac": _Profile(
        conditions=(("53741008", "Coronary arteriosclerosis"), ("194828000", "Angina")),
        imaging=(("36643-5", "No acute cardiopulmonary abnormality."),
                 ("24627-2", "Coronary artery calcification; no pulmonary embolism.")),
        lab_panel="51990-0",
        procedures=(("33367005", "Coronary angiography"),),
        prescriptions=("197361", "860975"),
        statement=("243670", "aspirin 81 MG Oral Tablet", "81 mg by mouth once daily"),
        note=("Progress note (synthetic demo data). Exertional chest pain for four months. Angiography: "
              "three-vessel coronary disease. Planned: coronary artery bypass grafting. Second opinion requested."),
    ),
    "oncology": _Profile(
        conditions=(("254637007", "Non-small cell lung cancer"),),
        imaging=(("24627-2", "Right upper lobe mass 3.1 cm; no mediastinal lymphadenopathy."),
                 ("30704-1", "No focal liver lesion.")),
        lab_panel="58410-2",
        procedures=(("367336001", "Chemotherapy"),),
        prescriptions=("313782", "860975"),
        statement=("849574", "Naproxen sodium 220 MG Oral Tablet", "220 mg by mouth twice daily as needed"),
        note=("Progress note (synthetic demo data). Right upper lobe non-small cell lung cancer, staging "
              "completed. Planned: right upper lobectomy. Second opinion requested."),
    ),
}


def seed_patient(ehr: LocalEhr, client: FhirClient, *, family: str | None = None, given: str | None = None,
                 profile: str = "spine", progress: Callable[[str], None] | None = None) -> dict:
    """Create one synthetic patient with a record rich enough for a second opinion; return the ids.

    The record: conditions, two imaging orders each with an ImagingStudy and a radiology DiagnosticReport, a
    lab cycle (Observations + lab DiagnosticReport), a recent Procedure, two MedicationRequests, a
    MedicationStatement, a progress-note DocumentReference with inline text, and a procedure-note
    DocumentReference whose PDF (~300 KB, deterministic bytes) is a separate Binary. One more Procedure,
    `old_procedure`, lies five years back, outside a two-year lookback (it is not in `procedures`).
    `physician` is the Practitioner who orders the second opinion (referring_physician). `progress`, when
    given, hears one line per stage (seeding takes most of the demo's time).
    """
    say = progress or (lambda _msg: None)
    if profile not in PROFILES:
        raise ValueError(f"unknown seed profile {profile!r}: use one of {', '.join(PROFILES)}")
    prof = PROFILES[profile]
    now = datetime.now(UTC).replace(microsecond=0)

    say("registering the patient (ADT)")
    reg = ehr.workflow("adt.register_patient", family=family, given=given)
    patient = f"Patient/{reg['patient']['id']}"
    ids: dict[str, Any] = {"patient": patient, "conditions": [], "service_requests": [], "imaging_studies": [],
                           "diagnostic_reports": [], "observations": [], "procedures": [],
                           "medication_requests": [], "medication_statements": [], "document_references": [],
                           "binaries": []}

    for n, (code, conclusion) in enumerate(prof.imaging, 1):
        say(f"imaging {n} of {len(prof.imaging)}: order, study, radiology report")
        order = ehr.workflow("orders.imaging_order", patient=patient, procedure=code)
        sr = f"ServiceRequest/{order['service_request']['id']}"
        study = ehr.workflow("orders.imaging_study", service_request=sr)
        report = ehr.workflow("orders.imaging_report", service_request=sr, conclusion=conclusion)
        ids["service_requests"].append(sr)
        ids["imaging_studies"].append(f"ImagingStudy/{study['imaging_study']['id']}")
        ids["diagnostic_reports"].append(f"DiagnosticReport/{report['diagnostic_report']['id']}")

    # The hospital's PACS as a DICOMweb (WADO-RS) Endpoint, so reviewers learn where the pixels are.
    endpoint = _pacs_endpoint(client)
    for study_ref in ids["imaging_studies"]:
        study = client.read_ref(study_ref)
        study["endpoint"] = [{"reference": endpoint}]
        client.update(study)

    say("a lab cycle: order, results, report")
    lab = ehr.workflow("orders.full_lab_cycle", patient=patient, test=prof.lab_panel)
    ids["service_requests"].append(f"ServiceRequest/{lab['service_request']['id']}")
    ids["diagnostic_reports"].append(f"DiagnosticReport/{lab['diagnostic_report']['id']}")
    ids["observations"] += [f"Observation/{o['id']}" for o in lab["observations"]]

    say(f"{len(prof.prescriptions)} prescription(s)")
    for med in prof.prescriptions:
        rx = ehr.workflow("meds.prescribe", patient=patient, medication=med)
        ids["medication_requests"].append(f"MedicationRequest/{rx['medication_request']['id']}")

    say("a procedure note (PDF, ~300 KB) and the rest of the record, in one transaction")
    pdf = _demo_pdf(profile)
    binary, _ = client.create({"resourceType": "Binary", "contentType": "application/pdf",
                               "securityContext": {"reference": patient},
                               "data": base64.b64encode(pdf).decode("ascii")})
    ids["binaries"].append(f"Binary/{binary['id']}")

    practitioners = _practitioners(client)
    # The physician who orders the second opinion (the order's requester, which BSeR requires).
    ids["physician"] = practitioners.get("attending") or referring_physician(client)
    bundle, keys = _clinical_bundle(prof, patient, now, binary["id"], pdf, practitioners)
    response = client.transaction(bundle)
    # Response entries come in request order (http.html#transaction-response).
    for key, entry in zip(keys, response.get("entry") or [], strict=True):
        ref = _created_ref(entry)
        if key == "old_procedure":
            ids[key] = ref
        else:
            ids[key].append(ref)
    return ids


# The demo EHR publishes, as an R4 EHR does (R5 SubscriptionTopic as Basic with cross-version extensions,
# Subscriptions R5 Backport IG), a topic that fires when a ServiceRequest is created or changes status and
# can be filtered by code: what `fhirbridge subscribe` needs. sekmet's own seeded topic fires on create
# only and cannot filter by code.
ORDER_TOPIC = "http://example.org/fhir/SubscriptionTopic/servicerequest-status"
_XV = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic"


def publish_order_topic(client: FhirClient) -> str:
    trigger = [{"url": "description", "valueMarkdown": "A ServiceRequest was created or changed status"},
               {"url": "resource", "valueUri": "http://hl7.org/fhir/StructureDefinition/ServiceRequest"},
               {"url": "supportedInteraction", "valueCode": "create"},
               {"url": "supportedInteraction", "valueCode": "update"},
               {"url": "fhirPathCriteria", "valueString": "%previous.empty() or %previous.status != %current.status"}]
    client.update({
        "resourceType": "Basic", "id": "topic-servicerequest-status",
        "modifierExtension": [{"url": f"{_XV}.status", "valueCode": "active"}],
        "extension": [{"url": f"{_XV}.url", "valueUri": ORDER_TOPIC},
                      {"url": f"{_XV}.title", "valueString": "Order created or status changed"},
                      {"url": f"{_XV}.resourceTrigger", "extension": trigger},
                      *[{"url": f"{_XV}.canFilterBy", "extension": [
                          {"url": "resource", "valueUri": "ServiceRequest"},
                          {"url": "filterParameter", "valueString": p}]} for p in ("code", "status", "patient")]],
        "code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]}})
    return ORDER_TOPIC


PACS_IDENTIFIER = ("urn:fhirbridge:demo:endpoint", "pacs-dicomweb")
DEMO_PRACTITIONER = ("urn:fhirbridge:demo:practitioner", "referring-physician")


def _pacs_endpoint(client: FhirClient) -> str:
    """A fictional DICOMweb endpoint (R4 Endpoint, connectionType dicom-wado-rs), created once per server."""
    system, value = PACS_IDENTIFIER
    endpoint, _ = client.create({
        "resourceType": "Endpoint", "identifier": [{"system": system, "value": value}], "status": "active",
        "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                           "code": "dicom-wado-rs", "display": "DICOM WADO-RS"},
        "name": "Demo hospital PACS (DICOMweb)", "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"], "address": "https://pacs.demo-hospital.example/dicom-web",
    }, if_none_exist=f"identifier={system}|{value}")
    return f"Endpoint/{endpoint['id']}"


def _created_ref(entry: dict) -> str:
    resource = entry.get("resource") or {}
    if resource.get("id"):
        return f"{resource['resourceType']}/{resource['id']}"
    location = (entry.get("response") or {}).get("location", "")
    return "/".join(location.split("/_history")[0].split("/")[-2:])


def _practitioners(client: FhirClient) -> dict[str, str]:
    """sekmet's master-data practitioners (created by its workflows), by role; missing ones are left out.

    The identifier system is sekmet's default for practitioners (settings `identifiers.practitioner`).
    """
    out = {}
    for role, ident in (("attending", "P-1001"), ("surgeon", "P-1002")):
        for practitioner in client.search("Practitioner", {"identifier": f"urn:oid:1.2.3.4.5.5|{ident}"}, count=1):
            out[role] = f"Practitioner/{practitioner['id']}"
            break
    return out


def referring_physician(client: FhirClient) -> str:
    """A physician to order as (the order's requester): sekmet's attending when its master data has one, else
    the demo's own, found by identifier or created once (conditional create)."""
    found = _practitioners(client).get("attending")
    if found:
        return found
    for practitioner in client.search("Practitioner", {"identifier": "|".join(DEMO_PRACTITIONER)}, count=1):
        return f"Practitioner/{practitioner['id']}"
    practitioner, _ = client.create({"resourceType": "Practitioner", "active": True,
                                     "identifier": [{"system": DEMO_PRACTITIONER[0], "value": DEMO_PRACTITIONER[1]}],
                                     "name": [{"prefix": ["Dr"], "given": ["Demo"], "family": "Referrer"}]},
                                    if_none_exist=f"identifier={DEMO_PRACTITIONER[0]}|{DEMO_PRACTITIONER[1]}")
    return f"Practitioner/{practitioner['id']}"


def _clinical_bundle(prof: _Profile, patient: str, now: datetime, binary_id: str, pdf: bytes,
                     authors: dict[str, str]) -> tuple[dict, list[str]]:
    """One transaction with what sekmet's workflows cannot make for this profile (http.html#transaction).

    Returns the Bundle and, per entry, the key of seed_patient's result it belongs to.
    """
    subject = {"reference": patient}
    entries: list[dict] = []
    keys: list[str] = []

    def add(key: str, resource: dict) -> str:
        full_url = f"urn:uuid:{uuid.uuid4()}"
        entries.append({"fullUrl": full_url, "resource": resource,
                        "request": {"method": "POST", "url": resource["resourceType"]}})
        keys.append(key)
        return full_url

    attending = {"recorder": {"reference": authors["attending"]}} if "attending" in authors else {}
    for i, (code, display) in enumerate(prof.conditions):
        add("conditions", {
            "resourceType": "Condition",
            "clinicalStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"),
            "verificationStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed",
                                      "Confirmed"),
            "category": [_cc("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item",
                             "Problem List Item")],
            "code": _cc(SNOMED, code, display), "subject": subject,
            "onsetDateTime": _iso(now - timedelta(days=400 - 30 * i)),
            "recordedDate": _iso(now - timedelta(days=300 - 30 * i)), **attending})

    surgeon = {"performer": [{"actor": {"reference": authors["surgeon"]}}]} if "surgeon" in authors else {}
    procedure_urls = []
    for i, (code, display) in enumerate(prof.procedures):
        procedure_urls.append(add("procedures", {
            "resourceType": "Procedure", "status": "completed", "code": _cc(SNOMED, code, display),
            "subject": subject,
            "performedPeriod": {"start": _iso(now - timedelta(days=240 + 20 * i)),
                                "end": _iso(now - timedelta(days=150 + 20 * i))}, **surgeon}))

    statement_code, statement_display, dosage = prof.statement
    add("medication_statements", {
        "resourceType": "MedicationStatement", "status": "active",
        "medicationCodeableConcept": _cc(RXNORM, statement_code, statement_display), "subject": subject,
        "effectivePeriod": {"start": _iso(now - timedelta(days=270))}, "dateAsserted": _iso(now),
        "informationSource": subject, "dosage": [{"sequence": 1, "text": dosage}]})

    author = [{"reference": authors["attending"]}] if "attending" in authors else []
    note = prof.note.encode("utf-8")
    add("document_references", _document("11506-3", "Progress note", subject, now, author, {
        "contentType": "text/plain; charset=utf-8", "language": "en", "title": "Progress note",
        "data": base64.b64encode(note).decode("ascii"), "size": len(note), "creation": _iso(now),
        "hash": _sha1_b64(note)}))
    written = now - timedelta(days=150)
    add("document_references", _document("28570-0", "Procedure note", subject, written, author, {
        "contentType": "application/pdf", "title": "Procedure note (PDF)", "url": f"Binary/{binary_id}",
        "size": len(pdf), "hash": _sha1_b64(pdf), "creation": _iso(written)}, related=procedure_urls[:1]))

    # Outside any lookback up to five years: lets the collect step's date filter be tested.
    add("old_procedure", {
        "resourceType": "Procedure", "status": "completed", "code": _cc(SNOMED, "80146002", "Appendectomy"),
        "subject": subject, "performedDateTime": _iso(now - timedelta(days=365 * LOOKBACK_OUTSIDE_YEARS + 30))})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}, keys


def _document(code: str, display: str, subject: dict, date: datetime, author: list, attachment: dict,
              related: list[str] | None = None) -> dict:
    doc = {"resourceType": "DocumentReference", "status": "current", "docStatus": "final",
           "type": _cc(LOINC, code, display),
           "category": [_cc(DOC_CATEGORY, "clinical-note", "Clinical Note")],
           "subject": subject, "date": _iso(date), "content": [{"attachment": attachment}]}
    if author:
        doc["author"] = author
    if related:
        doc["context"] = {"related": [{"reference": r} for r in related]}
    return doc


def _demo_pdf(profile: str) -> bytes:
    """~300 KB that look like a PDF: same bytes every time for a profile, so digests are stable."""
    head, tail = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", b"\n%%EOF\n"
    rng = random.Random(f"fhirbridge-demo-{profile}")
    return head + rng.randbytes(BINARY_SIZE - len(head) - len(tail)) + tail


def _cc(system: str, code: str, display: str) -> dict:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha1_b64(data: bytes) -> str:
    # Attachment.hash is the base64 SHA-1 of the data (FHIR R4 datatypes.html#Attachment).
    return base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")  # SHA-1: the spec's choice

