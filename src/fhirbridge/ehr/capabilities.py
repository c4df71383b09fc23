"""What this hospital's EHR can do for the write-back: the capability set the write plan is chosen from.

Servers advertise badly (a CapabilityStatement may claim `transaction` and run it as a batch, or omit
`updateCreate` it honours), so the set is resolved from three sources, later ones winning: what the EHR's
CapabilityStatement says, the vendor profile named in `[hospital.ehr] profile` (mappings/ehr/<name>.toml), and
each capability pinned in `[hospital.ehr]` by name. `origin` records which source set each one, for `doctor`.

Issue 14 fills in the discovery; this module fixes the vocabulary the write plans (ehr/write_plan.py) use.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from fhirbridge.config.model import EhrSettings
from fhirbridge.errors import ConfigError

# DocumentReference attachment types fhirbridge can produce, in its order of preference.
ATTACHMENT_TYPES = ("application/fhir+json", "application/pdf", "text/plain")


@dataclass(frozen=True)
class Capabilities:
    """One EHR's write behaviours. Defaults are an ideal R4 server (sekmet): everything offered."""

    transaction: bool = True                 # accepts `transaction` Bundles at [base] (R4 http.html#transaction)
    transaction_atomic: bool = True          # ...and runs them all-or-nothing (a batch in disguise: False)
    update_create: bool = True               # PUT to a new id creates it (rest.resource.updateCreate)
    conditional_create: bool = True          # honours If-None-Exist (conditionalCreate)
    if_match: bool = True                    # honours If-Match on update (versioning: versioned-update)
    docref_identifier_search: bool = True    # DocumentReference?identifier=system|value finds our note
    provenance_target_search: bool = True    # Provenance?target=DocumentReference/<id> finds our Provenance
    task_write: bool = True                  # Task create/update allowed (some vendors: Task is read-only)
    requires_encounter: bool = False         # DocumentReference.context.encounter required to file a note
    max_attachments: int | None = None       # DocumentReference.content entries kept (None: no limit)
    attachment_types: tuple[str, ...] = ATTACHMENT_TYPES   # content types accepted, in preference order
    # capability -> where its value came from: "advertised" | "profile <name>" | "pinned"
    origin: dict[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "origin")


def pinned(settings: EhrSettings, base: Capabilities | None = None) -> Capabilities:
    """`base` (default: an ideal server) with the capabilities pinned in `[hospital.ehr]` applied.

    Issue 14's discovery reads the CapabilityStatement and the profile first; this is the last step."""
    values = {n: getattr(base or Capabilities(), n) for n in Capabilities.names()}
    origin = dict((base or Capabilities()).origin)
    for name, value in settings.pins.items():
        if name not in values:
            raise ConfigError(f"{name!r} is not an EHR capability (one of {', '.join(Capabilities.names())})",
                              key=f"hospital.ehr.{name}")
        want = type(values[name]) if values[name] is not None else int
        if name == "attachment_types":
            if not isinstance(value, list) or not all(v in ATTACHMENT_TYPES for v in value) or not value:
                raise ConfigError(f"must be a non-empty list of {', '.join(ATTACHMENT_TYPES)}",
                                  key=f"hospital.ehr.{name}")
            value = tuple(value)
        elif not isinstance(value, want) or (want is int and (isinstance(value, bool) or value < 1)):
            raise ConfigError(f"must be a {'positive integer' if want is int else want.__name__}",
                              key=f"hospital.ehr.{name}")
        values[name] = value
        origin[name] = "pinned"
    return Capabilities(**values, origin=origin)
