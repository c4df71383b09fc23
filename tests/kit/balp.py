"""The IHE Basic Audit Log Patterns (BALP) profiles fhirbridge declares, as a checker for the tests.

Encoded by hand from the profiles' source, IHE ITI BALP 1.1 (`input/fsh/Disclose.fsh` of
github.com/IHE/ITI.BasicAudit; published as StructureDefinition-IHE.BasicAudit.PrivacyDisclosure.Source and
.Recipient), on top of the R4 AuditEvent elements those profiles rely on. What is checked, per profile:

- `modifierExtension 0..0`; `type` = DCM#110106 "Export" (Source) or DCM#110107 "Import" (Recipient),
  `action` R (Source) or C (Recipient); `subtype` slice `disclosure` 1..1 = iso-21089-lifecycle#disclose;
  `recorded 1..1`, `outcome 1..1`; R4: `source.observer 1..1`, `agent.requestor 1..1`.
- `agent 2..*`, sliced by the value of `type`: `source` 1..1 (DCM#110153), `recipient` 1..1 (DCM#110152),
  `custodian` 0..1 (SNOMED CT 159541003), `authorizer` 0..1 (SNOMED CT 429577009); in every slice `type 1..1`
  and `who 1..1`; `network 1..1` on `source` and `recipient`.
- Invariant `val-audit-source` ("The Audit Source is this agent too.", severity error):
  `$this.who = %resource.source.observer`, on `agent[source]` at the Source and on `agent[recipient]` at the
  Recipient. FHIRPath `=` on complex types: every child equal, recursively (fhirpath §6.1.1), so the Reference
  must match in identifier *and* display; an empty operand is no match here (a validator does not pass it).
- `entity 2..*`, sliced by the value of `type`: `patient` 1..1 (type audit-entity-type#1; role 1..1
  object-role#1, `what 1..1`, only Reference(Patient)); R4 invariant sev-1 on every entity:
  `name.empty() or query.empty()`.

A pattern on a CodeableConcept (`agent.type`) is met when one coding has the pattern's system and code; on a
Coding (`AuditEvent.type`, `subtype`) when the system and code are equal (FHIR profiling, pattern[x]).
"""
from __future__ import annotations

BASE = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
LIFECYCLE = "http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"

# slice name -> (system, code, min, max, network required)
AGENT_SLICES = {
    "source": (DCM, "110153", 1, 1, True),
    "recipient": (DCM, "110152", 1, 1, True),
    "custodian": (SCT, "159541003", 0, 1, False),
    "authorizer": (SCT, "429577009", 0, 1, False),
}
PROFILES = {
    BASE + "PrivacyDisclosure.Source": {"type": (DCM, "110106"), "action": "R", "audit_source": "source"},
    BASE + "PrivacyDisclosure.Recipient": {"type": (DCM, "110107"), "action": "C", "audit_source": "recipient"},
}


def _is(coding: dict | None, system: str, code: str) -> bool:
    return bool(coding) and coding.get("system") == system and coding.get("code") == code


def _cc_has(cc: dict | None, system: str, code: str) -> bool:
    return any(_is(c, system, code) for c in (cc or {}).get("coding", []))


def problems(event: dict) -> list[str]:
    """Why `event` does not meet every BALP profile in its meta.profile (empty: it does). A declared profile
    this checker does not know is a problem too: encode it here before emitting it."""
    declared = (event.get("meta") or {}).get("profile") or []
    out = [] if declared else ["meta.profile: no profile declared"]
    for url in declared:
        if url not in PROFILES:
            out.append(f"meta.profile: {url} is not encoded in tests/kit/balp.py")
            continue
        out += [f"{url.rsplit('.', 2)[-2]}.{url.rsplit('.', 1)[-1]}: {p}" for p in _check(event, PROFILES[url])]
    return out


def _check(ev: dict, profile: dict) -> list[str]:
    out: list[str] = []
    if ev.get("modifierExtension"):
        out.append("modifierExtension: 0..0")
    if not _is(ev.get("type"), *profile["type"]):
        out.append(f"type: must be {profile['type'][0]}#{profile['type'][1]}")
    if ev.get("action") != profile["action"]:
        out.append(f"action: must be {profile['action']}")
    disclose = [c for c in ev.get("subtype", []) if _is(c, LIFECYCLE, "disclose")]
    if len(disclose) != 1:
        out.append(f"subtype[disclosure]: 1..1, found {len(disclose)}")
    for name in ("recorded", "outcome"):
        if not ev.get(name):
            out.append(f"{name}: 1..1")
    observer = (ev.get("source") or {}).get("observer")
    if not observer:
        out.append("source.observer: 1..1 (R4)")

    agents = ev.get("agent", [])
    if len(agents) < 2:
        out.append(f"agent: 2..*, found {len(agents)}")
    for i, agent in enumerate(agents):
        if not isinstance(agent.get("requestor"), bool):
            out.append(f"agent[{i}].requestor: 1..1 (R4)")
    for name, (system, code, lo, hi, network) in AGENT_SLICES.items():
        members = [a for a in agents if _cc_has(a.get("type"), system, code)]
        if not lo <= len(members) <= hi:
            out.append(f"agent[{name}] ({system}#{code}): {lo}..{hi}, found {len(members)}")
        for a in members:
            if not a.get("who"):
                out.append(f"agent[{name}].who: 1..1")
            if network and not (a.get("network") or {}).get("address"):
                out.append(f"agent[{name}].network: 1..1 (with an address)")
            if name == profile["audit_source"] and not (a.get("who") and observer and a["who"] == observer):
                out.append(f"agent[{name}]: val-audit-source ($this.who = %resource.source.observer) fails")

    entities = ev.get("entity", [])
    if len(entities) < 2:
        out.append(f"entity: 2..*, found {len(entities)}")
    patients = [e for e in entities if _is(e.get("type"), ENTITY_TYPE, "1")]   # the slice is by `type`
    if len(patients) != 1:
        out.append(f"entity[patient]: 1..1, found {len(patients)}")
    for e in patients:
        if not _is(e.get("role"), OBJECT_ROLE, "1"):
            out.append("entity[patient].role: 1..1, object-role#1")
        if not str((e.get("what") or {}).get("reference", "")).startswith("Patient/"):
            out.append("entity[patient].what: 1..1, only Reference(Patient)")
    for i, e in enumerate(entities):
        if e.get("name") and e.get("query"):
            out.append(f"entity[{i}]: sev-1 (name.empty() or query.empty()) fails")
    return out
