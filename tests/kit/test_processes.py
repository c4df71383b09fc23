"""The kit's process handling (tests/kit/processes.py): a readiness wait retries until its deadline and then says
what it waited for, with the log's tail; a stop takes the whole process group, escalating to SIGKILL; and a
served app (tests/kit/hospital.py Served) whose setup fails half-way leaves no process behind."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fhirbridge.demo.localehr import free_port
from tests.kit import processes
from tests.kit.hospital import Served


def _started(monkeypatch) -> list:
    """Every process the kit starts from now on, recorded as it is started."""
    seen = []
    real = processes.start

    def start(*args, **kw):
        proc = real(*args, **kw)
        seen.append(proc)
        return proc

    monkeypatch.setattr(processes, "start", start)
    return seen


def _pid_from(path, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.05)
    return int(path.read_text())


def test_a_wait_that_times_out_names_what_it_waited_for_and_the_group_is_stopped(tmp_path):
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{free_port()}/healthz"        # nobody listens there
    # A leader and a child that both ignore SIGTERM: only the SIGKILL after the grace period stops them.
    proc = processes.start(["sh", "-c", "trap '' TERM; echo still starting; sleep 300 & sleep 300"], log=log)
    try:
        started = time.monotonic()
        with pytest.raises(processes.NotReady) as info:
            processes.wait_for_http(url, what="the test server", proc=proc, log=log, timeout=1.5)
        assert time.monotonic() - started >= 1.5                # retried until the deadline, not given up early
        message = str(info.value)
        assert "the test server did not answer" in message and url in message and "within 1.5 s" in message
        assert "ConnectionError" in message and "still starting" in message   # the last error and the log's tail
        assert len(processes.group_members(proc.pid)) >= 2          # the shell and its sleeps
    finally:
        processes.stop(proc, grace=1)
    assert proc.returncode == -9
    assert not processes.group_alive(proc.pid)


def test_a_process_that_exits_while_waited_for_is_reported_at_once(tmp_path):
    log = tmp_path / "server.log"
    proc = processes.start(["sh", "-c", "echo no such config; exit 2"], log=log)
    try:
        with pytest.raises(processes.NotReady, match="(?s)the test server exited with code 2 .*no such config"):
            processes.wait_for_http(f"http://127.0.0.1:{free_port()}/", what="the test server", proc=proc, log=log,
                                    timeout=60)
    finally:
        processes.stop(proc)
    assert not processes.group_alive(proc.pid)


def test_stop_takes_children_left_behind_by_a_leader_that_exited(tmp_path):
    pid_file = tmp_path / "child.pid"
    proc = processes.start(["sh", "-c", f"sleep 300 & echo $! > {pid_file}; exit 0"], log=tmp_path / "log")
    try:
        child = _pid_from(pid_file)
        proc.wait(30)
        assert child in processes.group_members(proc.pid)      # the leader is gone, its child is not
    finally:
        processes.stop(proc)
    assert not processes.group_alive(proc.pid)


@pytest.mark.sekmet
def test_a_served_app_that_never_gets_ready_leaves_no_process_behind(hospital, tmp_path, monkeypatch):
    """`fhirbridge serve` that hangs while starting (a sitecustomize that starts a child and sleeps): the
    readiness wait gives up at its deadline, and the serve process and its child are gone when Served raises."""
    hang = tmp_path / "hang"
    hang.mkdir()
    pid_file = tmp_path / "child.pid"
    (hang / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen(["sleep", "300"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("hanging on purpose before gunicorn starts", file=sys.stderr, flush=True)
        time.sleep(300)
    """))
    started = _started(monkeypatch)
    with pytest.raises(processes.NotReady) as info:
        Served(hospital, {"PYTHONPATH": str(hang)}, startup=5)
    message = str(info.value)
    assert "`fhirbridge serve`" in message and "/healthz" in message and "within 5 s" in message
    assert "hanging on purpose" in message                     # the log's tail
    (proc,) = started
    assert proc.returncode is not None
    assert not processes.group_alive(proc.pid)
    assert _pid_from(pid_file) not in processes.group_members(proc.pid)


@pytest.mark.sekmet
def test_a_served_app_that_exits_while_starting_leaves_no_process_behind(hospital, monkeypatch):
    started = _started(monkeypatch)
    with pytest.raises(processes.NotReady, match="exited with code 2"):
        Served(hospital, {"FHIRBRIDGE_HOSPITAL__HTTP__TIMEOUT_READ": "nan"}, startup=60)
    (proc,) = started
    assert proc.returncode == 2
    assert not processes.group_alive(proc.pid)



def test_a_run_ended_by_sigterm_still_stops_the_groups_its_fixtures_started(tmp_path):
    """pytest stopped by SIGTERM (a CI timeout) tears its fixtures down: the group a fixture started is gone."""
    pid_file, started = tmp_path / "child.pid", tmp_path / "started"
    (tmp_path / "test_hangs.py").write_text(textwrap.dedent(f"""
        import time
        import pytest
        from tests.kit import processes

        @pytest.fixture
        def server(tmp_path):
            proc = processes.start(["sh", "-c", "sleep 300 & echo $! > {pid_file}; wait"], log=tmp_path / "log")
            try:
                yield proc
            finally:
                processes.stop(proc)

        def test_hangs(server):
            open({str(started)!r}, "w").write("yes")
            time.sleep(300)
    """))
    root = Path(__file__).resolve().parents[2]
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "tests.kit.sigterm", "-p", "no:cacheprovider",
                            str(tmp_path / "test_hangs.py")], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        child = _pid_from(pid_file)
        deadline = time.monotonic() + 60
        while not started.exists():
            assert time.monotonic() < deadline and run.poll() is None, "the test never started"
            time.sleep(0.05)
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=60)
        assert run.returncode == 2, out.decode()            # pytest's "interrupted"
        assert not _alive(child), "the fixture's process outlived the SIGTERM"
    finally:
        processes.kill(run)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent, the stopped group's leader, has not reaped it yet).
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return False
