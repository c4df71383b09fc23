"""fhirbridge's own code systems: the CodeSystem resources behind every code it writes that no standard has.

Where SNOMED CT, LOINC or an HL7 code system has the concept, fhirbridge writes that code (the order category,
the document and section types, request-priority for urgency, BSeR's Task business statuses). What is left
has a real CodeSystem resource (R4 codesystem.html: canonical `url`, `version`, `status`, `content`
complete, every concept with display and definition), so a receiver can resolve every code it meets:

- `mappings/codesystems/<id>.json`, one file per code system, shipped with the package: the opinion's
  observation codes, concordance, recommendation, and the referral steps BSeR has no code for;
- `collection-profile`, generated from the collection profiles of the configured `mappings_dir`
  (`mappings/collect/*.toml`: a hospital that adds a profile adds a code), versioned by a digest of them.

The service serves them (`service/terminology.py`: `GET /fhir/CodeSystem/<id>`, `GET /fhir/CodeSystem?url=`).
Every url is `CANONICAL_BASE` + id (config/mappings.py): one base, which must stay a domain the project
controls, since codes once written into charts keep naming it. The `urn:fhirbridge:codes:*` systems of earlier
releases are still read (`LEGACY`), never written.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fhirbridge.config.mappings import CANONICAL_BASE, COLLECTION_PROFILE_SYSTEM, load_profile, profile_names
from fhirbridge.config.model import PACKAGE_MAPPINGS
from fhirbridge.errors import ConfigError

OPINION_OBSERVATION = CANONICAL_BASE + "opinion-observation"
CONCORDANCE = CANONICAL_BASE + "concordance"
RECOMMENDATION = CANONICAL_BASE + "recommendation"
REFERRAL_STEP = CANONICAL_BASE + "referral-step"
COLLECTION_PROFILE = COLLECTION_PROFILE_SYSTEM

# The systems earlier releases wrote (opinions filed, Tasks and orders in the EHR carry them) -> what replaced
# them. Read wherever fhirbridge reads its own codes back; never written.
LEGACY: dict[str, str] = {
    "urn:fhirbridge:codes:opinion": OPINION_OBSERVATION,
    "urn:fhirbridge:codes:concordance": CONCORDANCE,
    "urn:fhirbridge:codes:recommendation": RECOMMENDATION,
    "urn:fhirbridge:codes:referral-step": REFERRAL_STEP,
    "urn:fhirbridge:collection-profile": COLLECTION_PROFILE,
}

SHIPPED = PACKAGE_MAPPINGS / "codesystems"
REQUIRED = ("resourceType", "id", "url", "version", "name", "status", "content", "concept")


def same_system(system: str | None, canonical: str) -> bool:
    """True when `system` is `canonical` or the legacy urn it replaced (a code written by an earlier release)."""
    return system == canonical or (system is not None and LEGACY.get(system) == canonical)


@dataclass(frozen=True)
class Terminology:
    """Every code system fhirbridge defines, by canonical url."""
    by_url: dict[str, dict]

    def by_id(self, cs_id: str) -> dict | None:
        return next((cs for cs in self.by_url.values() if cs["id"] == cs_id), None)

    def defines(self, system: str, code: str) -> bool:
        cs = self.by_url.get(system)
        return cs is not None and any(c["code"] == code for c in _concepts(cs["concept"]))

    def display(self, system: str, code: str) -> str | None:
        cs = self.by_url.get(system)
        return next((c.get("display") for c in _concepts(cs["concept"]) if c["code"] == code), None) if cs else None


def _concepts(concepts: list[dict]):
    for c in concepts:
        yield c
        yield from _concepts(c.get("concept", []))


def _check(cs, path: Path) -> dict:
    if not isinstance(cs, dict) or cs.get("resourceType") != "CodeSystem":
        raise ConfigError("must be a FHIR CodeSystem resource (resourceType CodeSystem)", file=str(path))
    for key in REQUIRED:
        if not cs.get(key):
            raise ConfigError("a CodeSystem needs this element", file=str(path), key=key)
    if cs["id"] != path.stem or cs["url"] != CANONICAL_BASE + cs["id"]:
        raise ConfigError(f"id must be the file name ({path.stem}) and url {CANONICAL_BASE}<id>", file=str(path),
                          key="url")
    if cs["content"] != "complete":
        raise ConfigError("content must be complete: a receiver resolves every code we write here",
                          file=str(path), key="content")
    codes = [c.get("code") for c in _concepts(cs["concept"])]
    if not all(isinstance(c, str) and c for c in codes) or len(set(codes)) != len(codes):
        raise ConfigError("every concept needs a code, and each code once", file=str(path), key="concept")
    if not all(c.get("display") for c in _concepts(cs["concept"])):
        raise ConfigError("every concept needs a display", file=str(path), key="concept")
    return cs


def collection_profiles(mappings_dir: Path) -> dict:
    """The collection-profile CodeSystem: one code per profile of `mappings_dir/collect` (the code an order's
    `orderDetail` carries). Its version is a digest of the codes and descriptions, so it changes exactly when a
    profile is added, removed or redescribed."""
    concepts = []
    for name in profile_names(mappings_dir):
        profile = load_profile(mappings_dir, name)
        display = profile.description.split(":")[0].strip() if profile.description else profile.name
        concepts.append({"code": name, "display": display or name,
                         "definition": profile.description or f"Collection profile {name}"})
    digest = hashlib.sha256(json.dumps(concepts, sort_keys=True).encode()).hexdigest()[:12]
    return {"resourceType": "CodeSystem", "id": "collection-profile", "url": COLLECTION_PROFILE,
            "version": f"1.0.0+{digest}", "name": "FhirbridgeCollectionProfile",
            "title": "Second-opinion collection profiles", "status": "active", "experimental": False,
            "publisher": "fhirbridge", "caseSensitive": True, "content": "complete", "count": len(concepts),
            "description": "Which records a second-opinion order asks to collect (ServiceRequest.orderDetail); "
                           "generated from the collection profiles this service is configured with.",
            "concept": concepts}


def load_terminology(mappings_dir: Path, shipped: Path = SHIPPED) -> Terminology:
    """The shipped code systems (`shipped`/*.json) and the collection profiles of `mappings_dir`. A broken
    file is a ConfigError naming it."""
    by_url: dict[str, dict] = {}
    for path in sorted(Path(shipped).glob("*.json")):
        try:
            cs = _check(json.loads(path.read_text(encoding="utf-8")), path)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"not valid JSON: {exc}", file=str(path)) from None
        by_url[cs["url"]] = cs
    profiles = collection_profiles(Path(mappings_dir))
    by_url[profiles["url"]] = profiles
    return Terminology(by_url=by_url)


def check_terminology(mappings_dir: Path) -> Terminology:
    """Load the code systems and check the mappings against them (at start-up, beside mappings.check_all)."""
    terminology = load_terminology(mappings_dir)
    check_codes(mappings_dir, terminology)
    return terminology


def check_codes(mappings_dir: Path, terminology: Terminology) -> None:
    """Every code the opinion forms and the order codes take from one of our systems is defined in it (a
    misspelt choice would otherwise be written into charts as a code no receiver can resolve)."""
    from_mappings: list[tuple[str, str, str]] = []   # (system, code, file)
    for path in sorted((Path(mappings_dir) / "opinion").glob("*.toml")) + [Path(mappings_dir) / "codes" /
                                                                           "orders.toml"]:
        if path.exists():
            from_mappings += [(s, c, str(path)) for s, c in _codings(_toml(path))]
    for system, code, file in from_mappings:
        canonical = LEGACY.get(system, system)
        if canonical.startswith(CANONICAL_BASE) and not terminology.defines(canonical, code):
            raise ConfigError(f"code {code!r} is not defined in the code system {canonical}", file=file)


def _toml(path: Path) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _codings(node):
    if isinstance(node, dict):
        if isinstance(node.get("system"), str) and isinstance(node.get("code"), str):
            yield node["system"], node["code"]
        for value in node.values():
            yield from _codings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _codings(value)
