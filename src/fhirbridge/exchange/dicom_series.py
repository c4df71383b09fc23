"""A DICOM series as one encrypted attachment of a package (issue 15): the format, how seal writes it and how the
reviewer extracts it. Seal (loop/seal.py) and the reviewer (`reviewer open --extract`, the portal's viewer) share
this module, so the format is written down once, here.

FORMAT (a contract: the portal's viewer reads it too)

- One attachment per series: `attachments/att-NNN.jwe`, a streamed JWE (crypto/jwe.py) WITHOUT "zip" (DICOM pixel
  data does not deflate usefully, and DEFLATE was most of the seal time, issue 15 "Performance"), `cty`
  application/x-tar.
- Its plaintext is an uncompressed POSIX tar stream (ustar, what `tarfile` writes in mode "w|"): one regular
  file member per instance, named `<SOPInstanceUID>.dcm`, holding the DICOM part-10 bytes exactly as the PACS
  gave them (original transfer syntax), in InstanceNumber order (then SOP Instance UID). Nothing else: no
  directories, links or pax headers; a reader refuses any other member.
- Its manifest `attachments[]` entry: the usual `file`, `url` (`urn:dicom:uid:<SeriesInstanceUID>`: no
  hospital address), `owner` ("ImagingStudy/<id>"), `path` ("series[i]"), `title`, `content_type`
  "application/x-tar", `size` and `sha256` (of the tar plaintext), plus
  `"dicom": {"study_uid", "series_uid", "modality", "series_number", "description",
  "instances": [{"sop_uid", "sop_class_uid", "transfer_syntax", "number", "frames", "bytes", "sha256"}]}`
  in member order.
- The manifest's `imaging`: one entry per ImagingStudy the profile kept, `{"study_uid", "imaging_study":
  "ImagingStudy/<id>", "status": "included" | "withheld", "reason", "kind", "series": [series UIDs],
  "instances": N, "bytes": B}`; `kind` is a DicomwebError kind ("not-found", "too-large", ...) or one of
  ours ("not-configured", "no-uid", "older", "no-series").
- In the document, each ImagingStudy whose images travel points at them: each series carries the extension
  PACKAGE_ATTACHMENT (valueUrl: the package-relative file, "attachments/att-NNN.jwe"), and the study's and its
  series' `endpoint` references (the hospital's internal PACS, which no reviewer can reach) are removed.

Extracting (`extract_images`) is one pass per attachment: decrypt -> tar stream -> each member hashed while it
is written to a 0600 file; the members are checked against the manifest (names, order, sizes, SHA-256, count)
and the whole plaintext against the attachment's SHA-256 and the AES-GCM tag. The series' files appear under
their final folder only when all of that held; any mismatch removes that series' output and raises SealError
naming the attachment.
"""
from __future__ import annotations

import copy
import hashlib
import io
import os
import re
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import pydicom
from pydicom import uid
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.fileset import DIRECTORY_RECORDERS

from fhirbridge.crypto import files, jwe
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.dicomweb import DicomwebClient, DicomwebError
from fhirbridge.errors import SealError

CONTENT_TYPE = "application/x-tar"
PACKAGE_ATTACHMENT = "http://fhirbridge.org/fhir/StructureDefinition/package-attachment"
DICOMDIR = "DICOMDIR"
_BLOCK = 512
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")     # PS3.5 9.1
_COPY = 1 << 20


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


@dataclass(frozen=True)
class Member:
    """One instance to put in a series' tar: its file and its manifest entry (`instance_entry`)."""

    path: Path
    entry: dict


def instance_entry(*, sop_uid: str, sop_class_uid: str, transfer_syntax: str, number: int, frames: int,
                   size: int, sha256: str) -> dict:
    return {"sop_uid": sop_uid, "sop_class_uid": sop_class_uid, "transfer_syntax": transfer_syntax,
            "number": number, "frames": frames, "bytes": size, "sha256": sha256}


def ordered(members: Iterable[Member]) -> list[Member]:
    """Member order: InstanceNumber, then SOP Instance UID (what a viewer scrolls through)."""
    return sorted(members, key=lambda m: (m.entry["number"], m.entry["sop_uid"]))


