"""Crash-suite test hook: inert unless FHIRBRIDGE_TEST_CRASH_AT is set.

`FHIRBRIDGE_TEST_CRASH_AT=<point>[:n]` makes this process SIGKILL itself the n-th time (default: the first) it
reaches the named point, e.g. `seal.end` (the package is sealed, the step not yet recorded). A kill from
outside cannot land on a step boundary reliably; this lands on it every time, so the crash suite
(tests/reliability/test_crash.py) can prove that every boundary resumes without loss or duplication.
The points are listed in POINTS; nothing else in fhirbridge reads the variable.
"""
from __future__ import annotations

import os
import signal
import threading

from fhirbridge.steps import WORK_STEPS

VARIABLE = "FHIRBRIDGE_TEST_CRASH_AT"
# <step>.begin: claimed, nothing done; <step>.end: done, not recorded; <step>.recorded: recorded, Task not synced.
# file.<Type>.sent (write plans LEDGER and ONCE, loop/post_writes.py): the ledger says sent, the POST not yet made.
# order.written (loop/accepted_orders.py): an accepted order's ServiceRequest is in the EHR, its row still pending.
# supplement.* (loop/supplement.py): DocumentReference.sent the ledger says the uploaded document is sent, the
# POST not yet made (plans LEDGER and ONCE); sealed: the supplement package is sealed, not delivered;
# delivered: delivered and accounted for, the reviewer's request Task not yet completed.
SUPPLEMENT_POINTS = ("supplement.DocumentReference.sent", "supplement.sealed", "supplement.delivered")
# The conversation after the opinion (loop/followup.py): followup.written (the Communication is in the EHR, the
# question not yet delivered), followup.end (delivered, not recorded), <path>.committed (plan ATOMIC: the EHR answered
# the note's transaction), <path>.<Type>.sent (LEDGER/ONCE: the ledger says sent, the POST not yet made),
# <path>.end (filed, not recorded); <path> is `addendum` (an answer to a question) or `correction` (a new version).
FOLLOWUP_POINTS = ("followup.Communication.sent", "followup.written", "followup.end") + tuple(
    f"{path}.{at}" for path in ("addendum", "correction")
    for at in ("committed", "DocumentReference.sent", "Provenance.sent", "end"))
POINTS = ("intake.opened", "order.written", "receive.written", "receive.accepted", "file.committed",
          "file.DocumentReference.sent", "file.Provenance.sent") + SUPPLEMENT_POINTS + FOLLOWUP_POINTS + tuple(
    f"{step}.{at}" for step in WORK_STEPS for at in ("begin", "end", "recorded"))

_hits: dict[str, int] = {}
_lock = threading.Lock()


def crash_point(name: str) -> None:
    spec = os.environ.get(VARIABLE)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        hit = _hits[name]
    if hit == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
