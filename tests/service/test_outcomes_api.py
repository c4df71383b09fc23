"""GET /api/outcomes: the outcome figures of the known test set (tests/kit/outcomes.py) as a valid FHIR R4
MeasureReport, for the hospital the token may see, naming that hospital as the reporter; and the service's
`outcomes` tick following a filed opinion's plan."""
from __future__ import annotations

import pytest

from fhirbridge import jsonutil
from fhirbridge.config import loader as config
from fhirbridge.fhir.validate import validate
from fhirbridge.loop.receive import receive_file
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from tests.kit.hospital import SAMPLE_ANSWER
from tests.kit.outcomes import seed_known_outcomes

pytestmark = pytest.mark.sekmet
ADMIN = "outcomes-admin-token-0123456789"


def test_the_measure_report_of_the_known_set_is_served_to_staff(two_reviewers):
    h = two_reviewers
    h.config_path.write_text(h.config_path.read_text() + f'\n[api]\ntokens = ["{ADMIN}"]\n')
    svc = Service(config.load(h.config_path))
    try:
        seed_known_outcomes(svc.store, svc.apps[0].hospital.key, {"a": "spine-center", "b": "other-center"})
        seed_known_outcomes(svc.store, "another-hospital", {"a": "spine-center", "b": "other-center"})
        client = create_app(svc=svc).test_client()
        assert client.get("/api/outcomes").status_code == 401
        r = client.get("/api/outcomes", headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200 and r.mimetype == "application/fhir+json"
        report = jsonutil.loads(r.data)
        assert validate(report) == []
        assert report["reporter"]["identifier"]["value"] == svc.apps[0].hospital.identifier_value
        group = next(g for g in report["group"] if g["code"]["coding"][0]["code"] == "advice-followed")
        # Only this hospital's ten rows (the other hospital's are not configured here, so not reported).
        counts = {p["code"]["coding"][0]["code"]: p["count"] for p in group["population"]}
        assert counts == {"initial-population": 10, "denominator": 7, "denominator-exclusion": 3, "numerator": 5}
        strata = {s["value"]["text"] for st in group["stratifier"] for s in st["stratum"]}
        assert strata == {"Spine Center", "Other Center", "spine", "cardiac"}
    finally:
        svc.stop(wait=True)


def test_the_services_outcomes_tick_records_a_revoked_plan(hospital, fhir, seeded):
    h = hospital
    planned, _ = fhir.create({"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                              "code": {"coding": [{"system": "http://snomed.info/sct", "code": "55705006"}]},
                              "subject": {"reference": seeded["patient"]}})
    sr = h.order(seeded["patient"])
    sr["reasonReference"] = [{"reference": f"ServiceRequest/{planned['id']}"}]
    fhir.update(sr, if_match=sr["meta"]["versionId"])
    h.run()
    case = h.case_for(sr)
    receive_file(h.app, h.answer(case, SAMPLE_ANSWER.replace('"proceed-as-planned"', '"non-surgical-care"')))
    h.run(intake=False)
    assert h.app.store.get(case.id).step == "done"
    planned["status"] = "revoked"
    fhir.update(planned, if_match=planned["meta"]["versionId"])
    svc = Service(config.load(h.config_path))
    try:
        svc.tick_outcomes()
        row = svc.store.outcomes.get(case.id)
        assert (row.state, row.result, row.recommendation) == ("closed", "revoked", "non-surgical-care")
    finally:
        svc.stop(wait=True)
