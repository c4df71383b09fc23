"""The filed opinion's summary (loop/opinion_summary.py): written by the file step with its move, so the
dashboard counts conclusions in SQL; Cases filed before it existed are summarised a few at a time, never all
at once (at 100,000 Cases the dashboard's first view decrypted every opinion: about 15 s per worker)."""
from __future__ import annotations

import pytest

from fhirbridge.loop import opinion_summary
from fhirbridge.loop.receive import receive_file

pytestmark = pytest.mark.sekmet


def test_the_file_step_stores_the_coded_conclusion_and_the_turnaround(hospital, seeded):
    h = hospital
    case = h.delivered_case(seeded["patient"])
    receive_file(h.app, h.answer(case))
    h.run(intake=False)
    filed = h.app.store.get(case.id)
    assert filed.step == "done"
    assert (filed.concordance, filed.recommendation) == ("concordant", "proceed-as-planned")
    assert filed.filed_at is not None and filed.filed_at >= filed.created_at
    assert filed.turnaround_seconds is not None and 0 <= filed.turnaround_seconds < 3600
    assert h.app.store.conclusion_counts((filed.hospital,)) == {("concordant", "proceed-as-planned"): 1}
    # The outcome row's copy comes from the same reading of the opinion, at the same moment.
    outcome = h.app.store.outcomes.get(case.id)
    assert (outcome.concordance, outcome.recommendation) == (filed.concordance, filed.recommendation)
    assert outcome.filed_at == filed.filed_at


def test_opinions_filed_before_the_summary_are_backfilled_a_few_at_a_time(hospital, seeded, monkeypatch):
    h = hospital
    case = h.delivered_case(seeded["patient"])
    receive_file(h.app, h.answer(case))
    h.run(intake=False)
    key = h.app.store.get(case.id).hospital
    # As a store upgraded to 0006 holds them: filed, without the summary (and 30 with no opinion file here).
    h.app.store.set_summary(case.id, concordance=None, recommendation=None, filed_at=None, turnaround_seconds=None)
    h.app.store.load_cases([{"id": f"old-{i:02d}", "hospital": key, "service_request": f"ServiceRequest/old-{i}",
                             "patient": "Patient/old", "reviewer": "spine-center", "profile": "default",
                             "step": "done", "opinion_id": "gone", "updated_at": 10.0 + i} for i in range(30)])
    opened = []
    real = opinion_summary.open_opinion
    monkeypatch.setattr(opinion_summary, "open_opinion", lambda app, c: opened.append(c.id) or real(app, c))
    apps = {key: h.app}
    assert opinion_summary.backfill(apps, h.app.store, limit=20) == 20
    assert len(opened) == 20 and len(h.app.store.unsummarised(100)) == 11
    assert opinion_summary.backfill(apps, h.app.store, limit=20) == 11
    assert h.app.store.unsummarised(100) == []
    assert h.app.store.get(case.id).concordance == "concordant"          # read from its opinion file
    assert h.app.store.get("old-00").concordance is None                 # unreadable: filed, without codes
    assert h.app.store.get("old-00").filed_at == 10.0
