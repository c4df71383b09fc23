"""The Case's steps: the one vocabulary every layer shares, declared once.

    collect -> seal -> deliver -> await_opinion -> file -> done        (or failed / cancelled / declined)
                                                  file -> needs_review -> file   (a person checks the chart)
         collect -> await_records -> seal       (a profile that holds the Case until required records exist)
                              await_opinion -> supplement -> await_opinion   (more records, on request)

`FLOW` is the table: for each step, the step a successful run moves the Case to (None: no run of ours
happens there) and what the referral Task in the EHR shows meanwhile (FHIR task-status, BSeR-style
businessStatus). The store (what can be claimed, what is final), the runner, the Task sync, metrics,
the OpenAPI document and the dashboard all read it. The function that runs each work step is bound to it
in `loop/table.py`, which checks at import that every work step has one: the data lives here, below every
layer, so the store and the Task sync can read it without importing the loop's code.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Step(StrEnum):
    """Where a Case stands. A member equals its value (`Step.FILE == "file"`): the store keeps plain text."""

    COLLECT = "collect"
    SEAL = "seal"
    DELIVER = "deliver"
    AWAIT_OPINION = "await_opinion"
    AWAIT_RECORDS = "await_records"
    SUPPLEMENT = "supplement"
    FILE = "file"
    NEEDS_REVIEW = "needs_review"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DECLINED = "declined"


@dataclass(frozen=True)
class Flow:
    next: Step | None     # where a successful run moves the Case; None: nothing of ours runs at this step
    task_status: str      # FHIR task-status of the referral Task while the Case is here
    business: str         # the Task's businessStatus code (finer than task-status, as BSeR uses it)
    display: str          # businessStatus display
    final: bool = False   # closed for good ("failed" is not: it can be retried or cancelled)


FLOW: dict[Step, Flow] = {
    Step.COLLECT: Flow(Step.SEAL, "in-progress", "collecting", "Collecting records"),
    Step.SEAL: Flow(Step.DELIVER, "in-progress", "packaging", "Packaging records"),
    Step.DELIVER: Flow(Step.AWAIT_OPINION, "in-progress", "sending", "Sending to reviewer"),
    # The reviewer's turn: the opinion arrives by the inbox, `receive` or the reviewer API and moves it on.
    Step.AWAIT_OPINION: Flow(None, "in-progress", "sent-to-reviewer", "Sent to reviewer, awaiting opinion"),
    # Issue 16 part 6: the profile holds the Case (`hold = true`) while a required record of its checklist is
    # not in the package; collect again when it is in the EHR, or the physician confirms sending without it.
    Step.AWAIT_RECORDS: Flow(None, "on-hold", "awaiting-records",
                             "Waiting for records the reviewer needs, or the physician's go-ahead without them"),
    # Issue 16 part 2: the physician answered a reviewer's request for more records; the supplement package is
    # sealed and sent, the request Task completed, and the Case awaits the opinion again (loop/supplement.py).
    Step.SUPPLEMENT: Flow(Step.AWAIT_OPINION, "in-progress", "sending-records",
                          "Sending the records the reviewer asked for"),
    Step.FILE: Flow(Step.DONE, "in-progress", "opinion-received", "Opinion received, filing"),
    # The EHR cannot tell whether a write landed (POST-only, no identifier search: write plan ONCE) and its
    # answer was lost: a person checks the chart and says (`fhirbridge resolve`). Nothing of ours runs here,
    # and it is not final: resolving it puts the Case back at `file`. Never a second POST meanwhile.
    Step.NEEDS_REVIEW: Flow(None, "in-progress", "needs-review",
                            "Opinion may be in the chart; staff must check before it is filed again"),
    Step.DONE: Flow(None, "completed", "opinion-filed", "Opinion filed in the chart", final=True),
    Step.FAILED: Flow(None, "failed", "failed", "Referral failed; see the service's status for the reason"),
    Step.CANCELLED: Flow(None, "cancelled", "cancelled", "Referral cancelled", final=True),
    # FHIR task-status `rejected`: the potential performer refused.
    Step.DECLINED: Flow(None, "rejected", "declined", "The reviewer declined the referral", final=True),
}

# The straight path of a Case, in order (the way a person reads it).
PATH: tuple[Step, ...] = (Step.COLLECT, Step.SEAL, Step.DELIVER, Step.AWAIT_OPINION, Step.FILE, Step.DONE)
# Steps a worker claims and runs; and the states that end a Case. Plain text, as the store compares them.
WORK_STEPS: tuple[str, ...] = tuple(s.value for s, f in FLOW.items() if f.next is not None)
FINAL_STEPS: tuple[str, ...] = tuple(s.value for s, f in FLOW.items() if f.final)
ALL_STEPS: tuple[str, ...] = tuple(s.value for s in Step)


def is_before(a: str, b: str) -> bool:
    """True when step `a` comes before step `b` on the Case's path (a Case sent back a step)."""
    return a in PATH and b in PATH and PATH.index(Step(a)) < PATH.index(Step(b))
