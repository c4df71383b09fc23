"""Deliver a sealed package to its reviewer.

outbox: a directory (a shared folder, an SFTP drop). The package appears atomically: it is copied into a
hidden `.partial-<id>` directory, flushed, then renamed to `<id>`; a watcher never sees half a package.

https: each file is POSTed to the reviewer's URL with an `Idempotency-Key` (package id + file name), so a
retry after a lost response cannot create a second copy at the reviewer. Attachments go first and
`package.jwe` last: its arrival tells the reviewer the package is complete. Only 2xx (stored) and 409
(already stored under that key) count as delivered; a redirect is a permanent error, never followed.
429/502/503/504 are retried a few times within the run, honouring Retry-After (RFC 9110 section 10.2.3) up
to MAX_RETRY_AFTER; a longer one ends the attempt and the Case waits for a later run.
"""
from __future__ import annotations

import os
import shutil
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from fhirbridge.config.model import Reviewer
from fhirbridge.crypto import files
from fhirbridge.errors import FhirbridgeError
from fhirbridge.exchange.envelope import ENVELOPE_FILE
from fhirbridge.fhir.unreachable import why_unreachable


class DeliveryError(FhirbridgeError):
    def __init__(self, message: str, *, transient: bool):
        self.transient = transient
        super().__init__(message)


def deliver(reviewer: Reviewer, package_dir: Path, package_id: str) -> dict:
    if reviewer.transport.type == "outbox":
        assert reviewer.transport.path is not None  # the loader gives every outbox a path
        return _to_outbox(reviewer.transport.path, package_dir, package_id)
    if reviewer.transport.type == "pull":
        # Nothing to send: the sealed package waits in the Case directory for the reviewer API.
        return {"transport": "pull", "available": True}
    return _to_https(reviewer, package_dir, package_id)


def package_files(package_dir: Path) -> list[Path]:
    files = sorted(p for p in package_dir.rglob("*") if p.is_file() and p.name != ENVELOPE_FILE)
    return files + [package_dir / ENVELOPE_FILE]


def _to_outbox(outbox: Path, package_dir: Path, package_id: str) -> dict:
    final = outbox / package_id
    if final.exists():
        return {"transport": "outbox", "path": str(final), "already_delivered": True}
    try:
        files.private_dir(outbox)
        partial = outbox / f".partial-{package_id}"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(package_dir, partial)
        # copytree copies the Case folder's modes; a package sealed by an older version was 0755/0644.
        files.narrow_tree(partial, warn=False)
        for f in package_files(partial):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(partial, final)
    except OSError as exc:
        raise DeliveryError(f"cannot write to outbox {outbox}: {exc.strerror}", transient=True) from None
    return {"transport": "outbox", "path": str(final)}


# Status retries are done here, not by urllib3, so that a Retry-After longer than a run should wait ends the
# attempt at once instead of blocking the run (urllib3 would sleep whatever the server asks: a day, say).
RETRY_STATUSES = frozenset({429, 502, 503, 504})
RETRIES = 4                 # further attempts per file after the first, for the statuses above
BACKOFF = 0.5               # seconds, doubled per attempt, when the reviewer gives no Retry-After
MAX_RETRY_AFTER = 30.0      # the longest wait honoured within a run; a longer one leaves it to a later run
MAX_TOTAL_WAIT = 120.0      # all waits of one delivery together: a flaky reviewer cannot hold a run for long


def _session() -> requests.Session:
    # Connection failures only (nothing reached the reviewer, or the POST is repeated under the same
    # Idempotency-Key, which the reviewer deduplicates on); statuses and redirects are handled in _post.
    retry = Retry(total=RETRIES, connect=RETRIES, read=RETRIES, status=0, redirect=0, other=0,
                  allowed_methods=None, backoff_factor=BACKOFF, raise_on_status=False,
                  raise_on_redirect=False, respect_retry_after_header=False)
    s = requests.Session()
    s.mount("https://", HTTPAdapter(max_retries=retry))
    s.mount("http://", HTTPAdapter(max_retries=retry))
    return s


