"""`python -m bench --check` (issue 19): a ratio more than 25 % worse than its committed figure is a
regression, in the direction its goal says is better; --record keeps the sections a run did not touch."""
from __future__ import annotations

from bench import run


def _results(**values) -> dict:
    goals = [{"section": "seal", "figure": "fhirbridge / true floor", "value": values.get("seal", "1.40x"),
              "goal": "<= 1.5x", "met": True},
             {"section": "collect", "figure": "naive fhirclient / fhirbridge", "value": values.get("naive", "3.2x"),
              "goal": ">= 3x", "met": True},
             {"section": "claims", "figure": "duplicate claims", "value": 0, "goal": "0", "met": True}]
    return {"goals": goals, "sections": {"seal": {}, "collect": {}}, "machine": {}, "mode": "quick",
            "started": "now"}


def test_a_ratio_worse_by_more_than_a_quarter_is_a_regression_in_its_own_direction():
    baseline = run.record(_results(), None)
    assert set(baseline["ratios"]) == {"seal: fhirbridge / true floor", "collect: naive fhirclient / fhirbridge"}
    assert run.check(_results(seal="1.70x", naive="2.6x"), baseline) == ([], 2)   # within 25 % both ways
    regressed, compared = run.check(_results(seal="1.80x", naive="2.5x"), baseline)
    assert compared == 2 and len(regressed) == 2
    assert run.check(_results(seal="0.50x", naive="9.0x"), baseline)[0] == []     # better is never a regression


def test_record_keeps_the_sections_the_run_did_not_touch():
    previous = {"ratios": {"cases: x": {"value": 1.0, "better": "lower"},
                           "seal: fhirbridge / true floor": {"value": 9.0, "better": "lower"}}}
    out = run.record(_results(), previous)
    assert out["ratios"]["cases: x"]["value"] == 1.0
    assert out["ratios"]["seal: fhirbridge / true floor"]["value"] == 1.4
