"""The outcome figures (docs/outcomes.md): what the second opinions advised and what the chart shows became of
the planned treatment, with their denominators, overall, per reviewer and per specialty (collection profile).

Computed from the outcomes table alone (store/outcomes.py: codes and references, filled by loop/outcomes.py),
so the dashboard, /metrics and the MeasureReport at /api/outcomes give the same numbers and none decrypts an
opinion. Every rate is a numerator over a stated denominator; a rate with an empty denominator is None, never 0.

Definitions (one table each, read everywhere):
- CHANGING: recommendations that change the referring physician's plan ("opinions that changed the plan").
- EFFECT: what a closed row's chart result means for the plan: `as-planned` (the operation was done, or the
  order completed), `other-procedure` (a replacing order, or a Procedure of another code under the order: the
  "less invasive procedure" of the issue; fhirbridge does not rank invasiveness), `avoided` (revoked, not done,
  or nothing within the window). Results that say nothing about the plan (no plan named, plan deleted or
  entered in error) have no effect and are excluded, as are rows still open.
- EXPECTED: the effect each recommendation advises; `further-diagnostics` advises none, so it is not in the
  advice-followed denominator.
"""
from __future__ import annotations

import statistics
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric

from fhirbridge.store.outcomes import CLOSED, Outcome

CHANGING = ("less-invasive-procedure", "non-surgical-care", "watchful-waiting")
DIAGNOSIS_CHANGED = ("partially-concordant", "discordant")
EFFECT = {"performed": "as-planned", "completed": "as-planned", "performed-other": "other-procedure",
          "replaced": "other-procedure", "revoked": "avoided", "not-done": "avoided", "none-in-window": "avoided"}
EFFECTS = ("as-planned", "other-procedure", "avoided")
EXPECTED = {"proceed-as-planned": "as-planned", "less-invasive-procedure": "other-procedure",
            "non-surgical-care": "avoided", "watchful-waiting": "avoided"}
EFFECT_LABELS = {"as-planned": "Proceeded as planned", "other-procedure": "Another (less invasive) procedure",
                 "avoided": "Surgery avoided"}


@dataclass
class Group:
    """The figures of one set of filed opinions (all, one reviewer's, one specialty's)."""
    filed: int = 0                      # opinions filed (rows)
    with_recommendation: int = 0        # denominator of changed_plan
    changed_plan: int = 0               # recommendation in CHANGING
    with_concordance: int = 0           # denominator of changed_diagnosis
    changed_diagnosis: int = 0          # partially concordant or discordant
    open: int = 0                       # still followed (the window has not ended, no decision yet)
    excluded: int = 0                   # closed without an effect (no plan named, plan gone, entered in error)
    assessed: int = 0                   # closed with an effect: denominator of the chart figures
    effects: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EFFECTS, 0))
    advice_assessable: int = 0          # assessed, with a recommendation that advises an effect
    advice_followed: int = 0            # ...whose effect is the one advised
    decided: int = 0                    # assessed with a decision date (not "nothing within the window")
    _days: list[float] = field(default_factory=list, repr=False)   # from filing to each decision

    @property
    def median_days(self) -> float | None:
        """Median days from filing to the decision in the chart (None: no decision yet)."""
        return round(statistics.median(self._days), 1) if self._days else None

    @property
    def chart_changed(self) -> int:
        return self.effects["other-procedure"] + self.effects["avoided"]

    def add(self, row: Outcome) -> None:
        self.filed += 1
        if row.recommendation:
            self.with_recommendation += 1
            self.changed_plan += row.recommendation in CHANGING
        if row.concordance:
            self.with_concordance += 1
            self.changed_diagnosis += row.concordance in DIAGNOSIS_CHANGED
        if row.state != CLOSED:
            self.open += 1
            return
        effect = EFFECT.get(row.result or "")
        if effect is None:
            self.excluded += 1
            return
        self.assessed += 1
        self.effects[effect] += 1
        expected = EXPECTED.get(row.recommendation or "")
        if expected is not None:
            self.advice_assessable += 1
            self.advice_followed += expected == effect
        if row.decided_at is not None:
            self.decided += 1
            # A decision charted before the opinion was filed took no time after it.
            self._days.append(max(0.0, row.decided_at - row.filed_at) / 86400)

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        out["chart_changed"], out["median_days"] = self.chart_changed, self.median_days
        out["rates"] = {"changed_plan": rate(self.changed_plan, self.with_recommendation),
                        "changed_diagnosis": rate(self.changed_diagnosis, self.with_concordance),
                        "chart_changed": rate(self.chart_changed, self.assessed),
                        "advice_followed": rate(self.advice_followed, self.advice_assessable)}
        return out


def rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


