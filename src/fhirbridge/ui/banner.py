"""The dashboard's banner: which EHR, PACS or reviewer endpoint (or the store, or a key file) the service cannot use
right now, from the very checks and cache of `/readyz` (service/health.py `readiness`, handed to the pages by
the service as `app.extensions["fhirbridge.readiness"]`: the pages may not import the service).

A page view never waits on the network beyond the first one: when the cached result is older than its 5 s the
check runs again in a background thread and this view shows the last result; only a worker's first view, with
nothing known yet, waits for it (at most a second, then shows no banner).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from flask import current_app

FRESH_SECONDS = 5.0
_lock = threading.Lock()


def problems() -> list[tuple[str, str]]:
    """(what, why) of every check that is not ok: ("EHR of North Hospital", "unreachable: ConnectionError")."""
    check: Callable[[], tuple[dict, int]] | None = current_app.extensions.get("fhirbridge.readiness")
    if check is None:
        return []
    cache = current_app.extensions.setdefault("fhirbridge.ready", {})
    result = cache.get("result")
    if result is None or time.monotonic() - result[0] >= FRESH_SECONDS:
        worker = _refresh(check, cache)
        if result is None and worker is not None:
            worker.join(timeout=1.0)
        result = cache.get("result")
    if result is None:
        return []
    return [(_label(name), why) for name, why in result[1].get("checks", {}).items() if why != "ok"]


def _refresh(check: Callable[[], tuple[dict, int]], cache: dict) -> threading.Thread | None:
    with _lock:
        running = cache.get("banner_refresh")
        if running is not None and running.is_alive():
            return running
        worker = threading.Thread(target=check, name="fhirbridge-banner-check", daemon=True)
        cache["banner_refresh"] = worker
        worker.start()
        return worker


def _label(name: str) -> str:
    if name.startswith("ehr:"):
        return f"The EHR of {name[4:]}"
    if name.startswith("pacs:"):
        return f"The PACS of {name[5:]}"
    if name.startswith("reviewer:"):
        return f"The endpoint of reviewer {name[9:]}"
    return {"store": "The Case store", "keys": "Key files"}.get(name, name)
