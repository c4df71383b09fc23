"""Shared fixtures: a real local FHIR server (sekmet) for the session, a client for it, one seeded patient."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest

from browserkit import browser, page  # noqa: F401 - the browser fixtures, defined once for the session
from fhirbridge.errors import FhirbridgeError
from fhirbridge.fhir.client import FhirClient
from fhirbridge.demo.localehr import LocalEhr, find_sekmet, seed_patient

from loopkit import SEEDED_FAMILY, SEEDED_GIVEN  # noqa: E402 - the seeded patient's name, shared


@pytest.fixture(scope="session")
def ehr(tmp_path_factory: pytest.TempPathFactory):
    """A sekmet FHIR R4 server on a free 127.0.0.1 port, for the whole session."""
    try:
        find_sekmet()
    except FhirbridgeError as exc:
        pytest.skip(str(exc))
    server = LocalEhr.start(tmp_path_factory.mktemp("ehr"))
    try:
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
    """The fault-injecting proxy (tests/faultproxy.py) in front of the session EHR."""
    from faultproxy import FaultProxy
    p = FaultProxy(ehr.base_url)
    yield p
    p.close()


@pytest.fixture
def hospital(tmp_path, ehr):
    """A hospital configured against the session EHR with one reviewer (see tests/loopkit.py)."""
    from loopkit import TestHospital
    h = TestHospital(tmp_path, ehr.base_url)
    yield h
    h.close()


@pytest.fixture
def two_reviewers(tmp_path, ehr):
    """A hospital with two reviewers: spine-center (serves spine/default) and a second one."""
    from loopkit import TestHospital
    h = TestHospital(tmp_path, ehr.base_url, reviewers=("spine-center", "other-center"))
    yield h
    h.close()


# --- the reliability suites' figures (tests/reliability/; here, not in a conftest of their own, because test
# modules import names from this one as `conftest`, which a second conftest.py would shadow) -------------------

RELIABILITY_FIGURES: dict = {}


@pytest.fixture(scope="session")
def figures() -> dict:
    """Each reliability suite records its figures here; they are printed at the end of the run and, when
    FHIRBRIDGE_RELIABILITY_OUT names a file, written there as JSON (`python -m tests.reliability.run`)."""
    return RELIABILITY_FIGURES


def pytest_terminal_summary(terminalreporter):
    if not RELIABILITY_FIGURES:
        return
    form = "full" if os.environ.get("FHIRBRIDGE_RELIABILITY", "").lower() == "full" else "ci"
    terminalreporter.section(f"reliability figures ({form} form)")
    for suite, numbers in RELIABILITY_FIGURES.items():
        terminalreporter.write_line(f"{suite}: {json.dumps(numbers, sort_keys=True)}")
    out = os.environ.get("FHIRBRIDGE_RELIABILITY_OUT")
    if out:
        record = {"form": form, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "system": f"{platform.system()} {platform.release()} {platform.machine()}"},
                  "suites": RELIABILITY_FIGURES}
        Path(out).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        terminalreporter.write_line(f"figures written to {out}")
