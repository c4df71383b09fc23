"""The reliability suites (crash, EHR faults, bad input, load) and their size knob.

`FHIRBRIDGE_RELIABILITY=full` selects the full form (the figures in docs/reliability.md); unset, each suite
runs a reduced but real form that fits CI. Every suite records its figures in the session-wide `figures`
dict (relkit.py); they are printed at the end of the run and, when `FHIRBRIDGE_RELIABILITY_OUT` names a file, written
there as JSON (`python -m tests.reliability.run --full` does both).
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest

from relkit import FIGURES as _FIGURES
from relkit import FULL


@pytest.fixture(scope="session")
def figures() -> dict:
    return _FIGURES


def pytest_terminal_summary(terminalreporter):
    if not _FIGURES:
        return
    terminalreporter.section(f"reliability figures ({'full' if FULL else 'CI'} form)")
    for suite, numbers in _FIGURES.items():
        terminalreporter.write_line(f"{suite}: {json.dumps(numbers, sort_keys=True)}")
    out = os.environ.get("FHIRBRIDGE_RELIABILITY_OUT")
    if out:
        record = {"form": "full" if FULL else "ci", "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "system": f"{platform.system()} {platform.release()} {platform.machine()}"},
                  "suites": _FIGURES}
        Path(out).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        terminalreporter.write_line(f"figures written to {out}")
