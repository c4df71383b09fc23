"""The `fhirbridge` entry point itself: the umask it runs under, and what it prints when a command fails."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from fhirbridge.cli import main as cli
from fhirbridge.crypto.keys import generate_jwks, write_public_jwks
from fhirbridge.exchange.reviewer import write_reviewer_keys
from tests.kit.hospital import TestHospital
from tests.kit.processes import READY_SECONDS, start, stop, tail

# What an EHR (or whoever sits in its place) could put in an error's text: retitle the window (OSC 0), clear
# the screen (CSI 2J), an 8-bit CSI, a bell, colours.
HOSTILE = "\x1b]0;you have been pwned\x07\x1b[2J\x9b1;1Hpatient\x1b[31m not allowed\x07"


def _umask_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask line in /proc/<pid>/status (Linux 4.7+)")


@pytest.mark.parametrize("how", ["installed", "python -m"])
def test_the_installed_command_runs_under_umask_0077(tmp_path, how):
    """Issue 13, S11: whatever umask the shell has (0022 here), the command runs under 0077, so anything a
    library writes with a default mode is the owner's alone. Both entry points go through cli.main:console."""
    if not Path("/proc/self/status").exists():
        pytest.skip("reads the umask from /proc")
    exe = Path(sys.executable).with_name("fhirbridge")
    if how == "installed" and not exe.exists():
        pytest.skip("the fhirbridge script is not installed next to this Python")
    hospital_public = tmp_path / "hospital.public.jwks.json"
    write_public_jwks(hospital_public, generate_jwks())
    keys = write_reviewer_keys(tmp_path / "reviewer", hospital_public)
    command = [str(exe)] if how == "installed" else [sys.executable, "-m", "fhirbridge"]
    log = tmp_path / "portal.log"
    old = os.umask(0o022)                     # what the child inherits, as from a login shell
    try:
        proc = start([*command, "reviewer", "serve", "--key", keys["private_keys"], "--work", tmp_path / "work",
                      "--bind", "127.0.0.1:0"], log=log,
                     env={**os.environ, "FHIRBRIDGE_PORTAL_TOKEN": "portal-token-" + "u" * 20})
    finally:
        os.umask(old)
    try:
        deadline = time.monotonic() + READY_SECONDS
        while "reviewer portal on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, tail(log)
            time.sleep(0.1)
        assert _umask_of(proc.pid) == 0o077
    finally:
        stop(proc)


def test_an_error_quoting_the_ehr_is_printed_without_its_escape_sequences(tmp_path, proxy, capsys):
    """Issue 13, S13: an EHR's error text goes to the operator's terminal as text. Its escape sequences and
    controls are dropped; its words are kept."""
    outcome = {"resourceType": "OperationOutcome",
               "issue": [{"severity": "error", "code": "forbidden", "diagnostics": HOSTILE}]}
    proxy.add(method="GET", path=r"/Patient/", status=422, body=json.dumps(outcome).encode())
    h = TestHospital(tmp_path, proxy.base_url)
    try:
        code = cli.main(["--config", str(h.config_path), "order", "--patient", "Patient/p-1", "--question", "Why?"])
    finally:
        h.close()
    err = capsys.readouterr().err
    assert code != 0 and "error: EHR answered 422" in err
    assert "patient not allowed" in err                        # the EHR's words, as text
    for control in ("\x1b", "\x9b", "\x07"):
        assert control not in err
