"""Deliver a sealed package to its reviewer.

outbox: a directory (a shared folder, an SFTP drop). The package appears atomically: it is copied into a
hidden `.partial-<id>` directory, flushed, then renamed to `<id>`; a watcher never sees half a package.

https: each file is POSTed to the reviewer's URL with an `Idempotency-Key` (package id + file name), so a
retry after a lost response cannot create a second copy at the reviewer. Attachments go first and
`package.jwe` last: its arrival tells the reviewer the package is complete.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .config import Reviewer
from .envelope import ENVELOPE_FILE
from .errors import FhirbridgeError


class DeliveryError(FhirbridgeError):
    def __init__(self, message: str, *, transient: bool):
        self.transient = transient
        super().__init__(message)


def deliver(reviewer: Reviewer, package_dir: Path, package_id: str) -> dict:
    if reviewer.transport.type == "outbox":
        return _to_outbox(reviewer.transport.path, package_dir, package_id)
    return _to_https(reviewer, package_dir, package_id)


def package_files(package_dir: Path) -> list[Path]:
    files = sorted(p for p in package_dir.rglob("*") if p.is_file() and p.name != ENVELOPE_FILE)
    return files + [package_dir / ENVELOPE_FILE]


def _to_outbox(outbox: Path, package_dir: Path, package_id: str) -> dict:
    final = outbox / package_id
    if final.exists():
        return {"transport": "outbox", "path": str(final), "already_delivered": True}
    try:
        outbox.mkdir(parents=True, exist_ok=True)
        partial = outbox / f".partial-{package_id}"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(package_dir, partial)
        for f in package_files(partial):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(partial, final)
    except OSError as exc:
        raise DeliveryError(f"cannot write to outbox {outbox}: {exc.strerror}", transient=True) from None
    return {"transport": "outbox", "path": str(final)}


def _session() -> requests.Session:
    # POST is safe to retry here: the reviewer deduplicates on Idempotency-Key.
    retry = Retry(total=4, backoff_factor=0.5, status_forcelist=(429, 502, 503, 504),
                  allowed_methods=None, respect_retry_after_header=True, raise_on_status=False)
    s = requests.Session()
    s.mount("https://", HTTPAdapter(max_retries=retry))
    s.mount("http://", HTTPAdapter(max_retries=retry))
    return s


def _to_https(reviewer: Reviewer, package_dir: Path, package_id: str) -> dict:
    url = reviewer.transport.url
    headers = {"Content-Type": "application/jose+json", "X-Fhirbridge-Package": package_id}
    if reviewer.transport.token:
        headers["Authorization"] = f"Bearer {reviewer.transport.token}"
    sent = 0
    with _session() as s:
        for f in package_files(package_dir):
            rel = f.relative_to(package_dir).as_posix()
            h = {**headers, "Idempotency-Key": f"{package_id}/{rel}", "X-Fhirbridge-File": rel}
            try:
                with open(f, "rb") as body:
                    r = s.post(url, data=body, headers=h, timeout=(5, 120))
            except requests.RequestException as exc:
                raise DeliveryError(f"cannot reach reviewer {reviewer.name} at {url}: {exc.__class__.__name__}",
                                    transient=True) from None
            if r.status_code == 409 or 200 <= r.status_code < 300:
                sent += 1
                continue
            transient = r.status_code in (408, 429) or r.status_code >= 500
            raise DeliveryError(f"reviewer {reviewer.name} answered {r.status_code} to {rel}", transient=transient)
    return {"transport": "https", "url": url, "files": sent}
