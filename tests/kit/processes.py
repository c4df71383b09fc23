"""Processes the tests start (gunicorn, `fhirbridge worker`, ...): each in its own process group, waited for
until a deadline, and stopped with its whole group.

- `start()` runs a command in a new session (start_new_session=True: its own process group, whose id is the
  leader's pid), output to a log file.
- `wait_for_http()` polls a URL until it answers (200 by default) or a deadline passes. Every attempt has short
  timeouts and any connection or read error (requests.RequestException, OSError) is one more try, not a failure:
  on a loaded machine a server may accept late or answer slowly. When the deadline passes, or the process exits
  first, the error says what it waited for and ends with the tail of the process's log.
- `stop()` SIGTERMs the whole group, SIGKILLs it after a grace period and reaps the leader; it is safe to call
  more than once. Callers call it in a `finally` (or use `running()`, a with-block), so a setup that fails
  half-way leaves no process behind.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import requests

# How long a readiness wait polls before it gives up (a loaded CI machine starts gunicorn slowly).
READY_SECONDS = float(os.environ.get("FHIRBRIDGE_TEST_READY_SECONDS") or 120)
# Each attempt's (connect, read) timeouts: short, the deadline is what bounds the wait.
ATTEMPT_TIMEOUT = (1.0, 3.0)
STOP_GRACE = 10.0


class NotReady(RuntimeError):
    """A process or server did not become ready: what was waited for, why, and the log's tail."""


def start(argv: Sequence[str | os.PathLike], *, log: Path, env: Mapping[str, str] | None = None,
          cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """`argv` in its own process group (a new session), stdout and stderr written to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen([str(a) for a in argv], env=None if env is None else dict(env), cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def tail(log: Path | None, chars: int = 3000) -> str:
    """The last `chars` characters of `log` ('' when there is none)."""
    if log is None:
        return ""
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _with_tail(message: str, log: Path | None) -> str:
    if log is None:
        return message
    return f"{message}\n--- last lines of {log} ---\n{tail(log)}"


def wait_for_http(url: str, *, what: str, proc: subprocess.Popen | None = None, log: Path | None = None,
                  timeout: float = READY_SECONDS, ok: Callable[[requests.Response], bool] | None = None,
                  attempt_timeout: tuple[float, float] = ATTEMPT_TIMEOUT, interval: float = 0.2) -> requests.Response:
    """Poll `url` until `ok(response)` (default: status 200) and return that response.

    Raises NotReady, naming `what` and `url` and quoting the tail of `log`, when `proc` exits first or when
    `timeout` seconds pass. Connection and read errors of single attempts are retried until then."""
    ok = ok or (lambda r: r.status_code == 200)
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with requests.Session() as http:
        http.trust_env = False   # a proxy from the environment must not sit between us and 127.0.0.1
        while True:
            if proc is not None and proc.poll() is not None:
                raise NotReady(_with_tail(f"{what} exited with code {proc.returncode} before {url} answered "
                                          f"(last: {last})", log))
            try:
                response = http.get(url, timeout=attempt_timeout)
                if ok(response):
                    return response
                last = f"HTTP {response.status_code}"
            except (requests.RequestException, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise NotReady(_with_tail(f"{what} did not answer {url} within {timeout:g} s (last: {last})", log))
            time.sleep(interval)


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`."""
    proc = Path("/proc")
    if not proc.is_dir():   # not Linux: ask the kernel whether anything of the group is left
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue   # gone meanwhile
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses, so split after its last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait_group(pgid: int, until: float) -> bool:
    """Wait until group `pgid` has no live member or `until` (monotonic) passes; True when it is gone."""
    while group_alive(pgid):
        if time.monotonic() >= until:
            return False
        time.sleep(0.05)
    return True


def stop(proc: subprocess.Popen, *, grace: float = STOP_GRACE) -> int | None:
    """Stop `proc` (started with start_new_session=True) and everything in its process group: SIGTERM, then
    SIGKILL for whatever is left after `grace` seconds; the leader is reaped. Returns the leader's exit code.
    Safe to call again, and after the process has exited by itself (its children are still stopped)."""
    pgid = proc.pid
    if proc.poll() is None or group_alive(pgid):
        _signal_group(pgid, signal.SIGTERM)
        until = time.monotonic() + grace
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        if proc.poll() is None or not _wait_group(pgid, until):
            _signal_group(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
            _wait_group(pgid, time.monotonic() + grace)
    return proc.returncode


def kill(proc: subprocess.Popen, *, wait: float = STOP_GRACE) -> int | None:
    """SIGKILL `proc`'s whole process group at once (a crash, not a stop) and reap the leader."""
    _signal_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(wait)   # reaped: a zombie would still look alive to the survivors
    _wait_group(proc.pid, time.monotonic() + wait)
    return proc.returncode


@contextlib.contextmanager
def running(argv: Sequence[str | os.PathLike], *, log: Path, env: Mapping[str, str] | None = None,
            cwd: str | os.PathLike | None = None, grace: float = STOP_GRACE) -> Iterator[subprocess.Popen]:
    """`start()` for a with-block: the process group is stopped when the block ends, however it ends."""
    proc = start(argv, log=log, env=env, cwd=cwd)
    try:
        yield proc
    finally:
        stop(proc, grace=grace)
