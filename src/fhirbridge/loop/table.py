"""The step table's functions: each work step of `steps.FLOW` bound to the function that runs it.

A step function takes (app, case), does its work and returns a StepResult; it must be safe to repeat from
its start (a worker can die anywhere). Checked at import: every work step has exactly one function.
"""
from __future__ import annotations

from collections.abc import Callable

from fhirbridge.ehr.context import App
from fhirbridge.loop.collect import collect_step
from fhirbridge.loop.deliver import deliver_step
from fhirbridge.loop.filing import file_step
from fhirbridge.loop.result import StepResult
from fhirbridge.loop.seal import seal_step
from fhirbridge.loop.supplement import supplement_step
from fhirbridge.steps import FLOW, WORK_STEPS, Step
from fhirbridge.store.store import Case

StepFunction = Callable[[App, Case], StepResult]

RUN: dict[Step, StepFunction] = {
    Step.COLLECT: collect_step,
    Step.SEAL: seal_step,
    Step.DELIVER: deliver_step,
    Step.FILE: file_step,
    Step.SUPPLEMENT: supplement_step,
}

if set(RUN) != set(WORK_STEPS):  # pragma: no cover - a step added to FLOW without its function
    raise RuntimeError(f"steps.FLOW's work steps {sorted(WORK_STEPS)} and loop.table.RUN {sorted(RUN)} differ")


def next_of(step: str) -> Step:
    """Where a successful run of a work step moves the Case."""
    nxt = FLOW[Step(step)].next
    assert nxt is not None, f"{step} is not a work step"
    return nxt
