"""What one run of a step did: the small typed object every step function returns to the runner."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fhirbridge.steps import Step


@dataclass(frozen=True)
class StepResult:
    """The runner records it in one store transaction with the step's move; nothing else is returned."""

    # The event's detail: counts, ids, reasons. Never clinical content (the store holds none).
    detail: dict[str, Any] = field(default_factory=dict)
    # Set when the step could not do its work and sends the Case back (its work file was gone): the step
    # the Case goes back to. None: the step is done and the Case moves on to steps.FLOW[step].next.
    back_to: Step | None = None
    package_id: str | None = None           # seal: the package just sealed
    due_at: float | None = None             # seal: when the reviewer's opinion is due (the package says so too)
    document_reference: str | None = None   # file: the note in the chart ("DocumentReference/<id>")
    # The step brought the EHR Task in line itself (the write-back transaction completes it): the runner
    # need not read and sync the Task after recording the step.
    task_current: bool = False
    # file, plan ONCE: the outcome of a write is unknown and only a person can tell; the Case stops at
    # needs_review with this question (Case.last_error, shown by `status`, the dashboard and metrics).
    # collect, a profile that holds (issue 16 part 6): what is missing, as the Case waits at await_records.
    question: str | None = None
    # file: the filed opinion's summary columns (loop/opinion_summary.py), written with the step's move.
    summary: dict[str, Any] = field(default_factory=dict)

    def columns(self) -> dict[str, Any]:
        """The Case columns this result sets, besides the step."""
        values = {"package_id": self.package_id, "due_at": self.due_at,
                  "document_reference": self.document_reference}
        return {**{k: v for k, v in values.items() if v is not None}, **self.summary}


def needs_review(question: str, **detail: Any) -> StepResult:
    """The step cannot tell whether its write landed and may not write again: a person must check."""
    return StepResult(detail={"question": question, **detail}, back_to=Step.NEEDS_REVIEW, question=question)


def sent_back(step: Step, reason: str, **detail: Any) -> StepResult:
    """A step whose work file is gone (a restored volume, a replica not on the shared data_dir)."""
    return StepResult(detail={"reason": reason, **detail}, back_to=step)
