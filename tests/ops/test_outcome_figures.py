"""The outcome figures of a test set with known answers (tests/kit/outcomes.py): the same numbers in the figures,
the Prometheus metrics and the FHIR R4 MeasureReport, which validates."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from fhirbridge.fhir.validate import validate
from fhirbridge.ops import metrics
from fhirbridge.ops.measure_report import MEASURE, OUTCOME_MEASURE, measure_report
from fhirbridge.ops.outcome_figures import figures
from fhirbridge.store.store import Store
from tests.kit.outcomes import KNOWN, T0, seed_known_outcomes


def _store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    seed_known_outcomes(store, "hosp-1", {"a": "spine-center", "b": "heart-center"})
    return store


def test_the_figures_of_the_known_set_are_the_known_answers(tmp_path):
    store = _store(tmp_path)
    try:
        f = figures(store.outcomes.rows(), reviewer_names={"spine-center": "Spine Center"})
    finally:
        store.close()
    for name, group in (("overall", f.overall), ("a", f.by_reviewer["Spine Center"]),
                        ("b", f.by_reviewer["heart-center"])):
        got = group.as_dict()
        for key, value in KNOWN[name].items():
            assert got[key] == value, (name, key)
    assert set(f.by_profile) == {"spine", "cardiac"}
    assert f.by_profile["spine"].as_dict()["advice_followed"] == KNOWN["a"]["advice_followed"]
    rates = f.overall.as_dict()["rates"]
    assert rates == {"changed_plan": 0.6, "changed_diagnosis": 0.3, "chart_changed": 5 / 8, "advice_followed": 5 / 7}
    assert figures([]).overall.as_dict()["rates"]["advice_followed"] is None     # no denominator: no rate


def test_the_measure_report_is_a_valid_r4_summary_with_the_known_counts(tmp_path):
    store = _store(tmp_path)
    try:
        f = figures(store.outcomes.rows())
    finally:
        store.close()
    report = measure_report(f, now=T0 + 200 * 86400, reporter={"display": "Test Hospital"})
    assert validate(report) == []
    assert (report["type"], report["status"], report["measure"]) == ("summary", "complete", MEASURE)
    groups = {g["code"]["coding"][0]["code"]: g for g in report["group"]}
    assert all(g["code"]["coding"][0]["system"] == OUTCOME_MEASURE for g in report["group"])

    def counts(part):
        return {p["code"]["coding"][0]["code"]: p["count"] for p in part["population"]}

    assert counts(groups["advice-followed"]) == {"initial-population": 10, "denominator": 7,
                                                 "denominator-exclusion": 3, "numerator": 5}
    assert groups["advice-followed"]["measureScore"]["value"] == round(5 / 7, 4)
    assert counts(groups["chart-surgery-avoided"])["numerator"] == 4
    assert counts(groups["opinion-changed-plan"])["numerator"] == 6
    assert groups["time-to-decision"]["measureScore"] == {"value": 20.0, "unit": "d",
                                                          "system": "http://unitsofmeasure.org", "code": "d"}
    by_reviewer = next(s for s in groups["chart-plan-changed"]["stratifier"]
                       if s["code"][0]["coding"][0]["code"] == "reviewer")
    strata = {s["value"]["text"]: counts(s) for s in by_reviewer["stratum"]}
    assert strata["spine-center"]["numerator"] == 3 and strata["spine-center"]["denominator"] == 5
    assert strata["heart-center"]["numerator"] == 2 and strata["heart-center"]["denominator"] == 3


def test_the_metrics_carry_the_known_counts_per_reviewer_and_profile(tmp_path):
    store = _store(tmp_path)
    try:
        text = metrics.render(store, {"hosp-1": "Test Hospital"}).decode()
    finally:
        store.close()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))

    def total(name, **want):
        return sum(v for labels, v in samples[name] if all(labels.get(k) == x for k, x in want.items()))

    assert total("fhirbridge_outcome_opinions") == 10
    assert total("fhirbridge_outcome_opinions_changed_plan") == 6
    assert total("fhirbridge_outcome_chart", effect="avoided") == 4
    assert total("fhirbridge_outcome_chart", effect="open") == 1
    assert total("fhirbridge_outcome_advice_followed", reviewer="spine-center") == 4
    assert total("fhirbridge_outcome_advice_assessable", profile="cardiac") == 2
    assert total("fhirbridge_outcome_decision_days_median", reviewer="*", profile="*") == 20.0
    assert total("fhirbridge_outcome_decision_days_median", reviewer="heart-center", profile="*") == 15.0
    assert all("Patient" not in line and "known-" not in line for line in text.splitlines()
               if line.startswith("fhirbridge_outcome"))
