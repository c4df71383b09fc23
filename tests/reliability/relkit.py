"""Shared by the reliability suites: the size knob and what they count with.

`FHIRBRIDGE_RELIABILITY=full` selects the full form (the figures in docs/reliability.md); unset, each suite
runs a reduced but real form that fits CI. The suites record their figures in the `figures` fixture
(tests/reliability/conftest.py), printed at the end of the run and written as JSON to FHIRBRIDGE_RELIABILITY_OUT.
"""
from __future__ import annotations

import math
import os
from collections import Counter

from fhirbridge.ehr.task import CASE_ID_SYSTEM
from fhirbridge.errors import CaseError
from fhirbridge.loop.actions import resolve
from fhirbridge.loop.writeback import OPINION_ID_SYSTEM

FULL = os.environ.get("FHIRBRIDGE_RELIABILITY", "").lower() == "full"


def size(ci, full):
    """The CI value, or the full-form value under FHIRBRIDGE_RELIABILITY=full."""
    return full if FULL else ci


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of values; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def ehr_copies(fhir, cases) -> dict[str, Counter]:
    """What the EHR itself holds for each Case, by searching it (never by trusting our store): referral Tasks
    by the Case identifier, consult notes (LOINC 11488-4) whose context names the Case's order, and the
    Provenances that target each note. {"Task": Counter(case id -> n), "DocumentReference": ..., "Provenance": ...}"""
    by_order = {c.service_request: c.id for c in cases}
    out = {"Task": Counter(), "DocumentReference": Counter(), "Provenance": Counter()}
    for case in cases:
        out["Task"][case.id] = sum(1 for r in fhir.search("Task", {"identifier": f"{CASE_ID_SYSTEM}|{case.id}"})
                                   if r["resourceType"] == "Task")
    for patient in {c.patient for c in cases}:
        for doc in fhir.search("DocumentReference", {"patient": patient, "type": "http://loinc.org|11488-4"}):
            if doc["resourceType"] != "DocumentReference":
                continue
            for related in doc.get("context", {}).get("related", []):
                case_id = by_order.get(related.get("reference"))
                if case_id:
                    out["DocumentReference"][case_id] += 1
                    out["Provenance"][case_id] += sum(
                        1 for r in fhir.search("Provenance", {"target": f"DocumentReference/{doc['id']}"})
                        if r["resourceType"] == "Provenance")
    return out


def duplicates(copies: dict[str, Counter]) -> dict[str, int]:
    """Copies beyond the first, per resource type."""
    return {kind: sum(max(0, n - 1) for n in counter.values()) for kind, counter in copies.items()}


def review(app, fhir, case) -> str | None | bool:
    """The person a Case at needs_review waits for (write plan ONCE): looks in the chart (`fhir`: the EHR
    itself, not through fhirbridge) for the write in question and answers with `resolve`. Returns what was
    found ("DocumentReference/<id>", "Provenance/<id>") or None (not filed); False when `resolve` could not
    check the answer against the EHR just then (a fault on its read): the person tries again later."""
    rows = {k: r for k, r in app.store.ledger(case.id).items() if r["state"] == "sent"}
    if "DocumentReference" in rows:
        found = [d for d in fhir.search("DocumentReference",
                                        {"identifier": f"{OPINION_ID_SYSTEM}|urn:uuid:{case.opinion_id}"})
                 if d["resourceType"] == "DocumentReference"]
        filed = f"DocumentReference/{found[0]['id']}" if found else None
    else:
        target = rows["Provenance"]["identifier"].partition("|")[0]
        found = [p for p in fhir.search("Provenance", {"target": target}) if p["resourceType"] == "Provenance"]
        filed = f"Provenance/{found[0]['id']}" if found else None
    try:
        resolve(app, case, filed=filed)
    except CaseError as exc:
        if "could not read" not in str(exc):
            raise
        return False
    return filed
