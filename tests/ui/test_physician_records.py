"""Issue 16 parts 2 and 6 in real headless Chromium, on the physician's app: the order preview says what a
reviewer of the specialty expects (included, withheld and why, not found); later the reviewer asks for more
records, the Case page shows the request with the chart's record its query finds ticked, the physician adds an
operative report (PDF), and the page shows it answered and sent. Screenshots: build/screenshots/records-*.png.
"""
from __future__ import annotations

import re

import pytest

from fhirbridge.demo.localehr import seed_patient
from fhirbridge.ehr import data_request
from fhirbridge.fhir.client import FhirClient
from tests.kit.browser import shot
from tests.loop.test_supplement import QUERY, discharge_summary, uploaded
from tests.ui.test_physician import live  # noqa: F401 - the fixture: fhirbridge served, SMART launch

pytestmark = pytest.mark.sekmet
pytest.importorskip("playwright")

PDF = b"%PDF-1.4\n% operative report 2019, outside hospital (synthetic)\n%%EOF\n"


def test_physician_sees_the_checklist_and_answers_the_reviewers_request(page, live, ehr, tmp_path):  # noqa: F811
    hospital, smart, server = live
    with FhirClient(ehr.base_url) as fhir:
        ids = seed_patient(ehr, fhir, family="Brandvold", given="Siri", profile="spine")
        doctor, _ = fhir.create({"resourceType": "Practitioner", "active": True,
                                 "name": [{"prefix": ["Dr"], "given": ["Imogen"], "family": "Okafor"}]})
        fhir.create(discharge_summary(ids["patient"], days_ago=365 * 6))     # too old for the spine profile
    patient_id = ids["patient"].removeprefix("Patient/")
    page.goto(smart.chart_url(f"{server.url}/physician/launch", ids["patient"], f"Practitioner/{doctor['id']}"))
    page.click("#launch")
    page.wait_for_url(f"{server.url}/physician/patients/{patient_id}")

    # Part 6: the preview's checklist, item by item.
    page.get_by_role("link", name="Order a second opinion").click()
    page.get_by_label("Specialty").select_option("spine")
    page.get_by_label("Reviewer", exact=True).select_option("spine-center")
    page.get_by_label("Question for the reviewer").fill("Is the planned L4-L5 decompression indicated now?")
    page.get_by_role("button", name="Continue: check the records to be shared").click()
    checklist = page.locator("ul.checklist")
    assert checklist.locator('li[data-item="Medication plan with dosages"]').inner_text().startswith(
        "Medication plan with dosages: included")
    assert checklist.locator('li[data-item="Discharge summary of an earlier stay"]').inner_text() == \
        "Discharge summary of an earlier stay: withheld (older than the 1095-day lookback window)"
    assert checklist.locator('li[data-item="Operative report of an earlier surgery"]').inner_text() == \
        "Operative report of an earlier surgery: not found in the EHR"
    assert "check-not_found" in checklist.locator('li[data-item="Pathology reports"]').get_attribute("class")
    checklist.scroll_into_view_if_needed()
    shot(page, "records-1-order-preview-checklist")
    page.get_by_role("button", name="Place order").click()
    page.wait_for_url(re.compile(rf".*/physician/patients/{patient_id}/cases/.+"))
    case_id = page.url.rsplit("/", 1)[1]
    hospital.run()

    # The reviewer asks for the discharge summary, as a search; a recent one reaches the chart meanwhile.
    case = hospital.app.store.get(case_id)
    task = data_request.request_records(hospital.app, case, "Please send the discharge summary of the last stay.",
                                        QUERY)
    with FhirClient(ehr.base_url) as fhir:
        stored, _ = fhir.create(discharge_summary(ids["patient"], days_ago=20))
    summary = f"DocumentReference/{stored['id']}"

    page.get_by_role("link", name="Second opinions", exact=True).click()
    row = page.locator("tbody tr").first
    assert "The reviewer asks for more records" in row.inner_text()
    shot(page, "records-2-landing-request-open")
    row.get_by_role("link").first.click()
    request = page.locator(f'article.request[data-task="{task}"]')
    assert "Please send the discharge summary of the last stay." in request.inner_text()
    assert QUERY in request.inner_text()
    assert request.locator(f'input[name="record"][value="{summary}"]').is_checked()     # the query's result
    old = request.locator('input[name="record"]:not(:checked)')
    assert old.count() == 0 or all(not v.startswith("DocumentReference/") or v != summary
                                   for v in old.evaluate_all("els => els.map(e => e.value)"))
    pdf = tmp_path / "operative-report-2019.pdf"
    pdf.write_bytes(PDF)
    request.get_by_label("File").set_input_files(str(pdf))
    request.get_by_label("Title").fill("Operative report 2019 (outside hospital)")
    request.get_by_label("What it is").select_option(label="Operative report of an earlier surgery")
    shot(page, "records-3-case-request-form")
    request.get_by_role("button", name="Send to the reviewer").click()
    assert "the records go to the reviewer now" in page.get_by_role("status").first.inner_text()
    assert "Sending the records the reviewer asked for" in page.locator(".badge").first.inner_text()
    shot(page, "records-4-case-answer-sent")

    hospital.run(intake=False)
    page.reload()
    request = page.locator(f'article.request[data-task="{task}"]')
    assert "answered" in request.inner_text() and "2 record(s) sent" in request.inner_text()
    assert "More records sent on request" in page.locator(".timeline").inner_text()
    assert "The reviewer asked for more records" in page.locator(".timeline").inner_text()
    shot(page, "records-5-case-answered")
    case = hospital.app.store.get(case_id)
    assert case.step == "await_opinion", case.last_error
    with FhirClient(ehr.base_url) as fhir:
        assert len(uploaded(fhir, case)) == 1
        assert fhir.read_ref(task)["status"] == "completed"


