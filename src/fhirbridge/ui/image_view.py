"""The images of a package as the portal's viewer lists them: studies, series, instances, frames, reports.

Read from the folder the package's images were extracted to (`<StudyUID>/<SeriesUID>/<SOPUID>.dcm`, the
layout of exchange.dicom_series.extract_images), headers only (the pixels are read per frame by
ui/dicom_render.py when one is shown). Series are ordered by Series Number, instances by Instance Number
then by position along the slice normal, so scrolling goes through the volume in order. A study's report is
the DiagnosticReport of the package's document whose `imagingStudy` names the ImagingStudy of that Study
Instance UID (R4 DiagnosticReport.imagingStudy).

Key images are (series, SOP instance, frame) triples the reviewer marks; `KeyImage` checks one against what
the package holds, so only images of this package travel back with the opinion.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from fhirbridge.fhir.elements import concept_text

UID = re.compile(r"[0-9]+(\.[0-9]+)*")        # PS3.5 9.1: digits and dots, at most 64 characters
CT_LIKE = {"CT"}                               # modalities whose values are Hounsfield units (CT presets)


@dataclass
class Instance:
    sop_uid: str
    sop_class_uid: str
    number: int
    frames: int
    transfer_syntax: str
    path: Path
    position: float = 0.0


@dataclass
class Series:
    study_uid: str
    series_uid: str
    modality: str
    number: int
    description: str
    instances: list[Instance] = field(default_factory=list)

    @property
    def hounsfield(self) -> bool:
        return self.modality in CT_LIKE

    @property
    def frames(self) -> int:
        return sum(i.frames for i in self.instances)

    def title(self) -> str:
        """"MR T2 sagittal (#2)": the description, led by the modality unless it already is."""
        what = self.description or "series"
        if self.modality and not what.upper().startswith(self.modality.upper()):
            what = f"{self.modality} {what}"
        return f"{what} (#{self.number})" if self.number else what

    def instance(self, index: int) -> Instance | None:
        return self.instances[index] if 0 <= index < len(self.instances) else None

    def find(self, sop_uid: str) -> tuple[int, Instance] | None:
        return next(((i, x) for i, x in enumerate(self.instances) if x.sop_uid == sop_uid), None)


@dataclass
class Report:
    title: str
    status: str
    conclusion: str
    date: str


@dataclass
class ImageSet:
    series: list[Series]
    reports: dict[str, list[Report]]         # Study Instance UID -> the reports that reference its study

    def by_uid(self, series_uid: str) -> Series | None:
        return next((s for s in self.series if s.series_uid == series_uid), None)

    @property
    def study_uids(self) -> list[str]:
        return list(dict.fromkeys(s.study_uid for s in self.series))


def scan(root: Path, document: dict | None = None) -> ImageSet:
    """Every instance below `root` (`<study>/<series>/<sop>.dcm`), grouped and ordered; a file that is not
    DICOM is skipped (the extraction verified every one against the signed manifest)."""
    found: dict[str, Series] = {}
    for path in sorted(root.glob("*/*/*.dcm")):
        try:
            h = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError):
            continue
        series_uid = str(h.get("SeriesInstanceUID", path.parent.name))
        s = found.get(series_uid)
        if s is None:
            s = found[series_uid] = Series(study_uid=str(h.get("StudyInstanceUID", path.parent.parent.name)),
                                           series_uid=series_uid, modality=str(h.get("Modality", "")),
                                           number=_int(h.get("SeriesNumber")),
                                           description=str(h.get("SeriesDescription", "")))
        s.instances.append(Instance(sop_uid=str(h.get("SOPInstanceUID", path.stem)),
                                    sop_class_uid=str(h.get("SOPClassUID", "")),
                                    number=_int(h.get("InstanceNumber")), frames=max(_int(h.get("NumberOfFrames")), 1),
                                    transfer_syntax=str(h.file_meta.get("TransferSyntaxUID", "")), path=path,
                                    position=_position(h)))
    for s in found.values():
        s.instances.sort(key=lambda i: (i.number, i.position, i.sop_uid))
    ordered = sorted(found.values(), key=lambda s: (s.study_uid, s.number, s.series_uid))
    return ImageSet(series=ordered, reports=reports_by_study(document or {}))


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _position(h) -> float:
    """Where the slice lies along its normal (PS3.3 C.7.6.2.1.1), for ordering slices of equal number."""
    try:
        pos = [float(v) for v in h.ImagePositionPatient]
        o = [float(v) for v in h.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return 0.0
    normal = (o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3])
    return sum(p * n for p, n in zip(pos, normal, strict=True))


def study_uid_of(imaging_study: dict) -> str | None:
    """The Study Instance UID an R4 ImagingStudy names (identifier urn:dicom:uid, value urn:oid:<uid>)."""
    for ident in imaging_study.get("identifier", []):
        value = ident.get("value")
        if ident.get("system") == "urn:dicom:uid" and isinstance(value, str):
            return value.removeprefix("urn:oid:")
    return None


def reports_by_study(document: dict) -> dict[str, list[Report]]:
    resources = [e.get("resource", {}) for e in document.get("entry", [])]
    uid_of = {}
    for r in resources:
        if r.get("resourceType") == "ImagingStudy" and (uid := study_uid_of(r)):
            uid_of[f"ImagingStudy/{r.get('id')}"] = uid
    for e in document.get("entry", []):                     # references by fullUrl too
        r = e.get("resource", {})
        if r.get("resourceType") == "ImagingStudy" and e.get("fullUrl") and (uid := study_uid_of(r)):
            uid_of[e["fullUrl"]] = uid
    out: dict[str, list[Report]] = {}
    for r in resources:
        if r.get("resourceType") != "DiagnosticReport":
            continue
        for ref in r.get("imagingStudy", []):
            target = ref.get("reference", "")
            uid = uid_of.get(target) or next((u for k, u in uid_of.items() if target.endswith(k)), None)
            if uid:
                out.setdefault(uid, []).append(Report(
                    title=concept_text(r.get("code")) or "Report", status=str(r.get("status", "")),
                    conclusion=str(r.get("conclusion", "")),
                    date=str(r.get("effectiveDateTime") or r.get("issued") or "")[:10]))
    return out


@dataclass(frozen=True)
class KeyImage:
    """One image the reviewer marked: a frame (1-based, PS3.3 C.7.6.6 Frame Number) of an instance."""
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    frame: int

    def as_dict(self) -> dict:
        return {"study_uid": self.study_uid, "series_uid": self.series_uid, "sop_uid": self.sop_uid,
                "sop_class_uid": self.sop_class_uid, "frame": self.frame}


def key_image(images: ImageSet, series_uid: str, sop_uid: str, frame: object) -> KeyImage | None:
    """The key image these values name, if this package holds it (else None: never trusted as sent)."""
    s = images.by_uid(series_uid)
    found = s.find(sop_uid) if s else None
    try:
        n = int(str(frame))
    except ValueError:
        return None
    if s is None or found is None or not 1 <= n <= found[1].frames:
        return None
    return KeyImage(s.study_uid, s.series_uid, sop_uid, found[1].sop_class_uid, n)
