"""`fhirbridge status` on a real Case: `--json` prints JSON (it crashed on the store's column-name keys), and
text from the EHR in a Case's error or events reaches the terminal without its control characters."""
from __future__ import annotations

import json
import re

import pytest

from fhirbridge.cli.main import main

pytestmark = pytest.mark.sekmet

ESCAPES = "\x1b[2J\x1b]0;pwned\x07\x9b31m"
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def case(hospital, seeded):
    return hospital.delivered_case(seeded["patient"])


def test_status_of_one_case_as_json(hospital, case, capsys):
    code, out, err = run(capsys, "--config", hospital.config_path, "status", case.id[:8], "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["case"]["id"] == case.id and doc["case"]["step"] == "await_opinion"
    kinds = [e["kind"] for e in doc["events"]]
    assert kinds[0] == "opened" and len(kinds) >= 3
    assert all(e["case_id"] == case.id and isinstance(e["at"], float) for e in doc["events"])


def test_status_of_all_cases_as_json(hospital, case, capsys):
    code, out, err = run(capsys, "--config", hospital.config_path, "status", "--json")
    assert code == 0, err
    assert case.id in [c["id"] for c in json.loads(out)]


def test_events_are_plain_dicts_with_str_keys(hospital, case):
    events = hospital.app.store.events(case.id)
    assert events and all(type(k) is str for e in events for k in e)


def test_status_prints_ehr_text_without_terminal_controls(hospital, case, capsys):
    hospital.app.store.update(case.id, last_error=f"EHR said: {ESCAPES}bad", event_kind="step.failed",
                              detail={"error": f"OperationOutcome {ESCAPES}text"})
    for argv in (["status"], ["status", case.id[:8]]):
        code, out, err = run(capsys, "--config", hospital.config_path, *argv)
        assert code == 0, err
        assert "EHR said: " in out and not CONTROLS.search(out) and "pwned" not in out, repr(out)


def test_status_counts_every_case_but_lists_one_page(hospital, case, capsys):
    """At 100,000 Cases `status` read them all (4 s, 244 MiB): now counts per step, and a page."""
    key = hospital.app.store.get(case.id).hospital
    hospital.app.store.load_cases([{"id": f"bulk-{i:03d}", "hospital": key, "service_request": f"ServiceRequest/b{i}",
                                    "patient": "Patient/b", "reviewer": "spine-center", "profile": "default",
                                    "step": "done", "created_at": 1.0, "updated_at": 1.0 + i} for i in range(60)])
    code, out, err = run(capsys, "--config", hospital.config_path, "status")
    assert code == 0, err
    assert out.splitlines()[0] == "61 Cases: 1 await_opinion, 60 done"
    assert "the 50 most recently updated shown" in out and case.id[:8] in out
    code, out, err = run(capsys, "--config", hospital.config_path, "status", "--json", "--step", "done", "--limit", "5")
    assert code == 0, err
    assert [c["id"] for c in json.loads(out)] == [f"bulk-{i:03d}" for i in range(59, 54, -1)]
    code, out, err = run(capsys, "--config", hospital.config_path, "status", "--step", "awaiting")
    assert code != 0 and "step must be one of" in err
