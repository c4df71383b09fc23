"""The loop driven only through the `fhirbridge` command, as hospital IT and a reviewer would use it."""
from __future__ import annotations

import json
import re
import time

import pytest

from fhirbridge.cli.main import main
from fhirbridge.loop.document import person_name
from tests.kit.hospital import SAMPLE_ANSWER

pytestmark = pytest.mark.sekmet



def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_loop(hospital, seeded, capsys, tmp_path):
    cfg = hospital.config_path
    code, out, _ = run(capsys, "--config", cfg, "order", "--patient", seeded["patient"].split("/")[1],
                       "--question", "Fusion or decompression alone?", "--profile", "spine",
                       "--requester", seeded["physician"])
    assert code == 0 and out.startswith("ServiceRequest/")
    code, out, err = run(capsys, "--config", cfg, "run")
    assert code == 0, err
    assert "1 case(s) opened" in out and "collect" in out and "deliver" in out
    code, out, _ = run(capsys, "--config", cfg, "status")
    case_prefix = re.search(r"^([0-9a-f]{8})\s+await_opinion", out, re.M).group(1)
    case = hospital.app.store.find_by_prefix(case_prefix)

    r = hospital.reviewers["spine-center"]
    package = hospital.package_path(case)
    key = r.files["private_keys"]
    code, out, _ = run(capsys, "reviewer", "open", package, "--key", key, "--json", tmp_path / "doc.json",
                       "--extract", tmp_path / "files")
    assert code == 0
    assert "Fusion or decompression alone?" in out and "Withheld (" in out and "study" in out
    doc = json.loads((tmp_path / "doc.json").read_text())
    assert doc["resourceType"] == "Bundle" and doc["signature"]["sigFormat"] == "application/jose"
    assert list((tmp_path / "files").glob("*.pdf"))

    (tmp_path / "answer.toml").write_text(SAMPLE_ANSWER)
    code, out, _ = run(capsys, "reviewer", "answer", package, "--opinion", tmp_path / "answer.toml", "--key", key,
                       "--out", tmp_path / "opinion.jwe")
    assert code == 0 and "wrote sealed opinion" in out

    code, out, err = run(capsys, "--config", cfg, "receive", tmp_path / "opinion.jwe")
    assert code == 0, err
    assert re.search(r"filed as DocumentReference/\S+", out)
    code, out, err = run(capsys, "--config", cfg, "receive", tmp_path / "opinion.jwe")
    assert code == 4 and "already has its opinion filed" in err and "Traceback" not in err

    code, out, _ = run(capsys, "--config", cfg, "status", case_prefix)
    assert code == 0 and "step: done" in out and "file.done" in out and "opinion.received" in out


def test_cli_errors_are_one_clear_line(hospital, seeded, capsys, tmp_path):
    cfg = hospital.config_path
    code, _, err = run(capsys, "--config", cfg, "order", "--patient", "no-such-patient", "--question", "?",
                       "--requester", seeded["physician"])
    assert code == 1 and "Patient/no-such-patient does not exist in the EHR" in err
    (tmp_path / "junk.jwe").write_bytes(b"not a sealed opinion")
    code, _, err = run(capsys, "--config", cfg, "receive", tmp_path / "junk.jwe")
    assert code == 3 and "refused" in err and "Traceback" not in err
    code, _, err = run(capsys, "--config", cfg, "status", "zzzz")
    assert code == 1 and "no Case with id zzzz" in err
    code, _, err = run(capsys, "reviewer", "open", tmp_path / "nowhere", "--key", tmp_path / "nokey.json")
    assert code != 0 and "Traceback" not in err and "nokey.json" in err


def test_order_without_requester_is_refused_by_the_cli(hospital, seeded, capsys, fhir):
    """Issue 13, C4: BSeR's referral request has `requester` 1..1, and `fhirbridge order` wrote none without
    `--requester`. Now the command refuses to run without it, and a requester the EHR does not hold is a clear
    error; neither writes an order."""
    cfg = hospital.config_path
    before = len(list(fhir.search("ServiceRequest", {"subject": seeded["patient"]})))
    with pytest.raises(SystemExit) as refused:
        main(["--config", str(cfg), "order", "--patient", seeded["patient"], "--question", "Fusion?"])
    assert refused.value.code == 2
    assert "the following arguments are required: --requester" in capsys.readouterr().err
    code, _, err = run(capsys, "--config", cfg, "order", "--patient", seeded["patient"], "--question", "Fusion?",
                       "--requester", "Practitioner/no-such-doctor")
    assert code == 1 and "the requester Practitioner/no-such-doctor does not exist in the EHR" in err
    code, _, err = run(capsys, "--config", cfg, "order", "--patient", seeded["patient"], "--question", "Fusion?",
                       "--requester", "Patient/x")
    assert code == 1 and "Practitioner/<id> or PractitionerRole/<id>" in err
    assert len(list(fhir.search("ServiceRequest", {"subject": seeded["patient"]}))) == before
    code, out, _ = run(capsys, "--config", cfg, "order", "--patient", seeded["patient"], "--question", "Fusion?",
                       "--requester", seeded["physician"])
    assert code == 0 and fhir.read_ref(out.strip())["requester"] == {"reference": seeded["physician"]}


def test_reviewer_open_shows_priority_referrer_and_the_cases_due_date(hospital, seeded, capsys, fhir):
    """Issue 16, part 1: `reviewer open` names the order's priority, the referring physician and the due date the
    hospital has for the Case (not the package's expiry); `reviewer answer` picks the Case profile's form."""
    case = hospital.delivered_case(seeded["patient"], profile="oncology", priority="asap")
    r = hospital.reviewers["spine-center"]
    code, out, err = run(capsys, "reviewer", "open", hospital.package_path(case), "--key", r.files["private_keys"])
    assert code == 0, err
    due = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(case.due_at))
    assert f"Answer by: {due}" in out
    assert "Priority: asap  (URGENT: answer first)" in out
    name = person_name(fhir.read_ref(hospital.physician()))
    assert re.search(rf"^Referring physician: {re.escape(name)}\b", out, re.M), out

    answer = hospital.root / "onc.toml"
    answer.write_text(SAMPLE_ANSWER.replace('urgency = "routine"', 'urgency = "routine"\ntnm_stage = "sideways"'))
    code, _, err = run(capsys, "reviewer", "answer", hospital.package_path(case), "--opinion", answer, "--key",
                       r.files["private_keys"], "--out", hospital.root / "o.jwe")
    assert code == 2 and "tnm_stage: 'sideways' is not one of: confirmed, revised, not-assessable" in err
