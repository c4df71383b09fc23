"""What a FHIR R4 server says it can do: its CapabilityStatement (GET [base]/metadata), read as plain facts.

R4 capabilitystatement.html: `rest[mode=server]` carries the system-level interactions (`transaction`,
`batch`, ...) and one `resource[]` entry per type it serves, each with its `interaction[].code` (create,
update, search-type, ...), `updateCreate` (a PUT to a new id creates it), `conditionalCreate` (honours
`If-None-Exist`), `versioning` (`versioned-update`: honours `If-Match`) and its `searchParam[].name`.

Only what the statement SAYS is recorded; a type it does not list is "not stated" (`resource()` is None),
never "not supported": statements are often incomplete (many omit Binary although they serve it). What the
facts mean for filing an opinion is decided above this layer (ehr/capabilities.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ResourceCapability:
    """One `rest.resource[]` entry."""

    type: str
    interactions: frozenset[str] = frozenset()     # create, read, update, search-type, ...
    search_params: frozenset[str] = frozenset()    # searchParam[].name
    update_create: bool = False                    # absent is taken as not offered (R4 gives no default)
    conditional_create: bool = False
    conditional_update: bool = False
    versioning: str = ""                           # no-version | versioned | versioned-update ("" absent)


@dataclass(frozen=True)
class ServerStatement:
    """The server part of a CapabilityStatement."""

    fhir_version: str = ""
    interactions: frozenset[str] = frozenset()     # rest.interaction: transaction, batch, search-system, ...
    resources: dict[str, ResourceCapability] = field(default_factory=dict)

    def resource(self, type_: str) -> ResourceCapability | None:
        """The type's entry, or None when the statement does not list the type."""
        return self.resources.get(type_)

    def offers(self, type_: str, interaction: str) -> bool | None:
        """Whether the statement lists `interaction` on `type_`; None when it does not list the type."""
        r = self.resources.get(type_)
        return None if r is None else interaction in r.interactions


def parse(statement: Any) -> ServerStatement:
    """The server facts of a CapabilityStatement; ValueError when `statement` is not one."""
    if not isinstance(statement, dict) or statement.get("resourceType") != "CapabilityStatement":
        raise ValueError("not a CapabilityStatement")
    rest = next((r for r in statement.get("rest") or [] if isinstance(r, dict) and r.get("mode") == "server"), {})
    resources = {}
    for entry in rest.get("resource") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            continue
        resources[entry["type"]] = ResourceCapability(
            type=entry["type"], interactions=_codes(entry.get("interaction")),
            search_params=frozenset(str(p.get("name")) for p in entry.get("searchParam") or []
                                    if isinstance(p, dict) and p.get("name")),
            update_create=entry.get("updateCreate") is True,
            conditional_create=entry.get("conditionalCreate") is True,
            conditional_update=entry.get("conditionalUpdate") is True,
            versioning=str(entry.get("versioning") or ""))
    return ServerStatement(fhir_version=str(statement.get("fhirVersion") or ""),
                           interactions=_codes(rest.get("interaction")), resources=resources)


def _codes(items: Any) -> frozenset[str]:
    return frozenset(str(i["code"]) for i in items or [] if isinstance(i, dict) and i.get("code"))
