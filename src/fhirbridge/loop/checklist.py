"""The packet's checklist (issue 16 part 6): for each record a reviewer of the profile's specialty expects
(`[[expect]]` in mappings/collect/<profile>.toml), whether the package includes it, withheld it (and why) or
whether the EHR has none.

Collect computes it from everything its searches found, kept or withheld (`build`), and keeps the hospital's
copy in `collected.jwe`; the physician's preview shows that copy. Seal puts `for_reviewer` of it in the signed
manifest: a record withheld for a sensitivity label or a patient's Consent (reason `consent.POLICY`) must not
even be hinted at, so an item whose only matches were withheld that way reads "not found" there, exactly as
if the EHR had none (the same rule as `Collected.disclosable_withheld`).

A profile with `hold = true` holds the Case at `await_records` after collect while a `required` item is not
included (`missing_required`), until the record is in the EHR (collect runs again) or the physician confirms
sending without it (`confirm_incomplete`: recorded in the event log and the audit trail).
"""
from __future__ import annotations

from collections.abc import Iterable

from fhirbridge.config.mappings import Expectation, Profile
from fhirbridge.ehr.context import App
from fhirbridge.errors import CaseError
from fhirbridge.fhir.elements import has_coding
from fhirbridge.loop.consent import POLICY
from fhirbridge.steps import Step
from fhirbridge.store.store import Case

INCLUDED = "included"
WITHHELD = "withheld"
NOT_FOUND = "not_found"
# The fields a record's LOINC document or report code sits in, per resource type (R4).
CODE_FIELDS = {"DocumentReference": ("type",), "DiagnosticReport": ("code",), "Observation": ("code",),
               "Procedure": ("code",), "Composition": ("type",)}


def matches(item: Expectation, res: dict) -> bool:
    rtype = res.get("resourceType", "")
    if item.codes and has_coding(res, CODE_FIELDS.get(rtype, ("code", "type")), item.codes):
        return True
    if rtype not in item.resources:
        return False
    if item.modalities and rtype == "ImagingStudy":
        mods = {m.get("code") for m in res.get("modality", [])}
        mods |= {s.get("modality", {}).get("code") for s in res.get("series", [])}
        return bool(mods & set(item.modalities))
    return True


def build(profile: Profile, kept: Iterable[dict], withheld: Iterable[tuple[dict, str]]) -> list[dict]:
    """One entry per expected item, in the profile's order: {"item", "required", "status", "records",
    "withheld": [{"reference", "reason"}]}. `withheld`: (resource, reason) of each record collect held back."""
    kept, withheld = list(kept), list(withheld)
    out = []
    for item in profile.expect:
        included = [_ref(r) for r in kept if matches(item, r)]
        held = [{"reference": _ref(r), "reason": reason} for r, reason in withheld if matches(item, r)]
        status = INCLUDED if included else WITHHELD if held else NOT_FOUND
        out.append({"item": item.name, "required": item.required, "status": status, "records": included,
                    "withheld": held})
    return out


def for_reviewer(checklist: list[dict]) -> list[dict]:
    """The checklist as the package states it: nothing that names a record withheld under POLICY."""
    out = []
    for entry in checklist:
        held = [w for w in entry["withheld"] if not w["reason"].startswith(POLICY)]
        status = entry["status"]
        if status == WITHHELD and not held:
            status = NOT_FOUND   # only policy-withheld matches: said exactly as if there were none
        out.append({"item": entry["item"], "required": entry["required"], "status": status,
                    "records": entry["records"] if status == INCLUDED else [],
                    "reasons": sorted({w["reason"] for w in held}) if status == WITHHELD else []})
    return out


def missing_required(checklist: list[dict]) -> list[str]:
    """The required items the package would go without."""
    return [e["item"] for e in checklist if e["required"] and e["status"] != INCLUDED]


def for_physician(checklist: list[dict]) -> list[dict]:
    """The hospital's view, in the package's shape: every reason, a sensitivity label's too (the physician may
    see why the hospital holds a record back; the reviewer may not)."""
    return [{"item": e["item"], "required": e["required"], "status": e["status"],
             "records": e["records"] if e["status"] == INCLUDED else [],
             "reasons": sorted({w["reason"].removeprefix(POLICY) for w in e["withheld"]})
             if e["status"] == WITHHELD else []} for e in checklist]


def held_reason(missing: list[str]) -> str:
    return (f"the reviewer needs {', '.join(missing)}, not in the package; add it to the chart and collect "
            "again, or the referring physician confirms sending without it")


def _held(case: Case) -> list[str]:
    if case.step != Step.AWAIT_RECORDS:
        raise CaseError(f"Case {case.id[:8]} is {case.step}: only a Case held for missing records can be released")
    return [str(m) for m in (case.data or {}).get("missing", [])]


def collect_again(app: App, case: Case, *, by: str) -> Case:
    """The missing records may be in the chart now: collect again (the hold applies again if they are not)."""
    _held(case)
    return app.store.update(case.id, step=Step.COLLECT.value, last_error=None, next_attempt_at=None, attempts=0,
                            event_kind="checklist.recheck", detail={"by": by})


def confirm_incomplete(app: App, case: Case, *, by: str, missing: list[str]) -> Case:
    """The referring physician sends the package without the required records: recorded with who and what
    (the Case's event log is the audit trail; the manifest names them, `sent_without`), then sealed."""
    _held(case)
    return app.store.update(case.id, step=Step.SEAL.value, last_error=None, next_attempt_at=None, attempts=0,
                            data={"sent_without": missing}, event_kind="checklist.confirmed",
                            detail={"by": by, "missing": missing})


def _ref(res: dict) -> str:
    return f"{res.get('resourceType')}/{res.get('id')}"