@dataclass
class Figures:
    overall: Group
    by_reviewer: dict[str, Group]
    by_profile: dict[str, Group]
    first_filed: float | None = None
    last_filed: float | None = None

    def as_dict(self) -> dict:
        return {"overall": self.overall.as_dict(),
                "by_reviewer": {k: g.as_dict() for k, g in self.by_reviewer.items()},
                "by_profile": {k: g.as_dict() for k, g in self.by_profile.items()}}


def figures(rows: Iterable[Outcome], *, reviewer_names: dict[str, str] | None = None) -> Figures:
    """The figures of these rows; reviewers by their display name (`reviewer_names`: configured name -> display)."""
    names = reviewer_names or {}
    out = Figures(Group(), {}, {})
    for row in rows:
        out.overall.add(row)
        out.by_reviewer.setdefault(names.get(row.reviewer, row.reviewer), Group()).add(row)
        out.by_profile.setdefault(row.profile, Group()).add(row)
        out.first_filed = row.filed_at if out.first_filed is None else min(out.first_filed, row.filed_at)
        out.last_filed = row.filed_at if out.last_filed is None else max(out.last_filed, row.filed_at)
    out.by_reviewer = dict(sorted(out.by_reviewer.items()))
    out.by_profile = dict(sorted(out.by_profile.items()))
    return out


# --- Prometheus: computed from the store at scrape time, like ops/metrics.StoreCollector --------------------

class OutcomeCollector:
    """Gauges of the outcome figures. Counts per hospital, reviewer and profile (sum them as needed: every rate is
    one count over another); the median days per reviewer and per profile, "*" standing for all. Labels are
    configured names and codes of our CodeSystems, never a Case or a patient. Same on every replica: take max."""

    def __init__(self, store, hospital_names: dict[str, str]):
        self.store, self.names = store, hospital_names

    def collect(self) -> Iterator[Metric]:
        try:
            rows = self.store.outcomes.rows()
        except Exception:  # noqa: BLE001 - a scrape must answer; fhirbridge_store_up says the store did not
            return
        labels = ["hospital", "reviewer", "profile"]
        opinions = GaugeMetricFamily("fhirbridge_outcome_opinions", "Filed opinions by the recommendation they "
                                     "coded (\"none\": not coded)", labels=[*labels, "recommendation"])
        changed = GaugeMetricFamily("fhirbridge_outcome_opinions_changed_plan", "Filed opinions whose "
                                    "recommendation changes the planned treatment (of fhirbridge_outcome_opinions "
                                    "with a recommendation)", labels=labels)
        chart = GaugeMetricFamily("fhirbridge_outcome_chart", "What the chart shows became of the planned treatment: "
                                  "effect as-planned, other-procedure, avoided; open (still followed) or excluded "
                                  "(no effect: no plan named, plan gone)", labels=[*labels, "effect"])
        assessable = GaugeMetricFamily("fhirbridge_outcome_advice_assessable", "Closed outcomes with an effect and "
                                       "a recommendation that advises one: the advice-followed denominator",
                                       labels=labels)
        followed = GaugeMetricFamily("fhirbridge_outcome_advice_followed", "Of those, the ones whose effect in the "
                                     "chart is the one advised", labels=labels)
        median = GaugeMetricFamily("fhirbridge_outcome_decision_days_median", "Median days from the filed opinion "
                                   "to the decision in the chart (\"*\": all)", labels=labels)
        cells: dict[tuple[str, str, str], Group] = {}
        per_rec: dict[tuple[str, str, str, str], int] = {}
        medians: dict[tuple[str, str, str], Group] = {}
        for row in rows:
            hospital = self.names.get(row.hospital, row.hospital)
            key = (hospital, row.reviewer, row.profile)
            cells.setdefault(key, Group()).add(row)
            rec = (*key, row.recommendation or "none")
            per_rec[rec] = per_rec.get(rec, 0) + 1
            for m in ((hospital, "*", "*"), (hospital, row.reviewer, "*"), (hospital, "*", row.profile)):
                medians.setdefault(m, Group()).add(row)
        for rec_key, n in sorted(per_rec.items()):
            opinions.add_metric(list(rec_key), n)
        for key, g in sorted(cells.items()):
            changed.add_metric(list(key), g.changed_plan)
            for effect in EFFECTS:
                chart.add_metric([*key, effect], g.effects[effect])
            chart.add_metric([*key, "open"], g.open)
            chart.add_metric([*key, "excluded"], g.excluded)
            assessable.add_metric(list(key), g.advice_assessable)
            followed.add_metric(list(key), g.advice_followed)
        for key, g in sorted(medians.items()):
            if g.median_days is not None:
                median.add_metric(list(key), g.median_days)
        yield from (opinions, changed, chart, assessable, followed, median)
