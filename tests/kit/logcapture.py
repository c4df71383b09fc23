"""fhirbridge's own log handler on the root logger, writing JSON into a buffer, with the root logger put back
afterwards: what `serve` and `worker` log, as a test can read it."""
from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator

from fhirbridge.ops import logs


@contextlib.contextmanager
def captured_logs(level: str) -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buf = io.StringIO()
    logs.setup(level=level, fmt="json", stream=buf)
    try:
        yield buf
    finally:
        for h in list(root.handlers):
            if getattr(h, "_fhirbridge", False):
                root.removeHandler(h)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def lines(buf: io.StringIO) -> list[dict]:
    """The JSON log lines written so far."""
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]
