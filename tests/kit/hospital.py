"""Test kit for whole-loop tests: a hospital configured against the session's real EHR, its reviewers,
and helpers to play the physician and the reviewer.

Every TestHospital copies the shipped mappings and gives itself a unique local order code, so intake of one
test never picks up another test's orders from the shared EHR (exactly how hospitals use local codes).
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fhirbridge.config import loader as config
from fhirbridge.config.mappings import load_opinion_form
from fhirbridge.config.starter import write_starter
from fhirbridge.crypto import jws
from fhirbridge.crypto.keys import KeyRing, generate_jwks, write_private_jwks
from fhirbridge.demo.localehr import find_sekmet, referring_physician
from fhirbridge.ehr.context import App
from fhirbridge.ehr.order import place_order
from fhirbridge.errors import FhirbridgeError
from fhirbridge.exchange import envelope
from fhirbridge.exchange.opinion import build_opinion_document, reviewer_organization
from fhirbridge.exchange.reviewer import OpenedPackage, answer, open_package, write_reviewer_keys
from fhirbridge.loop.runner import run_pending
from tests.kit import processes
from tests.kit.scopegate import EXACT_SCOPES, SmartEhr

# The session's seeded patient (the `seeded` fixture of tests/conftest.py); tests that scan for PHI look for
# this name.
SEEDED_FAMILY = "Zeltwanger-Testpatient"
SEEDED_GIVEN = "Anna"

SAMPLE_ANSWER = '''\
concordance = "concordant"
recommendation = "proceed-as-planned"
alternatives = ["Physiotherapy", "Epidural steroid injection"]
risks_benefits = "Surgery relieves leg pain faster; risks are infection and dural tear."
urgency = "routine"
free_text = "Agree with the plan."

[[answers]]
question = "Is surgery indicated now?"
answer = "Yes."
'''


def docrefs(fhir, case) -> int:
    """How many DocumentReferences the EHR holds with this Case's opinion identifier."""
    from fhirbridge.loop.writeback import OPINION_ID_SYSTEM
    return sum(1 for r in fhir.search("DocumentReference",
                                      {"identifier": f"{OPINION_ID_SYSTEM}|urn:uuid:{case.opinion_id}"})
               if r["resourceType"] == "DocumentReference")


PG_URL = os.environ.get("FHIRBRIDGE_TEST_POSTGRES_URL")


@contextlib.contextmanager
def pg_schema(prefix: str = "fb"):
    """A store URL (FHIRBRIDGE_TEST_POSTGRES_URL) whose search_path is a fresh, empty schema, dropped afterwards."""
    from sqlalchemy import create_engine, text
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def start_smart_ehr(directory: Path, client_id: str, keys: Path, token_lifetime: int | None = None, *,
                    scopes: tuple[str, ...] | list[str] | str = EXACT_SCOPES) -> SmartEhr:
    """A sekmet that accepts only SMART tokens, for one client whose signing keys are in `keys`, granting it
    `scopes` and nothing more (default: exactly what fhirbridge needs with the shipped profiles and audit copies),
    behind the gate that authorises each entry of a transaction (tests/kit/scopegate.py). Seed it with
    `FhirClient(ehr.direct_url, auth=ehr.admin)`; give fhirbridge `ehr.base_url` and `ehr.token_url`."""
    return SmartEhr(directory, client_id, keys, scopes=scopes, token_lifetime=token_lifetime)


@contextlib.contextmanager
def smart_ehr_running(directory: Path, client_id: str, keys: Path, token_lifetime: int | None = None, *,
                      scopes: tuple[str, ...] | list[str] | str = EXACT_SCOPES):
    """`start_smart_ehr` for a fixture: skips when sekmet is not installed, stopped however the block ends."""
    require_sekmet()
    ehr = start_smart_ehr(directory, client_id, keys, token_lifetime, scopes=scopes)
    try:
        yield ehr
    finally:
        ehr.stop()


def require_sekmet() -> None:
    """Skip the test, saying why, when the sekmet FHIR server is not installed."""
    try:
        find_sekmet()
    except FhirbridgeError as exc:
        pytest.skip(str(exc))


def client_keys(directory: Path) -> Path:
    """A new private key set for a SMART client, in `directory`."""
    path = directory / "client.private.jwks.json"
    write_private_jwks(path, generate_jwks())
    return path


