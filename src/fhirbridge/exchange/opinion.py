"""The reviewer's structured answer -> a Consult note FHIR document (Composition LOINC 11488-4).

The answer is a TOML or JSON file whose keys are the fields of mappings/opinion/<form>.toml. Choice
fields become coded Observations as well as narrative, so the EHR can query how often a second opinion
confirmed or changed the plan. A `studies` field (the radiology re-read) is a list of
{study = "ImagingStudy/<id>", score = "<choice>", comment = "..."}, one per study of the package: each becomes
an Observation whose `derivedFrom` names the study by its DICOM Study Instance UID (a logical reference: the
ImagingStudy is the hospital's, and the opinion document must not point into its server).
Every section's `focus` is the ServiceRequest, as HL7 BSeR's feedback
document does, so the answer is tied to the order it answers.
"""
from __future__ import annotations

import html
import tomllib
import uuid
from pathlib import Path

from fhirbridge import jsonutil
from fhirbridge.config.mappings import OpinionForm
from fhirbridge.errors import FhirbridgeError
from fhirbridge.exchange import key_images as keys
from fhirbridge.fhir.elements import summary_line
from fhirbridge.fhir.narrative import narrative_problems


class AnswerError(FhirbridgeError):
    """The reviewer's answer file cannot become an opinion. Exit code 2, like every other problem with a file
    the user wrote: the fix is to edit the file, whatever was wrong with it."""

    exit_code = 2

    def __init__(self, file: str, problems: list[str]):
        self.file, self.problems = file, problems
        super().__init__(f"{file}: the answer is not complete:\n" + "\n".join(f"  - {p}" for p in problems))


class AnswerFileError(AnswerError):
    """The answer file itself is unusable (missing, not UTF-8, not TOML/JSON, not a table): one problem."""

    def __init__(self, file: str, problem: str):
        self.file, self.problems = file, [problem]
        FhirbridgeError.__init__(self, f"{file}: {problem}")


