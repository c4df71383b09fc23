"""Collect: gather one patient's records for a Case, per the Case's collection profile (mappings/collect).

Each collectable type is searched by patient with paging; the profile's rules (lookback window,
categories, modalities, sensitive security labels) are applied here rather than as search parameters, so
the manifest can name every record that was withheld and why, and so a server that ignores an
unsupported search parameter cannot widen what is disclosed. Resources the records point at
(Practitioner, Organization, Observation, Medication, Endpoint...) are then read in batches by `_id`.

Binary attachments are not downloaded here: collect records where they are; the seal step streams them
straight into encrypted files.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fhirbridge import jsonutil
from fhirbridge.config.mappings import FOLLOW_TYPES, Profile, ResourceRule
from fhirbridge.crypto import jwe
from fhirbridge.ehr.context import App
from fhirbridge.ehr.order import EXCLUDED_RECORD, excluded_records
from fhirbridge.errors import FhirbridgeError
from fhirbridge.exchange.envelope import write_atomic
from fhirbridge.fhir.elements import clinical_date, has_coding, iter_references
from fhirbridge.fhir.validate import validate as validate_resource
from fhirbridge.loop import checklist, guards, images
from fhirbridge.loop.consent import POLICY, Consents
from fhirbridge.loop.result import StepResult
from fhirbridge.steps import Step
from fhirbridge.store.store import Case

# A medication the patient is still taking matters however long ago it was started.
ALWAYS_CURRENT = {"MedicationStatement": ("active", "intended", "on-hold"),
                  "MedicationRequest": ("active", "on-hold")}
FOLLOW_DEPTH = 2
ID_BATCH = 50
# Requests in flight at once (searches by type, then reads by _id): enough to keep the server busy while we
# validate what it sent, few enough not to crowd a hospital's EHR (see bench/ and docs/performance.md).
FETCH_THREADS = 4
DESELECTED = "deselected by the referring physician"


@dataclass
class Collected:
    service_request: dict
    patient: dict
    resources: list[dict] = field(default_factory=list)      # everything to share except Patient/SR
    withheld: list[dict] = field(default_factory=list)       # {"reference", "reason"}
    attachments: list[dict] = field(default_factory=list)    # {"url", "owner", "path", "content_type", "title"}
    imaging: list[dict] = field(default_factory=list)        # loop/images.py: per kept ImagingStudy, its images
    checklist: list[dict] = field(default_factory=list)      # loop/checklist.py: the hospital's copy
    profile: str = "default"
    lookback_days: int = 0
    collected_at: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> Collected:
        return cls(**d)

    def disclosable_withheld(self) -> list[dict]:
        """What the reviewer may be told was withheld. Records withheld for a sensitivity label are left
        out entirely: "Condition/x withheld: HIV label" would disclose exactly what withholding protects."""
        return [w for w in self.withheld if not w["reason"].startswith(POLICY)]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.resources:
            out[r["resourceType"]] = out.get(r["resourceType"], 0) + 1
        return out


def collect(app: App, service_request: dict, profile: Profile, *, now: datetime | None = None,
            consents: Consents | None = None, keep_deselected: bool = False) -> Collected:
    """`consents`: the patient's Consents for this disclosure (consent.check); records they deny are withheld.
    `keep_deselected`: the records the physician deselected in the order are not held back for that (a
    supplement, loop/supplement.py: the physician now chooses each record)."""
    now = now or datetime.now(UTC)
    patient_ref = service_request["subject"]["reference"]
    patient = app.ehr.read_ref(patient_ref)
    _check_valid(patient, patient_ref)
    out = Collected(service_request=_without_exclusions(service_request), patient=patient, profile=profile.name,
                    lookback_days=profile.lookback_days,
                    collected_at=now.isoformat(timespec="seconds").replace("+00:00", "Z"))
    cutoff = now - timedelta(days=profile.lookback_days)
    invalid_before = len(app.ehr.invalid)
    excluded = frozenset() if keep_deselected else excluded_records(service_request)
    seen: set[str] = {patient_ref, f"ServiceRequest/{service_request['id']}"}
    held: list[tuple[dict, str]] = []   # (record, reason) of each one withheld: the checklist names them
    app.progress(f"  searching {', '.join(profile.rules)}")
    found = app.ehr.map_parallel(lambda ehr, rtype: list(ehr.search(rtype, {"patient": patient_ref})),
                                 profile.rules, threads=FETCH_THREADS)
    for (rtype, rule), results in zip(profile.rules.items(), found, strict=True):
        for res in results:
            if res.get("resourceType") != rtype:
                continue  # an _include'd or OperationOutcome entry
            ref = f"{rtype}/{res['id']}"
            if ref in seen:
                continue
            seen.add(ref)
            reason = _with_consent(withhold_reason(res, rule, profile, cutoff), res, consents)
            if not reason and ref in excluded:
                reason = DESELECTED
            if reason:
                out.withheld.append({"reference": ref, "reason": reason})
                held.append((res, reason))
            else:
                out.resources.append(res)
    _follow_references(app, out, profile, seen, consents, excluded, held)
    # Invalid resources are reported, not silently dropped and not sent: the reviewer sees them listed as
    # withheld with the validation reasons, and the Case's event log records them.
    invalid = {e.where: e.reasons for e in app.ehr.invalid[invalid_before:]}
    if invalid:
        keep = []
        for r in out.resources:
            ref = f"{r['resourceType']}/{r.get('id')}"
            if ref in invalid:
                out.withheld.append({"reference": ref, "reason": "invalid FHIR: " + "; ".join(invalid[ref][:3])})
                held.append((r, out.withheld[-1]["reason"]))
            else:
                keep.append(r)
        out.resources = keep
    out.attachments = list(find_attachments(app, out.resources))
    out.checklist = checklist.build(profile, out.resources, held)
    return out


def _without_exclusions(service_request: dict) -> dict:
    """The order as the reviewer gets it: without the list of records the physician held back. The manifest
    names those withheld for that reason; the list itself could name a record withheld for a sensitivity
    label, which must never be named to the reviewer (POLICY)."""
    kept = [e for e in service_request.get("extension", []) if e.get("url") != EXCLUDED_RECORD]
    out = {k: v for k, v in service_request.items() if k != "extension"}
    return {**out, "extension": kept} if kept else out


def _check_valid(resource: dict, where: str) -> None:
    reasons = validate_resource(resource)
    if reasons:
        raise FhirbridgeError(f"the EHR returned an invalid {where}: {'; '.join(reasons[:3])}")


def _with_consent(reason: str | None, res: dict, consents: Consents | None) -> str | None:
    """The patient's consent comes before the profile's reasons, but never before a sensitivity label: that
    reason must stay the one the reviewer is not told about."""
    if consents is None or (reason or "").startswith(POLICY):
        return reason
    return consents.withhold_reason(res) or reason


def withhold_reason(res: dict, rule: ResourceRule, profile: Profile, cutoff: datetime) -> str | None:
    labels = {(s.get("system"), s.get("code")) for s in res.get("meta", {}).get("security", [])}
    hit = [f"{s}|{c}" for s, c in profile.withhold_labels if (s, c) in labels]
    if hit:
        return f"{POLICY}sensitive record (security label {hit[0]}) is never disclosed under profile {profile.name}"
    status = record_status(res)
    if status in rule.statuses_excluded:
        return f"status {status}"
    if rule.categories and not has_coding(res, ("category",), rule.categories):
        return f"category not in profile {profile.name}"
    if rule.types and not has_coding(res, ("type",), rule.types):
        return f"document type not in profile {profile.name}"
    if rule.modalities and res.get("resourceType") == "ImagingStudy":
        mods = {m.get("code") for m in res.get("modality", [])}
        mods |= {s.get("modality", {}).get("code") for s in res.get("series", [])}
        if not mods & set(rule.modalities):
            return f"imaging modality not in profile {profile.name}"
    if rule.lookback and status not in ALWAYS_CURRENT.get(res["resourceType"], ()):
        when = clinical_date(res)
        if when is not None and when < cutoff:
            return f"older than the {profile.lookback_days}-day lookback window"
    return None


def record_status(res: dict) -> str | None:
    """The record's status; R4 Condition (and AllergyIntolerance) have no `status` and mark a mistaken entry
    in verificationStatus (condition-ver-status#entered-in-error)."""
    if res.get("status"):
        return res["status"]
    for c in (res.get("verificationStatus") or {}).get("coding", []):
        if c.get("code") == "entered-in-error":
            return "entered-in-error"
    return None


def _follow_references(app: App, out: Collected, profile: Profile, seen: set[str],
                       consents: Consents | None = None, excluded: Collection[str] = frozenset(),
                       held: list[tuple[dict, str]] | None = None) -> None:
    frontier = out.resources + [out.service_request, out.patient]
    for _depth in range(FOLLOW_DEPTH):
        wanted: dict[str, set[str]] = {}
        for res in frontier:
            for ref in iter_references(res):
                rtype, _, rid = _local_ref(app, ref)
                if rtype in FOLLOW_TYPES and rid and f"{rtype}/{rid}" not in seen:
                    wanted.setdefault(rtype, set()).add(rid)
        if not wanted:
            return
        frontier = []
        batches = [(rtype, ids_sorted[i:i + ID_BATCH]) for rtype, ids in wanted.items()
                   for ids_sorted in [sorted(ids)] for i in range(0, len(ids_sorted), ID_BATCH)]
        found = app.ehr.map_parallel(lambda ehr, b: list(ehr.search(b[0], {"_id": ",".join(b[1])})),
                                     batches, threads=FETCH_THREADS)
        for (rtype, batch), results in zip(batches, found, strict=True):
            for res in results:
                ref = f"{res.get('resourceType')}/{res.get('id')}"
                if res.get("resourceType") != rtype or ref in seen:
                    continue
                seen.add(ref)
                reason = _with_consent(_follow_withhold(res, profile), res, consents)
                if not reason and ref in excluded:
                    reason = DESELECTED
                if reason:
                    out.withheld.append({"reference": ref, "reason": reason})
                    if held is not None:
                        held.append((res, reason))
                    continue
                out.resources.append(res)
                frontier.append(res)
            for rid in batch:
                if f"{rtype}/{rid}" not in seen:
                    seen.add(f"{rtype}/{rid}")
                    out.withheld.append({"reference": f"{rtype}/{rid}",
                                         "reason": "referenced but not found in the EHR"})


def _follow_withhold(res: dict, profile: Profile) -> str | None:
    labels = {(s.get("system"), s.get("code")) for s in res.get("meta", {}).get("security", [])}
    for s, c in profile.withhold_labels:
        if (s, c) in labels:
            return f"{POLICY}sensitive record (security label {s}|{c}) is never disclosed under profile {profile.name}"
    if record_status(res) == "entered-in-error":
        return "status entered-in-error"
    return None


def _local_ref(app: App, ref: str) -> tuple[str, str, str]:
    """'Type/id' or '<base>/Type/id' -> (Type, '/', id); anything else (urn:, #contained, other servers)
    -> ('', '', '')."""
    base = app.hospital.fhir_base_url.rstrip("/") + "/"
    if ref.startswith(base):
        ref = ref[len(base):]
    if ref.startswith(("http:", "https:", "urn:", "#")):
        return "", "", ""
    parts = ref.split("/")
    if len(parts) >= 2 and parts[0][:1].isupper():
        return parts[0], "/", parts[1]
    return "", "", ""


def find_attachments(app: App, resources: list[dict]) -> Iterator[dict]:
    """Attachments held as Binary in the EHR (DocumentReference.content, DiagnosticReport.presentedForm)."""
    for res in resources:
        owner = f"{res['resourceType']}/{res['id']}"
        if res["resourceType"] == "DocumentReference":
            items = [(f"content[{i}].attachment", c.get("attachment", {}))
                     for i, c in enumerate(res.get("content", []))]
        elif res["resourceType"] == "DiagnosticReport":
            items = [(f"presentedForm[{i}]", a) for i, a in enumerate(res.get("presentedForm", []))]
        else:
            continue
        for path, att in items:
            url = att.get("url")
            if not url or att.get("data"):
                continue
            rtype, _, rid = _local_ref(app, url)
            if rtype == "Binary":
                yield {"url": f"Binary/{rid}", "owner": owner, "path": path,
                       "content_type": att.get("contentType", "application/octet-stream"),
                       "title": att.get("title", ""), "size": att.get("size")}


# --- the step ---------------------------------------------------------------------------------------------

COLLECTED_FILE = "collected.jwe"


def collect_step(app: App, case: Case) -> StepResult:
    """Collect the Case's records into its work directory; clinical content at rest is encrypted to the
    hospital's own key. Repeating it re-reads the EHR and overwrites the file atomically."""
    sr = guards.check_order(app, case)
    guards.show_step_on_task(app, case)
    consents = guards.check_consent(app, case, sr)
    profile = app.profile(case.profile)
    collected = collect(app, sr, profile, consents=consents)
    # The images of the kept ImagingStudies (issue 15): a PACS that is down raises a transient error here, so
    # the Case resumes at collect, reusing the series already retrieved.
    collected.imaging = images.collect_images(app, case.id, collected.resources, profile)
    write_atomic(app.case_dir(case.id) / COLLECTED_FILE,
                 jwe.encrypt_bytes(jsonutil.dumps(collected.as_dict()), app.hospital_keys.encryption_keys(),
                                   typ="fhirbridge-collected+jwe"))
    for w in collected.withheld:
        if w["reason"].startswith("invalid FHIR"):
            app.store.add_event(case.id, "invalid_resource", w)
    detail: dict[str, Any] = {"counts": collected.counts(), "withheld": len(collected.withheld),
                              "attachments": len(collected.attachments)}
    if collected.imaging:
        detail["images"] = {"studies": sum(e["status"] == "included" for e in collected.imaging),
                            "withheld": sum(e["status"] == "withheld" for e in collected.imaging),
                            "instances": sum(e["instances"] for e in collected.imaging),
                            "bytes": sum(e["bytes"] for e in collected.imaging)}
    if consents.refs:
        detail["consents"] = consents.refs
    # Issue 16 part 6: a profile that holds waits for its required records (or the physician's go-ahead,
    # loop/checklist.py confirm_incomplete, which records who sent without what).
    missing = checklist.missing_required(collected.checklist)
    if profile.hold and missing and not (case.data or {}).get("sent_without"):
        app.store.update(case.id, data={"missing": missing})     # names from the profile, no clinical content
        return StepResult({**detail, "missing": missing}, back_to=Step.AWAIT_RECORDS,
                          question=checklist.held_reason(missing))
    return StepResult(detail)


def has_collected(app: App, case: Case) -> bool:
    return (app.case_dir(case.id) / COLLECTED_FILE).exists()


def load_collected(app: App, case: Case) -> Collected:
    data = (app.case_dir(case.id) / COLLECTED_FILE).read_bytes()
    return Collected.from_dict(jsonutil.loads(jwe.decrypt_bytes(data, app.hospital_keys)))

