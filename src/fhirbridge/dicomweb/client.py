"""DICOMweb client for one PACS (DICOM PS3.18): QIDO-RS search, WADO-RS retrieve, STOW-RS store.

Conventions as fhir/client.py: one `requests.Session` with a urllib3 Retry adapter (429/502/503/504 and
connection failures retried with backoff, honouring a capped Retry-After; read timeouts retried only for
GET; POST retried only on 429/503, which say nothing was processed) and explicit (connect, read) timeouts
on every request. Every failure becomes a DicomwebError whose `transient` tells the caller whether a later
run may succeed (errors.py lists the kinds).

Retrieval (PS3.18 10.4, WADO-RS "Retrieve Instance Resources" for a study or a series):
- asks for `multipart/related; type="application/dicom"; transfer-syntax=*` (PS3.18 8.7.3.5.2 / 10.4.1.1.2):
  "*" means the origin server's stored transfer syntax, so the bytes are the PACS's own (never a lossy
  transcoding);
- streams the answer part by part (multipart.py) into files created 0600 inside a 0700 staging folder whose
  name starts with ".partial-", hashing each instance (SHA-256) as it is written: the answer is never held
  in memory whatever its size;
- checks every part: media type application/dicom, the 128-byte preamble then "DICM" (PS3.10 7.1), and a
  header pydicom can read (stop_before_pixels) whose Study/Series Instance UIDs are the ones asked for;
- checks the instances against the QIDO-RS list (PS3.18 10.6) of the same study/series: same SOP Instance
  UIDs, none missing, none extra;
- only then renames the staging folder to its final name (`<into>/<study>/<series>/<sop>.dcm`). On any error
  the staging folder is removed, so nothing partial ever carries a final name.

Messages name the interaction and UIDs, never header values (a patient's name or ID lives in every header).
"""
from __future__ import annotations

import hashlib
import http
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

import pydicom
import requests
from pydicom.errors import InvalidDicomError
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from fhirbridge import jsonutil
from fhirbridge.crypto import files
from fhirbridge.dicomweb.errors import DicomwebError
from fhirbridge.dicomweb.multipart import MultipartBody, PartSink, boundary_of, new_boundary, read_parts

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"          # PS3.18 8.7.3.1 / F.2: the QIDO-RS and STOW-RS answers
DICOM = "application/dicom"                     # PS3.18 8.7.3.5: a DICOM part-10 instance
# PS3.18 8.7.3.5.2: "transfer-syntax=*" asks for the instance as stored, in whatever transfer syntax it has.
RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRY_STATUSES = frozenset({429, 502, 503, 504})
NOT_PROCESSED_STATUSES = frozenset({429, 503})   # RFC 6585 4, RFC 9110 15.6.4: safe to repeat even a POST
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")     # PS3.5 9.1: digits and dots, at most 64 characters
_HASH_AHEAD = 8                                  # pieces of an answer (of up to chunk_size) awaiting their hash
_PREAMBLE = 128                                  # PS3.10 7.1: 128-byte preamble, then "DICM"
# Read once per instance, as it arrives: what the checks need and what collect records (InstanceNumber for the
# order, ImageType for localizers), so no caller reads the header a second time.
_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                "NumberOfFrames", "InstanceNumber", "ImageType"]


