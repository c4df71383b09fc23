"""`fhirbridge demo`: the whole loop on this machine, against a local demo EHR (sekmet-fhir).

Starts a FHIR R4 server on 127.0.0.1 with a temporary data directory, seeds a patient with imaging,
reports, procedures, medications and notes, orders a second opinion, collects, seals, delivers to a local
outbox, answers as a sample reviewer, files the opinion, checks what landed in the EHR, and stops the
server. The demo's own files (config, keys, package, opinion) stay in --dir to look at.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fhirbridge.config import loader as config
from fhirbridge.config.starter import write_starter
from fhirbridge.crypto import files
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.demo.localehr import LocalEhr, publish_order_topic, seed_patient
from fhirbridge.ehr.context import App
from fhirbridge.ehr.order import place_order
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


def run_demo(directory: Path, *, keep_ehr: bool = False) -> int:
    directory = directory.resolve()
    _prepare(directory)
    step = Steps()
    step("Starting a local demo EHR (sekmet-fhir, 127.0.0.1, simulator off)")
    ehr_dir = Path(tempfile.mkdtemp(prefix="fhirbridge-demo-ehr-"))
    ehr = LocalEhr.start(ehr_dir)
    print(f"    FHIR R4 server at {ehr.base_url}")
    try:
        return _loop(directory, ehr, step, seed_patient)
    finally:
        if keep_ehr:
            pgid = ehr.detach()
            print(f"\nThe demo EHR keeps running at {ehr.base_url} (data in {ehr_dir}); "
                  f"stop it with `kill -TERM -{pgid}`.")
        else:
            ehr.stop()
            shutil.rmtree(ehr_dir, ignore_errors=True)
            print("\nStopped the demo EHR and removed its data.")


def _loop(directory: Path, ehr, step: Steps, seed_patient) -> int:
    step("Configuring fhirbridge for the hospital, and keys for a sample reviewer")
    hospital_dir, reviewer_dir = directory / "hospital", directory / "reviewer"
    reviewer_files = write_reviewer_keys(reviewer_dir, None)
    paths = write_starter(hospital_dir, fhir_base_url=ehr.base_url, hospital_name="Demo General Hospital",
                          reviewers=[{"name": "demo-spine-center", "display": "Demo Spine Center",
                                      "jwks": str(reviewer_files["public_keys"]), "profiles": ["spine", "default"],
                                      "system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.1.2",
                                      "outbox": str(directory / "outbox")}])
    shutil.copy(paths["public_keys"], reviewer_dir / "trusted.jwks.json")
    print(f"    config: {paths['config']}")
    app = App(config.load(paths["config"]), progress=lambda m: print(f"    {m}", flush=True))
    try:
        step("Seeding a patient: imaging with reports, labs, procedures, medications, notes")
        seeded = seed_patient(ehr, app.ehr, profile="spine")
        publish_order_topic(app.ehr)  # lets `fhirbridge subscribe` work against a kept demo EHR
        print(f"    {seeded['patient']}: {len(seeded['diagnostic_reports'])} reports, "
              f"{len(seeded['imaging_studies'])} imaging studies, {len(seeded['procedures'])} procedures, "
              f"{len(seeded['medication_requests']) + len(seeded['medication_statements'])} medications, "
              f"{len(seeded['document_references'])} notes")

        step("The referring physician orders a second opinion (ServiceRequest in the EHR)")
        sr = place_order(app, patient=seeded["patient"], profile="spine", requester=seeded["physician"],
                         question="Planned L4-L5 microdiscectomy: is surgery indicated now, or is conservative "
                                  "care still appropriate?")
        print(f"    ServiceRequest/{sr['id']}")

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
    return 0


def opened_opinion(app: App, case) -> dict:
    data = opinion_path(app, case).read_bytes()
    _claims, document = open_sealed(data, typ=OPINION, decrypt=app.hospital_keys,
                                    trusted=app.reviewer_keys(case.reviewer), check_expiry=False)
    return document
