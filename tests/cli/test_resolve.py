"""`fhirbridge status` and `fhirbridge resolve` for a Case that needs review (write plan ONCE, issue 14): the
question is shown, a wrong answer is refused, the right one lets the Case finish with one note in the chart."""
from __future__ import annotations

import pytest

from fhirbridge.loop.receive import receive_file
from fhirbridge.loop.writeback import OPINION_ID_SYSTEM
from tests.kit.cli import run
from tests.kit.ehrproxy import PROFILES, EhrProxy
from tests.kit.hospital import TestHospital

pytestmark = pytest.mark.sekmet


def test_status_shows_the_question_and_resolve_answers_it(tmp_path, ehr, fhir, seeded, capsys):
    profile = PROFILES["post-only-no-search"]
    proxy = EhrProxy(ehr.base_url, profile.behaviour)
    h = TestHospital(tmp_path, proxy.base_url, ehr_pins=profile.pins,
                     env={"FHIRBRIDGE_HOSPITAL__HTTP__RETRIES": "0"})
    try:
        case = h.delivered_case(seeded["patient"])
        receive_file(h.app, h.answer(case))
        proxy.add(method="POST", path=r"^/fhir/DocumentReference/?$", action="lose-response", times=1)
        h.run(intake=False)
        case = h.app.store.get(case.id)
        assert case.step == "needs_review"
        cfg = ["--config", h.config_path]

        code, out, _ = run(capsys, *cfg, "status")
        assert code == 0 and "needs_review" in out and "NEEDS REVIEW" in out
        code, out, _ = run(capsys, *cfg, "status", case.id[:8])
        assert code == 0 and "question:" in out and f"resolve {case.id} --filed DocumentReference/<id>" in out

        code, _, err = run(capsys, *cfg, "resolve", case.id[:8], "--filed", "Provenance/x")
        assert code != 0 and "DocumentReference" in err
        other, _ = fhir.create({"resourceType": "DocumentReference", "status": "current",
                                "subject": {"reference": seeded["patient"]},
                                "content": [{"attachment": {"contentType": "text/plain", "data": "eA=="}}]})
        code, _, err = run(capsys, *cfg, "resolve", case.id[:8], "--filed", f"DocumentReference/{other['id']}")
        assert code != 0 and "not this Case's" in err
        assert h.app.store.get(case.id).step == "needs_review"

        [note] = [d for d in fhir.search("DocumentReference",
                                         {"identifier": f"{OPINION_ID_SYSTEM}|urn:uuid:{case.opinion_id}"})
                  if d["resourceType"] == "DocumentReference"]
        code, out, err = run(capsys, *cfg, "resolve", case.id[:8], "--filed", f"DocumentReference/{note['id']}")
        assert code == 0, err
        assert "back at file" in out
        h.run(intake=False)
        case = h.app.store.get(case.id)
        assert case.step == "done" and case.document_reference == f"DocumentReference/{note['id']}"
        assert proxy.written("DocumentReference", "POST") == 1
    finally:
        h.close()
        proxy.close()
