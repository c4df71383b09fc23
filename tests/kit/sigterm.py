"""A pytest plugin: SIGTERM ends the run the way Ctrl-C does, so every fixture's teardown still runs.

SIGTERM's default action ends the interpreter at once: no `finally`, no fixture finalizer, so the sekmet and
gunicorn process groups the fixtures started outlive the run (seen when a CI job's timeout stopped pytest) and
hold their ports and data dirs. Raised as KeyboardInterrupt, pytest stops the test that is running and then
tears every fixture down (`_pytest.runner.pytest_sessionfinish`), which stops each group it started.
Registered by tests/conftest.py (`pytest_plugins`)."""
from __future__ import annotations

import signal
import threading


def _interrupt(signum: int, _frame: object) -> None:
    # Once is enough: a second SIGTERM during teardown must not interrupt the stopping of the groups.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config) -> None:
    # Signal handlers can only be set from the main thread (pytest runs there unless embedded).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