def write_series_tar(dst: Writable, members: list[Member]) -> None:
    """The tar stream of one series into `dst` (a jwe.Encryptor): memory O(1 MiB) whatever its size. The
    members' sizes must be what the manifest says (the file is checked as it is copied).

    The bytes are what `tarfile` writes in mode "w|" (ustar headers from TarInfo.tobuf, each member padded to
    512 bytes, two zero blocks, the whole padded to tarfile's 10240-byte record), written here directly:
    tarfile's stream buffer re-copies its tail on every write, 8% of the seal time of a large series."""
    offset = 0
    for m in members:
        info = tarfile.TarInfo(f"{m.entry['sop_uid']}.dcm")
        info.size, info.mode, info.mtime = m.entry["bytes"], 0o600, 0
        header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        dst.write(header)
        copied = 0
        with open(m.path, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size != info.size:
                raise SealError(f"instance {m.entry['sop_uid']} changed on disk since it was retrieved")
            while block := f.read(_COPY):
                copied += len(block)
                if copied > info.size:
                    break
                dst.write(block)
        if copied != info.size:
            raise SealError(f"instance {m.entry['sop_uid']} changed on disk since it was retrieved")
        pad = -info.size % _BLOCK
        if pad:
            dst.write(b"\0" * pad)
        offset += len(header) + info.size + pad
    end = 2 * _BLOCK
    end += -(offset + end) % tarfile.RECORDSIZE
    dst.write(b"\0" * end)


def encrypt_series(members: list[Member], dst: Path, recipients: list, *, typ: str) -> dict:
    """The series' attachment file: tar -> JWE (no zip), written to a temporary name and renamed when
    complete. Returns jwe's summary (plaintext_sha256, plaintext_size)."""
    tmp = dst.with_name(f".{dst.name}.part")
    try:
        with files.open_private(tmp) as out:
            enc = jwe.Encryptor(out, recipients, compress=False, typ=typ, cty=CONTENT_TYPE)
            write_series_tar(enc, members)
            info = enc.close()
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return info


def point_at_package(resources: list[dict], series_files: dict[str, str]) -> list[dict]:
    """The records as the document carries them when images travel: each ImagingStudy with a series in
    `series_files` (SeriesInstanceUID -> "attachments/att-NNN.jwe") gets the PACKAGE_ATTACHMENT extension on
    those series and loses its `endpoint` references (the hospital's internal PACS); a dicom-wado-rs Endpoint
    that nothing shared refers to any more is left out. The inputs are not changed."""
    out: list[dict] = []
    dropped_refs: set[str] = set()
    for res in resources:
        if res.get("resourceType") == "ImagingStudy" and any(s.get("uid") in series_files
                                                              for s in res.get("series", [])):
            res = copy.deepcopy(res)
            dropped_refs |= {str(e.get("reference")) for e in res.pop("endpoint", [])}
            for s in res.get("series", []):
                dropped_refs |= {str(e.get("reference")) for e in s.pop("endpoint", [])}
                if s.get("uid") in series_files:
                    s.setdefault("extension", []).append({"url": PACKAGE_ATTACHMENT,
                                                          "valueUrl": series_files[s["uid"]]})
        out.append(res)
    still = {e.get("reference") for r in out if r.get("resourceType") == "ImagingStudy"
             for e in [*r.get("endpoint", []), *(x for s in r.get("series", []) for x in s.get("endpoint", []))]}
    return [r for r in out if not (r.get("resourceType") == "Endpoint" and f"Endpoint/{r.get('id')}" in dropped_refs
                                   and f"Endpoint/{r.get('id')}" not in still)]


# --- the reviewer's side ----------------------------------------------------------------------------------

class _Opened(Protocol):
    path: Path

    @property
    def manifest(self) -> dict: ...


def series_attachments(manifest: dict) -> list[dict]:
    """The attachments that are DICOM series (they carry "dicom")."""
    return [a for a in manifest.get("attachments", []) if isinstance(a, dict) and isinstance(a.get("dicom"), dict)]


def extract_images(opened: _Opened, key: KeyRing, outdir: Path) -> list[dict]:
    """Every series of the package into `outdir/<StudyUID>/<SeriesUID>/<SOPUID>.dcm` (0600 files, 0700 folders),
    one pass per attachment, and a DICOMDIR at `outdir/DICOMDIR` (see `write_dicomdir`). Returns per series
    {"file", "study_uid", "series_uid", "folder", "instances", "bytes"}. Raises SealError naming the attachment
    that does not match the signed manifest (its series' output removed; series already extracted stay)."""
    outdir = files.private_dir(Path(outdir))
    done: list[dict] = []
    for att in series_attachments(opened.manifest):
        done.append(_extract_one(opened, att, key, outdir))
    if done:
        write_dicomdir(outdir, done)
    return done


def _attachment_file(opened: _Opened, att: dict) -> Path:
    name = att.get("file")
    if not isinstance(name, str):
        raise SealError("an attachment of the manifest names no file")
    p = (opened.path / name).resolve()
    if opened.path.resolve() not in p.parents:   # a manifest must not point outside its package
        raise SealError(f"attachment path {name!r} leaves the package")
    if not p.is_file():
        raise SealError(f"attachment {name} named in the manifest is missing")
    return p


def _uid(value: Any, what: str, file: str) -> str:
    if not isinstance(value, str) or len(value) > 64 or not _UID.match(value):
        raise SealError(f"attachment {file}: the manifest's {what} is not a DICOM UID")
    return value


def _extract_one(opened: _Opened, att: dict, key: KeyRing, outdir: Path) -> dict:
    name = str(att.get("file"))
    src = _attachment_file(opened, att)
    dicom = att["dicom"]
    study = _uid(dicom.get("study_uid"), "study_uid", name)
    series = _uid(dicom.get("series_uid"), "series_uid", name)
    expected = dicom.get("instances")
    if not isinstance(expected, list) or not expected:
        raise SealError(f"attachment {name}: the manifest lists no instances")
    for item in expected:
        _uid(item.get("sop_uid") if isinstance(item, dict) else None, "sop_uid", name)
    parent = files.private_dir(outdir / study)
    final = parent / series
    staging = parent / f".partial-{series}"
    files.remove_tree(staging)
    files.private_dir(staging)
    # Each finished instance is fsynced and closed on a helper thread while the next one is decrypted (as the
    # DICOMweb client does): durable before the folder's rename, without the decryption waiting on the disk.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="extract-fsync") as syncer:
        _decrypt_into(_TarSink(staging, expected, name, syncer), src, key, att, name, staging)
    if final.exists():
        files.remove_tree(final)
    staging.rename(final)
    files.fsync_dir(parent)
    return {"file": name, "study_uid": study, "series_uid": series, "folder": final,
            "instances": len(expected), "bytes": sum(int(i.get("bytes") or 0) for i in expected),
            "entries": expected}


def _decrypt_into(sink: _TarSink, src: Path, key: KeyRing, att: dict, name: str, staging: Path) -> None:
    series = str(att["dicom"].get("series_uid"))
    try:
        with open(src, "rb") as f:
            info = jwe.decrypt_stream(f, sink, key, max_plaintext=att.get("size"))
        sink.finish()
        if info["plaintext_sha256"] != att.get("sha256") or info["plaintext_size"] != att.get("size"):
            raise SealError(f"attachment {name} does not match the signed manifest (SHA-256 or size of the series)")
    except BaseException as exc:
        sink.abort()
        files.remove_tree(staging)
        if isinstance(exc, SealError) and name not in str(exc):
            raise SealError(f"attachment {name} (series {series}): {exc}") from None
        raise


class _TarSink:
    """A push parser of the tar stream seal writes (ustar, regular files only): each member hashed as it is
    written to its own 0600 file, and checked against the manifest's next instance (name, size, SHA-256)."""

    def __init__(self, folder: Path, expected: list[dict], name: str, syncer: ThreadPoolExecutor):
        self.folder, self.expected, self.name, self.syncer = folder, expected, name, syncer
        self.pending: list[Future] = []
        self.buf = bytearray()
        self.index = 0                     # members finished
        self.file: BinaryIO | None = None
        self.remaining = 0                 # bytes of the current member still to come
        self.padding = 0                   # zero bytes after it (to the 512-byte block)
        self.sha = hashlib.sha256()
        self.ended = False

    def _fail(self, why: str) -> SealError:
        return SealError(f"attachment {self.name} does not match the signed manifest: {why}")

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self.file is not None:
                n = min(self.remaining, len(view))
                self.file.write(view[:n])
                self.sha.update(view[:n])
                self.remaining -= n
                view = view[n:]
                if self.remaining == 0:
                    self._close_member()
                continue
            if self.padding:
                n = min(self.padding, len(view))
                self.padding -= n
                view = view[n:]
                continue
            need = _BLOCK - len(self.buf)
            self.buf += view[:need]
            view = view[need:]
            if len(self.buf) == _BLOCK:
                block, self.buf = bytes(self.buf), bytearray()
                self._header(block)
        return len(data)

    def _header(self, block: bytes) -> None:
        if self.ended:
            if block.strip(b"\0"):
                raise self._fail("data after the end of the tar stream")
            return
        if not block.strip(b"\0"):
            self.ended = True          # the first of the two zero blocks that end a tar
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
        except tarfile.HeaderError as exc:
            raise self._fail(f"a tar header is corrupt ({exc})") from None
        if not info.isreg():
            raise self._fail(f"member {info.name[:80]!r} is not a regular file")
        if self.index >= len(self.expected):
            raise self._fail(f"more instances than the {len(self.expected)} it lists")
        want = self.expected[self.index]
        if info.name != f"{want['sop_uid']}.dcm" or info.size != want.get("bytes"):
            raise self._fail(f"member {self.index + 1} is not instance {want['sop_uid']} of {want.get('bytes')} "
                             "bytes")
        self.file = files.open_private(self.folder / info.name, exclusive=True)
        self.sha = hashlib.sha256()
        self.remaining = info.size
        self.padding = -info.size % _BLOCK
        if info.size == 0:
            self._close_member()

    def _close_member(self) -> None:
        assert self.file is not None
        self.file.flush()
        self.pending.append(self.syncer.submit(_sync_and_close, self.file))
        self.file = None
        want = self.expected[self.index]
        if self.sha.hexdigest() != want.get("sha256"):
            raise self._fail(f"instance {want['sop_uid']} has another SHA-256 than the manifest says")
        self.index += 1

    def wait(self) -> None:
        """Every finished file synced and closed (raises the first fsync error)."""
        for future in self.pending:
            future.result()

    def finish(self) -> None:
        self.wait()
        if self.file is not None or self.remaining or self.buf or not self.ended:
            raise self._fail("the tar stream ends early")
        if self.index != len(self.expected):
            raise self._fail(f"{self.index} instances where it lists {len(self.expected)}")

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        for future in self.pending:
            future.exception()   # wait: no thread may still hold a file of the folder about to be removed


def _sync_and_close(file: BinaryIO) -> None:
    try:
        files.fsync_file(file)
    finally:
        file.close()


# --- into the reviewer's own PACS ----------------------------------------------------------------------

def import_to_pacs(client: DicomwebClient, series: list[dict], *, batch: int = 50) -> dict:
    """STOW-RS (PS3.18 10.5) every extracted instance of `series` (what extract_images returns) into the
    reviewer's PACS, in batches of `batch` per request, then check by QIDO-RS (10.6) that the PACS lists every
    SOP Instance UID of each series. Returns {"series", "instances"}; a DicomwebError names what is missing."""
    sent = 0
    for s in series:
        paths = sorted(Path(s["folder"]).glob("*.dcm"))
        for i in range(0, len(paths), batch):
            client.store(paths[i:i + batch], study_uid=s["study_uid"])
        sent += len(paths)
        want = {p.stem for p in paths}
        listed = {str((item.get("00080018") or {}).get("Value", [""])[0])
                  for item in client.search_instances(s["study_uid"], s["series_uid"])}
        missing = want - listed
        if missing:
            raise DicomwebError(f"after STOW-RS the PACS lists {len(want) - len(missing)} of the {len(want)} "
                                f"instances of series {s['series_uid']}", kind="mismatch")
    return {"series": len(series), "instances": sent}


# --- DICOMDIR ------------------------------------------------------------------------------------------

# PS3.3 F.5: the directory record of an instance, by SOP Class (pydicom's recorders fill each record type's
# keys). The SOP Classes a second opinion carries besides images; any other is an IMAGE record. Each has its
# File ID prefix of pydicom's layout (its FileSet reads our DICOMDIR as one of its own).
_LEAF_RECORDS: dict[str, str] = {uid.RTDoseStorage: "RT DOSE", uid.RTStructureSetStorage: "RT STRUCTURE SET",
                 uid.RTPlanStorage: "RT PLAN", uid.BasicTextSRStorage: "SR DOCUMENT",
                 uid.EnhancedSRStorage: "SR DOCUMENT", uid.ComprehensiveSRStorage: "SR DOCUMENT",
                 uid.KeyObjectSelectionDocumentStorage: "KEY OBJECT DOC",
                 uid.EncapsulatedPDFStorage: "ENCAP DOC", uid.GrayscaleSoftcopyPresentationStateStorage: "PRESENTATION"}

_PREFIX = {"IMAGE": "IM", "RT DOSE": "RD", "RT STRUCTURE SET": "RS", "RT PLAN": "RP", "SR DOCUMENT": "SR",
           "KEY OBJECT DOC": "KY", "ENCAP DOC": "ED", "PRESENTATION": "PR"}


@dataclass
class _Node:
    record: Dataset
    children: dict[str, _Node]


# PS3.3 F.5 makes these Type 1 in the records, and real files lack them (pydicom's own bundled files have an
# empty InstanceNumber): the record then says "unknown" in the attribute's syntax, so a viewer still finds the
# file. Only the DICOMDIR's index says so; the instance's own bytes are never changed.
_UNKNOWN = {"PatientID": "UNKNOWN", "StudyDate": "19000101", "StudyTime": "000000", "StudyID": "0",
            "SeriesNumber": 0, "InstanceNumber": 0, "Modality": "OT"}


def _record(kind: str, header: Dataset) -> Dataset:
    try:
        record = DIRECTORY_RECORDERS[kind](header)
    except (ValueError, AttributeError):
        filled = copy.copy(header)
        for keyword, value in _UNKNOWN.items():
            if filled.get(keyword) in (None, ""):
                setattr(filled, keyword, value)
        record = DIRECTORY_RECORDERS[kind](filled)
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = kind
    return record


def _image_record(entry: dict) -> Dataset:
    record = Dataset()
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = "IMAGE"
    record.InstanceNumber = int(entry.get("number") or 0)
    return record


def write_dicomdir(outdir: Path, series: list[dict]) -> Path:
    """A DICOMDIR (PS3.10 8, PS3.3 F) at `outdir/DICOMDIR`, so a viewer that opens media (a CD's layout) finds
    every instance. PS3.10 8.2 allows File IDs of at most 8 components of at most 8 characters (A-Z, 0-9, _),
    which UIDs are not; so the DICOMDIR references `PT000000/ST000000/SE000000/IM000000` (pydicom's layout)
    and each of those files is a hard link to the extracted `<Study>/<Series>/<SOP>.dcm`: the same bytes, no
    second copy on disk (a copy where the file system has no hard links).

    `series`: what extract_images returns per series (its "folder", and the manifest's "entries").

    Linear in the number of instances: one header read per series (no pixel data) and for each instance that
    is not an image, the PATIENT / STUDY / SERIES / leaf records built with pydicom's recorders, then the
    Directory Record Sequence encoded twice: once to learn where each record's item starts (its offset, PS3.3
    F.3.2.1; the offsets are fixed-size UL values, so filling them in moves nothing), once with the offsets.
    pydicom's FileSet did the same work quadratically and wrote a second copy of every instance (issue 15:
    most of the extract time of a large study)."""
    staging = files.private_dir(outdir / ".dicomdir-staging")
    try:
        patients: dict[str, _Node] = {}
        links: list[tuple[Path, Path]] = []
        for s in series:
            paths = sorted(Path(s["folder"]).glob("*.dcm"))
            if not paths:
                continue
            # The PATIENT, STUDY and SERIES records from the series' first instance; an image's record from its
            # signed manifest entry (checked against the file's SHA-256 as it was extracted), so only other
            # kinds of instance (an RT Dose, a report) have their header read.
            header = pydicom.dcmread(paths[0], stop_before_pixels=True)
            patient_id = str(header.get("PatientID", ""))
            if patient_id not in patients:
                patients[patient_id] = _Node(_record("PATIENT", header), {})
            patient = patients[patient_id]
            if str(header.StudyInstanceUID) not in patient.children:
                patient.children[str(header.StudyInstanceUID)] = _Node(_record("STUDY", header), {})
            study = patient.children[str(header.StudyInstanceUID)]
            if str(header.SeriesInstanceUID) not in study.children:
                study.children[str(header.SeriesInstanceUID)] = _Node(_record("SERIES", header), {})
            seq = study.children[str(header.SeriesInstanceUID)]
            entries = {e.get("sop_uid"): e for e in s.get("entries") or [] if isinstance(e, dict)}
            folder_id = [f"PT{list(patients).index(patient_id):06d}",
                         f"ST{list(patient.children).index(str(header.StudyInstanceUID)):06d}",
                         f"SE{list(study.children).index(str(header.SeriesInstanceUID)):06d}"]
            for path in paths:
                entry = entries.get(path.stem)
                kind = _LEAF_RECORDS.get(str(entry["sop_class_uid"]), "IMAGE") if entry else ""
                if kind == "IMAGE":
                    assert entry is not None
                    leaf = _image_record(entry)
                else:
                    header = pydicom.dcmread(path, stop_before_pixels=True)
                    kind = _LEAF_RECORDS.get(str(header.SOPClassUID), "IMAGE")
                    leaf = _record(kind, header)
                    entry = {"sop_uid": str(header.SOPInstanceUID), "sop_class_uid": str(header.SOPClassUID),
                             "transfer_syntax": str(header.file_meta.TransferSyntaxUID)}
                file_id = [*folder_id, f"{_PREFIX[kind]}{len(seq.children):06d}"]
                leaf.ReferencedFileID = file_id
                leaf.ReferencedSOPClassUIDInFile = entry["sop_class_uid"]
                leaf.ReferencedSOPInstanceUIDInFile = entry["sop_uid"]
                leaf.ReferencedTransferSyntaxUIDInFile = entry["transfer_syntax"]
                seq.children[entry["sop_uid"]] = _Node(leaf, {})
                links.append((path, staging.joinpath(*file_id)))
        # Depth first, each record followed by its lower-level records: the order readers expect.
        order: list[_Node] = []

        def walk(siblings: list[_Node]) -> None:
            for node in siblings:
                order.append(node)
                walk(list(node.children.values()))

        roots = list(patients.values())
        walk(roots)
        ds = _dicomdir_dataset([node.record for node in order])
        encoded = io.BytesIO()
        ds.save_as(encoded, enforce_file_format=True)
        read = pydicom.dcmread(io.BytesIO(encoded.getvalue()))
        offset = {id(node): item.seq_item_tell for node, item in zip(order, read.DirectoryRecordSequence, strict=True)}
        for siblings in _sibling_lists(roots):
            for here, after in zip(siblings, siblings[1:], strict=False):
                here.record.OffsetOfTheNextDirectoryRecord = offset[id(after)]
            for node in siblings:
                if node.children:
                    first = next(iter(node.children.values()))
                    node.record.OffsetOfReferencedLowerLevelDirectoryEntity = offset[id(first)]
        if roots:
            ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = offset[id(roots[0])]
            ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = offset[id(roots[-1])]
        with files.open_private(staging / DICOMDIR) as out:
            ds.save_as(out, enforce_file_format=True)
        for original, target in links:
            files.private_dir(target.parent)
            try:
                os.link(original, target)
            except OSError:
                shutil.copyfile(original, target)
        for old in outdir.iterdir():
            if old.name == DICOMDIR or (old.is_dir() and re.fullmatch(r"PT\d{6}", old.name)):
                files.remove_tree(old) if old.is_dir() else old.unlink()
        for item in staging.iterdir():
            item.rename(outdir / item.name)
        files.narrow_tree(outdir, warn=False)
    finally:
        files.remove_tree(staging)
    return outdir / DICOMDIR


def _sibling_lists(roots: list[_Node]) -> Iterator[list[_Node]]:
    stack = [roots]
    while stack:
        siblings = stack.pop()
        yield siblings
        stack.extend(list(node.children.values()) for node in siblings if node.children)


def _dicomdir_dataset(records: list[Dataset]) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = uid.PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(DICOMDIR, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.FileSetID = "FHIRBRIDGE"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = records
    return ds
