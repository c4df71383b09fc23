"""What this hospital's EHR can do for the write-back: the capability set the write plan is chosen from.

Servers advertise badly (a CapabilityStatement may claim `transaction` and run it as a batch, or omit
`updateCreate` it honours), so the set is resolved from three sources, later ones winning: what the EHR's
CapabilityStatement says (`advertised`), the vendor profile named in `[hospital.ehr] profile`
(mappings/ehr/<name>.toml), and each capability pinned in `[hospital.ehr]` by name. `origin` records which
source set each one, for `doctor`: "advertised", "assumed" (transaction_atomic, see below), "profile <name>",
"pinned", or "default" (nothing said it: the ideal server's value).

What the statement says, per capability (fhir/capability_statement.py reads it; R4 capabilitystatement.html):
- transaction: `rest.interaction` lists `transaction` (R4 http.html#transaction).
- update_create: `updateCreate` on each of DocumentReference and Binary that the statement lists (the atomic
  plan PUTs both to ids it derives). A type the statement leaves out says nothing (many omit Binary).
- conditional_create: `conditionalCreate` on DocumentReference (the ledger plan's POST with If-None-Exist).
- if_match: `versioning = versioned-update` on Task (every Task write carries If-Match).
- docref_identifier_search / provenance_target_search: the `identifier` / `target` searchParam is listed.
- task_write: Task lists both `create` and `update`.
- transaction_atomic cannot be advertised. R4 http.html#transaction: a transaction SHALL succeed or fail as a
  whole, so a server that advertises `transaction` is taken at its word ("assumed") unless a profile or a pin
  says otherwise; the atomic plan checks every entry's `response.status` all the same, so a server that runs
  it as a batch is caught rather than trusted. requires_encounter, max_attachments and attachment_types are
  never in a statement: profiles and pins set them.

The statement is read only when some capability that it can say is left open by the profile and the pins
(`needs_statement`): a profile plus pins that fix all of them run without it (tests, an EHR whose metadata is
not reachable from the bridge).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fhirbridge.config.mappings import load_ehr_profile
from fhirbridge.config.model import EhrSettings
from fhirbridge.errors import ConfigError
from fhirbridge.fhir.capability_statement import ServerStatement

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
    # capability -> where its value came from: "advertised" | "assumed" | "profile <name>" | "pinned" | "default"
    origin: dict[str, str] = field(default_factory=dict, compare=False)
    # capability -> what the CapabilityStatement said of it (only those it said something of), for `doctor`
    advertised: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name not in ("origin", "advertised"))

    def disagreements(self) -> list[tuple[str, Any, Any, str]]:
        """(name, advertised, used, origin) for each capability where the value used is not what the EHR's
        statement says: a profile or a pin overrode it (doctor warns, so a wrong override is seen)."""
        return [(n, v, getattr(self, n), self.origin.get(n, "")) for n, v in self.advertised.items()
                if v != getattr(self, n)]


# The capabilities a CapabilityStatement can say something about (module docstring).
ADVERTISABLE = ("transaction", "update_create", "conditional_create", "if_match", "docref_identifier_search",
                "provenance_target_search", "task_write")


def advertised(statement: ServerStatement) -> dict[str, bool]:
    """What `statement` says of each capability it says something of (module docstring: which element)."""
    out: dict[str, bool] = {"transaction": "transaction" in statement.interactions}
    listed = [r for r in (statement.resource("DocumentReference"), statement.resource("Binary")) if r]
    if listed:
        out["update_create"] = all(r.update_create and "update" in r.interactions for r in listed)
    docref, provenance, task = (statement.resource(t) for t in ("DocumentReference", "Provenance", "Task"))
    if docref is not None:
        out["conditional_create"] = docref.conditional_create
        out["docref_identifier_search"] = "identifier" in docref.search_params
    if provenance is not None:
        out["provenance_target_search"] = "target" in provenance.search_params
    if task is not None:
        out["if_match"] = task.versioning == "versioned-update"
        out["task_write"] = {"create", "update"} <= task.interactions
    return out


def needs_statement(settings: EhrSettings, mappings_dir: Path) -> bool:
    """Whether some capability a statement can say is left open by the profile and the pins."""
    fixed = set(settings.pins)
    if settings.profile != "auto":
        fixed |= set(load_ehr_profile(mappings_dir, settings.profile).values)
    return not set(ADVERTISABLE) <= fixed


def resolve(settings: EhrSettings, mappings_dir: Path, statement: ServerStatement | None) -> Capabilities:
    """The capability set: the ideal defaults, what `statement` says (None: not read), the profile, the pins."""
    values: dict[str, Any] = {n: getattr(Capabilities(), n) for n in Capabilities.names()}
    origin = dict.fromkeys(values, "default")
    said = advertised(statement) if statement is not None else {}
    for name, value in said.items():
        values[name], origin[name] = value, "advertised"
    if "transaction" in said:
        values["transaction_atomic"], origin["transaction_atomic"] = said["transaction"], "assumed"
    if settings.profile != "auto":
        profile = load_ehr_profile(mappings_dir, settings.profile)
        for name, value in profile.values.items():
            values[name] = _checked(name, value, values, file=str(profile.file), key=f"capabilities.{name}")
            origin[name] = f"profile {profile.name}"
    return pinned(settings, Capabilities(**values, origin=origin, advertised=said))


def discover(settings: EhrSettings, mappings_dir: Path, read_statement: Callable[[], ServerStatement]) -> Capabilities:
    """`resolve`, calling `read_statement` (GET [base]/metadata) only when the statement is needed."""
    return resolve(settings, mappings_dir, read_statement() if needs_statement(settings, mappings_dir) else None)


def pinned(settings: EhrSettings, base: Capabilities | None = None) -> Capabilities:
    """`base` (default: an ideal server) with the capabilities pinned in `[hospital.ehr]` applied."""
    base = base or Capabilities()
    values = {n: getattr(base, n) for n in Capabilities.names()}
    origin = dict(base.origin)
    for name, value in settings.pins.items():
        values[name] = _checked(name, value, values, key=f"hospital.ehr.{name}")
        origin[name] = "pinned"
    return Capabilities(**values, origin=origin, advertised=dict(base.advertised))


def _checked(name: str, value: Any, values: dict[str, Any], *, key: str, file: str | None = None) -> Any:
    """`value` for capability `name`, checked against the type of its default; a ConfigError naming `key`."""
    if name not in values:
        raise ConfigError(f"{name!r} is not an EHR capability (one of {', '.join(Capabilities.names())})",
                          key=key, file=file)
    default = getattr(Capabilities(), name)
    if name == "attachment_types":
        if not isinstance(value, list) or not all(v in ATTACHMENT_TYPES for v in value) or not value:
            raise ConfigError(f"must be a non-empty list of {', '.join(ATTACHMENT_TYPES)}", key=key, file=file)
        return tuple(value)
    want = type(default) if default is not None else int
    if not isinstance(value, want) or (want is int and (isinstance(value, bool) or value < 1)):
        raise ConfigError(f"must be a {'positive integer' if want is int else want.__name__}", key=key, file=file)
    return value
