"""The series attachment format (exchange/dicom_series.py): seal's tar-in-JWE and the reviewer's one-pass extract
give back every instance byte for byte, with a DICOMDIR a viewer opens; a corrupted attachment is refused naming
it, and nothing of that series is left behind."""
from __future__ import annotations

import base64
import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet

from fhirbridge.crypto import jwe, keys
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.errors import SealError
from fhirbridge.exchange import dicom_series
from fhirbridge.exchange.dicom_series import Member, encrypt_series, extract_images, instance_entry, ordered
from tests.kit.dicom_studies import bundled_files, make_study, sha256_file


@dataclass
class Opened:
    path: Path
    manifest: dict = field(default_factory=dict)


def _members(paths: list[Path]) -> list[Member]:
    out = []
    for p in paths:
        h = pydicom.dcmread(p, stop_before_pixels=True)
        out.append(Member(p, instance_entry(sop_uid=str(h.SOPInstanceUID), sop_class_uid=str(h.SOPClassUID),
                                            transfer_syntax=str(h.file_meta.TransferSyntaxUID),
                                            number=int(h.InstanceNumber), frames=int(h.get("NumberOfFrames") or 1),
                                            size=p.stat().st_size, sha256=sha256_file(p))))
    return ordered(out)


@pytest.fixture
def package(tmp_path):
    ring = KeyRing(keys.generate_jwks())
    study = make_study(tmp_path / "study", ct_slices=5, mr_slices=4, frames=3, rle_slices=2, size=32)
    pkg = tmp_path / "package"
    (pkg / "attachments").mkdir(parents=True)
    attachments = []
    for n, (series_uid, paths) in enumerate(study.series.items(), 1):
        members = _members(paths)
        name = f"attachments/att-{n:03d}.jwe"
        info = encrypt_series(members, pkg / name, ring.encryption_keys(), typ="fhirbridge-attachment+jwe")
        attachments.append({"file": name, "content_type": dicom_series.CONTENT_TYPE,
                            "size": info["plaintext_size"], "sha256": info["plaintext_sha256"],
                            "dicom": {"study_uid": study.study_uid, "series_uid": series_uid, "modality": "CT",
                                      "series_number": n, "description": "",
                                      "instances": [m.entry for m in members]}})
    return Opened(pkg, {"attachments": attachments}), ring, study


def test_the_plaintext_is_a_plain_tar_of_part10_files_in_instance_order(package, tmp_path):
    opened, ring, study = package
    att = opened.manifest["attachments"][0]
    header = (opened.path / att["file"]).read_bytes()[:400]
    assert b'"zip"' not in base64.urlsafe_b64decode(header.split(b'"')[3] + b"==")   # DICOM is not deflated
    plain = tmp_path / "plain.tar"
    jwe.decrypt_to_path(opened.path / att["file"], plain, ring)
    with tarfile.open(plain, mode="r:") as tar:
        names = tar.getnames()
    assert names == [f"{i['sop_uid']}.dcm" for i in att["dicom"]["instances"]]
    numbers = [i["number"] for i in att["dicom"]["instances"]]
    assert numbers == sorted(numbers)


def test_extract_gives_every_instance_byte_identical_private_and_a_dicomdir(package, tmp_path):
    opened, ring, study = package
    out = tmp_path / "out"
    os.umask(0o022)
    done = extract_images(opened, ring, out)
    assert len(done) == len(study.series)
    got = {}
    for path in out.glob("*/*/*.dcm"):
        assert path.parent.parent.name == study.study_uid
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        got[path.stem] = sha256_file(path)
    assert got == study.hashes()
    for folder in [out, *out.glob("*/"), *out.glob("*/*/")]:
        if folder.is_dir():
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    fs = FileSet(pydicom.dcmread(out / "DICOMDIR"))
    assert len(fs) == len(got)
    for instance in fs:
        ref = out / instance.FileID
        assert hashlib.sha256(ref.read_bytes()).hexdigest() == got[instance.SOPInstanceUID]
        assert all(len(part) <= 8 for part in Path(instance.FileID).parts)


@pytest.mark.parametrize("where", ["tag", "middle"])
def test_a_corrupted_attachment_is_refused_naming_it_and_leaves_nothing_of_its_series(package, tmp_path, where):
    opened, ring, study = package
    att = opened.manifest["attachments"][1]
    path = opened.path / att["file"]
    data = bytearray(path.read_bytes())
    i = data.rindex(b'"tag":"') + 8 if where == "tag" else len(data) // 2
    data[i] = ord("A") if data[i] != ord("A") else ord("B")
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(SealError, match=att["file"]):
        extract_images(opened, ring, out)
    series_dir = out / study.study_uid / att["dicom"]["series_uid"]
    assert not series_dir.exists()
    assert not list((out / study.study_uid).glob(".partial-*"))


def test_a_manifest_hash_that_does_not_match_is_refused(package, tmp_path):
    opened, ring, _study = package
    att = opened.manifest["attachments"][0]
    att["dicom"]["instances"][0]["sha256"] = "0" * 64
    with pytest.raises(SealError, match=f"{att['file']}.*SHA-256"):
        extract_images(opened, ring, tmp_path / "out")


def test_the_dicomdir_of_several_patients_and_record_types_is_what_pydicom_reads(tmp_path):
    # pydicom's bundled files: five studies of different patients, among them an RT Dose (a RT DOSE record,
    # PS3.3 F.5) and a JPEG 2000 image. The DICOMDIR is written by our own linear writer; pydicom's FileSet
    # reader follows its offsets (next record, lower level) to every instance.
    studies = bundled_files(tmp_path / "src")
    series = []
    for n, s in enumerate(studies):
        folder = tmp_path / "out" / f"{n}"
        folder.mkdir(parents=True)
        for p in s.files:
            (folder / f"{pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm").write_bytes(p.read_bytes())
        series.append({"folder": folder})
    path = dicom_series.write_dicomdir(tmp_path / "out", series)
    fs = FileSet(pydicom.dcmread(path))
    assert len(fs) == len(studies)
    assert len(fs.find(PatientID=str(pydicom.dcmread(studies[0].files[0]).PatientID))) >= 1
    kinds = {i.DirectoryRecordType for i in fs}
    assert "RT DOSE" in kinds and "IMAGE" in kinds
    for instance in fs:
        original = next(p for s in studies for p in s.files
                        if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == instance.SOPInstanceUID)
        assert (tmp_path / "out" / instance.FileID).read_bytes() == original.read_bytes()
    dicomdir = pydicom.dcmread(path)
    assert dicomdir.file_meta.MediaStorageSOPClassUID == pydicom.uid.MediaStorageDirectoryStorage
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
