"""A sealed package carrying DICOM series, as issue 15's seal writes one, made by hand for the reviewer's side.

Each series travels as one attachment: an uncompressed tar of `<SOPInstanceUID>.dcm` part-10 files, encrypted
to the reviewer, named in the manifest with `content_type` application/x-tar, `size`, `sha256` and a `dicom`
entry (study/series UIDs, modality, series number, description, and per instance its UIDs, transfer syntax,
number, frames, bytes and SHA-256); `imaging` lists the study. The document holds the ImagingStudy (the EHR's
description, tests/kit/dicom_studies.py) and a radiology DiagnosticReport that references it.

The attachments are written by exchange.dicom_series.encrypt_series, as loop/seal.py writes them.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import pydicom
import pydicom.data
from pydicom.uid import generate_uid

from fhirbridge.crypto import jws
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.exchange import dicom_series, envelope
from fhirbridge.loop.seal import ATTACHMENT_TYP
from tests.kit.dicom_studies import Study, imaging_study_resource, make_study, sha256_file

EHR = "https://ehr.example/fhir"
REPORT_CONCLUSION = "Disc protrusion L4/5 with contact to the L5 root; no fracture."


# A transfer syntax no decoder knows (a private UID under pydicom's root): the viewer must say it cannot show it.
UNDECODABLE_SYNTAX = "1.2.826.0.1.3680043.8.498.1.99.1"


def viewer_study(directory: Path) -> Study:
    """The kit's generated study (CT, MR, multi-frame, RLE) plus, in the same study, pydicom's real MR slice
    (MR_small.dcm: a head MR) and a copy of its JPEG-LS file under an undecodable transfer syntax."""
    study = make_study(directory, ct_slices=6, mr_slices=8, frames=6, rle_slices=3, size=64)
    for name, description, syntax in (("MR_small.dcm", "MR head (pydicom MR_small)", None),
                                      ("MR_small_jpeg_ls_lossless.dcm", "MR no decoder", UNDECODABLE_SYNTAX)):
        ds = pydicom.dcmread(pydicom.data.get_testdata_file(name, download=False))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study.study_uid, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription, ds.SeriesNumber = description, 10 + len(study.series)
        if syntax:
            ds.file_meta.TransferSyntaxUID = syntax
        folder = directory / ds.SeriesInstanceUID
        folder.mkdir(parents=True)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        study.series[ds.SeriesInstanceUID] = [path]
    return study


def make_imaging_package(where: Path, signer: KeyRing, reviewer_public: KeyRing, study: Study, *,
                         name: str = "pkg-img", profile: str = "spine") -> Path:
    d = where / name
    (d / "attachments").mkdir(parents=True)
    imaging_study = {**imaging_study_resource(study, f"{EHR}/Patient/p1", "Endpoint/e1"), "id": "is1"}
    imaging_study["subject"] = {"reference": f"{EHR}/Patient/p1"}
    imaging_study.pop("endpoint", None)
    for s in imaging_study["series"]:
        s.pop("endpoint", None)
    report = {"resourceType": "DiagnosticReport", "id": "dr1", "status": "final",
              "code": {"text": "MR lumbar spine"}, "subject": {"reference": f"{EHR}/Patient/p1"},
              "effectiveDateTime": "2026-01-01", "imagingStudy": [{"reference": f"{EHR}/ImagingStudy/is1"}],
              "conclusion": REPORT_CONCLUSION}
    doc = {"resourceType": "Bundle", "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"},
           "type": "document", "timestamp": "2026-01-02T00:00:00Z", "entry": [
               {"fullUrl": f"{EHR}/Patient/p1", "resource": {"resourceType": "Patient", "id": "p1",
                                                              "name": [{"family": "Testpatient", "given": ["Ima"]}]}},
               {"fullUrl": f"{EHR}/ServiceRequest/sr1", "resource": {
                   "resourceType": "ServiceRequest", "id": "sr1", "status": "active", "intent": "order",
                   "subject": {"reference": f"{EHR}/Patient/p1"}}},
               {"fullUrl": f"{EHR}/ImagingStudy/is1", "resource": imaging_study},
               {"fullUrl": f"{EHR}/DiagnosticReport/dr1", "resource": report}]}
    attachments, total = [], 0
    for n, (series_uid, paths) in enumerate(study.series.items(), 1):
        file = f"attachments/att-{n:03d}.jwe"
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        first = headers[0]
        members = dicom_series.ordered(dicom_series.Member(p, dicom_series.instance_entry(
            sop_uid=str(h.SOPInstanceUID), sop_class_uid=str(h.SOPClassUID),
            transfer_syntax=str(h.file_meta.TransferSyntaxUID), number=int(h.get("InstanceNumber") or 0),
            frames=int(h.get("NumberOfFrames") or 1), size=p.stat().st_size, sha256=sha256_file(p)))
            for h, p in zip(headers, paths, strict=True))
        # The series' attachment exactly as loop/seal.py writes one.
        info = dicom_series.encrypt_series(members, d / file, reviewer_public.encryption_keys(), typ=ATTACHMENT_TYP)
        description = str(first.get("SeriesDescription", ""))
        attachments.append({"file": file, "url": f"urn:dicom:uid:{series_uid}", "owner": "ImagingStudy/is1",
                            "path": f"series[{n - 1}]", "content_type": dicom_series.CONTENT_TYPE,
                            "title": description or f"{first.Modality} series",
                            "size": info["plaintext_size"], "sha256": info["plaintext_sha256"],
                            "dicom": {"study_uid": study.study_uid, "series_uid": series_uid,
                                      "modality": str(first.Modality), "series_number": int(first.SeriesNumber),
                                      "description": description, "instances": [m.entry for m in members]}})
        total += sum(m.entry["bytes"] for m in members)
    iss = {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.7.1", "display": "Hospital A"}
    doc = jws.sign_bundle(doc, signer, who={"identifier": iss, "display": iss["display"]}, when="2026-01-02T00:00:00Z")
    now = int(time.time())
    claims = {"jti": str(uuid.uuid4()), "iat": now, "exp": now + 3600, "iss": iss,
              "aud": {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.7.9", "display": "Reviewer"},
              "case_id": str(uuid.uuid4()), "package_id": name, "service_request": "ServiceRequest/sr1",
              "patient": "Patient/p1", "manifest": {
                  "profile": profile, "question": "Is surgery indicated?", "shared": [], "withheld": [],
                  "attachments": attachments,
                  "imaging": [{"study_uid": study.study_uid, "imaging_study": "ImagingStudy/is1", "status": "included",
                               "reason": None, "kind": None, "series": len(study.series),
                               "instances": len(study.files), "bytes": total}]}}
    (d / envelope.ENVELOPE_FILE).write_bytes(
        envelope.seal(typ=envelope.PACKAGE, claims=claims, document=doc, signer=signer, recipient=reviewer_public))
    return d
