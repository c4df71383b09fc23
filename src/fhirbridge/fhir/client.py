"""FHIR R4 REST client for the hospital EHR.

One `requests.Session` (connection pooling, auth) with urllib3 retries configured for FHIR:

* 429/502/503/504 are retried with exponential backoff, honouring `Retry-After` (RFC 9110 section 10.2.3)
  up to `max_retry_after` seconds per wait, so a server asking for an hour cannot stall a run;
* connection failures are retried for every method; read timeouts only for idempotent methods;
* POST (create, transaction) is retried only on 429 and 503: those say the server did not process the
  request (RFC 6585 section 4, RFC 9110 section 15.6.4), whereas after a 502/504 or a read timeout the create
  or transaction may already have been applied and a blind retry could duplicate clinical data.

Every failure becomes `FhirError` with `transient` telling the caller whether a later run may succeed.
Messages name the interaction ("GET ServiceRequest/abc"), never query values or bodies: search parameters
and resources carry PHI. Only OperationOutcome diagnostics, which servers write for humans, are quoted.

Validation: with `validate=True` every resource returned by `read`/`read_ref`/`search` is checked with
`fhirbridge.fhir.validate`. An invalid resource is never dropped: it is returned or yielded unchanged and an
`InvalidResource` (where="Type/id", reasons) is appended to `client.invalid`, so the caller decides whether
to skip it, report it or abort. `read(..., strict=True)` raises the InvalidResource instead of returning.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import http
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from fhirbridge import jsonutil
from fhirbridge.errors import FhirError, InvalidResource, PartialTransaction
from fhirbridge.fhir.unreachable import why_unreachable
from fhirbridge.fhir.validate import validate as validate_resource

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
_JSON_TYPES = {"application/fhir+json", "application/json+fhir", "application/json"}
_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR R4 datatypes.html#id
_LOCATION_RE = re.compile(r"([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?/?$")
_MAX_DIAGNOSTICS = 200
_MAX_ERROR_BODY = 256 * 1024  # an OperationOutcome is small; never buffer a huge error page

# search.html#errors: by default a server silently ignores a search parameter it does not know, so
# "Observation?patient=123&bogus=x" would still work but "Observation?subjekt=Patient/123" would return every
# patient's Observations. Asking for strict handling turns such a mistake into a 400 instead of a PHI leak.
_STRICT_SEARCH = {"Prefer": "handling=strict"}

# RFC 9110 section 9.2.2: repeating these has the same effect as sending them once.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Statuses that mean "not processed, try later" and so are safe to retry even for POST.
NOT_PROCESSED_STATUSES = frozenset({429, 503})

_T = TypeVar("_T")
_R = TypeVar("_R")


class FhirRetry(Retry):
    """urllib3 Retry with a cap on Retry-After and per-method status retries (see module docstring)."""

    def __init__(self, *args: Any, max_retry_after: float = 30.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_retry_after = max_retry_after

    def new(self, **kw: Any) -> FhirRetry:
        # urllib3 rebuilds the Retry after every attempt from a fixed list of its own attributes.
        kw.setdefault("max_retry_after", self.max_retry_after)
        return super().new(**kw)

    def parse_retry_after(self, retry_after: str) -> float:
        try:
            seconds = super().parse_retry_after(retry_after)  # delta-seconds or HTTP-date, RFC 9110 10.2.3
        except InvalidHeader:
            return 0.0  # unparseable: urllib3 then falls back to our exponential backoff
        return min(seconds, self.max_retry_after)

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        if status_code not in self.status_forcelist:
            return False
        if method.upper() in IDEMPOTENT_METHODS:
            return True
        # POST/PATCH: after a 502/504 the upstream may have applied the create or transaction before the
        # gateway gave up, so repeating it could store the data twice. 429 and 503 are the server refusing
        # the request (RFC 6585 section 4, RFC 9110 section 15.6.4): nothing was applied, repeating is safe.
        return status_code in NOT_PROCESSED_STATUSES


class FhirClient:
    """Client for one FHIR R4 server (`base_url`, e.g. "https://ehr.example.org/fhir").

    Use one client per thread: `requests.Session` and the `invalid` list are not meant to be shared.
    """

    def __init__(self, base_url: str, *, auth: requests.auth.AuthBase | None = None,
                 timeout: tuple[float, float] = (5.0, 30.0), retries: int = 4, max_retry_after: float = 30.0,
                 backoff: float = 0.5, page_size: int = 100, validate: bool = True,
                 user_agent: str = "fhirbridge/0.1", observer: Callable[..., None] | None = None):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("FHIR base URL must be an absolute http(s) URL")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.page_size = page_size
        self.validate = validate
        self.invalid: list[InvalidResource] = []
        # Called after every request as observer(method, url, status or None, seconds, retries): metrics.
        self._observer = observer
        self._origin = (parts.scheme, parts.netloc)
        self._settings: dict[str, Any] = dict(
            auth=auth, timeout=timeout, retries=retries, max_retry_after=max_retry_after, backoff=backoff,
            page_size=page_size, validate=validate, user_agent=user_agent,
            observer=observer)   # siblings' requests count in the metrics too
        # map_parallel's helpers, made on first use and kept: sibling clients (idle ones queued) and threads.
        self._siblings: list[FhirClient] = []
        self._idle: queue.SimpleQueue[FhirClient] = queue.SimpleQueue()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_threads = 0
        self._helpers_lock = threading.Lock()
        retry = FhirRetry(
            total=retries, connect=retries, read=retries, status=retries, other=0,
            allowed_methods=IDEMPOTENT_METHODS,  # read-timeout retries: only where a repeat is harmless
            status_forcelist=RETRY_STATUSES,
            backoff_factor=backoff, backoff_max=max(backoff, max_retry_after),
            respect_retry_after_header=True,
            raise_on_status=False,  # give us the last response so its OperationOutcome reaches the error
            max_retry_after=max_retry_after,
        )
        self._session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers.update({"Accept": FHIR_JSON, "User-Agent": user_agent})
        self._session.auth = auth

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        with self._helpers_lock:
            executor, self._executor = self._executor, None
            siblings, self._siblings = self._siblings, []
        if executor is not None:
            executor.shutdown(wait=True)
        for sibling in siblings:
            sibling.close()
        self._session.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FhirClient({self.base_url!r})"

    # ------------------------------------------------------------------ reads

    def capabilities(self) -> dict:
        """The server's CapabilityStatement (GET [base]/metadata, http.html#capabilities)."""
        return self._get_json("metadata", "GET metadata")

    def read(self, type_: str, id_: str, *, strict: bool = False) -> dict:
        """GET [base]/Type/id. Invalid resources are recorded in `self.invalid` (raised when strict)."""
        _check_type(type_)
        _check_id(id_)
        resource = self._get_json(f"{type_}/{id_}", f"GET {type_}/{id_}")
        self._expect_type(resource, type_, f"GET {type_}/{id_}")
        self._check(resource, strict)
        return resource

    def read_ref(self, ref: str, *, strict: bool = False) -> dict:
        """Read a literal reference: "Type/id", "Type/id/_history/v" or an absolute URL under our base."""
        type_, id_, version = self._parse_ref(ref)
        if version is None:
            return self.read(type_, id_, strict=strict)
        _check_id(version)
        path = f"{type_}/{id_}/_history/{version}"
        resource = self._get_json(path, f"GET {path}")
        self._expect_type(resource, type_, f"GET {path}")
        self._check(resource, strict)
        return resource

    def search(self, type_: str, params: dict | Iterable[tuple[str, Any]] | None = None, *,
               count: int | None = None) -> Iterator[dict]:
        """Yield every resource of a search across all pages: matches and `_include`d resources alike.

        Searches are sent with `Prefer: handling=strict`: a parameter the server does not support fails
        (FhirError 400) instead of being ignored, which would widen the search.
        `count` sets `_count` (search.html#count: a page size hint, servers may send fewer); otherwise a
        `_count` in params is kept, else `page_size` is used. OperationOutcome entries (search.mode
        "outcome": the server's warnings about the search itself) are logged, not yielded.
        """
        for bundle in self.search_bundles(type_, params, count=count):
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if not isinstance(resource, dict):
                    continue
                if _is_search_outcome(entry, resource, type_):
                    _log_outcome(type_, resource)
                    continue
                self._check(resource, strict=False)
                yield resource

    def search_bundles(self, type_: str, params: dict | Iterable[tuple[str, Any]] | None = None, *,
                       count: int | None = None) -> Iterator[dict]:
        """Yield the raw searchset Bundles of a search, following link[relation=next] (http.html#paging)."""
        _check_type(type_)
        query: list[tuple[str, str]] | None = _with_count(_param_list(params), count, self.page_size)
        url = f"{self.base_url}/{type_}"
        seen: set[str] = set()
        while True:
            what = f"GET {type_}?… (search)" if not seen else f"GET {type_}?… (search page {len(seen) + 1})"
            bundle = self._get_json(url, what, params=query, headers=_STRICT_SEARCH)
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                raise FhirError(f"EHR answered {what} with something other than a Bundle", transient=False)
            yield bundle
            nxt = _next_link(bundle)
            if not nxt:
                return
            # Relative next links are resolved against the service base (FHIR URLs are base-relative).
            url = self._own_url(urljoin(self.base_url + "/", nxt), what)
            if url in seen:
                raise FhirError(f"EHR's paging for {type_} loops (a next link repeats); stopped", transient=False)
            seen.add(url)
            query = None  # the next link carries the whole query

    def map_parallel(self, fn: Callable[[FhirClient, _T], _R], items: Iterable[_T], *, threads: int = 4) -> list[_R]:
        """`[fn(client, item) for item in items]`, run on up to `threads` clients at once; results in item order.

        Why: a sequential pull leaves the server idle while we parse and validate, and us idle while it
        answers; a few requests in flight overlap the two. Each running item gets a sibling client of its own
        (same settings and auth, its own Session), per the one-client-per-thread rule; siblings and threads
        are kept for later calls, so a small patient does not pay for starting them. What the siblings record
        in `invalid` is appended to this client's `invalid`, in item order, so a caller sees the same as from
        a sequential loop. The first error (in item order) is raised once all items are done.
        """
        items = list(items)
        if threads <= 1 or len(items) <= 1:
            return [fn(self, item) for item in items]
        executor = self._executor_for(threads)

        def run(item: _T) -> tuple[_R, list[InvalidResource]]:
            client = self._checkout()
            try:
                return fn(client, item), client.invalid[:]
            finally:
                client.invalid.clear()
                self._idle.put(client)

        futures = [executor.submit(run, item) for item in items]
        out, error = [], None
        for future in futures:
            try:
                value, invalid = future.result()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after every item has finished
                error = error or exc
                continue
            self.invalid.extend(invalid)
            out.append(value)
        if error is not None:
            raise error
        return out

    def _executor_for(self, threads: int) -> ThreadPoolExecutor:
        with self._helpers_lock:
            if self._executor is None or self._executor_threads < threads:
                old, self._executor = self._executor, ThreadPoolExecutor(threads, thread_name_prefix="fhir")
                self._executor_threads = threads
                if old is not None:
                    old.shutdown(wait=False)  # its running items finish; new ones go to the new pool
            return self._executor

    def _checkout(self) -> FhirClient:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            sibling = FhirClient(self.base_url, **self._settings)
            with self._helpers_lock:
                self._siblings.append(sibling)
            return sibling

    # ------------------------------------------------------------------ writes

    def create(self, resource: dict, *, if_none_exist: str | None = None) -> tuple[dict, bool]:
        """POST [base]/Type. Returns (resource as stored, created?).

        With `if_none_exist` (a search query, http.html#ccreate) a match answers 200 and nothing is created:
        created is then False and the matching resource is returned. A server that answers without a
        body (Prefer ignored, or return=minimal) is followed up with a read of the Location.
        """
        type_ = _resource_type(resource)
        headers = {"Content-Type": FHIR_JSON, "Prefer": "return=representation"}
        if if_none_exist:
            headers["If-None-Exist"] = if_none_exist
        what = f"POST {type_}"
        resp = self._request("POST", type_, what, data=jsonutil.dumps(resource), headers=headers)
        created = resp.status_code == 201 or not if_none_exist
        return self._stored(resp, type_, what), created

    def update(self, resource: dict, *, if_match: str | None = None) -> dict:
        """PUT [base]/Type/id. `if_match` is an ETag (W/"3") or a bare versionId ("3"), http.html#concurrency."""
        type_ = _resource_type(resource)
        id_ = resource.get("id")
        if not isinstance(id_, str):
            raise ValueError(f"update needs a resource with an id ({type_} has none)")
        _check_id(id_)
        headers = {"Content-Type": FHIR_JSON, "Prefer": "return=representation"}
        if if_match:
            headers["If-Match"] = _etag(if_match)
        what = f"PUT {type_}/{id_}"
        resp = self._request("PUT", f"{type_}/{id_}", what, data=jsonutil.dumps(resource), headers=headers)
        return self._stored(resp, type_, what)

    def transaction(self, bundle: dict) -> dict:
        """POST a transaction Bundle to [base] (http.html#transaction); returns the transaction-response.

        A transaction is all-or-nothing: any error status (e.g. 409/412 from an ifMatch, 400/422 from
        validation) means nothing was written, and becomes FhirError carrying the OperationOutcome.
        Every entry's `response.status` is checked as well: R4 http.html#transaction-response has one per
        entry, and a server that runs a transaction as a batch answers HTTP 200 with, say, 200/200/201/412.
        For a `transaction` any non-2xx entry (or a missing one) means the server did not run it atomically:
        PartialTransaction (transient), so the caller finds what was written before sending anything again.
        A `batch` answer is returned as it is: its entries succeed or fail one by one (http.html#brules).
        """
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in ("transaction", "batch"):
            raise ValueError("transaction needs a Bundle of type transaction (or batch)")
        what = f"POST {bundle['type']} Bundle ({len(bundle.get('entry') or [])} entries)"
        headers = {"Content-Type": FHIR_JSON, "Prefer": "return=representation"}
        resp = self._request("POST", "", what, data=jsonutil.dumps(bundle), headers=headers)
        body = self._parse(resp, what)
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            raise FhirError(f"EHR answered {what} with something other than a Bundle",
                            status=resp.status_code, transient=False)
        if bundle["type"] == "transaction":
            _check_entries(bundle, body, what)
        return body

    # ------------------------------------------------------------------ binaries

    def download_binary(self, ref: str, dst: BinaryIO, *, max_bytes: int) -> dict:
        """Fetch an attachment's bytes into `dst`; returns {"content_type", "size", "sha256"}.

        `ref` is "Binary/id" or an absolute URL under our base (never another host: our credentials go
        with the request). We ask with `Accept: */*`: per FHIR R4 http.html#binary a server then answers
        with the raw content, which is streamed to `dst`. Servers that answer with a FHIR JSON Binary
        resource (base64 `data`; the simulator does this) are decoded in memory, bounded by max_bytes.
        Over max_bytes: non-transient FhirError; `dst` may hold a partial download and must be discarded.
        """
        url, rel = self._attachment_url(ref)
        what = f"GET {rel}"
        resp = self._request("GET", url, what, headers={"Accept": "*/*"}, stream=True)
        try:
            ctype = resp.headers.get("Content-Type") or "application/octet-stream"
            mime = ctype.split(";")[0].strip().lower()
            if mime in ("application/fhir+xml", "application/xml+fhir"):
                raise FhirError(f"EHR answered {what} with FHIR XML, which fhirbridge does not read",
                                status=resp.status_code, transient=False)
            if mime in _JSON_TYPES:
                # base64 inflates by 4/3; allow some room for the JSON around it.
                raw = _read_capped(resp, max_bytes * 4 // 3 + 64 * 1024, lambda: _too_big(what, max_bytes))
                binary = _maybe_binary(raw, mime)
                if binary is not None:
                    return _write_binary(binary, dst, what, max_bytes, resp.status_code)
                return _write_bytes([raw], dst, ctype, what, max_bytes)
            _precheck_length(resp, what, max_bytes)
            return _write_bytes(resp.iter_content(64 * 1024), dst, ctype, what, max_bytes)
        except requests.RequestException as exc:
            raise FhirError(f"download of {rel} from the EHR broke off ({type(exc).__name__})",
                            transient=True) from exc
        finally:
            resp.close()

    # ------------------------------------------------------------------ plumbing

    def _url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return f"{self.base_url}/{path_or_url}" if path_or_url else self.base_url

    def _request(self, method: str, path_or_url: str, what: str, *, params: Any = None, data: bytes | None = None,
                 headers: dict | None = None, stream: bool = False) -> requests.Response:
        """Send one request (urllib3 retries underneath); non-2xx and transport failures become FhirError."""
        url = self._url(path_or_url)
        started = time.monotonic()
        resp = None
        try:
            resp = self._session.request(method, url, params=params, data=data, headers=headers,
                                         timeout=self.timeout, stream=stream)
        except requests.Timeout as exc:
            raise FhirError(f"EHR did not answer {what} in time (timeouts {self.timeout[0]:g}s connect, "
                            f"{self.timeout[1]:g}s read)", transient=True) from exc
        except requests.ConnectionError as exc:
            raise FhirError(f"could not reach the EHR at {self.base_url} for {what}: {why_unreachable(exc, url)}",
                            transient=True) from exc
        except requests.exceptions.ChunkedEncodingError as exc:
            # The answer was cut off before its end (a reset connection, a proxy giving up): a broken transfer
            # that a later attempt gets past, not a fault of the Case. A write may have been applied: the
            # caller's own checks (conditional create, the Task read before filing) decide what to do again.
            raise FhirError(f"EHR's answer to {what} broke off before its end", transient=True) from exc
        except requests.RequestException as exc:
            raise FhirError(f"request {what} to the EHR failed ({type(exc).__name__})", transient=False) from exc
        finally:
            if self._observer is not None:
                self._observe(method, url, resp, time.monotonic() - started)
        log.debug("%s -> %s in %.0f ms", what, resp.status_code, (time.monotonic() - started) * 1000)
        if not 200 <= resp.status_code < 300:
            try:
                raise self._error(resp, what, streamed=stream)
            finally:
                resp.close()
        return resp

    def _observe(self, method: str, url: str, resp: requests.Response | None, seconds: float) -> None:
        assert self._observer is not None  # called only when there is one
        try:
            self._observer(method, url, resp.status_code if resp is not None else None, seconds,
                           _retries_used(resp) if resp is not None else 0)
        except Exception:  # metrics never break a request
            log.debug("request observer failed", exc_info=True)

    def _get_json(self, path_or_url: str, what: str, *, params: Any = None, headers: dict | None = None) -> Any:
        return self._parse(self._request("GET", path_or_url, what, params=params, headers=headers), what)

    def _parse(self, resp: requests.Response, what: str) -> Any:
        try:
            content = resp.content
        except requests.RequestException as exc:
            raise FhirError(f"EHR's answer to {what} broke off ({type(exc).__name__})", transient=True) from exc
        if not content.strip():
            return None
        try:
            return jsonutil.loads(content)
        except ValueError:
            raise FhirError(f"EHR answered {what} with a body that is not valid JSON",
                            status=resp.status_code, transient=False) from None

    def _error(self, resp: requests.Response, what: str, *, streamed: bool) -> FhirError:
        status = resp.status_code
        try:
            phrase = resp.reason or http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        outcome = _outcome_of(resp, streamed)
        message = f"EHR answered {status} {phrase}".rstrip() + f" to {what}"
        retried = _retries_used(resp)
        if retried:
            message += f" (after {retried} retries)"
        diagnostics = _diagnostics(outcome)
        if diagnostics:
            message += f": {diagnostics}"
        # 408 Request Timeout is the server timing out on us: as transient as our own read timeout.
        # 401/403 are about our credentials or permissions, not about the Case: an expired token or a
        # revoked scope fixed by hospital IT must let every waiting Case resume on its own, rather than
        # fail them all one by one.
        transient = status in (401, 403, 408, 429) or status >= 500
        return FhirError(message, status=status, transient=transient, outcome=outcome)

    def _stored(self, resp: requests.Response, type_: str, what: str) -> dict:
        """The resource a create/update stored: from the body, else by reading its Location."""
        body = self._parse(resp, what)
        if isinstance(body, dict) and body.get("resourceType") == type_:
            return body
        location = resp.headers.get("Location") or resp.headers.get("Content-Location")
        if not location:
            raise FhirError(f"EHR accepted {what} but sent neither the resource nor a Location",
                            status=resp.status_code, transient=False)
        # Only the trailing Type/id matters: behind a proxy the Location's host may differ from ours.
        match = _LOCATION_RE.search(location.split("?")[0])
        if not match:
            raise FhirError(f"EHR accepted {what} but its Location does not name a resource",
                            status=resp.status_code, transient=False)
        return self.read(match.group(1), match.group(2))

    def _parse_ref(self, ref: str) -> tuple[str, str, str | None]:
        """'Type/id[/_history/v]' or an absolute URL under our base -> (type, id, version or None)."""
        rel = ref
        if ref.startswith(("http://", "https://")):
            if not ref.startswith(self.base_url + "/"):
                raise FhirError("reference points outside the EHR's FHIR base; not followed", transient=False)
            rel = ref[len(self.base_url) + 1:]
        parts = rel.split("?")[0].split("/")
        if len(parts) == 2 or (len(parts) == 4 and parts[2] == "_history"):
            if _TYPE_RE.match(parts[0]) and _ID_RE.match(parts[1]):
                return parts[0], parts[1], parts[3] if len(parts) == 4 else None
        raise FhirError(f"cannot read reference {ref[:100]!r}: expected Type/id", transient=False)

    def _attachment_url(self, ref: str) -> tuple[str, str]:
        if ref.startswith(("http://", "https://")):
            if not ref.startswith(self.base_url + "/"):
                raise FhirError("attachment URL points outside the EHR's FHIR base; fhirbridge only downloads "
                                "from the configured EHR", transient=False)
            rel = ref[len(self.base_url) + 1:]
        else:
            rel = ref.lstrip("/")
        type_, id_, _ = self._parse_ref(rel)
        return f"{self.base_url}/{rel}", f"{type_}/{id_}"

    def _own_url(self, url: str, what: str) -> str:
        parts = urlsplit(url)
        if (parts.scheme, parts.netloc) != self._origin:
            raise FhirError(f"EHR's next-page link after {what} points to another server; not followed "
                            f"(our credentials would go with it)", transient=False)
        return url

    def _check(self, resource: dict, strict: bool) -> None:
        if not self.validate:
            return
        reasons = validate_resource(resource)
        if reasons:
            err = InvalidResource(_describe(resource), reasons)
            self.invalid.append(err)
            if strict:
                raise err

    @staticmethod
    def _expect_type(resource: Any, type_: str, what: str) -> None:
        if not isinstance(resource, dict) or resource.get("resourceType") != type_:
            raise FhirError(f"EHR answered {what} with something other than a {type_}", transient=False)


# ---------------------------------------------------------------------- helpers


def _check_type(type_: str) -> None:
    if not isinstance(type_, str) or not _TYPE_RE.match(type_):
        raise ValueError("not a FHIR resource type name")


def _check_id(id_: str) -> None:
    # Ids come from data; refusing odd ones keeps them from rewriting the request path ("../metadata").
    if not isinstance(id_, str) or not _ID_RE.match(id_):
        raise FhirError("not a valid FHIR id (datatypes.html#id: 1-64 of A-Z a-z 0-9 - .)", transient=False)


def _resource_type(resource: dict) -> str:
    type_ = resource.get("resourceType") if isinstance(resource, dict) else None
    if not isinstance(type_, str) or not _TYPE_RE.match(type_):
        raise ValueError("resource has no valid resourceType")
    return type_


def _describe(resource: dict) -> str:
    rid = resource.get("id")
    return f"{resource.get('resourceType', '?')}/{rid if isinstance(rid, str) and rid else '?'}"


def _param_list(params: dict | Iterable[tuple[str, Any]] | None) -> list[tuple[str, str]]:
    """dict or pairs -> pairs; a list value repeats the parameter (AND, search.html#combining)."""
    if params is None:
        return []
    items = params.items() if isinstance(params, dict) else params
    out: list[tuple[str, str]] = []
    for key, value in items:
        values = value if isinstance(value, (list, tuple)) else [value]
        out.extend((str(key), str(v)) for v in values)
    return out


def _with_count(query: list[tuple[str, str]], count: int | None, page_size: int) -> list[tuple[str, str]]:
    if count is not None:
        return [(k, v) for k, v in query if k != "_count"] + [("_count", str(count))]
    if any(k == "_count" for k, _ in query):
        return query
    return query + [("_count", str(page_size))]


def _next_link(bundle: dict) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


def _is_search_outcome(entry: dict, resource: dict, searched_type: str) -> bool:
    mode = (entry.get("search") or {}).get("mode")
    if mode == "outcome":
        return True
    # Some servers omit search.mode on their warning OperationOutcomes.
    return resource.get("resourceType") == "OperationOutcome" and searched_type != "OperationOutcome"


def _log_outcome(type_: str, outcome: dict) -> None:
    codes = ", ".join(f"{i.get('severity')}/{i.get('code')}" for i in outcome.get("issue") or []
                      if isinstance(i, dict))
    log.warning("EHR attached an OperationOutcome to a %s search (%s)", type_, codes or "no issues")


def _entry_status(entry: object) -> str:
    """An entry's response.status ("201 Created" -> "201"), or "" when it has none."""
    response = entry.get("response") if isinstance(entry, dict) else None
    status = response.get("status") if isinstance(response, dict) else None
    return str(status).strip().split(" ")[0] if status is not None else ""


def _check_entries(sent: dict, answer: dict, what: str) -> None:
    """Every entry of a transaction-response must be 2xx, one per entry sent (R4 http.html#transaction-response)."""
    statuses = [_entry_status(e) for e in answer.get("entry") or []]
    expected = len(sent.get("entry") or [])
    bad = [(i, s) for i, s in enumerate(statuses) if not (len(s) == 3 and s.startswith("2"))]
    if not bad and len(statuses) == expected:
        return
    if bad:
        first = bad[0][1]
        detail = ", ".join(f"entry {i + 1}: {s or 'no status'}" for i, s in bad[:5])
    else:
        first = ""
        detail = f"{len(statuses)} entry answers for {expected} entries"
    raise PartialTransaction(f"EHR answered {what} with refused entries ({detail}): it did not run the "
                             f"transaction all-or-nothing; what was written is reconciled before a retry",
                             statuses=statuses, status=int(first) if first.isdigit() else None)


def _etag(value: str) -> str:
    value = value.strip()
    return value if value.startswith(('W/"', '"')) else f'W/"{value}"'


def _outcome_of(resp: requests.Response, streamed: bool) -> dict | None:
    """The OperationOutcome of an error answer, if that is what it carries (anything else is ignored)."""
    try:
        raw = _read_capped(resp, _MAX_ERROR_BODY, lambda: None) if streamed else resp.content
        if len(raw) > _MAX_ERROR_BODY:
            return None
        body = jsonutil.loads(raw) if raw.strip() else None
    except (ValueError, requests.RequestException):
        return None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return body
    return None


def _diagnostics(outcome: dict | None) -> str:
    """The first human-readable text of an OperationOutcome, truncated."""
    if not outcome:
        return ""
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
        if isinstance(text, str) and text.strip():
            text = " ".join(text.split())
            return text if len(text) <= _MAX_DIAGNOSTICS else text[: _MAX_DIAGNOSTICS - 1] + "…"
    return ""


def _retries_used(resp: requests.Response) -> int:
    retries = getattr(resp.raw, "retries", None)
    return len(getattr(retries, "history", ()) or ())


def _read_capped(resp: requests.Response, limit: int, too_big) -> bytes:
    """Read a streamed body up to `limit` bytes; beyond, raise `too_big()` (or, if that is None, truncate)."""
    chunks, size = [], 0
    for chunk in resp.iter_content(64 * 1024):
        size += len(chunk)
        if size > limit:
            err = too_big()
            if err is not None:
                raise err
            chunks.append(chunk[: len(chunk) - (size - limit)])
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _too_big(what: str, max_bytes: int) -> FhirError:
    return FhirError(f"{what}: attachment is larger than the limit of {max_bytes} bytes; not downloaded",
                     transient=False)


def _precheck_length(resp: requests.Response, what: str, max_bytes: int) -> None:
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and not resp.headers.get("Content-Encoding") and int(length) > max_bytes:
        raise _too_big(what, max_bytes)


def _maybe_binary(raw: bytes, mime: str) -> dict | None:
    """The Binary resource in a JSON answer; None when plain JSON content was served (application/json)."""
    try:
        body = jsonutil.loads(raw)
    except ValueError:
        if mime == "application/json":
            return None
        raise FhirError("EHR sent a FHIR JSON answer for a Binary that is not valid JSON", transient=False) from None
    if isinstance(body, dict) and body.get("resourceType") == "Binary":
        return body
    if mime == "application/json":
        return None
    raise FhirError("EHR answered a Binary download with a FHIR resource that is not a Binary", transient=False)


def _write_binary(binary: dict, dst: BinaryIO, what: str, max_bytes: int, status: int) -> dict:
    data = binary.get("data")
    if not isinstance(data, str):
        raise FhirError(f"EHR answered {what} with a Binary that has no data", status=status, transient=False)
    try:
        content = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise FhirError(f"EHR answered {what} with Binary.data that is not valid base64",
                        status=status, transient=False) from None
    if len(content) > max_bytes:
        raise _too_big(what, max_bytes)
    dst.write(content)
    return {"content_type": binary.get("contentType") or "application/octet-stream", "size": len(content),
            "sha256": hashlib.sha256(content).hexdigest()}


def _write_bytes(chunks: Iterable[bytes], dst: BinaryIO, content_type: str, what: str, max_bytes: int) -> dict:
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise _too_big(what, max_bytes)
        digest.update(chunk)
        dst.write(chunk)
    return {"content_type": content_type, "size": size, "sha256": digest.hexdigest()}
