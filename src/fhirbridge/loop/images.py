"""Images: the DICOM instances of the ImagingStudies a Case shares, from the hospital's PACS (issue 15).

Part of the collect step (loop/collect.py `collect_step` calls `collect_images` after the records are
collected): the images are the records' own content, and a repeated collect re-checks both. For each
ImagingStudy the profile kept, newest first (`started`), up to the profile's `[imaging] most_recent`:

- the Study Instance UID is its `identifier` with system urn:dicom:uid (R4 ImagingStudy.identifier, value
  `urn:oid:<uid>`), or any identifier whose value is `urn:oid:<uid>`;
- the PACS is the study's Endpoint with connectionType dicom-wado-rs (R4 endpoint-connection-type) when it is
  reachable, else `[hospital.pacs] url`. Credentials go to `url`, and to an Endpoint's address only when it has
  the same origin (an address read from the EHR must not collect our PACS password);
- QIDO-RS lists the series; those of other modalities, and localizers/scouts (`skip_series` words in the
  SeriesDescription, or in the first instance's ImageType, PS3.3 C.7.6.1.1.2 value 3 "LOCALIZER"), are left
  out; WADO-RS retrieves each series (client: every instance checked, SHA-256, counts against QIDO-RS), up to
  `[hospital.pacs] parallel_series` at once, into `<case>/images/<study>/<series>/`, and the counts are checked
  against the ImagingStudy's own `series[].numberOfInstances` too;
- a series retrieved before (a Case resuming after the PACS went down) is reused when every file still has the
  SHA-256 its index (`<series>.json`) recorded.

Outcomes: a transient DicomwebError (PACS unreachable, slow, 5xx, 401/403, an answer cut off) leaves the Case
at collect to resume. Anything else (the PACS has no such study, not DICOM, a count mismatch, over a cap, any
other refusal) withholds that study's images, named in the manifest's `imaging` with its reason and kind; with
the profile's `required = true` the Case fails instead, saying which study and why.

Logs and progress lines carry counts and UIDs only (UIDs identify images, not patients), never a header value.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom
from requests.auth import AuthBase

from fhirbridge import jsonutil
from fhirbridge.config.mappings import ImagingRule, Profile
from fhirbridge.config.model import Pacs
from fhirbridge.crypto import files, urls
from fhirbridge.dicomweb import DicomwebClient, DicomwebError
from fhirbridge.dicomweb import make_auth as pacs_make_auth
from fhirbridge.ehr.context import App
from fhirbridge.errors import FhirbridgeError
from fhirbridge.exchange.dicom_series import Member, instance_entry, ordered
from fhirbridge.fhir import auth as fhir_auth

IMAGES_DIR = "images"
WADO_RS = "dicom-wado-rs"
# Why a study's images do not travel, in words the reviewer may read (the DicomwebError's own message names
# the PACS's address and goes to the Case's event log only).
KIND_WORDS = {
    "not-configured": "this hospital does not send images (no [hospital.pacs])",
    "older": "older than the profile's most recent studies",
    "no-uid": "the ImagingStudy names no Study Instance UID",
    "no-series": "no series of the profile's modalities (localizers and scouts left out)",
    "not-found": "the PACS does not have this study",
    "not-dicom": "the PACS sent something that is not DICOM",
    "mismatch": "the PACS's instances do not match the study's description",
    "too-large": "over the profile's size cap",
    "refused": "the PACS refused the request",
}
# Kinds that mean the profile chose so: never a reason to fail a Case whose profile requires images.
CHOSEN = frozenset({"older", "no-series", "not-configured"})


def study_uid(study: dict) -> str | None:
    """The Study Instance UID of an R4 ImagingStudy (its identifier urn:dicom:uid, or a urn:oid: value)."""
    for ident in study.get("identifier", []):
        value = ident.get("value")
        if isinstance(value, str) and value.startswith("urn:oid:") and (
                ident.get("system") in ("urn:dicom:uid", "urn:ietf:rfc:3986", None)):
            return value.removeprefix("urn:oid:")
    return None


def _withheld(study: dict, uid: str | None, kind: str, *, detail: str = "") -> dict:
    reason = KIND_WORDS.get(kind, kind) + (f" ({detail})" if detail else "")
    return {"study_uid": uid, "imaging_study": f"ImagingStudy/{study.get('id')}", "status": "withheld",
            "reason": reason, "kind": kind, "series": [], "instances": 0, "bytes": 0}


def collect_images(app: App, case_id: str, resources: list[dict], profile: Profile) -> list[dict]:
    """The `imaging` entries of the Case (the manifest's, plus per series its retrieved instances and their
    files under the Case folder). Raises a transient DicomwebError to resume later, or a FhirbridgeError when
    the profile requires images that cannot travel."""
    rule = profile.imaging
    if rule is None:
        return []
    studies = [r for r in resources if r.get("resourceType") == "ImagingStudy"]
    studies.sort(key=lambda s: str(s.get("started") or ""), reverse=True)
    pacs = app.hospital.pacs
    if pacs is None:
        return [_withheld(s, study_uid(s), "not-configured") for s in studies]
    endpoints = {f"Endpoint/{r.get('id')}": r for r in resources if r.get("resourceType") == "Endpoint"}
    root = files.private_dir(app.case_dir(case_id) / IMAGES_DIR)
    auth = pacs_auth(app, pacs)
    out: list[dict] = []
    package_bytes = 0
    for n, study in enumerate(studies):
        uid = study_uid(study)
        if n >= rule.most_recent:
            out.append(_withheld(study, uid, "older", detail=f"{rule.most_recent} kept"))
            continue
        if uid is None:
            out.append(_withheld(study, uid, "no-uid"))
            continue
        app.progress(f"  images: study {n + 1}/{min(len(studies), rule.most_recent)}")
        try:
            entry = _one_study(study, uid, rule, pacs, auth, _addresses(study, endpoints, pacs), root)
            if package_bytes + entry["bytes"] > rule.max_package_bytes:
                raise DicomwebError(f"study {uid} would bring the package over {rule.max_package_bytes} bytes",
                                    kind="too-large")
        except DicomwebError as exc:
            if exc.transient:
                raise
            app.store.add_event(case_id, "images_withheld", {"study_uid": uid, "kind": exc.kind, "error": str(exc)})
            out.append(_withheld(study, uid, exc.kind))
            continue
        package_bytes += entry["bytes"]
        out.append(entry)
    failed = [e for e in out if e["status"] == "withheld" and e["kind"] not in CHOSEN]
    if rule.required and failed:
        words = "; ".join(f"study {e['study_uid'] or e['imaging_study']}: {e['reason']}" for e in failed)
        raise FhirbridgeError(f"profile {profile.name} requires the images, and they cannot be sent: {words}")
    return out


def pacs_auth(app: App, pacs: Pacs) -> AuthBase | None:
    """The credentials for `[hospital.pacs]` (also used by the readiness check, service/health.py)."""
    if pacs.auth.type == "smart":
        # The EHR's SMART Backend Services token (the loader checks [hospital.auth] is smart).
        return fhir_auth.make_auth(app.hospital.auth.as_dict(), default_scopes=app.smart_scopes)
    return pacs_make_auth(pacs.auth.as_dict())


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def _addresses(study: dict, endpoints: dict[str, dict], pacs: Pacs) -> list[tuple[str, bool]]:
    """(DICOMweb base, send our credentials) in the order to try: the study's WADO-RS Endpoints, then the
    configured PACS. An address that is not https (or loopback) is skipped: images are PHI."""
    out: list[tuple[str, bool]] = []
    refs = [e.get("reference") for e in study.get("endpoint", [])]
    refs += [e.get("reference") for s in study.get("series", []) for e in s.get("endpoint", [])]
    for ref in refs:
        ep = endpoints.get(str(ref))
        if not ep or ep.get("status", "active") != "active" \
                or (ep.get("connectionType") or {}).get("code") != WADO_RS:
            continue
        address = str(ep.get("address") or "").rstrip("/")
        if urls.is_https_or_loopback(address) and address not in [a for a, _ in out]:
            out.append((address, pacs.url is not None and _origin(address) == _origin(pacs.url)))
    if pacs.url and pacs.url not in [a for a, _ in out]:
        out.append((pacs.url, True))
    return out


def _client(pacs: Pacs, address: str, auth: AuthBase | None) -> DicomwebClient:
    return DicomwebClient(address, auth=auth, timeout=(pacs.timeout_connect, pacs.timeout_read),
                          retries=pacs.retries)


def _series_list(pacs: Pacs, addresses: list[tuple[str, bool]], auth: AuthBase | None,
                 uid: str) -> tuple[str, AuthBase | None, list[dict]]:
    """The first address that answers QIDO-RS for the study's series (an unreachable Endpoint falls back)."""
    if not addresses:
        raise DicomwebError(f"study {uid}: no reachable dicom-wado-rs Endpoint and no [hospital.pacs] url",
                            kind="not-found")
    last: DicomwebError | None = None
    for address, with_auth in addresses:
        use = auth if with_auth else None
        try:
            with _client(pacs, address, use) as client:
                listed = client.search_series(uid)
            if not listed:
                raise DicomwebError(f"the PACS has no series of study {uid}", kind="not-found")
            return address, use, listed
        except DicomwebError as exc:
            last = exc
            if exc.kind not in ("unavailable", "unauthorized", "not-found"):
                raise
    assert last is not None
    raise last


