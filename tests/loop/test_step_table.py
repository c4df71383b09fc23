"""The Case's steps are declared once (steps.FLOW) and every reader agrees with it."""
from __future__ import annotations

from fhirbridge.ehr.task import STATUS
from fhirbridge.loop.result import StepResult, sent_back
from fhirbridge.loop.runner import outcome
from fhirbridge.loop.table import RUN
from fhirbridge.ops.crashpoints import POINTS
from fhirbridge.service.openapi import CASE_STEPS
from fhirbridge.steps import ALL_STEPS, FINAL_STEPS, FLOW, PATH, WORK_STEPS, Step
from fhirbridge.ui.dashboard import STATE_LABELS, STATE_ORDER


def test_every_work_step_has_exactly_one_function_and_nothing_else_does():
    assert set(RUN) == set(WORK_STEPS) == {Step.COLLECT, Step.SEAL, Step.DELIVER, Step.FILE, Step.SUPPLEMENT}
    assert FLOW[Step.SUPPLEMENT].next == Step.AWAIT_OPINION and FLOW[Step.AWAIT_RECORDS].next is None


def test_the_path_follows_the_table_from_collect_to_done():
    walked, step = [Step.COLLECT], Step.COLLECT
    while (nxt := FLOW[step].next) is not None:
        walked.append(nxt)
        step = nxt
    assert walked == [Step.COLLECT, Step.SEAL, Step.DELIVER, Step.AWAIT_OPINION]   # then the reviewer's turn
    assert FLOW[Step.FILE].next == Step.DONE and list(PATH) == walked + [Step.FILE, Step.DONE]


def test_final_steps_are_the_closed_ones_and_failed_is_not_among_them():
    assert set(FINAL_STEPS) == {"done", "cancelled", "declined"}
    assert "failed" not in FINAL_STEPS and "failed" in ALL_STEPS


def test_the_task_the_api_the_dashboard_and_the_crash_points_read_the_same_steps():
    assert all(step in STATUS for step in ALL_STEPS)                 # the Task shows every step
    assert STATUS["done"] == ("completed", "opinion-filed", "Opinion filed in the chart")
    assert list(CASE_STEPS) == list(ALL_STEPS)                       # the OpenAPI enum
    assert list(STATE_ORDER) == list(ALL_STEPS) and set(STATE_LABELS) == set(ALL_STEPS)
    assert {p.split(".")[0] for p in POINTS if p.split(".")[1] in ("begin", "end", "recorded")} >= set(WORK_STEPS)


def test_a_step_is_stored_as_plain_text():
    assert Step.AWAIT_OPINION == "await_opinion" and type(str(Step.AWAIT_OPINION)) is str
    assert all(type(s) is str for s in WORK_STEPS + FINAL_STEPS + ALL_STEPS)


def test_a_step_result_sets_only_the_columns_it_names():
    assert StepResult({"counts": 1}).columns() == {}
    assert StepResult({}, package_id="p", due_at=5.0).columns() == {"package_id": "p", "due_at": 5.0}
    back = sent_back(Step.COLLECT, "collected records missing", consents=["Consent/1"])
    assert back.back_to == Step.COLLECT and back.detail == {"reason": "collected records missing",
                                                            "consents": ["Consent/1"]}


def test_the_runner_names_each_outcome_as_metrics_label_it():
    assert outcome("collect", "seal", True) == "done"
    assert outcome("file", "done", True) == "done"
    assert outcome("seal", "collect", True) == "back"            # a work file was gone
    assert outcome("deliver", "deliver", False) == "retry"
    assert outcome("seal", "failed", False) == "failed"
    assert outcome("collect", "cancelled", True) == "cancelled"


def test_needs_review_is_no_work_step_and_not_final():
    """A Case whose write may be in the chart waits for a person (issue 14): no worker claims it, and it is
    not closed (resolving it goes back to file)."""
    assert "needs_review" in ALL_STEPS
    assert "needs_review" not in WORK_STEPS and "needs_review" not in FINAL_STEPS
    assert FLOW[Step.NEEDS_REVIEW].next is None
