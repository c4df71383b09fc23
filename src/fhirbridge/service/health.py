"""Probes and public keys: /healthz (alive), /readyz (the store answers; each EHR, PACS and reviewer endpoint
checked and reported),
/.well-known/jwks.json (every served hospital's public keys)."""
from __future__ import annotations

import threading
import time

import requests
from flask import Blueprint, current_app, jsonify

from fhirbridge.config.loader import check_files
from fhirbridge.crypto.keys import public_jwks
from fhirbridge.ehr.context import App
from fhirbridge.errors import FhirbridgeError
from fhirbridge.fhir.auth import make_auth
from fhirbridge.loop.images import pacs_auth
from fhirbridge.service.http import json_response, service
from fhirbridge.service.scheduler import Service
from fhirbridge.store.store import ping

health = Blueprint("health", __name__)


@health.get("/.well-known/jwks.json")
def hospital_jwks():
    """The public keys of every hospital served here: reviewers verify packages and seal opinions with them
    (a reviewer can follow this URL instead of keeping a copy). Never a private member."""
    keys: list[dict] = []
    for app in service().apps:
        keys += public_jwks(app.hospital_keys.public_jwks())["keys"]
    resp = json_response({"keys": keys}, content_type="application/jwk-set+json")
    resp.headers["Cache-Control"] = "public, max-age=300"
    return resp


@health.get("/healthz")
def healthz():
    return jsonify({"status": "alive"})


@health.get("/readyz")
def readyz():
    body, status = readiness(service(), current_app.extensions.setdefault("fhirbridge.ready", {}))
    return jsonify(body), status


def readiness(svc: Service, cache: dict) -> tuple[dict, int]:
    """Ready when the store answers: every replica can then take API calls and notifications and work the
    Cases of any EHR that is up; "degraded" when an EHR is down or a configured key file is missing or
    wrong. Each EHR is checked too, quickly (no retries, 2 s + 3 s) and reported, but
    one hospital's EHR being down must not take every replica out of the load balancer. Cached 5 s in
    `cache` (one per app, never shared between apps; the probe listener shares its worker's)."""
    with cache.setdefault("lock", threading.Lock()):
        cached = cache.get("result")
        if cached and time.monotonic() - cached[0] < 5:
            return cached[1], cached[2]
        checks, ok = {}, True
        try:
            ping(svc.store)
            checks["store"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["store"], ok = f"unreachable: {exc.__class__.__name__}", False
        for app in svc.apps:
            checks[f"ehr:{app.hospital.name}"] = _quick_ehr_check(app)
            # The PACS down holds every Case with images at collect (transient, they resume): degraded and
            # on the banner like the EHR. Only its base URL is checked: an ImagingStudy's own Endpoint is
            # known per study, and a Case falls back to this URL when that one is unreachable.
            if app.hospital.pacs is not None and app.hospital.pacs.url:
                checks[f"pacs:{app.hospital.name}"] = _quick_pacs_check(app)
        # A reviewer's https endpoint down holds its Cases at deliver (they retry): degraded, and named on the
        # dashboard's banner (issue 17), the way `doctor` checks it (any HTTP answer over TLS is reachable).
        for name, reviewer in svc.config.reviewers.items():
            if reviewer.transport.type == "https" and reviewer.transport.url:
                checks[f"reviewer:{name}"] = _quick_reviewer_check(reviewer.transport.url)
        # A reviewer's key file missing or wrong fails that reviewer's Cases at seal: degraded, not down
        # (the other reviewers' Cases go on), and named, so nobody reads "ready" with Cases bound to fail.
        problems = check_files(svc.config)
        checks["keys"] = "; ".join(problems) if problems else "ok"
        degraded = [k for k, v in checks.items() if (k.startswith(("ehr:", "pacs:", "reviewer:")) or k == "keys")
                    and v != "ok"]
        body = {"status": ("degraded" if degraded else "ready") if ok else "not ready", "checks": checks}
        status = 200 if ok else 503
        cache["result"] = (time.monotonic(), body, status)
        return body, status


def _quick_reviewer_check(url: str) -> str:
    try:
        requests.options(url, timeout=(2, 3))
    except requests.RequestException as exc:
        return f"unreachable: {exc.__class__.__name__}"
    return "ok"


def _quick_ehr_check(app: App) -> str:
    try:
        r = requests.get(f"{app.hospital.fhir_base_url}/metadata", timeout=(2, 3),
                         auth=make_auth(app.hospital.auth.as_dict()), headers={"Accept": "application/fhir+json"})
    except requests.RequestException as exc:
        return f"unreachable: {exc.__class__.__name__}"
    except FhirbridgeError as exc:  # SMART: the token endpoint refused or could not be reached
        return f"unreachable: {exc}"
    return "ok" if r.status_code == 200 else f"unreachable: HTTP {r.status_code}"


def _quick_pacs_check(app: App) -> str:
    """One QIDO-RS study search asking for at most one match (PS3.18 section 10.6.1, `limit`): cheap on any
    PACS, and it proves what collect needs (the DICOMweb service answers, and our credentials are accepted).
    200 with matches or 204 with none are both a working PACS."""
    pacs = app.hospital.pacs
    if pacs is None or not pacs.url:
        return "not configured"
    try:
        r = requests.get(f"{pacs.url.rstrip('/')}/studies", params={"limit": "1"}, timeout=(2, 3),
                         auth=pacs_auth(app, pacs), headers={"Accept": "application/dicom+json"})
    except requests.RequestException as exc:
        return f"unreachable: {exc.__class__.__name__}"
    except (FhirbridgeError, ValueError) as exc:   # the SMART token (or a token source) could not be had
        return f"unreachable: {exc}"
    if r.status_code in (200, 204):
        return "ok"
    if r.status_code in (401, 403):
        return f"refused our credentials: HTTP {r.status_code}"
    return f"unreachable: HTTP {r.status_code}"