def unique_mappings(root: Path) -> tuple[Path, str]:
    """A copy of the shipped mappings whose second-opinion order code is unique to this test."""
    mappings = root / "mappings"
    shutil.copytree(config.PACKAGE_MAPPINGS, mappings)
    code = f"SO-{uuid.uuid4().hex[:10]}"
    orders = mappings / "codes" / "orders.toml"
    text = orders.read_text()
    text = text.replace('system = "http://terminology.hl7.org/CodeSystem/v2-0336"\ncode = "S"',
                        f'system = "urn:test:orders"\ncode = "{code}"', 1)
    text = text.replace('code = { system = "http://terminology.hl7.org/CodeSystem/v2-0336", code = "S",',
                        f'code = {{ system = "urn:test:orders", code = "{code}",', 1)
    orders.write_text(text)
    return mappings, code


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


class TestReviewer:
    __test__ = False

    def __init__(self, directory: Path, name: str):
        self.name = name
        self.directory = directory
        self.files = write_reviewer_keys(directory, None)
        self.key = KeyRing.load(self.files["private_keys"])
        self.trusted: KeyRing | None = None

    def trust(self, hospital_public: Path) -> None:
        shutil.copy(hospital_public, self.directory / "trusted.jwks.json")
        self.trusted = KeyRing.load(self.directory / "trusted.jwks.json")


class TestHospital:
    __test__ = False

    def __init__(self, root: Path, ehr_url: str, *, reviewers: tuple[str, ...] = ("spine-center",),
                 env: dict[str, str] | None = None, ehr_pins: dict | None = None):
        self.root = root
        self.env = env or {}
        mappings, self.order_code = unique_mappings(root)
        self.reviewers = {name: TestReviewer(root / "reviewers" / name, name) for name in reviewers}
        blocks = [{"name": name, "display": name.replace("-", " ").title(), "jwks": str(r.files["public_keys"]),
                   "profiles": ["spine", "default"] if i == 0 else [], "system": "urn:ietf:rfc:3986",
                   "value": f"urn:oid:2.999.9.{i + 1}", "outbox": str(root / "outbox" / name)}
                  for i, (name, r) in enumerate(self.reviewers.items())]
        paths = write_starter(root / "hospital", fhir_base_url=ehr_url,
                              hospital_name=f"Test Hospital {self.order_code}", reviewers=blocks)
        for r in self.reviewers.values():
            r.trust(paths["public_keys"])
        cfg = paths["config"].read_text().replace('# mappings_dir = "mappings"', f'mappings_dir = "{mappings}"')
        if ehr_pins:
            # What the EHR can do, pinned (issue 14): how a test chooses the write plan (tests/kit/ehrproxy.py).
            cfg += "\n[hospital.ehr]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in ehr_pins.items())
        paths["config"].write_text(cfg)
        self.config_path = paths["config"]
        self._physician: str | None = None
        self.app = self.new_app()

    def use_smart(self, client_id: str, keys: Path, token_url: str | None = None) -> None:
        """Authorise at the EHR with SMART Backend Services as `client_id`, signing with `keys` (token endpoint:
        `token_url`, else discovered), asking for the scopes fhirbridge derives from this configuration (no
        [hospital.auth] scopes)."""
        text = self.config_path.read_text()
        old = next(line for line in text.splitlines() if line.startswith('type = "none"'))
        self.config_path.write_text(text.replace(
            old, f'type = "smart"\nclient_id = "{client_id}"\nkeys = "{keys}"'
                 + (f'\ntoken_url = "{token_url}"' if token_url else "")))
        self.app.close()
        self.app = self.new_app()

    def new_app(self, **env) -> App:
        merged = {**self.env, **{k.upper(): v for k, v in env.items()}}
        return App(config.load(self.config_path, environ=merged))

    def close(self) -> None:
        self.app.close()

    # --- the physician -----------------------------------------------------------------------------
    def order(self, patient: str, question: str = "Is surgery indicated now?", **kw) -> dict:
        kw.setdefault("profile", "spine")
        kw.setdefault("requester", self.physician())
        return place_order(self.app, patient=patient, question=question, **kw)

    def physician(self) -> str:
        """The Practitioner this hospital's orders name as requester (found, or created once, in its EHR)."""
        if self._physician is None:
            self._physician = referring_physician(self.app.ehr)
        return self._physician

    def run(self, app: App | None = None, **kw):
        return run_pending(app or self.app, **kw)

    def case_for(self, sr: dict):
        return self.app.store.find_by_order(self.app.hospital.key, f"ServiceRequest/{sr['id']}")

    # --- the reviewer ------------------------------------------------------------------------------
    def package_path(self, case) -> Path:
        return self.root / "outbox" / case.reviewer / case.package_id

    def open(self, case, reviewer: str | None = None) -> OpenedPackage:
        r = self.reviewers[reviewer or case.reviewer]
        return open_package(self.package_path(case), r.key, r.trusted)

    def answer(self, case, text: str = SAMPLE_ANSWER, *, reviewer: str | None = None) -> Path:
        r = self.reviewers[reviewer or case.reviewer]
        opened = open_package(self.package_path(case), r.key, r.trusted)
        answer_file = self.root / f"answer-{uuid.uuid4().hex[:6]}.toml"
        answer_file.write_text(text)
        sealed, claims = answer(opened, answer_file, r.key, r.trusted, mappings_dir=self.app.config.mappings_dir)
        out = self.root / f"opinion-{claims['jti']}.jwe"
        out.write_bytes(sealed)
        return out

    def delivered_case(self, patient: str, **kw):
        sr = self.order(patient, **kw)
        self.run()
        case = self.case_for(sr)
        assert case is not None and case.step == "await_opinion", (case and case.last_error)
        return case


