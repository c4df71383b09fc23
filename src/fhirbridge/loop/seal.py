"""Seal step: turn a Case's collected records into a signed, encrypted package directory.

    <package_id>/package.jwe             envelope: claims (manifest) + signed document Bundle
    <package_id>/attachments/att-NNN.jwe one per large Binary, streamed: memory stays bounded

Attachments up to `inline_attachment_limit` travel inside the document as Binary entries; larger ones
are streamed from the EHR to a private temp file and from there into their own JWE, whose plaintext
SHA-256 the signed manifest names (cf. SMART Health Links: a manifest plus encrypted files).
The package is built in a staging directory and renamed into place, so a crash mid-seal leaves nothing
that looks finished; a rerun starts over.
"""
from __future__ import annotations

import base64
import dataclasses
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fhirbridge.crypto import jwe
from fhirbridge.crypto.files import fsync_file, open_private, private_dir
from fhirbridge.ehr.context import App
from fhirbridge.errors import SealError
from fhirbridge.exchange import dicom_series, envelope
from fhirbridge.exchange.compression import worth_deflating
from fhirbridge.fhir.elements import question_of
from fhirbridge.loop import checklist, guards, images
from fhirbridge.loop.collect import Collected, has_collected, load_collected
from fhirbridge.loop.document import POLICY_NOTE, build_document, hospital_organization, referring_physician
from fhirbridge.loop.result import StepResult, sent_back
from fhirbridge.steps import Step
from fhirbridge.store.store import Case, worker_id

ATTACHMENT_TYP = "fhirbridge-attachment+jwe"


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def package_dir(app: App, case: Case) -> Path:
    return app.case_dir(case.id) / "package" / str(case.package_id)


def seal_case(app: App, case: Case, collected: Collected, *, extra_manifest: dict | None = None,
              due_at: float | None = None) -> tuple[str, dict]:
    """Build the package; returns (package_id, summary for the event log - counts only, no PHI, and the
    `due_at` the package names). A supplement (loop/supplement.py) adds its manifest entries and keeps the
    Case's due date."""
    cfg = app.config
    reviewer = cfg.reviewer(case.reviewer)
    # The reviewer's newest key generation only: after it rotated, its old keys stay published for a while
    # but new packages go to the new ones (and never to keys of a file that merged two reviewers).
    reviewer_keys = app.reviewer_keys(case.reviewer).current()
    recipients = reviewer_keys.encryption_keys()
    package_id = str(uuid.uuid4())
    # Per worker: two workers that both believe they hold the Case (a lapsed lease) never share a directory.
    staging = app.case_dir(case.id) / f"package.staging-{_safe(worker_id())}"
    shutil.rmtree(staging, ignore_errors=True)
    private_dir(staging / "attachments")

    inline, files = [], []
    for n, att in enumerate(collected.attachments, 1):
        app.progress(f"  attachment {n}/{len(collected.attachments)} ({att['content_type']})")
        tmp = staging / "download.tmp"
        with open_private(tmp) as f:   # the EHR's document, in clear until encrypted below
            info = app.ehr.download_binary(att["url"], f, max_bytes=cfg.max_attachment_bytes)
        content_type = info.get("content_type") or att["content_type"]
        if info["size"] <= cfg.inline_attachment_limit:
            inline.append({"resourceType": "Binary", "id": att["url"].split("/", 1)[1],
                           "contentType": content_type,
                           "data": base64.b64encode(tmp.read_bytes()).decode("ascii")})
        else:
            name = f"attachments/att-{n:03d}.jwe"
            # DEFLATE only where it saves something (issue 15: it was most of the seal time, saving nothing).
            jwe.encrypt_to_path(tmp, staging / name, recipients, typ=ATTACHMENT_TYP, cty=content_type,
                                compress=worth_deflating(content_type, tmp))
            files.append({"file": name, "url": att["url"], "owner": att["owner"], "path": att["path"],
                          "content_type": content_type, "title": att["title"], "size": info["size"],
                          "sha256": info["sha256"]})
        tmp.unlink()
    series_files = _seal_images(app, case, collected, staging, recipients, files)

    now = datetime.now(UTC)
    timestamp = now.isoformat(timespec="seconds").replace("+00:00", "Z")
    h = app.hospital
    org = hospital_organization(h.name, h.identifier_system, h.identifier_value)
    shared = dicom_series.point_at_package(collected.resources, series_files)
    collected = dataclasses.replace(collected, resources=shared)
    document = build_document(collected, package_id=package_id, base_url=h.fhir_base_url, hospital_org=org,
                              timestamp=timestamp, inline_binaries=inline)
    issued = int(time.time())
    due_at = due_at or reviewer.due_at(issued)
    manifest: dict[str, Any] = {
        "profile": collected.profile,
        # Urgency and who asked (issue 16): the order's R4 request-priority and its requester, so the reviewer
        # sees them without reading the ServiceRequest, and sorts the inbox by them.
        "priority": collected.service_request.get("priority") or "routine",
        "requester": referring_physician(collected),
        "lookback_days": collected.lookback_days,
        "question": question_of(collected.service_request),
        "shared": [f"{r['resourceType']}/{r['id']}" for r in collected.resources],
        "withheld": collected.disclosable_withheld(),
        # The packet's checklist (issue 16 part 6): per expected record, included / withheld (why) / not found.
        "checklist": checklist.for_reviewer(collected.checklist),
        "policy_note": POLICY_NOTE,
        "attachments": files,
        "inline_attachments": [f"Binary/{b['id']}" for b in inline],
        **(extra_manifest or {}),
    }
    if (case.data or {}).get("sent_without"):
        # Issue 16 part 6: required records the referring physician confirmed sending without (recorded, audited).
        manifest["sent_without"] = list(case.data["sent_without"])
    if collected.imaging:
        # What became of each kept ImagingStudy's images (exchange/dicom_series.py: the format).
        manifest["imaging"] = [{"study_uid": e["study_uid"], "imaging_study": e["imaging_study"],
                                "status": e["status"], "reason": e["reason"], "kind": e["kind"],
                                "series": [s["series_uid"] for s in e["series"]], "instances": e["instances"],
                                "bytes": e["bytes"]} for e in collected.imaging]
    claims = {
        "jti": package_id, "iat": issued, "exp": issued + cfg.package_lifetime_days * 86400,
        **envelope.addressing({"system": h.identifier_system, "value": h.identifier_value, "display": h.name},
                              {"system": reviewer.identifier_system, "value": reviewer.identifier_value,
                               "display": reviewer.display}),
        "case_id": case.id, "service_request": case.service_request, "patient": case.patient,
        "package_id": package_id, "manifest": manifest,
        # The answer's due date (config Reviewer.due_at), signed with the rest; `exp` is when the package
        # stops being accepted at all, a different and later instant.
        "due_at": due_at,
    }
    # Streamed into the staging folder, which is renamed whole below: a reader never sees half an envelope.
    try:
        with open_private(staging / envelope.ENVELOPE_FILE, exclusive=True) as f:
            size = envelope.seal_signed_document_to(
                f, typ=envelope.PACKAGE, claims=claims, document=document, signer=app.hospital_keys,
                recipient=reviewer_keys, who=h.organization_ref(), when=timestamp, x5c=app.hospital_x5c)
            fsync_file(f)
    except SealError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    limit = envelope.max_envelope_bytes(envelope.PACKAGE)
    if size > limit:
        shutil.rmtree(staging, ignore_errors=True)
        raise SealError(f"the package envelope would be {size} bytes, more than a reviewer accepts ({limit}); "
                        "lower fhirbridge.inline_attachment_limit so attachments travel as separate files")
    final = app.case_dir(case.id) / "package" / package_id
    private_dir(final.parent)
    staging.rename(final)
    summary = {"package_id": package_id, "shared": len(manifest["shared"]), "withheld": len(collected.withheld),
               "attachment_files": len(files), "inline_attachments": len(inline),
               "image_series": len(series_files),
               "envelope_bytes": size, "due_at": due_at}
    return package_id, summary


