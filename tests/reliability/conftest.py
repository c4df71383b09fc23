"""The reliability suites' fixtures: `figures`, where each suite records its numbers (printed and written by
the tests/kit/figures.py plugin), and a patient of the suite's own."""
from __future__ import annotations

import pytest

from fhirbridge.demo.localehr import seed_patient
from tests.kit.figures import FIGURES


@pytest.fixture(scope="session")
def figures() -> dict:
    """Each reliability suite records its figures here; they are printed at the end of the run and, when
    FHIRBRIDGE_RELIABILITY_OUT names a file, written there as JSON (`python -m tests.reliability.run`)."""
    return FIGURES


@pytest.fixture
def own_patient(ehr, fhir) -> dict:
    """A spine patient of this test's own. The session's seeded patient gathers every opinion the suite files
    (each a DocumentReference that the next Case collects and seals again): late in a full run a Case on it
    carries some 90 notes, and the random-fault loops, which fault every one of those requests, took minutes
    instead of seconds."""
    return seed_patient(ehr, fhir, family="Reliability-Testpatient", given="Rhea", profile="spine")
