"""The dashboard's Outcomes page (/dashboard/outcomes): what the second opinions advised and what the chart shows
became of the planned treatment, each figure with its denominator, overall, per reviewer and per specialty.

The figures are ops/outcome_figures.py's, from the outcomes table (codes only): the page decrypts no opinion, and
shows the same numbers as /metrics and GET /api/outcomes. ui/dashboard.py signs the staff in and mounts it.
"""
from __future__ import annotations

from fhirbridge.ops.outcome_figures import EFFECT_LABELS, EFFECTS, Figures, Group, figures
from fhirbridge.ui.charts import bar_chart

# Short labels: the chart's label column is narrow (the tables beside it give the full names).
CHART_LABELS = {"as-planned": "As planned", "other-procedure": "Another procedure", "avoided": "Surgery avoided"}
EFFECT_COLORS = {"As planned": "#1f5fa8", "Another procedure": "#9a6200", "Surgery avoided": "#1e7a46"}


def percent(numerator: int, denominator: int) -> str | None:
    """Rounded half up (5 of 8 is 63 %); None without a denominator: such a rate is not 0 %."""
    return f"{int(100 * numerator / denominator + 0.5)} %" if denominator else None


def share(numerator: int, denominator: int) -> str:
    """"n of d (p %)", or "n of 0" with no percentage."""
    p = percent(numerator, denominator)
    return f"{numerator} of {denominator} ({p})" if p else f"{numerator} of 0"


def headline(numerator: int, denominator: int) -> dict:
    return {"percent": percent(numerator, denominator) or "—", "of": f"{numerator} of {denominator}"}


def row(name: str, g: Group) -> dict:
    return {"name": name, "filed": g.filed, "changed_plan": share(g.changed_plan, g.with_recommendation),
            "changed_diagnosis": share(g.changed_diagnosis, g.with_concordance), "assessed": g.assessed,
            "open": g.open, "excluded": g.excluded,
            "effects": {e: share(g.effects[e], g.assessed) for e in EFFECTS},
            "chart_changed": share(g.chart_changed, g.assessed),
            "advice": share(g.advice_followed, g.advice_assessable),
            "median": g.median_days, "decided": g.decided}


def outcomes_context(svc, hospital_keys: list[str]) -> dict:
    """What templates/dashboard/outcomes.html shows for the hospitals (keys) this sign-in may see."""
    cfg = svc.config
    f: Figures = figures(svc.store.outcomes.rows(hospitals=tuple(hospital_keys)),
                         reviewer_names={r.name: r.display for r in cfg.reviewers.values()})
    g = f.overall
    effects = [(CHART_LABELS[e], g.effects[e]) for e in EFFECTS]
    return {"overall": row("All", g), "window_days": cfg.outcomes.window_days,
            "headline": {"changed_plan": headline(g.changed_plan, g.with_recommendation),
                         "chart_changed": headline(g.chart_changed, g.assessed),
                         "advice": headline(g.advice_followed, g.advice_assessable)},
            "effect_chart": bar_chart(effects, title="What the chart shows became of the planned treatment",
                                      colors=EFFECT_COLORS),
            "effect_labels": EFFECT_LABELS, "effects": EFFECTS,
            "by_reviewer": [row(name, grp) for name, grp in f.by_reviewer.items()],
            "by_profile": [row(name, grp) for name, grp in f.by_profile.items()]}
