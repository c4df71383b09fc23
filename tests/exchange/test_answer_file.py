"""Every problem with the reviewer's answer file (bad TOML or JSON, not a table, missing, not UTF-8) is an
AnswerError with exit code 2, in the API and in `fhirbridge reviewer answer`. None of this needs the EHR."""
from __future__ import annotations

import pytest

from fhirbridge.cli import main as cli
from fhirbridge.exchange.opinion import AnswerError, load_answer
from tests.kit.packages import make_package


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name, content", [
    ("answer.toml", 'concordance = "concordant\n'),
    ("answer.json", '{"concordance": "concordant",}'),
    ("answer.json", '["concordant"]'),
    ("answer.toml", None),
    ("answer.toml", b'risks_benefits = "R\xfcckenschmerzen"\n'),
])
def test_every_answer_file_problem_is_an_answer_error_with_exit_code_2(tmp_path, name, content):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content, encoding="utf-8")
    with pytest.raises(AnswerError) as info:
        load_answer(p)
    assert info.value.exit_code == 2 and str(p) in str(info.value) and len(info.value.problems) == 1


def test_cli_answer_with_bad_toml_exits_2(sites, tmp_path, capsys):
    pkg = make_package(tmp_path / "in", sites["a"].private, sites["reviewer_public"])
    answer_file = tmp_path / "answer.toml"
    answer_file.write_text('concordance = "concordant\n', encoding="utf-8")
    out_file = tmp_path / "opinion.jwe"
    code, _out, err = run(capsys, "reviewer", "answer", pkg, "--key", sites["key_file"], "--opinion", answer_file,
                         "--out", out_file)
    assert code == 2 and "not valid TOML" in err and "Traceback" not in err
    assert not out_file.exists()
