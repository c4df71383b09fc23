"""The reliability suites' figures: each suite records its numbers in the `figures` fixture; they are printed
at the end of the run and, when FHIRBRIDGE_RELIABILITY_OUT names a file, written there as JSON
(`python -m tests.reliability.run`)."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest

from fhirbridge.demo.localehr import seed_patient

RELIABILITY_FIGURES: dict = {}


@pytest.fixture(scope="session")
def figures() -> dict:
    """Each reliability suite records its figures here; they are printed at the end of the run and, when
    FHIRBRIDGE_RELIABILITY_OUT names a file, written there as JSON (`python -m tests.reliability.run`)."""
    return RELIABILITY_FIGURES


@pytest.fixture
def own_patient(ehr, fhir) -> dict:
    """A spine patient of this test's own. The session's seeded patient gathers every opinion the suite files
    (each a DocumentReference that the next Case collects and seals again): late in a full run a Case on it
    carries some 90 notes, and the random-fault loops, which fault every one of those requests, took minutes
    instead of seconds."""
    return seed_patient(ehr, fhir, family="Reliability-Testpatient", given="Rhea", profile="spine")


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