def _retry_after(response: requests.Response) -> float | None:
    """Retry-After in seconds (RFC 9110 section 10.2.3: delta-seconds or an HTTP-date), uncapped: the caller
    decides; None when absent or unparseable (our own backoff applies then)."""
    value = (response.headers.get("Retry-After") or "").strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 section 5.6.7: HTTP-dates are in GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _where(location: str | None) -> str:
    """A redirect target, safe to show: scheme, host and path only (a query or userinfo may hold a token)."""
    if not location:
        return "nowhere (no Location header)"
    try:
        parts = urlsplit(location)
        port = parts.port
    except ValueError:  # the header is the reviewer's text, not necessarily a valid URL
        return "an invalid Location"
    if not parts.scheme and not parts.netloc:
        return repr(parts.path[:200])
    return repr(f"{parts.scheme}://{parts.hostname or ''}{f':{port}' if port else ''}{parts.path}"[:200])


class _Budget:
    def __init__(self, seconds: float):
        self.left = seconds


def _post(s: requests.Session, reviewer: Reviewer, url: str, f: Path, headers: dict, rel: str,
          budget: _Budget) -> requests.Response:
    for attempt in range(RETRIES + 1):
        try:
            with open(f, "rb") as body:
                # No redirects: requests would turn a 302 into a GET of wherever it points (a login page
                # answering 200), which looked like a delivery; and a package must never follow a
                # redirect to an address the hospital did not configure.
                r = s.post(url, data=body, headers=headers, timeout=(5, 120), allow_redirects=False)
        except requests.RequestException as exc:
            raise DeliveryError(f"cannot reach reviewer {reviewer.name} at {url}: {why_unreachable(exc, url)}",
                                transient=True) from None
        if r.status_code not in RETRY_STATUSES:
            return r
        wait = _retry_after(r)
        r.close()
        if wait is not None and wait > MAX_RETRY_AFTER:
            raise DeliveryError(f"reviewer {reviewer.name} answered {r.status_code} to {rel} and asks to retry "
                                f"after {wait:.0f} s (more than the {MAX_RETRY_AFTER:.0f} s a run waits); "
                                "a later run will try again", transient=True)
        if attempt == RETRIES:
            return r
        pause = wait if wait is not None else min(BACKOFF * 2 ** attempt, MAX_RETRY_AFTER)
        if pause > budget.left:
            raise DeliveryError(f"reviewer {reviewer.name} answered {r.status_code} to {rel}; this run has waited "
                                f"{MAX_TOTAL_WAIT:.0f} s for it already, a later run will try again", transient=True)
        budget.left -= pause
        time.sleep(pause)
    raise AssertionError("unreachable")


def _to_https(reviewer: Reviewer, package_dir: Path, package_id: str) -> dict:
    url = reviewer.transport.url
    assert url is not None  # the loader requires it of https
    headers = {"Content-Type": "application/jose+json", "X-Fhirbridge-Package": package_id}
    if reviewer.transport.token:
        headers["Authorization"] = f"Bearer {reviewer.transport.token}"
    sent = 0
    budget = _Budget(MAX_TOTAL_WAIT)
    with _session() as s:
        for f in package_files(package_dir):
            rel = f.relative_to(package_dir).as_posix()
            h = {**headers, "Idempotency-Key": f"{package_id}/{rel}", "X-Fhirbridge-File": rel}
            r = _post(s, reviewer, url, f, h, rel, budget)
            if r.status_code == 409 or 200 <= r.status_code < 300:
                sent += 1
                continue
            if 300 <= r.status_code < 400:
                # Permanent: the configured URL is wrong (moved, or behind a login); someone must correct it.
                raise DeliveryError(f"reviewer {reviewer.name} URL {url} redirects ({r.status_code}) to "
                                    f"{_where(r.headers.get('Location'))}; nothing is sent to a redirected "
                                    "address: correct reviewers.transport.url", transient=False)
            transient = r.status_code in (408, 429) or r.status_code >= 500
            raise DeliveryError(f"reviewer {reviewer.name} answered {r.status_code} to {rel}", transient=transient)
    return {"transport": "https", "url": url, "files": sent}