def _first(item: dict, tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value")
    return values[0] if isinstance(values, list) and values else None


def _one_study(study: dict, uid: str, rule: ImagingRule, pacs: Pacs, auth: AuthBase | None,
               addresses: list[tuple[str, bool]], root: Path) -> dict:
    address, use, listed = _series_list(pacs, addresses, auth, uid)
    described = {s.get("uid"): s for s in study.get("series", [])}
    wanted = []
    for item in listed:
        series_uid = _first(item, "0020000E")
        modality = str(_first(item, "00080060") or (described.get(series_uid, {}).get("modality") or {}).get("code")
                       or "")
        description = str(_first(item, "0008103E") or described.get(series_uid, {}).get("description") or "")
        if not series_uid or (rule.modalities and modality not in rule.modalities) \
                or _skipped(description, rule):
            continue
        number = _first(item, "00200011")
        wanted.append({"series_uid": str(series_uid), "modality": modality, "description": description,
                       "series_number": int(number) if isinstance(number, int | float) else None})
    if not wanted:
        return _withheld(study, uid, "no-series")

    def fetch(series: dict) -> dict | None:
        with _client(pacs, address, use) as client:
            return _series(client, uid, series, rule, root)

    with ThreadPoolExecutor(max_workers=pacs.parallel_series, thread_name_prefix="wado") as pool:
        got = [s for s in pool.map(fetch, wanted) if s is not None]
    for s in got:
        expected = described.get(s["series_uid"], {}).get("numberOfInstances")
        if isinstance(expected, int) and expected != len(s["instances"]):
            raise DicomwebError(f"series {s['series_uid']} has {len(s['instances'])} instances in the PACS where "
                                f"the ImagingStudy says {expected}", kind="mismatch")
    total = sum(i["bytes"] for s in got for i in s["instances"])
    if total > rule.max_study_bytes:
        raise DicomwebError(f"study {uid} is {total} bytes, over the cap of {rule.max_study_bytes}", kind="too-large")
    if not got:
        return _withheld(study, uid, "no-series")
    return {"study_uid": uid, "imaging_study": f"ImagingStudy/{study.get('id')}", "status": "included",
            "reason": "", "kind": "", "series": got, "instances": sum(len(s["instances"]) for s in got),
            "bytes": total}


def _skipped(text: str, rule: ImagingRule) -> bool:
    low = text.casefold()
    return any(word.casefold() in low for word in rule.skip_series)


def _index_path(root: Path, study: str, series: str) -> Path:
    return root / study / f"{series}.json"


def _series(client: DicomwebClient, study: str, series: dict, rule: ImagingRule, root: Path) -> dict | None:
    """One series: reused when its index and files agree, else retrieved and indexed. None: a localizer."""
    index = _index_path(root, study, series["series_uid"])
    reused = _reuse(index, root)
    if reused is not None:
        return reused if reused.get("instances") else None
    got = client.retrieve_series(study, series["series_uid"], root, max_bytes=rule.max_study_bytes)
    members = []
    localizer = False
    for inst in got.instances:
        header = pydicom.dcmread(inst.path, stop_before_pixels=True, specific_tags=["InstanceNumber", "ImageType"])
        image_type = [str(v).casefold() for v in (header.get("ImageType") or [])]
        localizer = localizer or any(word.casefold() in image_type for word in rule.skip_series)
        number = header.get("InstanceNumber")
        members.append(Member(inst.path, instance_entry(
            sop_uid=inst.sop_instance_uid, sop_class_uid=inst.sop_class_uid, transfer_syntax=inst.transfer_syntax_uid,
            number=int(number) if number not in (None, "") else 0, frames=inst.frames, size=inst.size,
            sha256=inst.sha256)))
    entry = {**series, "instances": [] if localizer else
             [{**m.entry, "file": m.path.relative_to(root).as_posix()} for m in ordered(members)]}
    if localizer:
        files.remove_tree(got.folder)
    files.write_atomic(index, jsonutil.dumps(entry))
    return None if localizer else entry


def _reuse(index: Path, root: Path) -> dict | None:
    """The series' index when every file it names is there with its SHA-256 (a resumed Case); else None."""
    if not index.is_file():
        return None
    try:
        entry = jsonutil.loads(index.read_bytes())
        for inst in entry["instances"]:
            digest = hashlib.sha256()
            with open(root / inst["file"], "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            if digest.hexdigest() != inst["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entry


def members(app: App, case_id: str, series: dict) -> list[Member]:
    """The tar members of one collected series (seal), files under the Case's images folder."""
    root = app.case_dir(case_id) / IMAGES_DIR
    out = []
    for inst in series["instances"]:
        entry = {k: v for k, v in inst.items() if k != "file"}
        path = (root / inst["file"]).resolve()
        if root.resolve() not in path.parents:
            raise FhirbridgeError(f"an image file of series {series['series_uid']} is outside the Case's folder")
        out.append(Member(path, entry))
    return out
