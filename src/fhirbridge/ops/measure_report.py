"""The outcome figures as a FHIR R4 MeasureReport (type `summary`), served at GET /api/outcomes for a quality
team's tools (docs/outcomes.md).

R4 measurereport.html: a summary report has one `group` per measure, each with its `population`s (codes of
HL7's measure-population CodeSystem: the initial population, the denominator, its exclusions, the numerator;
for the continuous time to decision the measure-population and a `measureScore` that is its median in days,
UCUM `d`) and `stratifier`s (per reviewer, per specialty) whose `stratum` repeat the populations. The group and
stratifier codes are fhirbridge's CodeSystem `outcome-measure`. `measure` is the canonical of the measure the
report is about; fhirbridge does not publish a Measure resource for it (docs/outcomes.md, limits).
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

from fhirbridge.config.mappings import CANONICAL_BASE
from fhirbridge.ops.outcome_figures import Figures, Group

OUTCOME_MEASURE = CANONICAL_BASE + "outcome-measure"
MEASURE = "http://fhirbridge.org/fhir/Measure/second-opinion-outcomes"
POPULATION = "http://terminology.hl7.org/CodeSystem/measure-population"
UCUM = "http://unitsofmeasure.org"

# (group code, display, numerator, denominator); the denominator's exclusions are the initial population's rest.
PROPORTIONS: tuple[tuple[str, str, Callable[[Group], int], Callable[[Group], int]], ...] = (
    ("opinion-changed-plan", "Opinions that changed the plan", lambda g: g.changed_plan,
     lambda g: g.with_recommendation),
    ("opinion-changed-diagnosis", "Opinions that changed the diagnosis", lambda g: g.changed_diagnosis,
     lambda g: g.with_concordance),
    ("chart-plan-changed", "Plans changed in the chart", lambda g: g.chart_changed, lambda g: g.assessed),
    ("chart-surgery-avoided", "Surgery avoided", lambda g: g.effects["avoided"], lambda g: g.assessed),
    ("chart-other-procedure", "Another (less invasive) procedure", lambda g: g.effects["other-procedure"],
     lambda g: g.assessed),
    ("chart-as-planned", "Proceeded as planned", lambda g: g.effects["as-planned"], lambda g: g.assessed),
    ("advice-followed", "Advice followed", lambda g: g.advice_followed, lambda g: g.advice_assessable),
)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _concept(system: str, code: str, display: str | None = None) -> dict:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def _population(code: str, count: int) -> dict:
    return {"code": _concept(POPULATION, code), "count": count}


def _proportion(g: Group, num: Callable[[Group], int], den: Callable[[Group], int]) -> dict:
    n, d = num(g), den(g)
    out: dict = {"population": [_population("initial-population", g.filed), _population("denominator", d),
                                _population("denominator-exclusion", g.filed - d), _population("numerator", n)]}
    if d:
        out["measureScore"] = {"value": round(n / d, 4), "unit": "1", "system": UCUM, "code": "1"}
    return out


def _time(g: Group) -> dict:
    out: dict = {"population": [_population("initial-population", g.filed),
                                _population("measure-population", g.decided)]}
    if g.median_days is not None:
        out["measureScore"] = {"value": g.median_days, "unit": "d", "system": UCUM, "code": "d"}
    return out


def _stratifiers(f: Figures, part: Callable[[Group], dict]) -> list[dict]:
    out = []
    for code, display, groups in (("reviewer", "By reviewer", f.by_reviewer),
                                  ("profile", "By specialty", f.by_profile)):
        if groups:
            out.append({"code": [_concept(OUTCOME_MEASURE, code, display)],
                        "stratum": [{"value": {"text": name}, **part(g)} for name, g in groups.items()]})
    return out


def measure_report(f: Figures, *, now: float, reporter: dict | None = None) -> dict:
    """The MeasureReport of these figures, as of `now` (the period: first filing to now). `reporter`: a
    Reference to the hospital (one hospital reported), else left out."""
    groups = []
    for code, display, num, den in PROPORTIONS:
        groups.append({"code": _concept(OUTCOME_MEASURE, code, display), **_proportion(f.overall, num, den),
                       "stratifier": _stratifiers(f, partial(_proportion, num=num, den=den))})
    groups.append({"code": _concept(OUTCOME_MEASURE, "time-to-decision", "Time from opinion to decision"),
                   **_time(f.overall), "stratifier": _stratifiers(f, _time)})
    for g in groups:
        if not g["stratifier"]:
            del g["stratifier"]
    report: dict = {"resourceType": "MeasureReport", "status": "complete", "type": "summary", "measure": MEASURE,
                    "date": _iso(now), "period": {"start": _iso(f.first_filed if f.first_filed is not None else now),
                                                  "end": _iso(now)},
                    # No improvementNotation: whether more surgery avoided is better is the quality team's call.
                    "group": groups}
    if reporter:
        report["reporter"] = reporter
    return report