def test_a_held_case_is_sent_without_the_missing_record_once_the_physician_confirms(page, live, ehr):  # noqa: F811
    """Part 6's hold, on the physician's Case page: what is missing, confirmed item by item."""
    hospital, smart, server = live
    item = "Operative report of an earlier surgery"
    spine = hospital.app.config.mappings_dir / "collect" / "spine.toml"
    text = spine.read_text().replace('lookback_days = 1095', 'lookback_days = 1095\nhold = true', 1)
    spine.write_text(text.replace(f'name = "{item}"\ncodes = ["http://loinc.org|11504-8"]',
                                  f'name = "{item}"\ncodes = ["http://loinc.org|11504-8"]\nrequired = true'))
    with FhirClient(ehr.base_url) as fhir:
        ids = seed_patient(ehr, fhir, family="Halvorsen", given="Tove", profile="spine")
        doctor, _ = fhir.create({"resourceType": "Practitioner", "active": True,
                                 "name": [{"prefix": ["Dr"], "given": ["Imogen"], "family": "Okafor"}]})
    patient_id = ids["patient"].removeprefix("Patient/")
    sr = hospital.order(ids["patient"], requester=f"Practitioner/{doctor['id']}")
    hospital.run()
    case = hospital.case_for(sr)
    assert case.step == "await_records", case.last_error

    page.goto(smart.chart_url(f"{server.url}/physician/launch", ids["patient"], f"Practitioner/{doctor['id']}"))
    page.click("#launch")
    page.wait_for_url(f"{server.url}/physician/patients/{patient_id}")
    page.goto(f"{server.url}/physician/patients/{patient_id}/cases/{case.id}")
    held = page.locator("#held")
    assert item in held.inner_text()
    shot(page, "records-6-case-held")
    held.get_by_role("button", name="Send without them").click()          # not confirmed item by item: refused
    assert "Tick each missing record" in page.get_by_role("alert").first.inner_text()
    assert hospital.app.store.get(case.id).step == "await_records"
    page.locator("#held").get_by_label(item).check()
    page.locator("#held").get_by_role("button", name="Send without them").click()
    assert "the package goes without them" in page.get_by_role("status").first.inner_text()
    shot(page, "records-7-case-sent-without")
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "await_opinion", case.last_error
    assert hospital.open(case).manifest["sent_without"] == [item]
    [confirmed] = [e for e in hospital.app.store.events(case.id) if e["kind"] == "checklist.confirmed"]
    assert confirmed["detail"] == {"by": f"Practitioner/{doctor['id']}", "missing": [item]}
