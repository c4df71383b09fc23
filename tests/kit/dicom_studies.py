"""Real DICOM for the tests: studies generated with pydicom, and the files pydicom ships.

`make_study(directory)` writes one study of a synthetic test patient (no real person) as DICOM part-10
files: a multi-slice CT series, an MR series, one multi-frame instance (Multi-frame Grayscale Word Secondary
Capture, with NumberOfFrames) and a CT series in RLE Lossless (a compressed transfer syntax, PS3.5 G; encoded
by pydicom's own RLE encoder). `large_series(directory, megabytes)` writes one CT series of about that size
(the memory-bound test and the bench). `bundled_files(directory)` copies a few of pydicom's bundled test
files (CT, MR, JPEG 2000, an implicit-VR multi-frame RT Dose, an RLE multi-frame colour image), each its own
study. Every `Study` knows its files by series, so a test can compare hashes after a round trip.

`endpoint_resource(address)` and `imaging_study_resource(study, patient, endpoint)` describe a study as the
EHR does (FHIR R4): an Endpoint with connectionType dicom-wado-rs (R4 endpoint-connection-type) and an
ImagingStudy whose `identifier` is the Study Instance UID as `urn:dicom:uid` / `urn:oid:<uid>` (R4
ImagingStudy.identifier, as in the spec's examples), with its series and instances.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, RLELossless, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"

# Files pydicom ships inside its wheel (pydicom.data, never downloaded): distinct SOP Instance UIDs.
BUNDLED = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtdose.dcm", "SC_rgb_rle_2frame.dcm")
PATIENT = {"PatientName": "TEST^PACS", "PatientID": "FB-PACS-TEST", "PatientBirthDate": "19700101",
           "PatientSex": "O"}


@dataclass
class Study:
    study_uid: str
    series: dict[str, list[Path]] = field(default_factory=dict)   # series UID -> its files

    @property
    def files(self) -> list[Path]:
        return [p for paths in self.series.values() for p in paths]

    def hashes(self) -> dict[str, str]:
        """SOP Instance UID -> SHA-256 of the file as written."""
        return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: sha256_file(p) for p in self.files}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _instance(study_uid: str, series_uid: str, sop_class: str, modality: str, number: int, pixels: np.ndarray,
              *, series_number: int, description: str, frames: int | None = None,
              rle: bool = False, frame_of_reference: str = "") -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "FBACC1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, series_number, number
    ds.SeriesDescription = description
    ds.ReferringPhysicianName = ""
    ds.PatientOrientation = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 1.0
    ds.FrameOfReferenceUID = frame_of_reference or generate_uid()
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[-2], pixels.shape[-1]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.astype("<u2").tobytes()
    if rle:
        ds.compress(RLELossless, pixels.astype("<u2"), encoding_plugin="pydicom")
    return ds


def _pixels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A phantom-ish image: a bright disc on noise, 12 bits (so it compresses a little, like a real scan)."""
    rows, cols = shape[-2], shape[-1]
    y, x = np.ogrid[:rows, :cols]
    disc = ((y - rows / 2) ** 2 + (x - cols / 2) ** 2 < (min(rows, cols) / 3) ** 2) * 1500
    noise = rng.integers(0, 200, size=shape)
    return (noise + disc).clip(0, 4095).astype(np.uint16)


