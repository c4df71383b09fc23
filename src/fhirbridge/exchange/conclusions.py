"""The coded conclusions of an opinion document: the outcome fields every opinion form ends in
(mappings/opinion/*.toml: concordance, recommendation, urgency), read back from its Observations.

Opinions filed before the code systems got their canonical urls carry the legacy urn (terminology.LEGACY);
both are read.
"""
from __future__ import annotations

from fhirbridge.config.terminology import OPINION_OBSERVATION, same_system

OUTCOME_FIELDS = ("concordance", "recommendation", "urgency")


def conclusions_of(document: dict) -> dict[str, str]:
    """{field: code} for the outcome fields the document's Observations carry (absent fields left out)."""
    found: dict[str, str] = {}
    for e in document.get("entry", []) if isinstance(document, dict) else []:
        r = e.get("resource", {}) if isinstance(e, dict) else {}
        if r.get("resourceType") != "Observation":
            continue
        code = next((c.get("code") for c in r.get("code", {}).get("coding", [])
                     if same_system(c.get("system"), OPINION_OBSERVATION)), None)
        value = next((c.get("code") for c in r.get("valueCodeableConcept", {}).get("coding", [])), None)
        if code in OUTCOME_FIELDS and isinstance(value, str) and value:
            found[code] = value
    return found