def load_answer(path: Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AnswerFileError(str(path), "no such file") from None
    except UnicodeDecodeError:
        raise AnswerFileError(str(path), "not UTF-8 text; save the answer as UTF-8") from None
    except OSError as exc:
        raise AnswerFileError(str(path), f"cannot read: {exc.strerror}") from None
    kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
    try:
        data = jsonutil.loads(text) if kind == "JSON" else tomllib.loads(text)
    except Exception as exc:  # noqa: BLE001 - TOML and JSON raise different types
        raise AnswerFileError(str(path), f"not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise AnswerFileError(str(path), "the answer must be a table/object of fields")
    return data


def check_answer(answer: dict, form: OpinionForm) -> list[str]:
    problems = []
    for name in answer:
        if name not in form.fields:
            problems.append(f"{name}: unknown field (fields: {', '.join(form.fields)})")
    for f in form.fields.values():
        value = answer.get(f.name)
        if value in (None, "", []):
            if f.required:
                extra = f" (one of: {', '.join(f.choices)})" if f.kind == "choice" else ""
                problems.append(f"{f.name}: required - {f.label}{extra}")
            continue
        if f.kind == "choice" and (not isinstance(value, str) or value not in f.choices):
            problems.append(f"{f.name}: {value!r} is not one of: {', '.join(f.choices)}")
        elif f.kind == "text" and not isinstance(value, str):
            problems.append(f"{f.name}: must be text")
        elif f.kind == "list" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            problems.append(f"{f.name}: must be a list of text items")
        elif f.kind == "studies":
            problems += _study_problems(f, value)
        elif f.kind == "answers" and not (isinstance(value, list) and all(
                isinstance(v, dict) and isinstance(v.get("question"), str) and isinstance(v.get("answer"), str)
                for v in value)):
            problems.append(f"{f.name}: must be a list of {{question = ..., answer = ...}} entries")
    return problems


def _study_problems(f, value) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        return [f"{f.name}: must be a list of {{study = \"ImagingStudy/<id>\", score = ...}} entries"]
    problems = []
    for i, v in enumerate(value):
        if not isinstance(v.get("study"), str) or not v["study"].startswith("ImagingStudy/"):
            problems.append(f"{f.name}[{i}]: study must name an imaging study of the package (ImagingStudy/<id>)")
        if v.get("score") not in f.choices:
            problems.append(f"{f.name}[{i}]: score {v.get('score')!r} is not one of: {', '.join(f.choices)}")
        if not isinstance(v.get("comment", ""), str):
            problems.append(f"{f.name}[{i}]: comment must be text")
        unknown = set(v) - {"study", "score", "comment"}
        if unknown:
            problems.append(f"{f.name}[{i}]: unknown key {sorted(unknown)[0]!r} (study, score, comment)")
    return problems


def study_title(study: dict | None, key: str) -> str:
    return summary_line(study) if study else key


def _esc(text: str) -> str:
    return html.escape(text, quote=False).replace("\n", "<br/>")


def field_html(f, value, studies: dict[str, dict] | None = None) -> str:
    if f.kind == "studies":
        rows = "".join(
            f"<li>{_esc(study_title((studies or {}).get(v['study']), v['study']))}: "
            f"<b>{_esc(f.choices[v['score']].get('display', v['score']))}</b>"
            f"{'<br/>' + _esc(v['comment']) if v.get('comment') else ''}</li>" for v in value)
        return f"<p><b>{_esc(f.label)}:</b></p><ul>{rows}</ul>"
    if f.kind == "choice":
        return f"<p><b>{_esc(f.label)}:</b> {_esc(f.choices[value].get('display', value))}</p>"
    if f.kind == "text":
        return f"<p><b>{_esc(f.label)}:</b> {_esc(value)}</p>"
    if f.kind == "list":
        return f"<p><b>{_esc(f.label)}:</b></p><ul>" + "".join(f"<li>{_esc(v)}</li>" for v in value) + "</ul>"
    rows = "".join(f"<li><b>Q:</b> {_esc(v['question'])}<br/><b>A:</b> {_esc(v['answer'])}</li>" for v in value)
    return f"<p><b>{_esc(f.label)}:</b></p><ul>{rows}</ul>"


def build_opinion_document(answer: dict, form: OpinionForm, *, opinion_id: str, timestamp: str,
                           patient_entry: dict, service_request_entry: dict, reviewer_org: dict,
                           studies: dict[str, dict] | None = None, key_images: list[dict] | None = None) -> dict:
    """`patient_entry`/`service_request_entry` are the package's Bundle entries (fullUrl + resource), copied
    so the opinion document is complete on its own (FHIR documents carry what they reference). `studies`: the
    package's ImagingStudy resources by "ImagingStudy/<id>", for a `studies` field. `key_images`: the frames the
    reviewer marked (exchange/key_images.py: a "Key Images" section and its ImagingStudy entries)."""
    patient_url, sr_url = patient_entry["fullUrl"], service_request_entry["fullUrl"]
    org_url = f"urn:uuid:{reviewer_org['id']}"
    sections: dict[str, dict] = {}
    observations = []
    for f in form.fields.values():
        value = answer.get(f.name)
        if value in (None, "", []):
            continue
        section = sections.setdefault(f.section, {"title": f.section, "focus": {"reference": sr_url},
                                                  "html": [], "entry": []})
        if f.section in form.section_codes:
            section["code"] = {"coding": [form.section_codes[f.section]]}
        section["html"].append(field_html(f, value, studies))
        if f.kind == "studies" and f.observation_code:
            for i, v in enumerate(value):
                obs_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:uuid:{opinion_id}#{f.name}#{i}"))
                obs = _observation(obs_id, f, v["score"], patient_url, sr_url, org_url, timestamp)
                obs["derivedFrom"] = [_study_reference((studies or {}).get(v["study"]), v["study"])]
                if v.get("comment"):
                    obs["note"] = [{"text": v["comment"]}]
                observations.append({"fullUrl": f"urn:uuid:{obs_id}", "resource": obs})
                section["entry"].append({"reference": f"urn:uuid:{obs_id}"})
        if f.kind == "choice" and f.observation_code:
            obs_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:uuid:{opinion_id}#{f.name}"))
            observations.append({"fullUrl": f"urn:uuid:{obs_id}",
                                 "resource": _observation(obs_id, f, value, patient_url, sr_url, org_url, timestamp)})
            section["entry"].append({"reference": f"urn:uuid:{obs_id}"})
    comp_sections = []
    for s in sections.values():
        out = {"title": s["title"], "focus": s["focus"],
               "text": {"status": "generated",
                        "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{"".join(s["html"])}</div>'}}
        if "code" in s:
            out["code"] = s["code"]
        if s["entry"]:
            out["entry"] = s["entry"]
        comp_sections.append(out)
    text_sections = [(s["title"], s["html"]) for s in sections.values()]
    if key_images:
        section, entries = keys.section_and_entries(key_images, opinion_id=opinion_id, patient_url=patient_url,
                                                    sr_url=sr_url)
        comp_sections.append(section)
        text_sections.append((section["title"], [keys.narrative(key_images)]))
        observations += entries
    composition_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:uuid:{opinion_id}#composition"))
    composition = {
        "resourceType": "Composition", "id": composition_id,
        "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{composition_id}"},
        "status": "final", "type": {"coding": [form.doc_type]}, "category": [{"coding": [form.doc_category]}],
        "subject": {"reference": patient_url}, "date": timestamp, "author": [{"reference": org_url}],
        "title": form.title,
        "text": composition_text(form.title, text_sections),
        # R4 Composition.attester: the reviewer organisation vouches for its opinion (`official`: an
        # Organization's attestation; the person who answered is not named in the answer). The document's
        # signature, made with the reviewer's key, is that attestation signed.
        "attester": [{"mode": "official", "time": timestamp, "party": {"reference": org_url}}],
        "section": comp_sections,
    }
    entries = [{"fullUrl": f"urn:uuid:{composition_id}", "resource": composition},
               patient_entry, service_request_entry, {"fullUrl": org_url, "resource": reviewer_org}]
    return {"resourceType": "Bundle", "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{opinion_id}"},
            "type": "document", "timestamp": timestamp, "entry": entries + observations}


def _observation(obs_id: str, f, value: str, patient_url: str, sr_url: str, org_url: str, timestamp: str) -> dict:
    return {"resourceType": "Observation", "id": obs_id, "status": "final",
            "code": {"coding": [f.observation_code], "text": f.label},
            "subject": {"reference": patient_url}, "basedOn": [{"reference": sr_url}],
            "effectiveDateTime": timestamp, "performer": [{"reference": org_url}],
            "valueCodeableConcept": {"coding": [f.choices[value]], "text": f.choices[value].get("display")}}


def _study_reference(study: dict | None, key: str) -> dict:
    """A logical Reference to the re-read study (R4 references.html#logical): its DICOM Study Instance UID,
    which names the study in any PACS, and its summary as display."""
    ref: dict = {"type": "ImagingStudy", "display": study_title(study, key)}
    uid = next((i for i in (study or {}).get("identifier", []) if i.get("system") == "urn:dicom:uid"), None)
    if uid and isinstance(uid.get("value"), str):
        ref["identifier"] = {"system": "urn:dicom:uid", "value": uid["value"]}
    return ref


def composition_text(title: str, sections: list[tuple[str, list[str]]]) -> dict:
    """Composition.text (R4 documents.html: the document's attested narrative, status `generated`) from the
    structured answer only: the title and each section's fields, rendered by `field_html`, which escapes every
    value. Nothing the reviewer typed is taken as markup, and the result is checked against the R4 narrative
    allow-list (fhir/narrative.py) before it is used."""
    body = f"<h2>{_esc(title)}</h2>" + "".join(f"<h3>{_esc(t)}</h3>{''.join(parts)}" for t, parts in sections)
    div = f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'
    problems = narrative_problems(div)
    if problems:   # cannot happen with escaped values; never send a narrative the hospital would refuse
        raise FhirbridgeError("the opinion narrative is not safe XHTML: " + "; ".join(problems))
    return {"status": "generated", "div": div}


def reviewer_organization(identity: dict) -> dict:
    """An Organization for the reviewer from the {system, value, display} the package names as audience."""
    oid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{identity['system']}|{identity['value']}"))
    return {"resourceType": "Organization", "id": oid, "active": True,
            "identifier": [{"system": identity["system"], "value": identity["value"]}],
            "name": identity.get("display") or identity["value"]}
