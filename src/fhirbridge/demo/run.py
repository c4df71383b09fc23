"""`fhirbridge demo`: the whole loop on this machine, against a local demo EHR (sekmet-fhir).

Starts a FHIR R4 server on 127.0.0.1 with a temporary data directory, seeds a patient with imaging,
reports, procedures, medications and notes, has the surgeon sign an elective spinal fusion, whose CDS Hooks
card (order-sign) suggests a second opinion; the accepted suggestion places the second-opinion order, which
fhirbridge collects, seals, delivers to a local
outbox, answers as a sample reviewer, files the opinion, checks what landed in the EHR, and stops the
server. The demo's own files (config, keys, package, opinion) stay in --dir to look at.

Its end says how to open the pages against what it just ran: the IT dashboard (and this Case's page) and the
physician app of `fhirbridge serve`, and the reviewer portal of `fhirbridge reviewer serve`. With `--keep`
it starts both itself, against the demo EHR, prints their URLs and sign-in tokens, and stops everything it
started (the service, the portal, the EHR) on Ctrl-C.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from fhirbridge.config import loader as config
from fhirbridge.config.starter import write_starter
from fhirbridge.crypto import files
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.demo import cds
from fhirbridge.demo.dicom_study import point_study_at, write_demo_study
from fhirbridge.demo.dicomweb_standin import NAME as STANDIN_NAME
from fhirbridge.demo.dicomweb_standin import RunningStandIn
from fhirbridge.demo.localehr import LocalEhr, free_port, publish_order_topic, seed_patient
from fhirbridge.demo.orthanc import NAME as ORTHANC_NAME
from fhirbridge.demo.orthanc import RunningOrthanc, find_orthanc
from fhirbridge.ehr.context import App
from fhirbridge.errors import FhirbridgeError
from fhirbridge.exchange.envelope import OPINION, open_sealed
from fhirbridge.exchange.render import render_opinion
from fhirbridge.exchange.reviewer import answer, open_package, trust_for, write_reviewer_keys
from fhirbridge.loop.receive import opinion_path, receive_file
from fhirbridge.loop.runner import run_pending
from fhirbridge.steps import Step

MARKER = ".fhirbridge-demo"
SAMPLE_ANSWER = ('''\
# A structured second opinion (fields: mappings/opinion/default.toml)
concordance = "partially-concordant"
diagnosis_comment = "Imaging confirms the disc herniation; the neurological deficit described is not corroborated."
recommendation = "non-surgical-care"
alternatives = ["Six weeks of structured physiotherapy", "Epidural steroid injection at the affected level"]
risks_benefits = "Surgery now offers faster leg-pain relief but carries infection, dural tear and recurrence risk; '''
                 '''conservative care resolves most cases within three months."
urgency = "routine"
free_text = "Re-refer if motor weakness or bladder symptoms develop."

[[answers]]
question = "Is surgery indicated now?"
answer = "Not yet: no progressive deficit; try conservative care first."
''')


def _prog() -> str:
    """How the user ran us, so the commands we print work as shown (a venv's bin is often not on PATH)."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "fhirbridge"
    if os.sep not in argv0 or shutil.which("fhirbridge") == os.path.abspath(argv0):
        return "fhirbridge"
    return os.path.relpath(argv0)


class Steps:
    def __init__(self):
        self.n, self.t0 = 0, time.monotonic()

    def __call__(self, title: str) -> None:
        self.n += 1
        print(f"\n[{self.n}] {title}  (+{time.monotonic() - self.t0:.1f}s)", flush=True)


def _prepare(directory: Path) -> None:
    if directory.exists():
        if not (directory / MARKER).exists():
            raise FhirbridgeError(f"{directory} exists and was not made by the demo; choose another --dir")
        shutil.rmtree(directory)
    files.private_dir(directory)   # it holds both parties' private keys and the demo patient's records
    (directory / MARKER).write_text("made by `fhirbridge demo`; safe to delete\n")


@dataclass
class Ran:
    """What the demo made, for the pages that show it."""
    config: Path
    reviewer_key: Path
    packages: Path          # the reviewer's outbox (delivered packages)
    inbox: Path             # the hospital's inbox (sealed opinions the service takes in)
    case_id: str


def run_demo(directory: Path, *, keep_ehr: bool = False, keep: bool = False) -> int:
    directory = directory.resolve()
    _prepare(directory)
    step = Steps()
    step("Starting a local demo EHR (sekmet-fhir, 127.0.0.1, simulator off)")
    ehr_dir = Path(tempfile.mkdtemp(prefix="fhirbridge-demo-ehr-"))
    ehr = LocalEhr.start(ehr_dir)
    print(f"    FHIR R4 server at {ehr.base_url}")
    images: RunningOrthanc | RunningStandIn | None = None
    try:
        study_uid, study_files = write_demo_study(files.private_dir(directory / "pacs"), "FB-DEMO", "DEMO^SPINE")
        found = find_orthanc()
        if found is not None:
            # A real PACS when one is installed (issue 15 part 6); its own process group, stopped at the end.
            step("Starting a demo PACS (Orthanc with its DICOMweb plugin, 127.0.0.1) with an MR study")
            images = RunningOrthanc.start(directory / "orthanc", study_files, found=found)
            print(f"    Orthanc DICOMweb at {images.url}: {len(study_files)} MR slices, study {study_uid}")
            pacs_name = ORTHANC_NAME
        else:
            step("Starting the demo's DICOMweb stand-in (read-only, not a PACS: Orthanc is not installed) "
                 "with an MR study")
            images = RunningStandIn(directory / "pacs")
            print(f"    DICOMweb stand-in at {images.url}: {len(study_files)} MR slices, study {study_uid}")
            pacs_name = STANDIN_NAME
        ran = _loop(directory, ehr, step, seed_patient, images=(images.url, study_uid, study_files),
                    pacs_name=pacs_name)
        if keep:
            return _keep_serving(directory, ehr, ran, step)
        _print_pages(ran, ehr)
        return 0
    finally:
        if images is not None:
            images.stop()
            if isinstance(images, RunningOrthanc):
                print("\nStopped the demo PACS (Orthanc) and its process group.")
        if keep_ehr and not keep:
            pgid = ehr.detach()
            print(f"\nThe demo EHR keeps running at {ehr.base_url} (data in {ehr_dir}); "
                  f"stop it with `kill -TERM -{pgid}`.")
        else:
            ehr.stop()
            shutil.rmtree(ehr_dir, ignore_errors=True)
            print("\nStopped the demo EHR and removed its data.")


SERVICE_PORT, PORTAL_PORT = 8080, 8090   # what `serve` and `reviewer serve` listen on by default


def _portal_argv(ran: Ran, work: Path, bind: str) -> list[str]:
    return ["reviewer", "serve", "--key", str(ran.reviewer_key), "--packages", str(ran.packages),
            "--answers", str(ran.inbox), "--work", str(work), "--bind", bind]


def _print_pages(ran: Ran, ehr) -> None:
    """How to open the three pages against what the demo just ran (the demo EHR stops now: --keep keeps it)."""
    prog = _prog()
    print("\nThe pages, against this demo (`fhirbridge demo --keep` starts all of it for you and keeps the EHR):")
    print(f"  IT dashboard:    FHIRBRIDGE_API__TOKENS=<a token of 16+ characters> {prog} --config {ran.config} "
          f"serve, then http://127.0.0.1:{SERVICE_PORT}/dashboard/ (sign in with that token); this Case: "
          f"http://127.0.0.1:{SERVICE_PORT}/dashboard/cases/{ran.case_id}")
    print(f"  reviewer portal: FHIRBRIDGE_PORTAL_TOKEN=<a token> {prog} "
          f"{' '.join(_portal_argv(ran, ran.config.parent.parent / 'reviewer-portal', f'127.0.0.1:{PORTAL_PORT}'))}"
          f", then http://127.0.0.1:{PORTAL_PORT}/")
    print(f"  physician app:   http://127.0.0.1:{SERVICE_PORT}/physician/launch is opened by the EHR (SMART App "
          f"Launch: ?iss={ehr.base_url}&launch=...); the demo EHR has no chart to launch it from, so the "
          "dashboard shows the Cases the physician's orders make")


def _keep_serving(directory: Path, ehr, ran: Ran, step: Steps) -> int:
    """`--keep`: the service (API, dashboard, physician app, scheduler) and the reviewer portal against the
    demo, until Ctrl-C (or SIGTERM); then every process started here is stopped, the EHR last."""
    step("Starting the service and the reviewer portal (--keep: Ctrl-C stops everything)")
    api_token, portal_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    service_port, portal_port = free_port(), free_port()
    service_url, portal_url = f"http://127.0.0.1:{service_port}", f"http://127.0.0.1:{portal_port}"
    env = {**os.environ, "FHIRBRIDGE_API__TOKENS": api_token, "FHIRBRIDGE_PORTAL_TOKEN": portal_token}
    started: list[subprocess.Popen] = []
    # SIGTERM (a service manager, `kill`) ends the wait like Ctrl-C: everything started here is stopped.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for name, argv in (("service", ["--config", str(ran.config), "serve", "--bind", f"127.0.0.1:{service_port}",
                                        "--workers", "1"]),
                           ("portal", _portal_argv(ran, directory / "reviewer-portal", f"127.0.0.1:{portal_port}"))):
            with open(directory / f"{name}.log", "ab") as log:   # the child keeps its own copy of the descriptor
                started.append(subprocess.Popen([sys.executable, "-m", "fhirbridge", *argv], stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        _wait_until_up(f"{service_url}/healthz", started[0], directory / "service.log")
        _wait_until_up(f"{portal_url}/", started[1], directory / "portal.log")
        print(f"    IT dashboard:    {service_url}/dashboard/  (token {api_token})")
        print(f"    this Case:       {service_url}/dashboard/cases/{ran.case_id}")
        print(f"    reviewer portal: {portal_url}/  (token {portal_token})")
        print(f"    physician app:   {service_url}/physician/launch (opened by an EHR's SMART launch, "
              f"iss={ehr.base_url})")
        print(f"    demo EHR:        {ehr.base_url}")
        print(f"    logs:            {directory / 'service.log'}, {directory / 'portal.log'}")
        print("Running until Ctrl-C.", flush=True)
        while all(p.poll() is None for p in started):
            time.sleep(0.5)
        gone = next(p for p in started if p.poll() is not None)
        raise FhirbridgeError(f"the {'service' if gone is started[0] else 'portal'} stopped (exit code "
                              f"{gone.returncode}); see {directory}/*.log")
    except KeyboardInterrupt:
        print("\nStopping the service, the portal and the demo EHR.", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in started:
            _stop_group(proc)
        # The EHR is stopped last, by run_demo.


def _interrupt(*_args) -> None:
    raise KeyboardInterrupt


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with requests.Session() as http:
        http.trust_env = False   # a proxy from the environment must not sit between us and 127.0.0.1
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FhirbridgeError(f"{url} did not start (exit code {proc.returncode}); see {log}")
            try:
                if http.get(url, timeout=2, allow_redirects=False).status_code < 500:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
    raise FhirbridgeError(f"{url} did not answer within {timeout:g} s; see {log}")


def _stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM the child's process group (gunicorn's master and workers), SIGKILL what is left after `grace`."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # workers outliving their master
    except ProcessLookupError:
        pass
    proc.wait()


def _loop(directory: Path, ehr, step: Steps, seed_patient, images: tuple[str, str, list[Path]] | None = None,
          pacs_name: str = STANDIN_NAME) -> Ran:
    """The loop; `images` (DICOMweb base URL, Study Instance UID, files) puts the demo study in the package;
    `pacs_name` is what its Endpoint is called (Orthanc, or the labelled stand-in)."""
    step("Configuring fhirbridge for the hospital, and keys for a sample reviewer")
    hospital_dir, reviewer_dir = directory / "hospital", directory / "reviewer"
    reviewer_files = write_reviewer_keys(reviewer_dir, None)
    paths = write_starter(hospital_dir, fhir_base_url=ehr.base_url, hospital_name="Demo General Hospital",
                          reviewers=[{"name": "demo-spine-center", "display": "Demo Spine Center",
                                      "jwks": str(reviewer_files["public_keys"]), "profiles": ["spine", "default"],
                                      "system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.1.2",
                                      "outbox": str(directory / "outbox")}])
    if images is not None:
        # The hospital's PACS (docs/imaging.md): the spine profile's [imaging] then sends the study's images.
        with open(paths["config"], "a", encoding="utf-8") as f:
            f.write(f'\n[hospital.pacs]\nurl = "{images[0]}"\n')
    shutil.copy(paths["public_keys"], reviewer_dir / "trusted.jwks.json")
    print(f"    config: {paths['config']}")
    app = App(config.load(paths["config"]), progress=lambda m: print(f"    {m}", flush=True))
    try:
        step("Seeding a patient: imaging with reports, labs, procedures, medications, notes")
        seeded = seed_patient(ehr, app.ehr, profile="spine", progress=lambda m: print(f"    {m}", flush=True))
        if images is not None and seeded["imaging_studies"]:
            endpoint = point_study_at(app.ehr, seeded["imaging_studies"][0], images[1], images[2], images[0],
                                      name=pacs_name)
            where = "the DICOMweb stand-in" if pacs_name == STANDIN_NAME else "Orthanc"
            print(f"    {seeded['imaging_studies'][0]}: the MR study, at {endpoint} ({where})")
            for other in seeded["imaging_studies"][1:]:
                # The seed's fictional PACS does not resolve: its studies point at the demo's PACS too (which
                # does not hold them, so they are withheld as "not in the PACS" at once, without retries).
                resource = app.ehr.read_ref(other)
                resource["endpoint"] = [{"reference": endpoint}]
                app.ehr.update(resource)
        publish_order_topic(app.ehr)  # lets `fhirbridge subscribe` work against a kept demo EHR
        print(f"    {seeded['patient']}: {len(seeded['diagnostic_reports'])} reports, "
              f"{len(seeded['imaging_studies'])} imaging studies, {len(seeded['procedures'])} procedures, "
              f"{len(seeded['medication_requests']) + len(seeded['medication_statements'])} medications, "
              f"{len(seeded['document_references'])} notes")

        step("The surgeon signs an elective spinal fusion: the EHR calls fhirbridge's CDS Hooks service "
             "(order-sign), which suggests a second opinion; the surgeon accepts, and the order is placed")
        accepted = cds.run_scene(app, paths["config"], patient=seeded["patient"], physician=seeded["physician"],
                                 say=lambda m: print(f"    {m}", flush=True))
        sr = accepted.service_request
        print(f"    ServiceRequest/{sr['id']} (orders a second opinion; reason "
              f"{sr['reasonReference'][0]['reference']}; Case {accepted.case_id})")

        step("fhirbridge run: intake, collect, seal (sign + encrypt), deliver to the outbox")
        report = run_pending(app)
        case = app.store.find_by_order(app.hospital.key, f"ServiceRequest/{sr['id']}")
        if case is None or case.step != Step.AWAIT_OPINION:
            raise FhirbridgeError(f"the demo Case did not reach the reviewer: {report.errors}")
        assert case.package_id is not None  # sealed before it was delivered
        package = directory / "outbox" / case.package_id
        print(f"    package: {package}")

        step("The reviewer opens the package (verify signature, decrypt)")
        key_path = reviewer_files["private_keys"]
        key = KeyRing.load(key_path)
        trusted = trust_for(key_path, None)
        opened = open_package(package, key, trusted)
        m = opened.manifest
        print(f"    signature valid; {len(m['shared'])} records shared, {len(m['withheld'])} withheld, "
              f"{len(m['attachments'])} attachment file(s)")
        for study in m.get("imaging", []):
            print(f"    images: study {study['study_uid']}: {study['status']}"
                  + (f", {len(study['series'])} series, {study['instances']} instances, {study['bytes']} bytes"
                     if study["status"] == "included" else f" ({study.get('reason') or study.get('kind')})"))
        print(f"    see it yourself: {_prog()} reviewer open {package} --key {key_path}")

        step("The reviewer answers (structured opinion -> Consult note, signed + sealed to the hospital)")
        answer_file = reviewer_dir / "answer.toml"
        files.write_atomic(answer_file, SAMPLE_ANSWER.encode("utf-8"))
        sealed, claims = answer(opened, answer_file, key, trusted, mappings_dir=app.config.mappings_dir)
        opinion_file = reviewer_dir / f"opinion-{claims['jti']}.jwe"
        files.write_atomic(opinion_file, sealed)
        print(f"    {opinion_file}")

        step("fhirbridge receives the opinion and files it in the EHR (one transaction)")
        receive_file(app, opinion_file)
        run_pending(app, intake=False, case_id=case.id)
        case = app.store.get(case.id)
        if case.step != Step.DONE:
            raise FhirbridgeError(f"the opinion was not filed: {case.last_error}")
        assert case.document_reference is not None and case.task is not None  # a filed Case records both

        step("Checking the chart")
        docref = app.ehr.read_ref(case.document_reference)
        task = app.ehr.read_ref(case.task)
        related = [r["reference"] for r in docref.get("context", {}).get("related", [])]
        print(f"    {case.document_reference}: {docref['type']['coding'][0]['display']}, "
              f"subject {docref['subject']['reference']}, related {', '.join(related)}")
        print(f"    {case.task}: status {task['status']} ({task.get('businessStatus', {}).get('text')})")
        print()
        print("\n".join("    | " + line for line in render_opinion(opened_opinion(app, case)).splitlines()))
    finally:
        app.close()

    print("\nWhere to look:")
    print(f"  opinion in the EHR:  {case.document_reference} (Task {case.task} completed)")
    print(f"  sealed package:      {package}")
    print(f"  sealed opinion:      {opinion_file}")
    print(f"  hospital config:     {paths['config']}")
    print(f"  case history:        {_prog()} --config {paths['config']} status {case.id[:8]}")
    return Ran(config=paths["config"], reviewer_key=reviewer_files["private_keys"], packages=directory / "outbox",
               inbox=app.config.inbox, case_id=case.id)


def opened_opinion(app: App, case) -> dict:
    data = opinion_path(app, case).read_bytes()
    _claims, document = open_sealed(data, typ=OPINION, decrypt=app.hospital_keys,
                                    trusted=app.reviewer_keys(case.reviewer), check_expiry=False)
    return document
