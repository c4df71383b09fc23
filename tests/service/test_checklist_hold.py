"""Issue 16 part 6: a profile that holds (`hold = true`, an `[[expect]]` entry `required = true`) keeps the Case
at await_records after collect while the required record is not in the package; staff (or the physician) read
the chart again once it is there, or confirm sending without it (each missing item named; who confirmed is
recorded, and the signed manifest says what was sent without)."""
from __future__ import annotations

import pytest

from fhirbridge.config import loader as config
from fhirbridge.demo.localehr import seed_patient
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from tests.loop.test_supplement import discharge_summary

pytestmark = pytest.mark.sekmet

STAFF = "staff-token-0123456789abcdef"
ITEM = "Discharge summary of an earlier stay"


@pytest.fixture
def holding(hospital):
    """The hospital's spine profile holds for the discharge summary."""
    path = hospital.app.config.mappings_dir / "collect" / "spine.toml"
    text = path.read_text().replace('lookback_days = 1095', 'lookback_days = 1095\nhold = true', 1)
    text = text.replace(f'name = "{ITEM}"\ncodes = ["http://loinc.org|18842-5"]',
                        f'name = "{ITEM}"\ncodes = ["http://loinc.org|18842-5"]\nrequired = true')
    path.write_text(text)
    hospital.config_path.write_text(hospital.config_path.read_text() + f'\n[api]\ntokens = ["{STAFF}"]\n')
    hospital.app.close()
    hospital.app = hospital.new_app()
    assert hospital.app.profile("spine").hold
    svc = Service(config.load(hospital.config_path))
    yield hospital, create_app(svc=svc).test_client()
    svc.stop(wait=True)


def staff() -> dict:
    return {"Authorization": f"Bearer {STAFF}"}


def test_a_holding_profile_waits_for_the_required_record_then_collects_it(holding, ehr, fhir):
    h, client = holding
    own = seed_patient(ehr, fhir, profile="spine")
    sr = h.order(own["patient"])
    h.run()
    case = h.case_for(sr)
    assert case.step == "await_records"
    assert ITEM in case.last_error and case.data["missing"] == [ITEM]
    assert fhir.read_ref(case.task)["status"] == "on-hold"
    h.run(intake=False, ignore_backoff=True)                    # nothing runs a held Case
    assert h.app.store.get(case.id).step == "await_records"

    fhir.create(discharge_summary(own["patient"]))
    resp = client.post(f"/api/cases/{case.id}/held", headers=staff(), json={"action": "collect-again"})
    assert resp.status_code == 200 and resp.get_json()["step"] == "collect"
    h.run(intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "await_opinion", case.last_error
    checklist = {e["item"]: e for e in h.open(case).manifest["checklist"]}
    assert checklist[ITEM]["status"] == "included" and checklist[ITEM]["required"] is True
    assert "sent_without" not in h.open(case).manifest


def test_the_physician_confirms_sending_without_it(holding, ehr, fhir):
    h, client = holding
    own = seed_patient(ehr, fhir, profile="spine")
    sr = h.order(own["patient"])
    h.run()
    case = h.case_for(sr)
    assert case.step == "await_records"
    for body, words in (({"action": "send-without"}, "confirm must name every missing item"),
                        ({"action": "send-without", "confirm": ["something else"]}, "every missing item"),
                        ({"action": "go"}, "action is")):
        resp = client.post(f"/api/cases/{case.id}/held", headers=staff(), json=body)
        assert resp.status_code == 400 and words in resp.get_json()["error"]["message"]
    resp = client.post(f"/api/cases/{case.id}/held", headers=staff(),
                       json={"action": "send-without", "confirm": [ITEM]})
    assert resp.status_code == 200 and resp.get_json()["step"] == "seal"
    h.run(intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "await_opinion", case.last_error
    m = h.open(case).manifest
    assert m["sent_without"] == [ITEM]
    assert {e["item"]: e for e in m["checklist"]}[ITEM]["status"] == "not_found"
    confirmed = [e for e in h.app.store.events(case.id) if e["kind"] == "checklist.confirmed"]
    assert len(confirmed) == 1 and confirmed[0]["detail"]["missing"] == [ITEM] and confirmed[0]["detail"]["by"]
    again = client.post(f"/api/cases/{case.id}/held", headers=staff(), json={"action": "collect-again"})
    assert again.status_code == 409
