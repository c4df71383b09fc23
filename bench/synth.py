"""Synthetic patients of a chosen size, loaded into a FHIR server with PUT transactions.

A patient of `size` resources: a few Practitioners, then Conditions, DiagnosticReports (each with four
Observation results), Procedures and MedicationRequests in fixed proportions, all dated within the last
year so the default collection profile (730-day lookback) shares every one of them. Ids are chosen here
(PUT), so loading needs no reference rewriting and the same ids can be asked for by every contender.
All data is synthetic.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from fhirbridge.fhir.client import FhirClient

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
OBS_PER_REPORT = 4
LOAD_CHUNK = 500   # entries per transaction: sekmet takes a 500-entry transaction in well under its timeout

# Shares of the resources that are not Practitioners; DiagnosticReport + its Observations make 0.5.
MIX = (("Condition", 0.05), ("DiagnosticReport", 0.10), ("Procedure", 0.20), ("MedicationRequest", 0.15))


@dataclass
class Patient:
    id: str
    size: int
    service_request: dict
    counts: dict[str, int] = field(default_factory=dict)
    load_seconds: float = 0.0

    @property
    def ref(self) -> str:
        return f"Patient/{self.id}"


def plan(size: int) -> dict[str, int]:
    """How many of each type make a record of `size` resources (Patient and the order not counted)."""
    if size < 10:
        raise ValueError("a synthetic patient needs at least 10 resources")
    practitioners = max(1, size // 200)
    rest = size - practitioners
    counts = {"Practitioner": practitioners}
    for rtype, share in MIX:
        counts[rtype] = max(1, round(rest * share))
    counts["Observation"] = counts["DiagnosticReport"] * OBS_PER_REPORT
    # Whatever rounding left over (or took too much) goes to MedicationRequest.
    counts["MedicationRequest"] += size - sum(counts.values())
    if counts["MedicationRequest"] < 1:
        raise ValueError(f"cannot make a patient of {size} resources with this mix")
    return counts


def _cc(system: str, code: str, display: str) -> dict:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def resources(size: int, tag: str, now: datetime | None = None) -> tuple[str, list[dict], dict]:
    """(patient id, every resource incl. Patient, the second-opinion ServiceRequest) for one patient."""
    now = now or datetime.now(UTC).replace(microsecond=0)
    counts = plan(size)
    pid = f"bp-{tag}"
    subject = {"reference": f"Patient/{pid}"}
    out: list[dict] = [{"resourceType": "Patient", "id": pid, "active": True, "gender": "female",
                        "birthDate": "1961-04-02", "name": [{"family": f"Benchmark-{tag}", "given": ["Synthetic"]}]}]
    pracs = [f"bpr-{tag}-{i}" for i in range(counts["Practitioner"])]
    for i, prid in enumerate(pracs):
        out.append({"resourceType": "Practitioner", "id": prid, "active": True,
                    "name": [{"family": f"Clinician-{i}", "given": ["Bench"], "prefix": ["Dr."]}]})

    def when(i: int) -> str:
        return _iso(now - timedelta(days=1 + i % 300, minutes=i))

    def prac(i: int) -> dict:
        return {"reference": f"Practitioner/{pracs[i % len(pracs)]}"}

    for i in range(counts["Condition"]):
        out.append({"resourceType": "Condition", "id": f"bc-{tag}-{i}",
                    "clinicalStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "active",
                                          "Active"),
                    "verificationStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                              "confirmed", "Confirmed"),
                    "code": _cc(SNOMED, "76107001", "Prolapsed lumbar intervertebral disc"), "subject": subject,
                    "recordedDate": when(i), "recorder": prac(i)})
    obs_n = 0
    for i in range(counts["DiagnosticReport"]):
        results = []
        for _ in range(OBS_PER_REPORT):
            oid = f"bo-{tag}-{obs_n}"
            obs_n += 1
            results.append({"reference": f"Observation/{oid}"})
            out.append({"resourceType": "Observation", "id": oid, "status": "final",
                        "category": [_cc("http://terminology.hl7.org/CodeSystem/observation-category",
                                         "laboratory", "Laboratory")],
                        "code": _cc(LOINC, "2345-7", "Glucose [Mass/volume] in Serum or Plasma"),
                        "subject": subject, "effectiveDateTime": when(i), "performer": [prac(i)],
                        "valueQuantity": {"value": 90 + obs_n % 40, "unit": "mg/dL",
                                          "system": "http://unitsofmeasure.org", "code": "mg/dL"}})
        out.append({"resourceType": "DiagnosticReport", "id": f"bd-{tag}-{i}", "status": "final",
                    "category": [_cc("http://terminology.hl7.org/CodeSystem/v2-0074", "LAB", "Laboratory")],
                    "code": _cc(LOINC, "24323-8", "Comprehensive metabolic 2000 panel - Serum or Plasma"),
                    "subject": subject, "effectiveDateTime": when(i), "issued": when(i).replace("Z", ".000Z"),
                    "performer": [prac(i)], "result": results,
                    "conclusion": "Within reference ranges (synthetic benchmark data)."})
    for i in range(counts["Procedure"]):
        out.append({"resourceType": "Procedure", "id": f"bx-{tag}-{i}", "status": "completed",
                    "code": _cc(SNOMED, "91251008", "Physical therapy procedure"), "subject": subject,
                    "performedDateTime": when(i), "performer": [{"actor": prac(i)}]})
    for i in range(counts["MedicationRequest"]):
        out.append({"resourceType": "MedicationRequest", "id": f"bm-{tag}-{i}", "status": "active",
                    "intent": "order", "subject": subject, "authoredOn": when(i), "requester": prac(i),
                    "medicationCodeableConcept": _cc(RXNORM, "849574", "Naproxen sodium 220 MG Oral Tablet"),
                    "dosageInstruction": [{"text": "220 mg by mouth twice daily as needed"}]})
    sr = {"resourceType": "ServiceRequest", "id": f"bs-{tag}", "status": "active", "intent": "order",
          "category": [_cc(SNOMED, "3457005", "Patient referral")],
          # Not a code fhirbridge takes in as a second-opinion order: the collect benchmark hands this
          # order to collect() itself, and intake in the loop benchmark must not pick it up as well.
          "code": _cc("urn:fhirbridge:bench", "collect-only", "Benchmark order (collect only)"),
          "subject": subject, "authoredOn": _iso(now),
          "note": [{"text": "Is surgery indicated now? (synthetic benchmark order)"}]}
    return pid, out, sr


def load(client: FhirClient, size: int, tag: str | None = None, *, order: bool = True) -> Patient:
    """Create one synthetic patient of `size` resources (and, with `order`, a collect-only order) on the
    server behind `client`."""
    tag = tag or uuid.uuid4().hex[:10]
    pid, items, sr = resources(size, tag)
    started = time.perf_counter()
    for i in range(0, len(items), LOAD_CHUNK):
        chunk = items[i:i + LOAD_CHUNK]
        client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in chunk]})
    if order:
        client.update(sr)
    counts: dict[str, int] = {}
    for r in items[1:]:
        counts[r["resourceType"]] = counts.get(r["resourceType"], 0) + 1
    return Patient(id=pid, size=size, service_request=sr, counts=counts,
                   load_seconds=time.perf_counter() - started)
