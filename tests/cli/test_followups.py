"""Follow-up questions and corrections through the command line (issue 16 parts 3 and 5): the reviewer answers
with `reviewer answer --follow-up ID` and corrects with `--corrects`, the hospital takes both in with `receive`,
`status` shows what is open; replays and answers to unknown questions exit 2 and write nothing."""
from __future__ import annotations

import re

import pytest

from fhirbridge.cli.main import main
from fhirbridge.loop.followup import ask
from fhirbridge.store.followups import FollowUps
from tests.kit.hospital import SAMPLE_ANSWER

pytestmark = pytest.mark.sekmet


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_follow_up_answered_and_a_correction_sent_from_the_command_line(hospital, seeded, capsys, tmp_path, fhir):
    h, cfg = hospital, hospital.config_path
    case = h.delivered_case(seeded["patient"])
    key = h.reviewers[case.reviewer].files["private_keys"]
    package = h.package_path(case)
    code, _, err = run(capsys, "--config", cfg, "receive", h.answer(case))
    assert code == 0, err
    case = h.app.store.get(case.id)

    row = ask(h.app, case, "Does the patient need a brace after surgery?")
    code, out, err = run(capsys, "--config", cfg, "status")
    assert code == 0 and "1 open follow-up(s)" in out and "asked" in out
    code, out, err = run(capsys, "--config", cfg, "run")
    assert code == 0, err
    for i in (2, 3):
        code, out, err = run(capsys, "--config", cfg, "ask", case.id[:8], "--question", f"Question {i}?")
        assert code == 0 and f"follow-up question {i} of case {case.id[:8]}: sent (Communication/" in out, err
    code, out, err = run(capsys, "--config", cfg, "ask", case.id[:8], "--question", "A fourth?")
    assert code == 2 and "the most its reviewer answers (3)" in err and "Traceback" not in err
    code, out, _ = run(capsys, "--config", cfg, "status")
    assert re.search(rf"{case.id[:8]}\s+question\s+1\s+sent\s+{row['id']}", out), out

    (tmp_path / "answer.txt").write_text("No brace is needed; walking from day one.")
    code, out, err = run(capsys, "reviewer", "answer", package, "--follow-up", row["id"], "--opinion",
                         tmp_path / "answer.txt", "--key", key, "--out", tmp_path / "answer.jwe")
    assert code == 0, err
    assert "wrote sealed answer" in out and "follow-up question 1" in out
    code, out, err = run(capsys, "--config", cfg, "receive", tmp_path / "answer.jwe")
    assert code == 0, err
    assert re.search(r"filed as DocumentReference/\S+", out)
    code, _, err = run(capsys, "--config", cfg, "receive", tmp_path / "answer.jwe")
    assert code == 2 and "replay" in err and "Traceback" not in err
    code, _, err = run(capsys, "reviewer", "answer", package, "--follow-up", "no-such-question", "--opinion",
                       tmp_path / "answer.txt", "--key", key, "--out", tmp_path / "x.jwe")
    assert code == 2 and "no follow-up question no-such-question" in err
    code, out, _ = run(capsys, "--config", cfg, "status", case.id[:8])
    assert "follow-up 1: filed" in out
    code, out, _ = run(capsys, "--config", cfg, "status")
    assert "2 open follow-up(s)" in out      # questions 2 and 3 wait for the reviewer

    (tmp_path / "corrected.toml").write_text(SAMPLE_ANSWER.replace("Agree with the plan.", "Corrected: wait."))
    code, out, err = run(capsys, "reviewer", "answer", package, "--opinion", tmp_path / "corrected.toml",
                         "--corrects", case.opinion_id, "--key", key, "--out", tmp_path / "corrected.jwe")
    assert code == 0 and "wrote sealed corrected opinion" in out, err
    code, out, err = run(capsys, "--config", cfg, "receive", tmp_path / "corrected.jwe")
    assert code == 0, err
    assert "received corrected opinion" in out
    [correction] = FollowUps(h.app.store).of_case(case.id, "correction")
    assert correction["state"] == "filed"
    assert fhir.read_ref(case.document_reference)["status"] == "superseded"
    new = fhir.read_ref(correction["note"])
    assert new["relatesTo"] == [{"code": "replaces", "target": {"reference": case.document_reference}}]
