"""In real headless Chromium: the referring physician opens a filed second opinion from the EHR (SMART EHR
launch), asks follow-up questions on the Case page, and reads the thread as the reviewer answers: question,
answer, times; the form goes once the reviewer's limit is reached. Screenshots: build/screenshots/
physician-followup-*.png.
"""
from __future__ import annotations

import pytest

from fhirbridge.config import loader as config
from fhirbridge.demo.localehr import seed_patient
from fhirbridge.exchange import followup as wire
from fhirbridge.fhir.client import FhirClient
from fhirbridge.loop.followup import run_followups
from fhirbridge.loop.receive import receive_bytes, receive_file
from fhirbridge.loop.writeback import OPINION_ID_SYSTEM
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from fhirbridge.store.followups import FollowUps
from tests.kit.browser import LiveServer, shot
from tests.kit.smart_launch_server import CLIENT_ID, SmartLaunchServer, configure_physician_app

pytestmark = pytest.mark.sekmet
pytest.importorskip("playwright")


@pytest.fixture
def live(hospital, ehr):
    holder = {}
    server = LiveServer(lambda environ, start: holder["app"](environ, start))
    smart = SmartLaunchServer(ehr.base_url, client_id=CLIENT_ID, host="localhost")
    configure_physician_app(hospital, smart, public_url=server.url)
    smart.register(f"{server.url}/physician/callback")
    svc = Service(config.load(hospital.config_path))
    hospital.app = svc.apps[0]
    holder["app"] = create_app(svc=svc)
    yield hospital, smart, server
    server.close()
    smart.close()
    svc.stop(wait=True)


def test_the_physician_asks_follow_up_questions_and_reads_the_thread(page, live, ehr, fhir):
    hospital, smart, server = live
    with FhirClient(ehr.base_url) as admin:
        ids = seed_patient(ehr, admin, family="Haugen", given="Sigrid", profile="spine")
        doctor, _ = admin.create({"resourceType": "Practitioner", "active": True,
                                  "name": [{"prefix": ["Dr"], "given": ["Tomas"], "family": "Berg"}]})
    doctor_ref = f"Practitioner/{doctor['id']}"
    patient_id = ids["patient"].removeprefix("Patient/")
    sr = hospital.order(ids["patient"], requester=doctor_ref)
    hospital.run()
    case = hospital.case_for(sr)
    receive_file(hospital.app, hospital.answer(case))
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "done", case.last_error

    page.goto(smart.chart_url(f"{server.url}/physician/launch", ids["patient"], doctor_ref))
    page.click("#launch")
    page.wait_for_url(f"{server.url}/physician/patients/{patient_id}")
    page.goto(f"{server.url}/physician/patients/{patient_id}/cases/{case.id}")
    assert page.get_by_role("heading", name="Follow-up questions").is_visible()
    box = page.get_by_label("Ask the reviewer a follow-up question (3 left)")
    box.fill("Would you still advise surgery if the leg pain settles with physiotherapy?")
    page.get_by_role("button", name="Send the question").click()
    assert "Your question was recorded" in page.get_by_role("status").inner_text()
    first = page.get_by_role("article", name="Follow-up question 1")
    assert "being sent" in first.inner_text() and "physiotherapy" in first.inner_text()
    shot(page, "physician-followup-1-asked")

    assert run_followups(hospital.app) == 1
    [row] = FollowUps(hospital.app.store).of_case(case.id)
    [comm] = [c for c in fhir.search("Communication", {"identifier": f"{OPINION_ID_SYSTEM}|urn:uuid:{row['id']}"})
              if c["resourceType"] == "Communication"]
    assert comm["sender"] == {"reference": doctor_ref}       # the signed-in physician asked
    page.reload()
    assert "awaiting the reviewer" in first.inner_text()

    r = hospital.reviewers[case.reviewer]
    question = wire.open_question(hospital.root / "outbox" / case.reviewer / f"followup-{row['id']}", r.key,
                                  r.trusted)
    receive_bytes(hospital.app, wire.seal_answer(
        question, "Yes, if the weakness persists.\n\nWithout weakness, six more weeks of physiotherapy first.",
        r.key)[0])
    assert run_followups(hospital.app) == 1
    page.reload()
    text = first.inner_text()
    assert "answered" in text and "six more weeks of physiotherapy" in text and "filed in the chart" in text
    assert "2 left" in page.get_by_label("Ask the reviewer a follow-up question (2 left)").evaluate(
        "e => e.labels[0].innerText")
    shot(page, "physician-followup-2-answered")

    # Two more: then the reviewer's limit (3) is reached and the form is gone.
    for text in ("Is an MRI needed before the decision?", "Should the anticoagulant be paused?"):
        page.get_by_role("textbox").fill(text)
        page.get_by_role("button", name="Send the question").click()
    assert page.get_by_role("article").count() >= 3
    assert page.get_by_role("button", name="Send the question").count() == 0
    assert "answers no more follow-up questions" in page.content()
    shot(page, "physician-followup-3-limit")
