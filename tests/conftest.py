"""Fixtures every test folder needs: a real local FHIR server (sekmet) for the session, a client for it, one
seeded patient, the shared test data, the fault proxy and test hospitals. A fixture only one folder uses lives
in that folder's conftest.py (tests/ui/: the browser; tests/exchange/: reviewer sites; tests/reliability/: the
figures). Helpers are imported from the kit (`from tests.kit.<module> import ...`), never from a conftest."""
from __future__ import annotations

from pathlib import Path

import pytest

from fhirbridge.demo.localehr import LocalEhr, find_sekmet, seed_patient
from fhirbridge.errors import FhirbridgeError
from fhirbridge.fhir.client import FhirClient
from tests.kit.faultproxy import FaultProxy
from tests.kit.hospital import SEEDED_FAMILY, SEEDED_GIVEN, TestHospital
from tests.kit.processes import READY_SECONDS
from tests.kit.sekmet_workflows import run_in_process

# SIGTERM (a CI timeout, `kill`) runs every fixture's teardown too, so no started process group survives it;
# the reliability figures are gathered from every xdist worker and printed once.
pytest_plugins = ["tests.kit.sigterm", "tests.kit.figures"]


@pytest.fixture(scope="session")
def ehr(tmp_path_factory: pytest.TempPathFactory):
    """A sekmet FHIR R4 server on a free 127.0.0.1 port, for the whole session."""
    try:
        find_sekmet()
    except FhirbridgeError as exc:
        pytest.skip(str(exc))
    server = LocalEhr.start(tmp_path_factory.mktemp("ehr"), startup_timeout=READY_SECONDS)
    try:
        run_in_process(server)      # seeding in milliseconds (tests/kit/sekmet_workflows.py)
        yield server
    finally:
        server.stop()


@pytest.fixture
def fhir(ehr: LocalEhr):
    with FhirClient(ehr.base_url) as client:
        yield client


@pytest.fixture(scope="session")
def seeded(ehr: LocalEhr) -> dict:
    """One spine-surgery patient (see fhirbridge.demo.localehr.seed_patient), created once per session."""
    with FhirClient(ehr.base_url) as client:
        return seed_patient(ehr, client, family=SEEDED_FAMILY, given=SEEDED_GIVEN, profile="spine")


@pytest.fixture(scope="session")
def testdata_dir() -> Path:
    """Shared test data next to the repository (../shared/testdata); skips when it is not there."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path}")
    return path


@pytest.fixture
def proxy(ehr):
    """The fault-injecting proxy (tests/kit/faultproxy.py) in front of the session EHR."""
    p = FaultProxy(ehr.base_url)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def hospital(tmp_path, ehr):
    """A hospital configured against the session EHR with one reviewer (see tests/kit/hospital.py)."""
    h = TestHospital(tmp_path, ehr.base_url)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def two_reviewers(tmp_path, ehr):
    """A hospital with two reviewers: spine-center (serves spine/default) and a second one."""
    h = TestHospital(tmp_path, ehr.base_url, reviewers=("spine-center", "other-center"))
    try:
        yield h
    finally:
        h.close()
