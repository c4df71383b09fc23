"""Key images: the frames the reviewer marked, carried in the opinion document and filed with it.

FHIR R4 has no resource for a selection of images (R5 adds ImagingSelection; STU3's ImagingManifest, the
FHIR side of a DICOM Key Object Selection, was withdrawn in R4). So the opinion document carries them the
way R4 can, without an extension of ours:

- a Composition section coded DICOM DCM 121180 "Key Images" (a heading of DICOM CID 7001, Diagnostic Imaging
  Report Headings) whose narrative lists every image with its Study, Series and SOP Instance UIDs and frame
  number, readable in any EHR that shows the filed document;
- as the section's entries, one ImagingStudy per study, in the opinion Bundle itself (urn:uuid), holding only
  the marked instances: `identifier` the Study Instance UID (urn:dicom:uid, as the hospital's ImagingStudy
  names it, so it is a logical reference into any PACS and never a link into the hospital's server),
  `series.uid` + `modality`, `instance.uid` + `sopClass`, and the marked frame numbers in `instance.title`
  (R4 ImagingStudy.series.instance has no frame element).

A DICOM Key Object Selection Document (PS3.3 A.35.4) would be the DICOM-native form; building one means
writing an SR content tree and filing a DICOM object in a PACS the hospital did not open to us, so it is left
for later (docs/imaging.md).
"""
from __future__ import annotations

import html
import re
import uuid

DCM = "http://dicom.nema.org/resources/ontology/DCM"
KEY_IMAGES_SECTION = {"system": DCM, "code": "121180", "display": "Key Images"}
UID = re.compile(r"[0-9]+(\.[0-9]+)*")
FIELDS = ("study_uid", "series_uid", "sop_uid", "sop_class_uid", "modality", "frame")
MAX_KEY_IMAGES = 200


def problems(images: object) -> list[str]:
    """What is wrong with a list of key images ({study_uid, series_uid, sop_uid, sop_class_uid, modality,
    frame}); empty when each is well formed."""
    if not isinstance(images, list):
        return ["key_images: must be a list of {study_uid, series_uid, sop_uid, sop_class_uid, modality, frame}"]
    if len(images) > MAX_KEY_IMAGES:
        return [f"key_images: at most {MAX_KEY_IMAGES}"]
    out = []
    for i, k in enumerate(images):
        if not isinstance(k, dict):
            out.append(f"key_images[{i}]: must be a table")
            continue
        for name in ("study_uid", "series_uid", "sop_uid", "sop_class_uid"):
            v = k.get(name)
            if not isinstance(v, str) or len(v) > 64 or not UID.fullmatch(v):
                out.append(f"key_images[{i}]: {name} is not a DICOM UID")
        if not isinstance(k.get("modality"), str) or not re.fullmatch(r"[A-Z0-9_]{1,16}", k["modality"]):
            out.append(f"key_images[{i}]: modality is not a DICOM modality code")
        if isinstance(k.get("frame"), bool) or not isinstance(k.get("frame"), int) or k["frame"] < 1:
            out.append(f"key_images[{i}]: frame must be a number from 1")
        if set(k) - set(FIELDS):
            out.append(f"key_images[{i}]: unknown key {sorted(set(k) - set(FIELDS))[0]!r}")
    return out


def _esc(text: str) -> str:
    return html.escape(text, quote=False)


def section_and_entries(images: list[dict], *, opinion_id: str, patient_url: str, sr_url: str
                        ) -> tuple[dict, list[dict]]:
    """The "Key Images" section and its ImagingStudy entries (one per study, marked instances only)."""
    studies: dict[str, dict] = {}
    for k in images:
        study = studies.setdefault(k["study_uid"], {})
        series = study.setdefault(k["series_uid"], {"modality": k["modality"], "instances": {}})
        inst = series["instances"].setdefault(k["sop_uid"], {"sop_class_uid": k["sop_class_uid"], "frames": []})
        if k["frame"] not in inst["frames"]:
            inst["frames"].append(k["frame"])
    entries, refs = [], []
    for study_uid, series_map in studies.items():
        rid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:uuid:{opinion_id}#key-images#{study_uid}"))
        series = []
        for series_uid, s in series_map.items():
            series.append({
                "uid": series_uid, "modality": {"system": DCM, "code": s["modality"]},
                "numberOfInstances": len(s["instances"]),
                "instance": [{"uid": sop,
                              "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{i['sop_class_uid']}"},
                              "title": "key image, frame " + ", ".join(str(f) for f in sorted(i["frames"]))}
                             for sop, i in s["instances"].items()]})
        n = sum(len(s["instances"]) for s in series_map.values())
        resource = {"resourceType": "ImagingStudy", "id": rid, "status": "available",
                    "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
                    "subject": {"reference": patient_url}, "basedOn": [{"reference": sr_url}],
                    "description": "Key images marked by the second-opinion reviewer",
                    "numberOfSeries": len(series), "numberOfInstances": n, "series": series}
        entries.append({"fullUrl": f"urn:uuid:{rid}", "resource": resource})
        refs.append({"reference": f"urn:uuid:{rid}"})
    div = f'<div xmlns="http://www.w3.org/1999/xhtml">{narrative(images)}</div>'
    section = {"title": "Key images", "code": {"coding": [KEY_IMAGES_SECTION]}, "focus": {"reference": sr_url},
               "text": {"status": "generated", "div": div}, "entry": refs}
    return section, entries


def narrative(images: list[dict]) -> str:
    """The images as XHTML list items (escaped: UIDs are digits and dots, checked by `problems`, anyway)."""
    rows = "".join(
        f"<li>Study {_esc(k['study_uid'])}, series {_esc(k['series_uid'])} ({_esc(k['modality'])}), "
        f"instance {_esc(k['sop_uid'])}, frame {k['frame']}</li>" for k in images)
    return f"<p><b>Key images</b> ({len(images)}), by DICOM UID:</p><ul>{rows}</ul>"


def listed(document: dict) -> list[dict]:
    """The key images a filed opinion document lists: [{study_uid, series_uid, sop_uid, frames}]."""
    out = []
    for e in document.get("entry", []):
        r = e.get("resource", {})
        if r.get("resourceType") != "ImagingStudy" or not str(r.get("description", "")).startswith("Key images"):
            continue
        study = next((i["value"].removeprefix("urn:oid:") for i in r.get("identifier", [])
                      if i.get("system") == "urn:dicom:uid"), "")
        for s in r.get("series", []):
            for i in s.get("instance", []):
                frames = [int(f) for f in re.findall(r"\d+", str(i.get("title", "")))]
                out.append({"study_uid": study, "series_uid": s.get("uid"), "sop_uid": i.get("uid"),
                            "frames": frames})
    return out
