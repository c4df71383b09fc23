"""Running the `fhirbridge` command in-process, as a test would type it."""
from __future__ import annotations

from pathlib import Path

from fhirbridge.cli import main as cli


def run(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `fhirbridge ARGV...`."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def init_site(tmp_path: Path, capsys, *extra) -> Path:
    """`fhirbridge init` into tmp_path/site; the path of the config it wrote."""
    code, _, err = run(capsys, "init", tmp_path / "site", *extra)
    assert code == 0, err
    return tmp_path / "site" / "fhirbridge.toml"
