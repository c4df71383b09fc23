"""In real headless Chromium: a CDS Hooks card's SMART link (issue 18) opens the physician's ordering app with the
order prefilled. The EHR (tests/kit/cds_client.py) calls order-sign over HTTP for a spinal fusion; the card's
link of type "smart" names the app's launch URL and an appContext, which the test EHR's SMART server
(tests/kit/smart_launch_server.py) hands to the app in the token response, as CDS Hooks 2.0 says. The form shows
the specialty, the reviewer and the question filled in; the order placed names the draft order as its reason,
and the card records it. Screenshot: build/screenshots/physician-cds-*.png.
"""
from __future__ import annotations

import re

import pytest
import requests

from fhirbridge.config import loader as config
from fhirbridge.demo.localehr import seed_patient
from fhirbridge.ehr.order import PLACER_SYSTEM
from fhirbridge.fhir.client import FhirClient
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from fhirbridge.ui.smart import app_context
from tests.kit.browser import LiveServer, shot
from tests.kit.cds_client import SPINE_FUSION, EhrCdsClient
from tests.kit.smart_launch_server import CLIENT_ID, SmartLaunchServer, configure_physician_app

pytestmark = pytest.mark.sekmet
pytest.importorskip("playwright")


@pytest.fixture
def live(hospital, ehr):
    holder = {}
    server = LiveServer(lambda environ, start: holder["app"](environ, start))
    smart = SmartLaunchServer(ehr.base_url, client_id=CLIENT_ID, host="localhost")
    cds = EhrCdsClient()
    configure_physician_app(hospital, smart, public_url=server.url)
    hospital.config_path.write_text(hospital.config_path.read_text() + cds.config_block(hospital.app.hospital.name))
    smart.register(f"{server.url}/physician/callback")
    svc = Service(config.load(hospital.config_path))
    hospital.app = svc.apps[0]
    holder["app"] = create_app(svc=svc)
    try:
        yield hospital, smart, server, cds
    finally:
        server.close()
        smart.close()
        cds.close()
        svc.stop(wait=True)


def test_the_cards_smart_link_opens_the_order_form_prefilled(page, live, ehr):
    hospital, smart, server, cds = live
    with FhirClient(ehr.base_url) as fhir:
        ids = seed_patient(ehr, fhir, family="Brennan", given="Tove", profile="spine")
        doctor, _ = fhir.create({"resourceType": "Practitioner", "active": True,
                                 "name": [{"prefix": ["Dr"], "given": ["Ines"], "family": "Haddad"}]})
        draft, _ = fhir.create(cds.draft(SPINE_FUSION, patient=ids["patient"].removeprefix("Patient/")))
        patient = fhir.read_ref(ids["patient"])
    pid = patient["id"]
    user = f"Practitioner/{doctor['id']}"

    # The EHR's order-sign call, over HTTP, with prefetch.
    url = f"{server.url}/cds-services/fhirbridge-order-sign"
    body = cds.order_sign(pid, user, [draft], prefetch={"patient": patient, "priorSecondOpinions": {
        "resourceType": "Bundle", "type": "searchset", "entry": []}})
    r = requests.post(url, json=body, headers={"Authorization": f"Bearer {cds.jwt(url)}"}, timeout=30)
    assert r.status_code == 200, r.text
    [card] = r.json()["cards"]
    [link] = card["links"]
    assert link["type"] == "smart" and link["url"] == f"{server.url}/physician/launch"

    # The clinician follows the link: the EHR launches the app with the card's appContext.
    page.goto(smart.chart_url(link["url"], ids["patient"], user, app_context=link["appContext"]))
    page.click("#launch")
    page.wait_for_url(f"{server.url}/physician/patients/{pid}")
    page.get_by_role("link", name="Order a second opinion").click()
    assert page.get_by_label("Specialty").input_value() == "spine"
    assert page.get_by_label("Reviewer", exact=True).input_value() == "spine-center"
    assert "less invasive alternative" in page.get_by_label("Question for the reviewer").input_value()
    note = page.get_by_role("status").filter(has_text="decision-support card")
    assert f"ServiceRequest/{draft['id']}" in note.inner_text()
    shot(page, "physician-cds-1-prefilled-order")

    page.get_by_role("button", name="Continue: check the records to be shared").click()
    page.get_by_role("button", name="Place order").click()
    page.wait_for_url(re.compile(rf".*/physician/patients/{pid}/cases/.+"))
    case_id = page.url.rsplit("/", 1)[1]
    case = hospital.app.store.get(case_id)
    order = hospital.app.ehr.read_ref(case.service_request)
    assert order["reasonReference"] == [{"reference": f"ServiceRequest/{draft['id']}"}]
    row = hospital.app.store.cds_card(card["uuid"])
    assert row["second_opinion_order"] == case.service_request and row["case_id"] == case_id
    assert [e["detail"]["card"] for e in hospital.app.store.events(case_id) if e["kind"] == "cds.ordered"] == \
        [card["uuid"]]
    shot(page, "physician-cds-2-case")

    # The EHR then reports the card as accepted with its suggestion: the card has its order, no second one.
    path = "/cds-services/fhirbridge-order-sign/feedback"
    sid = card["suggestions"][0]["uuid"]
    r = requests.post(f"{server.url}{path}", timeout=30,
                      headers={"Authorization": f"Bearer {cds.jwt(server.url + path)}"},
                      json={"feedback": [{"card": card["uuid"], "outcome": "accepted",
                                          "acceptedSuggestions": [{"id": sid}]}]})
    assert r.status_code == 200, r.text
    assert r.json()["feedback"][0]["service_request"] == case.service_request
    with FhirClient(ehr.base_url) as fhir:
        placed = list(fhir.search("ServiceRequest", {"identifier": f"{PLACER_SYSTEM}|{sid}"}))
    assert placed == []


def test_an_app_context_of_the_wrong_shape_is_dropped():
    assert app_context('{"profile": "spine", "draftOrder": "ServiceRequest/1", "extra": "x"}') == \
        {"profile": "spine", "draftOrder": "ServiceRequest/1"}
    assert app_context('{"profile": "<script>", "reviewer": 5}') == {}
    assert app_context("not json") == {} and app_context(None) == {} and app_context("[1]") == {}
