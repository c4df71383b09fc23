"""The reliability suites' figures, as a plugin: each suite records its numbers in FIGURES (the `figures`
fixture, tests/reliability/conftest.py); they are printed at the end of the run and, when
FHIRBRIDGE_RELIABILITY_OUT names a file, written there as JSON (`python -m tests.reliability.run`).

Under pytest-xdist (`-n 2`) the suites run in worker processes: each worker hands its figures to the controller
through `workeroutput` when it finishes, and the controller, the one with a terminal, prints them all."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest

FIGURES: dict = {}
_KEY = "reliability_figures"


def pytest_sessionfinish(session):
    output = getattr(session.config, "workeroutput", None)     # set only in an xdist worker
    if output is not None:
        output[_KEY] = json.dumps(FIGURES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist, in the controller: a worker finished; keep its figures."""
    FIGURES.update(json.loads(getattr(node, "workeroutput", {}).get(_KEY) or "{}"))


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    form = "full" if os.environ.get("FHIRBRIDGE_RELIABILITY", "").lower() == "full" else "ci"
    terminalreporter.section(f"reliability figures ({form} form)")
    for suite, numbers in FIGURES.items():
        terminalreporter.write_line(f"{suite}: {json.dumps(numbers, sort_keys=True)}")
    out = os.environ.get("FHIRBRIDGE_RELIABILITY_OUT")
    if out:
        record = {"form": form, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "system": f"{platform.system()} {platform.release()} {platform.machine()}"},
                  "suites": FIGURES}
        Path(out).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        terminalreporter.write_line(f"figures written to {out}")
