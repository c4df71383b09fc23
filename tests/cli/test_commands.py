"""The `fhirbridge` command, in-process, for everything that needs no FHIR server."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from fhirbridge.cli import main as cli
from fhirbridge.crypto.keys import KeyRing


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def no_traceback(err: str) -> None:
    assert "Traceback" not in err


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def site(tmp_path, capsys) -> Path:
    code, _, err = run(capsys, "init", tmp_path / "site")
    assert code == 0, err
    return tmp_path / "site"


# --- init ------------------------------------------------------------------------------------------

def test_init_writes_config_and_keys(tmp_path, capsys):
    d = tmp_path / "site"
    code, out, err = run(capsys, "init", d, "--fhir-base-url", "https://ehr.example/fhir",
                         "--hospital-name", "St. Elsewhere")
    assert code == 0, err
    cfg, private, public = (d / "fhirbridge.toml", d / "keys" / "hospital.private.jwks.json",
                            d / "keys" / "hospital.public.jwks.json")
    for p in (cfg, private, public):
        assert p.is_file()
        assert f"wrote {p}" in out
    assert mode(private) == 0o600
    assert mode(d / "keys") & 0o077 == 0  # the key directory is private too
    text = cfg.read_text(encoding="utf-8")
    assert 'fhir_base_url = "https://ehr.example/fhir"' in text and 'name = "St. Elsewhere"' in text
    assert KeyRing.load(private).has_private
    pub = json.loads(public.read_text())
    assert pub["keys"] and not any("d" in k for k in pub["keys"])


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_init_keeps_keys_private_and_the_config_readable_under_any_umask(tmp_path, capsys, umask):
    """Issue 13, S11: the keys are the owner's alone and the configuration (no secrets: those come from the
    environment) readable by the operators and tools, whatever umask `init` runs under."""
    d = tmp_path / "site"
    old = os.umask(umask)
    try:
        code, _, err = run(capsys, "init", d)
    finally:
        os.umask(old)
    assert code == 0, err
    assert mode(d / "fhirbridge.toml") == 0o644
    assert mode(d / "keys") == 0o700 and mode(d / "keys" / "hospital.private.jwks.json") == 0o600
    assert mode(d / "keys" / "hospital.public.jwks.json") == 0o644


def test_second_init_refuses_and_keeps_the_files(site, capsys):
    cfg = site / "fhirbridge.toml"
    private = site / "keys" / "hospital.private.jwks.json"
    before = (cfg.read_bytes(), private.read_bytes())
    code, out, err = run(capsys, "init", site)
    assert code != 0
    assert "exists" in err and str(cfg) in err
    no_traceback(err)
    assert (cfg.read_bytes(), private.read_bytes()) == before


def test_init_force_replaces(site, capsys):
    private = site / "keys" / "hospital.private.jwks.json"
    before = private.read_bytes()
    code, _, err = run(capsys, "init", site, "--force")
    assert code == 0, err
    assert private.read_bytes() != before and mode(private) == 0o600


# --- configuration errors --------------------------------------------------------------------------

def test_missing_config_exits_2_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "missing.toml"
    code, out, err = run(capsys, "--config", missing, "status")
    assert code == 2
    assert str(missing) in err and "not found" in err
    assert out == ""
    no_traceback(err)


def test_config_typo_exits_2_naming_file_and_key(site, capsys):
    cfg = site / "fhirbridge.toml"
    text = cfg.read_text(encoding="utf-8")
    cfg.write_text(text.replace("retries = 4", "retries = 4\nretires = 5", 1), encoding="utf-8")
    code, out, err = run(capsys, "--config", cfg, "status")
    assert code == 2
    assert f"{cfg}: hospital.http.retires:" in err and "unknown key" in err
    no_traceback(err)


def test_config_from_environment_variable(site, capsys, monkeypatch):
    monkeypatch.setenv("FHIRBRIDGE_CONFIG", str(site / "fhirbridge.toml"))
    code, out, err = run(capsys, "status")
    assert code == 0, err
    assert "no cases yet" in out


# --- status and friends ----------------------------------------------------------------------------

def test_status_on_a_fresh_config(site, capsys):
    code, out, err = run(capsys, "--config", site / "fhirbridge.toml", "status")
    assert code == 0, err
    assert out.strip() == "no cases yet"
    assert (site / "var" / "fhirbridge.db").is_file()  # the store was created in data_dir


def test_status_json_on_a_fresh_config(site, capsys):
    code, out, err = run(capsys, "--config", site / "fhirbridge.toml", "status", "--json")
    assert code == 0, err
    assert json.loads(out) == []


def test_status_of_an_unknown_case(site, capsys):
    code, out, err = run(capsys, "--config", site / "fhirbridge.toml", "status", "deadbeef")
    assert code == 1
    assert "no Case" in err and "deadbeef" in err
    no_traceback(err)


def test_keys_jwks_prints_only_public_keys(site, capsys):
    code, out, err = run(capsys, "--config", site / "fhirbridge.toml", "keys", "jwks")
    assert code == 0, err
    jwks = json.loads(out)
    assert jwks == json.loads((site / "keys" / "hospital.public.jwks.json").read_text())
    assert not any(k.get("d") for k in jwks["keys"])


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


# --- reviewer side ---------------------------------------------------------------------------------

def test_reviewer_keys_with_trust(site, tmp_path, capsys):
    hospital_public = site / "keys" / "hospital.public.jwks.json"
    d = tmp_path / "reviewer"
    code, out, err = run(capsys, "reviewer", "keys", d, "--trust", hospital_public)
    assert code == 0, err
    private, public, trusted = (d / "reviewer.private.jwks.json", d / "reviewer.public.jwks.json",
                                d / "trusted.jwks.json")
    for p in (private, public, trusted):
        assert p.is_file() and str(p) in out
    assert sorted(x.name for x in d.iterdir()) == sorted(p.name for p in (private, public, trusted))
    assert mode(private) == 0o600
    assert trusted.read_bytes() == hospital_public.read_bytes()
    ring = KeyRing.load(private)
    assert ring.has_private
    pub = json.loads(public.read_text())
    assert len(pub["keys"]) == 3  # EC signing, EC + RSA encryption
    assert not any(m in k for k in pub["keys"] for m in ("d", "p", "q"))


def test_reviewer_keys_without_trust(tmp_path, capsys):
    d = tmp_path / "reviewer"
    code, out, err = run(capsys, "reviewer", "keys", d)
    assert code == 0, err
    assert sorted(p.name for p in d.iterdir()) == ["reviewer.private.jwks.json", "reviewer.public.jwks.json"]


def test_reviewer_keys_refuses_to_overwrite(tmp_path, capsys):
    d = tmp_path / "reviewer"
    assert run(capsys, "reviewer", "keys", d)[0] == 0
    before = (d / "reviewer.private.jwks.json").read_bytes()
    code, out, err = run(capsys, "reviewer", "keys", d)
    assert code != 0 and "refusing to overwrite" in err
    no_traceback(err)
    assert (d / "reviewer.private.jwks.json").read_bytes() == before


def test_reviewer_keys_with_a_missing_trust_file_can_be_rerun(site, tmp_path, capsys):
    d = tmp_path / "reviewer"
    code, out, err = run(capsys, "reviewer", "keys", d, "--trust", tmp_path / "typo.jwks.json")
    assert code != 0 and "typo.jwks.json" in err
    no_traceback(err)
    code, out, err = run(capsys, "reviewer", "keys", d, "--trust", site / "keys" / "hospital.public.jwks.json")
    assert code == 0, err


def test_reviewer_open_missing_package(site, tmp_path, capsys):
    d = tmp_path / "reviewer"
    assert run(capsys, "reviewer", "keys", d, "--trust", site / "keys" / "hospital.public.jwks.json")[0] == 0
    missing = tmp_path / "no-such-package"
    code, out, err = run(capsys, "reviewer", "open", missing, "--key", d / "reviewer.private.jwks.json")
    assert code != 0
    assert err.startswith("error: ") and str(missing) in err and "no such file" in err
    no_traceback(err)
    assert "signature: valid" not in out


def test_reviewer_open_with_a_missing_key_file(tmp_path, capsys):
    key = tmp_path / "nokey.jwks.json"
    code, out, err = run(capsys, "reviewer", "open", tmp_path / "pkg", "--key", key)
    assert code == 2
    assert str(key) in err and "key file not found" in err
    no_traceback(err)


def test_reviewer_open_without_trusted_keys(tmp_path, capsys):
    d = tmp_path / "reviewer"
    assert run(capsys, "reviewer", "keys", d)[0] == 0  # no trusted.jwks.json next to the key
    code, out, err = run(capsys, "reviewer", "open", tmp_path / "pkg", "--key", d / "reviewer.private.jwks.json")
    assert code != 0
    assert "--trust" in err and "trusted" in err
    no_traceback(err)


def test_reviewer_answer_missing_package(site, tmp_path, capsys):
    d = tmp_path / "reviewer"
    assert run(capsys, "reviewer", "keys", d, "--trust", site / "keys" / "hospital.public.jwks.json")[0] == 0
    answer = tmp_path / "answer.toml"
    answer.write_text('concordance = "concordant"\n', encoding="utf-8")
    out_file = tmp_path / "opinion.jwe"
    code, out, err = run(capsys, "reviewer", "answer", tmp_path / "pkg", "--key", d / "reviewer.private.jwks.json",
                         "--opinion", answer, "--out", out_file)
    assert code != 0 and "no such file" in err
    no_traceback(err)
    assert not out_file.exists()
