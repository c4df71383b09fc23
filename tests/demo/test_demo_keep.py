"""`fhirbridge demo --keep` (issue 17, part 4): the demo's end serves the pages against what it just ran (the
dashboard, this Case's page, the reviewer portal) until Ctrl-C, and Ctrl-C stops every process it started:
the service (gunicorn master and worker), the portal and the demo EHR. Seeding shows its progress."""
from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import requests

from fhirbridge.demo.localehr import find_sekmet
from tests.kit import processes

pytestmark = pytest.mark.sekmet


def descendants(pid: int) -> set[int]:
    """Every living process below `pid` (by parent id, from /proc), whatever its process group."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def sign_in(s: requests.Session, login_url: str, token: str) -> requests.Response:
    """The login form as a browser sends it: its CSRF token from the page, then the sign-in token."""
    form = s.get(login_url, timeout=30)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text) or re.search(
        r'value="([^"]+)" name="csrf_token"', form.text)
    assert csrf, form.text[:500]
    return s.post(login_url, data={"csrf_token": csrf.group(1), "token": token}, timeout=30)


def test_demo_keep_serves_the_pages_until_ctrl_c_then_stops_everything(tmp_path):
    try:
        find_sekmet()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(str(exc))
    log = tmp_path / "demo.log"
    proc = processes.start([sys.executable, "-m", "fhirbridge", "demo", "--dir", tmp_path / "demo", "--keep"],
                           log=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 300
        while "Running until Ctrl-C." not in log.read_text():
            assert proc.poll() is None, processes.tail(log)
            assert time.monotonic() < deadline, processes.tail(log)
            time.sleep(0.5)
        out = log.read_text()
        # Seeding says what it is doing (it takes most of the demo's time).
        assert "registering the patient" in out and "imaging 1 of" in out and "a lab cycle" in out
        dashboard, token = re.search(r"IT dashboard:\s+(http://127\.0\.0\.1:\d+/dashboard/)\s+\(token (\S+)\)",
                                     out).groups()
        case_page = re.search(r"this Case:\s+(http://\S+/dashboard/cases/[0-9a-f-]+)", out).group(1)
        portal, portal_token = re.search(r"reviewer portal:\s+(http://127\.0\.0\.1:\d+/)\s+\(token (\S+)\)",
                                         out).groups()
        ehr = re.search(r"demo EHR:\s+(http://\S+/fhir)", out).group(1)
        with requests.Session() as s:
            s.trust_env = False
            login = sign_in(s, dashboard + "login", token)
            assert login.status_code == 200 and "/login" not in login.url, login.text[:300]
            page = s.get(case_page, timeout=30)
            assert page.status_code == 200 and case_page.rsplit("/", 1)[1][:8] in page.text
        with requests.Session() as s:
            s.trust_env = False
            login = sign_in(s, portal + "login", portal_token)
            assert login.status_code == 200 and "/login" not in login.url, login.text[:300]
        assert requests.get(f"{ehr}/metadata", timeout=30).status_code == 200
        started = descendants(proc.pid)
        assert len(started) >= 3, started        # the service (master + worker), the portal; the EHR too
        os.killpg(proc.pid, signal.SIGINT)       # Ctrl-C in the demo's terminal
        assert proc.wait(60) == 0, processes.tail(log)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in started if alive(p)], processes.tail(log)
        assert "Stopping the service, the portal and the demo EHR." in log.read_text()
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{ehr}/metadata", timeout=2)
    finally:
        processes.stop(proc)