def _seal_images(app: App, case: Case, collected: Collected, staging: Path, recipients: list,
                 files: list[dict]) -> dict[str, str]:
    """One attachment per included series (exchange/dicom_series.py), appended to `files`; returns
    SeriesInstanceUID -> its file, for the document's ImagingStudy."""
    series_files: dict[str, str] = {}
    n = len(collected.attachments)
    studies = {f"ImagingStudy/{r.get('id')}": r for r in collected.resources if r.get("resourceType") == "ImagingStudy"}
    for study in collected.imaging:
        if study["status"] != "included":
            continue
        described = [s.get("uid") for s in studies.get(study["imaging_study"], {}).get("series", [])]
        for series in study["series"]:
            n += 1
            name = f"attachments/att-{n:03d}.jwe"
            app.progress(f"  series {series['series_uid']}: {len(series['instances'])} instances")
            members = images.members(app, case.id, series)
            info = dicom_series.encrypt_series(members, staging / name, recipients, typ=ATTACHMENT_TYP)
            uid = series["series_uid"]
            files.append({"file": name, "url": f"urn:dicom:uid:{uid}", "owner": study["imaging_study"],
                          "path": f"series[{described.index(uid)}]" if uid in described else "series",
                          "content_type": dicom_series.CONTENT_TYPE,
                          "title": series["description"] or f"{series['modality']} series",
                          "size": info["plaintext_size"], "sha256": info["plaintext_sha256"],
                          "dicom": {"study_uid": study["study_uid"], "series_uid": uid,
                                    "modality": series["modality"], "series_number": series["series_number"],
                                    "description": series["description"],
                                    "instances": [m.entry for m in members]}})
            series_files[uid] = name
    return series_files


def seal_step(app: App, case: Case) -> StepResult:
    """Seal the collected records into the package. Repeating it rebuilds the staging directory."""
    guards.check_order(app, case)
    if not has_collected(app, case):
        # Its work file is gone (a restored volume, a replica not on the shared data_dir): collect again.
        return sent_back(Step.COLLECT, "collected records missing from data_dir; collecting again")
    guards.show_step_on_task(app, case)
    package_id, summary = seal_case(app, case, load_collected(app, case))
    # The due date the package names is the Case's: one value for the reviewer, the pages and the overdue flag.
    return StepResult(summary, package_id=package_id, due_at=summary["due_at"])

