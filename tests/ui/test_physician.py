"""End to end in real headless Chromium: a physician launches the ordering app from the EHR (SMART EHR
launch, tests/kit/smart_launch_server.py), meets a validation error, previews the records, deselects one,
orders, watches the Case progress, and later reads the filed opinion; the reviewer's package lists the
deselected record as withheld. A screenshot of every page goes to build/screenshots/physician-*.png.

The test EHR runs on "localhost" and fhirbridge on 127.0.0.1: two sites to the browser, so the redirect
back from the EHR's authorization endpoint is cross-site, as in a hospital.
"""
from __future__ import annotations

import re

import pytest

from fhirbridge.config import loader as config
from fhirbridge.demo.localehr import seed_patient
from fhirbridge.fhir.client import FhirClient
from fhirbridge.loop.collect import DESELECTED
from fhirbridge.loop.receive import receive_file
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from tests.kit.browser import LiveServer, shot
from tests.kit.smart_launch_server import CLIENT_ID, SmartLaunchServer, configure_physician_app

pytestmark = pytest.mark.sekmet
pytest.importorskip("playwright")


@pytest.fixture
def live(hospital, ehr):
    """fhirbridge served on a real port; its public_url (the SMART redirect_uri base) is that port."""
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


def test_physician_launches_orders_with_a_record_held_back_and_reads_the_opinion(page, live, ehr):
    hospital, smart, server = live
    with FhirClient(ehr.base_url) as fhir:
        ids = seed_patient(ehr, fhir, family="Lindqvist", given="Maren", profile="spine")
        doctor, _ = fhir.create({"resourceType": "Practitioner", "active": True,
                                 "name": [{"prefix": ["Dr"], "given": ["Imogen"], "family": "Okafor"}]})
    patient_id = ids["patient"].removeprefix("Patient/")
    held_back = ids["procedures"][0]

    # The EHR's chart: the physician opens the second-opinion app for this patient.
    page.goto(smart.chart_url(f"{server.url}/physician/launch", ids["patient"], f"Practitioner/{doctor['id']}"))
    page.click("#launch")
    page.wait_for_url(f"{server.url}/physician/patients/{patient_id}")
    assert page.locator("h1").inner_text() == "Second opinions for Maren Lindqvist"
    assert page.locator(".patient-banner").inner_text().startswith("Maren Lindqvist")
    assert "Dr Imogen Okafor" in page.locator(".who").inner_text()
    assert "No second opinion has been ordered" in page.content()
    shot(page, "physician-1-landing")

    # The order form: sent with no reviewer and no question, it says what is missing and keeps the rest.
    page.get_by_role("link", name="Order a second opinion").click()
    assert page.locator("h1").inner_text() == "Order a second opinion"
    page.get_by_label("Specialty").select_option("spine")
    page.get_by_label("Urgency").select_option("urgent")
    page.get_by_role("button", name="Continue: check the records to be shared").click()
    summary = page.get_by_role("alert")
    assert "Choose the reviewer" in summary.inner_text() and "Write the question" in summary.inner_text()
    assert page.get_by_label("Specialty").input_value() == "spine"
    assert page.get_by_label("Urgency").input_value() == "urgent"
    assert page.evaluate("document.activeElement.id") == "reviewer"      # focus on the first error
    assert page.get_by_label("Reviewer", exact=True).get_attribute("aria-invalid") == "true"
    shot(page, "physician-2-order-errors")

    # Filled in: the preview lists every record the rules would share, each with a checkbox.
    page.get_by_label("Reviewer", exact=True).select_option("spine-center")
    page.get_by_label("Question for the reviewer").fill(
        "Is the planned L4-L5 decompression indicated now?\nWould more physiotherapy be a reasonable alternative?")
    page.get_by_role("button", name="Continue: check the records to be shared").click()
    assert page.get_by_role("heading", name="Records to be shared with Spine Center").is_visible()
    assert page.get_by_role("alert").count() == 0
    box = page.locator(f'input[name="share"][value="{held_back}"]')
    assert box.is_checked()
    assert page.locator('input[name="share"]').count() >= 8
    assert "older than the 1095-day lookback window" in page.content()     # what the rules keep back, and why
    box.uncheck()
    shot(page, "physician-3-order-preview")

    page.get_by_role("button", name="Place order").click()
    page.wait_for_url(re.compile(rf".*/physician/patients/{patient_id}/cases/.+"))
    case_id = page.url.rsplit("/", 1)[1]
    assert page.locator("h1").inner_text() == "Second opinion from Spine Center"
    assert "Physical therapy procedure" in page.locator("dl.facts").inner_text()     # held back, by name
    assert page.locator(".timeline li.done").first.inner_text().startswith("Ordered")
    assert "in progress" in page.locator(".timeline li.current").inner_text()
    shot(page, "physician-4-case-ordered")

    # fhirbridge works the Case: collected, sealed, sent to the reviewer.
    hospital.run()
    page.reload()
    sent = page.locator(".timeline li", has_text="Sent to Spine Center")
    assert "done" in sent.get_attribute("class") and "answer due by" in sent.inner_text()
    assert "Waiting for the reviewer" in page.locator(".timeline li.current").inner_text()
    shot(page, "physician-5-case-sent")

    # The reviewer opens the package: the deselected record is listed as withheld, and is not in it.
    case = hospital.app.store.get(case_id)
    opened = hospital.open(case)
    assert {"reference": held_back, "reason": DESELECTED} in opened.claims["manifest"]["withheld"]
    assert held_back not in opened.claims["manifest"]["shared"]
    # ... answers; the opinion is received and filed in the chart.
    receive_file(hospital.app, hospital.answer(case))
    hospital.run()
    page.reload()
    assert page.locator(".timeline li.done").count() == 5
    opinion = page.locator("article.opinion")
    text = opinion.inner_text()
    assert "Concordant: diagnosis confirmed" in text and "Proceed with the planned treatment" in text
    assert "Agree with the plan." in text and "Epidural steroid injection" in text
    assert opinion.get_by_role("heading", name="Answers to the referring physician").is_visible()
    shot(page, "physician-6-case-opinion")

    page.get_by_role("link", name="Second opinions", exact=True).click()
    row = page.locator("tbody tr").first
    assert "Opinion filed" in row.inner_text() and "L4-L5 decompression" in row.inner_text()
    shot(page, "physician-7-landing-history")