def craft_opinion(hospital: TestHospital, case, *, signer: KeyRing | None = None, recipient: KeyRing | None = None,
                  doc=None, claims=None, opened: OpenedPackage | None = None) -> bytes:
    """A sealed opinion built step by step, so one part at a time can be made wrong (`opened`: the Case's
    package, already opened)."""
    r = hospital.reviewers[case.reviewer]
    opened = opened or hospital.open(case)
    c = opened.claims
    # A copy: `doc` may change the entries in place, and `opened` may serve many opinions.
    entries = {f"{e['resource']['resourceType']}/{e['resource']['id']}": copy.deepcopy(e)
               for e in opened.document["entry"]}
    answer = {"concordance": "discordant", "recommendation": "further-diagnostics", "risks_benefits": "x",
              "urgency": "urgent"}
    opinion_id = str(uuid.uuid4())
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    document = build_opinion_document(answer, load_opinion_form(hospital.app.config.mappings_dir),
                                      opinion_id=opinion_id, timestamp=now, patient_entry=entries[c["patient"]],
                                      service_request_entry=entries[c["service_request"]],
                                      reviewer_org=reviewer_organization(envelope.party(c, "aud")))
    if doc:
        doc(document)
    signer = signer or r.key
    document = jws.sign_bundle(document, signer, who={"display": "x"}, when=now)
    t = int(time.time())
    out = {"jti": opinion_id, "iat": t, "exp": t + 3600, **envelope.reply_addressing(c), "case_id": case.id,
           "package_id": c["package_id"], "service_request": c["service_request"], "patient": c["patient"]}
    if claims:
        claims(out)
    return envelope.seal(typ=envelope.OPINION, claims=out, document=document, signer=signer,
                         recipient=recipient or r.trusted)


class Worker:
    """A real `fhirbridge worker` process (the scheduler without HTTP) for this hospital, logging to a file, in a
    process group of its own (tests/kit/processes.py)."""
    __test__ = False

    def __init__(self, hospital: TestHospital, env: dict[str, str], n: int | str):
        self.log = hospital.root / f"worker-{n}.log"
        self.proc = processes.start(
            [sys.executable, "-m", "fhirbridge", "--config", str(hospital.config_path), "worker"],
            log=self.log, env={**os.environ, **env})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self) -> str:
        return f"--- worker pid {self.pid} (exit {self.proc.returncode}) ---\n" + \
            self.log.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (a crash) and reap it: a zombie would still look alive to
        the survivors."""
        processes.kill(self.proc)

    def stop(self) -> None:
        """SIGTERM the worker's process group, SIGKILL after a grace period."""
        processes.stop(self.proc)


class Served:
    """`fhirbridge serve` (gunicorn: the HTTP API plus each worker's scheduler) on a free 127.0.0.1 port, for this
    hospital, logging to a file, in a process group of its own; ready once /healthz answers.

    The readiness wait polls until `startup` seconds have passed, retrying any connection or read error; if the
    server exits or the deadline passes, the whole process group is stopped before the error (naming what was
    waited for, with the log's tail) is raised, so a failed setup leaves no gunicorn behind."""
    __test__ = False

    def __init__(self, hospital: TestHospital, env: dict[str, str], *, workers: int = 2,
                 startup: float = processes.READY_SECONDS):
        from fhirbridge.demo.localehr import free_port
        self.log = hospital.root / "serve.log"
        self.base = f"http://127.0.0.1:{free_port()}"
        self.proc = processes.start(
            [sys.executable, "-m", "fhirbridge", "--config", str(hospital.config_path), "serve",
             "--bind", self.base.removeprefix("http://"), "--workers", str(workers)],
            log=self.log, env={**os.environ, **env})
        try:
            processes.wait_for_http(f"{self.base}/healthz", what=f"`fhirbridge serve` (pid {self.proc.pid})",
                                    proc=self.proc, log=self.log, timeout=startup)
        except BaseException:
            self.kill()
            raise

    def tail(self, chars: int = 5000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        """Stop gunicorn's whole process group (master and workers): SIGTERM, SIGKILL after a grace period."""
        processes.stop(self.proc)

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
