"""Issue 16 parts 2 and 6 on the command line: `fhirbridge status` shows the reviewer's open request for more
records (the list marks the Case; the Case's view quotes the request from the EHR) and the supplement once
sent; `reviewer open` opens the supplement (what it adds to, what was asked) and shows the checklist first."""
from __future__ import annotations

import pytest

from fhirbridge.demo.localehr import seed_patient
from fhirbridge.ehr import data_request
from fhirbridge.loop import supplement
from tests.kit.cli import run
from tests.loop.test_supplement import QUERY, discharge_summary

pytestmark = pytest.mark.sekmet


def test_status_and_reviewer_open_follow_the_request_and_the_supplement(hospital, ehr, fhir, capsys):
    own = seed_patient(ehr, fhir, profile="spine")
    case = hospital.delivered_case(own["patient"])
    task = data_request.request_records(hospital.app, case, "The discharge summary, please.", QUERY)
    stored, _ = fhir.create(discharge_summary(own["patient"]))

    code, out, _ = run(capsys, "--config", hospital.config_path, "status")
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith(case.id[:8]))
    assert "MORE RECORDS ASKED" in line
    code, out, _ = run(capsys, "--config", hospital.config_path, "status", case.id[:8])
    assert code == 0
    assert f"records asked: {task}" in out and "The discharge summary, please." in out and QUERY in out

    supplement.answer_request(hospital.app, hospital.app.store.get(case.id), task,
                              records=[f"DocumentReference/{stored['id']}"], upload=None, actor="ward clerk")
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "await_opinion", case.last_error
    code, out, _ = run(capsys, "--config", hospital.config_path, "status", case.id[:8])
    assert "records asked" not in out
    [entry] = case.data["supplements"]
    assert f"supplement: package {entry['package_id'][:8]}: 1 record(s) sent for {task}" in out
    assert "supplement.done" in out and "records.answered" in out

    r = hospital.reviewers[case.reviewer]
    code, out, err = run(capsys, "reviewer", "open", hospital.root / "outbox" / case.reviewer / entry["package_id"],
                         "--key", r.files["private_keys"], "--trust", r.directory / "trusted.jwks.json")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[2].startswith(f"NEW RECORDS: a supplement to package {case.package_id}, 1 record(s) added on request")
    assert "You asked: The discharge summary, please." in out
    head = out.split("Problems (")[0]
    assert "[x] Discharge summary of an earlier stay: included (1)" in head
    assert "Clinical notes (1):" in out and "Discharge summary" in out.split("Clinical notes (1):")[1]