def _write(ds: Dataset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def make_study(directory: Path, *, ct_slices: int = 12, mr_slices: int = 8, frames: int = 6, rle_slices: int = 4,
               size: int = 64, seed: int = 15) -> Study:
    rng = np.random.default_rng(seed)
    study = Study(study_uid=generate_uid())
    plan = [("CT", CT_IMAGE, ct_slices, "CT spine", None, False),
            ("MR", MR_IMAGE, mr_slices, "MR T2 sagittal", None, False),
            ("OT", MULTIFRAME_WORD_SC, 1, "multi-frame", frames, False),
            ("CT", CT_IMAGE, rle_slices, "CT RLE Lossless", None, True)]
    for number, (modality, sop_class, count, description, nframes, rle) in enumerate(plan, start=1):
        series_uid = generate_uid()
        paths = []
        for i in range(1, count + 1):
            shape = (nframes, size, size) if nframes else (size, size)
            ds = _instance(study.study_uid, series_uid, sop_class, modality, i, _pixels(rng, shape),
                           series_number=number, description=description, frames=nframes, rle=rle)
            paths.append(_write(ds, directory / series_uid))
        study.series[series_uid] = paths
    return study


def large_series(directory: Path, megabytes: float, *, size: int = 512, seed: int = 16, series: int = 1) -> Study:
    """A CT study of about `megabytes` MiB (512x512 16-bit slices: 0.5 MiB each) in `series` series of about
    the same number of slices."""
    rng = np.random.default_rng(seed)
    study = Study(study_uid=generate_uid())
    slices = max(series, round(megabytes * 1024 * 1024 / (size * size * 2)))
    for s in range(series):
        series_uid = generate_uid()
        count = slices // series + (1 if s < slices % series else 0)
        study.series[series_uid] = [
            _write(_instance(study.study_uid, series_uid, CT_IMAGE, "CT", i, _pixels(rng, (size, size)),
                             series_number=s + 1, description="CT large"), directory / series_uid)
            for i in range(1, count + 1)]
    return study


def bundled_files(directory: Path) -> list[Study]:
    """pydicom's bundled files (BUNDLED), copied into `directory`: one Study each."""
    directory.mkdir(parents=True, exist_ok=True)
    studies = []
    for name in BUNDLED:
        source = Path(pydicom.data.get_testdata_file(name, download=False) or "")
        if not source.is_file():
            raise FileNotFoundError(f"pydicom's bundled test file {name} is missing")
        target = directory / name
        shutil.copyfile(source, target)
        header = pydicom.dcmread(target, stop_before_pixels=True)
        studies.append(Study(study_uid=str(header.StudyInstanceUID),
                             series={str(header.SeriesInstanceUID): [target]}))
    return studies


def endpoint_resource(address: str) -> dict:
    """An R4 Endpoint for a DICOMweb base URL (WADO-RS)."""
    return {"resourceType": "Endpoint", "status": "active",
            "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                               "code": "dicom-wado-rs", "display": "DICOM WADO-RS"},
            "name": "Test PACS (Orthanc, DICOMweb)", "payloadType": [{"text": "DICOM"}],
            "payloadMimeType": ["application/dicom"], "address": address}


def imaging_study_resource(study: Study, patient: str, endpoint: str) -> dict:
    """An R4 ImagingStudy of `study` for `patient` ("Patient/id") at `endpoint` ("Endpoint/id")."""
    series = []
    for series_uid, paths in study.series.items():
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        first = headers[0]
        series.append({
            "uid": series_uid, "number": int(first.get("SeriesNumber") or 0),
            "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": str(first.Modality)},
            "description": str(first.get("SeriesDescription", "")) or None,
            "numberOfInstances": len(paths), "endpoint": [{"reference": endpoint}],
            "instance": [{"uid": str(h.SOPInstanceUID), "number": int(h.get("InstanceNumber") or 0),
                          "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{h.SOPClassUID}"}}
                         for h in headers]})
    for item in series:
        if item["description"] is None:
            del item["description"]
    modalities = sorted({item["modality"]["code"] for item in series})
    return {"resourceType": "ImagingStudy", "status": "available",
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study.study_uid}"}],
            "subject": {"reference": patient}, "started": "2026-01-01T12:00:00Z",
            "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": m} for m in modalities],
            "endpoint": [{"reference": endpoint}], "numberOfSeries": len(series),
            "numberOfInstances": sum(item["numberOfInstances"] for item in series), "series": series}