@dataclass(frozen=True)
class Instance:
    """One retrieved (or stored) instance: where it is, what it is, and its bytes' SHA-256 (hex)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    modality: str
    frames: int
    path: Path
    size: int
    sha256: str
    number: int = 0                      # InstanceNumber (0 when absent or unreadable)
    image_type: tuple[str, ...] = ()     # ImageType's values (PS3.3 C.7.6.1.1.2)


@dataclass
class Retrieved:
    """A study or series retrieved in full: `folder` is final only once everything in it was checked."""

    study_instance_uid: str
    series_instance_uid: str | None
    folder: Path
    instances: list[Instance] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(i.size for i in self.instances)

    def series(self) -> dict[str, list[Instance]]:
        out: dict[str, list[Instance]] = {}
        for instance in self.instances:
            out.setdefault(instance.series_instance_uid, []).append(instance)
        return out


@dataclass
class StoreResult:
    """A STOW-RS answer (PS3.18 10.5.3): the SOP Instance UIDs stored, and those refused with their reason."""

    stored: list[str]
    failed: dict[str, int]
    status: int


class PacsRetry(Retry):
    """urllib3 Retry with a cap on Retry-After and per-method status retries (see the module docstring)."""

    def __init__(self, *args: Any, max_retry_after: float = 30.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_retry_after = max_retry_after

    def new(self, **kw: Any) -> PacsRetry:
        kw.setdefault("max_retry_after", self.max_retry_after)
        return super().new(**kw)

    def parse_retry_after(self, retry_after: str) -> float:
        try:
            seconds = super().parse_retry_after(retry_after)  # RFC 9110 10.2.3
        except InvalidHeader:
            return 0.0
        return min(seconds, self.max_retry_after)

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        if status_code not in self.status_forcelist:
            return False
        # A STOW-RS POST after a 502/504 may have been stored; a repeat is harmless for DICOM (same SOP
        # Instance UID) but is left to the caller, who checks what the PACS has (as for FHIR creates).
        return method.upper() in IDEMPOTENT_METHODS or status_code in NOT_PROCESSED_STATUSES


class DicomwebClient:
    """Client for one DICOMweb service (`base_url`, e.g. "https://pacs.example.org/dicom-web").

    `auth` is a requests auth (dicomweb.auth.make_auth). One client per thread (a requests Session is not
    meant to be shared); `close()` or a with-block ends it. A retrieval lists the instances on a helper
    thread with a second Session of its own, so a token source given as `auth` must be thread-safe.
    """

    def __init__(self, base_url: str, *, auth: requests.auth.AuthBase | None = None,
                 timeout: tuple[float, float] = (5.0, 60.0), retries: int = 4, backoff: float = 0.5,
                 max_retry_after: float = 30.0, chunk_size: int = 1024 * 1024, page_size: int = 1000,
                 fsync: bool = True, user_agent: str = "fhirbridge/0.1"):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("DICOMweb base URL must be an absolute http(s) URL")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.page_size = page_size
        self.fsync = fsync
        self._settings: dict[str, Any] = dict(auth=auth, timeout=timeout, retries=retries, backoff=backoff,
                                              max_retry_after=max_retry_after, page_size=page_size,
                                              user_agent=user_agent)
        self._lister: DicomwebClient | None = None   # the QIDO-RS helper of _retrieve (its own Session)
        retry = PacsRetry(
            total=retries, connect=retries, read=retries, status=retries, other=0,
            allowed_methods=IDEMPOTENT_METHODS, status_forcelist=RETRY_STATUSES,
            backoff_factor=backoff, backoff_max=max(backoff, max_retry_after),
            respect_retry_after_header=True, raise_on_status=False, max_retry_after=max_retry_after)
        self._session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers.update({"User-Agent": user_agent})
        self._session.auth = auth

    def close(self) -> None:
        if self._lister is not None:
            self._lister.close()
        self._session.close()

    def __enter__(self) -> DicomwebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DicomwebClient({self.base_url!r})"

    # ------------------------------------------------------------------ QIDO-RS (PS3.18 10.6)

    def search_studies(self, params: dict[str, str] | None = None) -> list[dict]:
        """GET {base}/studies: matching studies as DICOM JSON objects (PS3.18 F.2)."""
        return self._qido("studies", params, "0020000D")

    def search_series(self, study_uid: str, params: dict[str, str] | None = None) -> list[dict]:
        """GET {base}/studies/{study}/series."""
        return self._qido(f"studies/{_uid(study_uid)}/series", params, "0020000E")

    def search_instances(self, study_uid: str, series_uid: str | None = None,
                         params: dict[str, str] | None = None) -> list[dict]:
        """GET {base}/studies/{study}[/series/{series}]/instances."""
        path = f"studies/{_uid(study_uid)}" + (f"/series/{_uid(series_uid)}" if series_uid else "")
        return self._qido(path + "/instances", params, "00080018")

    def _qido(self, path: str, params: dict[str, str] | None, key: str) -> list[dict]:
        """Every match across pages: `limit`/`offset` (PS3.18 8.3.4.4), until a short page. A PACS that
        ignores `offset` would repeat its first page forever: a page with nothing new ends the search."""
        what = f"QIDO-RS {_shape(path)}"
        results: list[dict] = []
        seen: set[str] = set()
        offset = 0
        while True:
            query = {**(params or {}), "limit": str(self.page_size), "offset": str(offset)}
            resp = self._request("GET", path, what, params=query, headers={"Accept": DICOM_JSON})
            page = self._json(resp, what)
            if page is None:           # 204 No Content: nothing matches (PS3.18 10.6.3.2)
                page = []
            if not isinstance(page, list) or not all(isinstance(item, dict) for item in page):
                raise DicomwebError(f"PACS answered {what} with something other than a DICOM JSON array",
                                    kind="refused", status=resp.status_code)
            fresh = [item for item in page if _first(item, key) not in seen]
            for item in fresh:
                seen.add(_first(item, key) or "")
            results += fresh
            if len(page) < self.page_size or not fresh:
                return results
            offset += len(page)

    # ------------------------------------------------------------------ WADO-RS (PS3.18 10.4)

    def retrieve_series(self, study_uid: str, series_uid: str, into: Path, *,
                        max_bytes: int | None = None, expected: set[str] | int | None = None) -> Retrieved:
        """Every instance of one series into `into/<study>/<series>/<sop>.dcm` (see the module docstring).

        The series folder is what becomes final; `into/<study>` is only its container (made 0700 first),
        so a study is complete only when retrieve_study() named it, never because its folder exists.

        `expected`: what the answer is checked against. None asks QIDO-RS for the series' instances (10.6);
        a caller that already has the SOP Instance UIDs (a set), or the series' number of instances from a
        series-level QIDO-RS (NumberOfSeriesRelatedInstances, an int), gives them, and the instance-level
        search is not made (on Orthanc it costs about as much as a tenth of the download, on the same CPUs)."""
        study, series = _uid(study_uid), _uid(series_uid)
        parent = files.private_dir(into / study)
        return self._retrieve(f"studies/{study}/series/{series}", study, series, parent, parent / series,
                              max_bytes, expected)

    def retrieve_study(self, study_uid: str, into: Path, *, max_bytes: int | None = None) -> Retrieved:
        """Every instance of a study into `into/<study>/<series>/<sop>.dcm`."""
        study = _uid(study_uid)
        parent = files.private_dir(into)
        return self._retrieve(f"studies/{study}", study, None, parent, parent / study, max_bytes, None)

    def expected_instances(self, study: str, series: str | None) -> set[str]:
        """The SOP Instance UIDs QIDO-RS lists for a study or series; none is DicomwebError "not-found"."""
        listed = self.search_instances(study, series)
        uids = {_first(item, "00080018") for item in listed}
        uids.discard(None)
        if not uids:
            what = f"series {series} of study {study}" if series else f"study {study}"
            raise DicomwebError(f"the PACS has no instances of {what}", kind="not-found")
        return {u for u in uids if u}

    def _retrieve(self, path: str, study: str, series: str | None, parent: Path, final: Path,
                  max_bytes: int | None, expected: set[str] | int | None) -> Retrieved:
        what = f"WADO-RS {_shape(path)}"
        # A crash mid-download leaves a ".partial-" folder (or, mid-replacement, an ".old-" one), never one
        # under the final name: sweep those of this same target first (ours: the same series, same place).
        for prefix in (".partial-", ".old-"):
            for stale in parent.glob(f"{prefix}{final.name}-*"):
                files.remove_tree(stale)
        staging = files.private_dir(parent / f".partial-{final.name}-{secrets.token_hex(4)}")
        # Two helper threads: the QIDO-RS list (10.6), needed only to check the result, is asked for on a
        # second connection while the WADO-RS answer streams in (bench: 0.7 s of a 150 MiB series on
        # Orthanc); each finished instance is fsynced while the next one arrives.
        # A third: each part's SHA-256 is computed beside the parsing of the answer (hashlib releases the GIL),
        # in order, on one thread of its own.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dicomweb-qido") as lister, \
                ThreadPoolExecutor(max_workers=2, thread_name_prefix="dicomweb-fsync") as syncer, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="dicomweb-sha256") as hasher:
            try:
                writer = _SeriesWriter(staging, study, series, max_bytes=max_bytes,
                                       syncer=syncer if self.fsync else None, hasher=hasher)
                listing: Future = lister.submit(self._listing_client().expected_instances, study, series) \
                    if expected is None else _done(expected)
                try:
                    self._stream_into(path, what, writer)
                    writer.complete()
                except BaseException as exc:
                    writer.abort()
                    # A study the PACS does not have: say so (its WADO-RS error may be anything).
                    listed_error = listing.exception()
                    if isinstance(exc, DicomwebError) and isinstance(listed_error, DicomwebError) \
                            and listed_error.kind == "not-found":
                        raise listed_error from exc
                    raise
                self._finish(what, writer, listing.result(), staging, parent, final)
            except BaseException:
                files.remove_tree(staging)
                raise
        instances = [_moved(i, staging, final) for i in writer.instances]
        return Retrieved(study_instance_uid=study, series_instance_uid=series, folder=final, instances=instances)

    def _finish(self, what: str, writer: _SeriesWriter, expected: set[str] | int, staging: Path, parent: Path,
                final: Path) -> None:
        """Compare with the QIDO-RS list (or count), then give the staging folder its final name."""
        got = {i.sop_instance_uid for i in writer.instances}
        if isinstance(expected, int):
            if len(got) != expected:
                raise DicomwebError(f"PACS answered {what} with {len(got)} instances where its QIDO-RS search "
                                    f"counts {expected}", kind="mismatch")
        elif (missing := expected - got) | (extra := got - expected):
            raise DicomwebError(f"PACS answered {what} with {len(got)} instances where its QIDO-RS search "
                                f"lists {len(expected)} ({len(missing)} missing, {len(extra)} not listed)",
                                kind="mismatch")
        # Verified: the staging folder takes the final name (replacing an earlier complete copy).
        if final.exists():
            old = parent / f".old-{final.name}-{secrets.token_hex(4)}"
            final.rename(old)
            staging.rename(final)
            files.remove_tree(old)
        else:
            staging.rename(final)
        if self.fsync:
            files.fsync_dir(parent)

    def _stream_into(self, path: str, what: str, writer: _SeriesWriter) -> None:
        resp = self._request("GET", path, what, headers={"Accept": RETRIEVE_ACCEPT}, stream=True)
        try:
            boundary = boundary_of(resp.headers.get("Content-Type") or "")
            read_parts(self._chunks(resp, what), boundary, writer.open_part)
        finally:
            resp.close()

    def _listing_client(self) -> DicomwebClient:
        if self._lister is None:
            self._lister = DicomwebClient(self.base_url, chunk_size=self.chunk_size, fsync=self.fsync,
                                          **self._settings)
        return self._lister

    def _chunks(self, resp: requests.Response, what: str) -> Iterator[bytes]:
        try:
            yield from resp.iter_content(self.chunk_size)
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as exc:
            raise DicomwebError(f"PACS's answer to {what} broke off before its end ({type(exc).__name__})",
                                kind="truncated") from exc
        except requests.RequestException as exc:   # a read timeout or a reset mid-answer
            raise DicomwebError(f"PACS's answer to {what} broke off ({type(exc).__name__}); timeouts "
                                f"{self.timeout[0]:g}s connect, {self.timeout[1]:g}s read", kind="truncated") from exc

    # ------------------------------------------------------------------ STOW-RS (PS3.18 10.5)

    def store(self, paths: Sequence[Path], *, study_uid: str | None = None) -> StoreResult:
        """POST the DICOM part-10 files `paths` in one streamed multipart/related request; every SOP Instance
        UID sent must come back in the answer's ReferencedSOPSequence, else DicomwebError (kind "refused"
        when the PACS says it failed them, "mismatch" when it is silent about some)."""
        sent: list[str] = []
        for file in paths:
            header = _read_header(file, f"file {file.name}")
            sent.append(_header_uid(header, "SOPInstanceUID"))
        path = f"studies/{_uid(study_uid)}" if study_uid else "studies"
        what = f"STOW-RS {_shape(path)} ({len(sent)} instances)"
        body = MultipartBody(list(paths), boundary=new_boundary())
        headers = {"Content-Type": f'multipart/related; type="{DICOM}"; boundary={body.boundary}',
                   "Accept": DICOM_JSON}
        try:
            resp = self._request("POST", path, what, data=body, headers=headers, ok_statuses=(409,))
        finally:
            body.close()
        answer = self._json(resp, what) or {}
        if not isinstance(answer, dict):
            raise DicomwebError(f"PACS answered {what} with something other than a DICOM JSON object",
                                kind="refused", status=resp.status_code)
        stored = [u for u in (_first(item, "00081155") for item in _sequence(answer, "00081199")) if u]
        failed: dict[str, int] = {}
        for item in _sequence(answer, "00081198"):
            uid = _first(item, "00081155")
            if uid:
                reason = _first(item, "00081197")
                failed[uid] = int(reason) if isinstance(reason, int | float) else 0
        result = StoreResult(stored=stored, failed=failed, status=resp.status_code)
        if failed or resp.status_code == 409:
            # PS3.18 10.5.3: 409 all failed, 202 some failed (FailedSOPSequence with PS3.4 failure reasons).
            raise DicomwebError(f"PACS refused {len(failed) or len(sent)} of the {len(sent)} instances of {what} "
                                f"(HTTP {resp.status_code})", kind="refused", status=resp.status_code)
        unconfirmed = set(sent) - set(stored)
        if unconfirmed:
            raise DicomwebError(f"PACS answered {what} without confirming {len(unconfirmed)} of the instances",
                                kind="mismatch", status=resp.status_code)
        return result

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, what: str, *, params: Any = None, data: Any = None,
                 headers: dict | None = None, stream: bool = False,
                 ok_statuses: Iterable[int] = ()) -> requests.Response:
        url = f"{self.base_url}/{path}"
        started = time.monotonic()
        try:
            resp = self._session.request(method, url, params=params, data=data, headers=headers,
                                         timeout=self.timeout, stream=stream)
        except requests.exceptions.ChunkedEncodingError as exc:
            raise DicomwebError(f"PACS's answer to {what} broke off before its end", kind="truncated") from exc
        except (requests.Timeout, requests.ConnectionError) as exc:
            # requests raises ConnectionError, not Timeout, for a read timeout once urllib3's retries are spent.
            if isinstance(exc, requests.Timeout) or _cause(exc) in ("ReadTimeoutError", "ConnectTimeoutError"):
                raise DicomwebError(f"PACS did not answer {what} in time (timeouts {self.timeout[0]:g}s connect, "
                                    f"{self.timeout[1]:g}s read)", kind="unavailable") from exc
            raise DicomwebError(f"could not reach the PACS at {self.base_url} for {what} ({_cause(exc)})",
                                kind="unavailable") from exc
        except requests.RequestException as exc:
            raise DicomwebError(f"request {what} to the PACS failed ({type(exc).__name__})", kind="refused") from exc
        log.debug("%s -> %s in %.0f ms", what, resp.status_code, (time.monotonic() - started) * 1000)
        if not 200 <= resp.status_code < 300 and resp.status_code not in set(ok_statuses):
            try:
                raise _error(resp, what)
            finally:
                resp.close()
        return resp

    def _json(self, resp: requests.Response, what: str) -> Any:
        try:
            content = resp.content
        except requests.RequestException as exc:
            raise DicomwebError(f"PACS's answer to {what} broke off ({type(exc).__name__})",
                                kind="truncated") from exc
        if resp.status_code == 204 or not content.strip():
            return None
        try:
            return jsonutil.loads(content)
        except ValueError:
            raise DicomwebError(f"PACS answered {what} with a body that is not valid JSON",
                                kind="refused", status=resp.status_code) from None


class _SeriesWriter:
    """The sink factory for read_parts: one private temp file per part, checked, then named by its UID.

    With a `syncer` (a thread pool), each finished file is fsynced and closed there while the next part
    arrives; `complete()` waits for all of them and syncs the folders, so the rename that follows publishes
    only data that is on disk."""

    def __init__(self, staging: Path, study: str, series: str | None, *, max_bytes: int | None,
                 syncer: ThreadPoolExecutor | None, hasher: ThreadPoolExecutor | None = None):
        self.staging, self.study, self.series = staging, study, series
        self.max_bytes, self.syncer, self.hasher = max_bytes, syncer, hasher
        self.instances: list[Instance] = []
        self.total = 0
        self.current: _PartFile | None = None
        self._seen: set[str] = set()
        self._folders: set[Path] = {staging}
        self._pending: list[Future] = []

    def open_part(self, headers: dict[str, str]) -> PartSink:
        media = (headers.get("content-type") or DICOM).split(";")[0].strip().lower()
        if media != DICOM:
            raise DicomwebError(f"the PACS sent a part of type {media[:60]!r} where DICOM ({DICOM}) was asked for",
                                kind="not-dicom")
        self.current = _PartFile(self, self.staging / f"part-{len(self.instances) + 1:06d}.tmp")
        return self.current

    def release(self, file: BinaryIO) -> None:
        """A finished file: fsynced and closed on the syncer, else closed now."""
        if self.syncer is None:
            file.close()
        else:
            self._pending.append(self.syncer.submit(_sync_and_close, file))

    def complete(self) -> None:
        for future in self._pending:
            future.result()
        if self.syncer is not None:
            for folder in self._folders:
                files.fsync_dir(folder)

    def abort(self) -> None:
        if self.current is not None and self.current.file is not None:
            self.current.file.close()
        for future in self._pending:
            future.exception()   # wait: no thread may still hold a file of the folder about to be removed

    def add(self, tmp: Path, size: int, digest: str) -> None:
        header = _read_header(tmp, f"part {len(self.instances) + 1}")
        sop = _header_uid(header, "SOPInstanceUID")
        study = _header_uid(header, "StudyInstanceUID")
        series = _header_uid(header, "SeriesInstanceUID")
        if study != self.study or (self.series is not None and series != self.series):
            raise DicomwebError(f"the PACS sent instance {sop} of series {series} (study {study}) in its answer "
                                f"for {'series ' + self.series if self.series else 'study ' + self.study}",
                                kind="mismatch")
        if sop in self._seen:
            raise DicomwebError(f"the PACS sent instance {sop} twice", kind="mismatch")
        self._seen.add(sop)
        folder = self.staging if self.series is not None else files.private_dir(self.staging / series)
        self._folders.add(folder)
        target = folder / f"{sop}.dcm"
        tmp.rename(target)
        meta = getattr(header, "file_meta", None)
        self.instances.append(Instance(
            sop_instance_uid=sop, sop_class_uid=str(header.get("SOPClassUID", "")),
            series_instance_uid=series, study_instance_uid=study,
            transfer_syntax_uid=str(getattr(meta, "TransferSyntaxUID", "") or ""),
            modality=str(header.get("Modality", "")), frames=_frames(header),
            path=target, size=size, sha256=digest, number=_number(header), image_type=_image_type(header)))


class _PartFile:
    """One part being written: hashed and size-checked as it arrives; "DICM" checked after 132 bytes."""

    def __init__(self, writer: _SeriesWriter, path: Path):
        self.writer, self.path = writer, path
        self.file: BinaryIO | None = files.open_private(path, exclusive=True)
        self.sha = hashlib.sha256()
        self.hashing: deque[Future] = deque()
        self.size = 0
        self.head: bytearray | None = bytearray()   # the first 132 bytes, until the preamble is checked

    def write(self, data: bytes) -> None:
        assert self.file is not None
        if self.head is not None:
            self.head += data[:_PREAMBLE + 4 - len(self.head)]
            if len(self.head) >= _PREAMBLE + 4:
                _check_preamble(bytes(self.head), self.writer)   # before writing a byte more of a non-DICOM part
                self.head = None
        self.file.write(data)
        if self.writer.hasher is None:
            self.sha.update(data)
        else:
            # `data` is a bytes object of its own (multipart.read_parts), so it may be hashed after this returns;
            # at most _HASH_AHEAD pieces wait, so memory stays bounded when the hash falls behind.
            if len(self.hashing) >= _HASH_AHEAD:
                self.hashing.popleft().result()
            self.hashing.append(self.writer.hasher.submit(self.sha.update, data))
        self.size += len(data)
        self.writer.total += len(data)
        if self.writer.max_bytes is not None and self.writer.total > self.writer.max_bytes:
            raise DicomwebError(f"the retrieval is over its cap of {self.writer.max_bytes} bytes", kind="too-large")

    def finish(self) -> None:
        assert self.file is not None
        if self.head is not None:
            _check_preamble(bytes(self.head), self.writer)   # shorter than a preamble: fails
        self.file.flush()
        file, self.file = self.file, None
        self.writer.release(file)
        self.writer.current = None
        while self.hashing:
            self.hashing.popleft().result()
        self.writer.add(self.path, self.size, self.sha.hexdigest())


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _sync_and_close(file: BinaryIO) -> None:
    try:
        files.fsync_file(file)
    finally:
        file.close()


def _check_preamble(head: bytes, writer: _SeriesWriter) -> None:
    if len(head) < _PREAMBLE + 4 or head[_PREAMBLE:_PREAMBLE + 4] != b"DICM":
        raise DicomwebError(f"part {len(writer.instances) + 1} of the PACS's answer is not a DICOM part-10 file "
                            "(no 'DICM' after the 128-byte preamble, PS3.10 7.1)", kind="not-dicom")


def _read_header(path: Path, what: str) -> pydicom.Dataset:
    """The header of a part-10 file (pixel data neither read nor kept)."""
    try:
        with open(path, "rb") as f:
            if f.read(_PREAMBLE + 4)[_PREAMBLE:] != b"DICM":
                raise DicomwebError(f"{what} is not a DICOM part-10 file (no 'DICM' preamble, PS3.10 7.1)",
                                    kind="not-dicom")
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except DicomwebError:
        raise
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
        raise DicomwebError(f"{what} has a DICOM header that cannot be read ({type(exc).__name__})",
                            kind="not-dicom") from exc


def _frames(header: pydicom.Dataset) -> int:
    """NumberOfFrames (an IS, PS3.5 6.2): 1 when absent or unreadable (it only describes the instance)."""
    try:
        return max(1, int(header.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _number(header: pydicom.Dataset) -> int:
    """InstanceNumber (an IS): 0 when absent or unreadable (it only orders the series)."""
    try:
        return int(header.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        return 0


def _image_type(header: pydicom.Dataset) -> tuple[str, ...]:
    value = header.get("ImageType")
    if value is None:
        return ()
    return tuple(str(v) for v in value) if isinstance(value, list | tuple | pydicom.multival.MultiValue) \
        else (str(value),)


def _header_uid(header: pydicom.Dataset, keyword: str) -> str:
    value = str(header.get(keyword, "") or "")
    if not value or len(value) > 64 or not _UID_RE.match(value):
        raise DicomwebError(f"a DICOM part has no valid {keyword}", kind="not-dicom")
    return value


def _moved(instance: Instance, staging: Path, final: Path) -> Instance:
    rel = instance.path.relative_to(staging)
    return Instance(**{**instance.__dict__, "path": final / rel})


def _uid(value: str | None) -> str:
    """A UID as a path segment: PS3.5 9.1 syntax, so nothing else (no "/" or "..") reaches the URL or disk."""
    if not isinstance(value, str) or not value or len(value) > 64 or not _UID_RE.match(value):
        raise DicomwebError("not a valid DICOM UID (PS3.5 9.1: digits and dots, at most 64)", kind="refused")
    return quote(value, safe=".")


def _shape(path: str) -> str:
    """The path as the error names it: UIDs are fine to show (they identify images, not a patient)."""
    return "/" + path


def _first(item: dict, tag: str) -> Any:
    """The first value of attribute `tag` (8 hex digits) of a DICOM JSON object (PS3.18 F.2.2)."""
    element = item.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    return values[0] if isinstance(values, list) and values else None


def _sequence(item: dict, tag: str) -> list[dict]:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [v for v in values if isinstance(v, dict)] if isinstance(values, list) else []


def _error(resp: requests.Response, what: str) -> DicomwebError:
    status = resp.status_code
    try:
        phrase = resp.reason or http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    message = f"PACS answered {status} {phrase}".rstrip() + f" to {what}"
    retried = len(getattr(getattr(resp.raw, "retries", None), "history", ()) or ())
    if retried:
        message += f" (after {retried} retries)"
    # The error bodies are not quoted: a PACS's error page may echo header values of the instance.
    if status == 404:
        kind = "not-found"
    elif status in (401, 403):
        kind = "unauthorized"    # credentials or permissions: fixed by IT, then every waiting Case resumes
    elif status in (408, 429) or status >= 500:
        kind = "unavailable"
    else:
        kind = "refused"
    return DicomwebError(message, kind=kind, status=status)


def _cause(exc: requests.ConnectionError) -> str:
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)
    return type(reason).__name__ if reason is not None else type(exc).__name__
