"""The demo's MR study: a synthetic lumbar spine (no real person), written as DICOM part-10 files.

Sixteen sagittal MR slices of 128 x 128 (MR Image Storage, Explicit VR Little Endian), with a column of
vertebral bodies and discs whose shape changes from slice to slice, so scrolling in the portal's viewer
shows the volume. Its StudyInstanceUID is what the demo's ImagingStudy names (identifier urn:dicom:uid).
"""
from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from fhirbridge.crypto import files
from fhirbridge.demo.dicomweb_standin import NAME as STANDIN_NAME
from fhirbridge.fhir.client import FhirClient

MR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.4")
SLICES, SIZE = 16, 128


def _slice(n: int) -> np.ndarray:
    y, x = np.mgrid[:SIZE, :SIZE]
    img = np.full((SIZE, SIZE), 80.0)
    depth = 1 - abs(n - SLICES / 2) / (SLICES / 2)            # widest in the mid-sagittal slice
    for k in range(5):                                      # L1..L5 bodies with discs between them
        cy = 18 + k * 22
        img[((x - 64) / (18 * depth + 4)) ** 2 + ((y - cy) / 8) ** 2 < 1] = 900
        img[((x - 64) / (16 * depth + 3)) ** 2 + ((y - cy - 11) / 2.5) ** 2 < 1] = 1500
    img[(abs(x - 88) < 5 * depth + 1) & (y > 4)] = 1200       # the spinal canal
    rng = np.random.default_rng(n)
    return (img + rng.normal(0, 25, img.shape)).clip(0, 4095).astype(np.uint16)


def write_demo_study(folder: Path, patient_id: str, patient_name: str) -> tuple[str, list[Path]]:
    """Write the study below `folder`; returns (StudyInstanceUID, the files)."""
    study_uid, series_uid, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    # A demo patient, but kept as any patient's images are: 0700 folders, 0600 files.
    series_dir = files.private_dir(folder / series_uid)
    paths = []
    for n in range(1, SLICES + 1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR_IMAGE, generate_uid()
        meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", "O"
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_of_reference
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "DEMO1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, n
        ds.SeriesDescription, ds.ReferringPhysicianName = "MR T2 sagittal lumbar spine (demo)", ""
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ImagePositionPatient = [float(n * 4 - 32), -64.0, 64.0]
        ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 4.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = SIZE
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 800, 1600
        ds.PixelData = _slice(n).astype("<u2").tobytes()
        path = series_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        path.chmod(0o600)
        paths.append(path)
    return study_uid, paths


def point_study_at(client: FhirClient, study_ref: str, study_uid: str, paths: list[Path], dicomweb_url: str,
                   *, name: str = STANDIN_NAME) -> str:
    """Make the seeded ImagingStudy `study_ref` describe the demo study (R4 ImagingStudy: identifier
    urn:dicom:uid, series and instances) and name the demo's PACS (Orthanc, or the stand-in) as its
    dicom-wado-rs Endpoint, `name` saying which it is. Returns the Endpoint's reference."""
    endpoint, _ = client.create({
        "resourceType": "Endpoint", "status": "active",
        "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                           "code": "dicom-wado-rs", "display": "DICOM WADO-RS"},
        "name": name, "payloadType": [{"text": "DICOM"}], "payloadMimeType": ["application/dicom"],
        "address": dicomweb_url})
    ref = f"Endpoint/{endpoint['id']}"
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    first = headers[0]
    study = client.read_ref(study_ref)
    mr = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "MR"}
    study.update({
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
        "started": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "modality": [mr], "endpoint": [{"reference": ref}], "numberOfSeries": 1, "numberOfInstances": len(paths),
        "description": "MR lumbar spine (demo study)",
        "series": [{"uid": str(first.SeriesInstanceUID), "number": 1, "modality": mr,
                    "description": str(first.SeriesDescription), "numberOfInstances": len(paths),
                    "endpoint": [{"reference": ref}],
                    "instance": [{"uid": str(h.SOPInstanceUID), "number": int(h.InstanceNumber),
                                  "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{MR_IMAGE}"}}
                                 for h in headers]}]})
    client.update(study)
    return ref
