"""A test set of outcomes with known answers (docs/outcomes.md has the definitions), written straight into a
store: ten filed opinions, five per reviewer, with what the chart showed. The figures a test expects of it are
KNOWN below, worked out by hand from the table."""
from __future__ import annotations

DAY = 86400.0
T0 = 1_790_000_000.0     # 2026-09-21: when the first opinion was filed

# (reviewer, profile, recommendation, concordance, result or None (still open), days from filing to decision)
ROWS = [
    ("a", "spine", "proceed-as-planned", "concordant", "performed", 10),
    ("a", "spine", "non-surgical-care", "discordant", "revoked", 20),
    ("a", "spine", "non-surgical-care", "concordant", "performed", 30),
    ("a", "spine", "less-invasive-procedure", "partially-concordant", "replaced", 40),
    ("a", "spine", "watchful-waiting", "concordant", "none-in-window", None),
    ("b", "cardiac", "proceed-as-planned", "concordant", "completed", 5),
    ("b", "cardiac", "further-diagnostics", "concordant", "revoked", 15),
    ("b", "cardiac", "proceed-as-planned", "concordant", None, None),
    ("b", "cardiac", "non-surgical-care", "discordant", "no-plan", None),
    ("b", "cardiac", "less-invasive-procedure", "concordant", "revoked", 50),
]

# Overall: 6 of 10 advised a change; 3 of 10 changed the diagnosis; 8 assessed in the chart (1 open, 1 no plan):
# 3 as planned, 1 other procedure, 4 avoided -> 5 of 8 changed; advice followed 5 of 7 (further-diagnostics
# advises nothing); median days to decision of 5, 10, 15, 20, 30, 40, 50 = 20.
KNOWN = {
    "overall": dict(filed=10, changed_plan=6, with_recommendation=10, changed_diagnosis=3, assessed=8, open=1,
                    excluded=1, effects={"as-planned": 3, "other-procedure": 1, "avoided": 4}, chart_changed=5,
                    advice_followed=5, advice_assessable=7, decided=7, median_days=20.0),
    "a": dict(filed=5, changed_plan=4, assessed=5, effects={"as-planned": 2, "other-procedure": 1, "avoided": 2},
              chart_changed=3, advice_followed=4, advice_assessable=5, decided=4, median_days=25.0),
    "b": dict(filed=5, changed_plan=2, assessed=3, open=1, excluded=1,
              effects={"as-planned": 1, "other-procedure": 0, "avoided": 2}, chart_changed=2, advice_followed=1,
              advice_assessable=2, decided=3, median_days=15.0),
}


def seed_known_outcomes(store, hospital: str, reviewers: dict[str, str]) -> list[str]:
    """Write ROWS for `hospital` (its key), reviewers "a"/"b" mapped to configured names; returns the Case ids."""
    ids = []
    for i, (rev, profile, rec, conc, result, days) in enumerate(ROWS):
        case_id = f"known-{hospital[:8]}-{i:02d}"
        filed = T0 + i * DAY
        store.outcomes.open(case_id=case_id, hospital=hospital, reviewer=reviewers[rev], profile=profile,
                            patient=f"Patient/p{i}", order_ref=f"ServiceRequest/o{i}", filed_at=filed,
                            window_ends=filed + 180 * DAY, recommendation=rec, concordance=conc)
        if result is None:
            store.outcomes.record(case_id, now=filed, next_check_at=filed + 3600, state="open",
                                  plan=f"ServiceRequest/plan{i}")
        else:
            store.outcomes.record(case_id, now=filed, next_check_at=None, state="closed", result=result,
                                  decided_at=None if days is None else filed + days * DAY)
        ids.append(case_id)
    return ids
