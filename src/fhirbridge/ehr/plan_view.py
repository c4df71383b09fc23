"""The write plan as `fhirbridge doctor` shows it: the capability set resolved from the CapabilityStatement doctor
read, the profile and the pins (ehr/capabilities.py), and the plan chosen from it (ehr/write_plan.py).

doctor lives in `ops`, below this layer, so it cannot choose the plan itself; the CLI hands it `for_hospital(...)`.
Nothing here opens the store or asks for a token: doctor works before either exists.
"""
from __future__ import annotations

from fhirbridge.config.model import Config, Hospital
from fhirbridge.ehr import capabilities, write_plan
from fhirbridge.fhir.capability_statement import parse
from fhirbridge.ops.doctor import PlanFor, PlanView


def for_hospital(cfg: Config, hospital: Hospital) -> PlanFor:
    """statement (or None) -> the PlanView of `hospital` (a ConfigError for a bad profile or pin)."""
    def plan_for(statement: dict | None) -> PlanView:
        caps = capabilities.resolve(hospital.ehr, cfg.mappings_dir, parse(statement) if statement else None)
        plan = write_plan.choose(caps)
        return PlanView(kind=plan.kind.name, description=plan.kind.value, task_write=plan.task_write,
                        writes=plan.writes, profile=hospital.ehr.profile,
                        capabilities=tuple((n, getattr(caps, n), caps.origin.get(n, "")) for n in caps.names()),
                        disagreements=tuple(caps.disagreements()))
    return plan_for
