"""The physician's ordering app at the HTTP level (Flask's test client), launched by a SMART EHR launch from
the test EHR (tests/kit/smart_launch_server.py) in front of the session's sekmet: the launch and its refusals
(unknown issuer, bad state, another patient, missing CSRF, an identity token for someone else), form
validation, and an order whose deselected record is withheld from the reviewer's package.
"""
from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from fhirbridge.config import loader as config
from fhirbridge.ehr.order import excluded_records
from fhirbridge.errors import ConfigError
from fhirbridge.loop.collect import DESELECTED
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from tests.kit.smart_launch_server import CLIENT_ID, SmartLaunchServer, configure_physician_app

pytestmark = pytest.mark.sekmet


@pytest.fixture(scope="module")
def doctor(ehr):
    from fhirbridge.fhir.client import FhirClient
    with FhirClient(ehr.base_url) as fhir:
        p, _ = fhir.create({"resourceType": "Practitioner", "active": True,
                            "name": [{"prefix": ["Dr"], "given": ["Imogen"], "family": "Okafor"}]})
    return f"Practitioner/{p['id']}"


@pytest.fixture
def served(hospital, ehr):
    smart = SmartLaunchServer(ehr.base_url, client_id=CLIENT_ID)
    smart.register("http://localhost/physician/callback")
    configure_physician_app(hospital, smart)
    svc = Service(config.load(hospital.config_path))
    hospital.app = svc.apps[0]
    client = create_app(svc=svc).test_client()
    yield hospital, smart, client
    svc.stop(wait=True)
    smart.close()


def launch(client, smart, patient: str, user: str | None):
    """The EHR opens the app; the browser goes to the EHR's authorize endpoint and back."""
    launch_id = smart.new_launch(patient, user)
    r = client.get("/physician/launch", query_string={"iss": smart.fhir_base, "launch": launch_id})
    assert r.status_code == 302, r.data
    back = requests.get(r.headers["Location"], allow_redirects=False, timeout=10)
    assert back.status_code == 302, back.text
    return client.get(back.headers["Location"])


def csrf(client, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.data
    return re.search(rb'name="csrf_token" value="([^"]+)"', page.data).group(1).decode()


def pid(patient_ref: str) -> str:
    return patient_ref.removeprefix("Patient/")


# --- the launch ------------------------------------------------------------------------------------------

def test_ehr_launch_opens_the_patient_in_context(served, seeded, doctor):
    _h, smart, client = served
    r = launch(client, smart, seeded["patient"], doctor)
    assert r.status_code == 200 and b"Opening the patient" in r.data
    target = f"/physician/patients/{pid(seeded['patient'])}"
    assert target.encode() in r.data
    page = client.get(target)
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert "Anna Zeltwanger-Testpatient" in text and "Dr Imogen Okafor" in text
    assert text.count("<h1") == 1 and "Order a second opinion" in text
    assert smart.refusals == []


def test_the_authorize_request_carries_pkce_state_aud_and_launch(served, seeded):
    _h, smart, client = served
    launch_id = smart.new_launch(seeded["patient"], None)
    r = client.get("/physician/launch", query_string={"iss": smart.fhir_base, "launch": launch_id})
    url = urlsplit(r.headers["Location"])
    q = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert f"{url.scheme}://{url.netloc}{url.path}" == f"{smart.url}/authorize"
    assert q["response_type"] == "code" and q["client_id"] == CLIENT_ID and q["launch"] == launch_id
    assert q["aud"] == smart.fhir_base and q["redirect_uri"] == "http://localhost/physician/callback"
    assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43 and q["state"]
    assert {"launch", "openid", "fhirUser"} <= set(q["scope"].split())
    # The pending launch is in its own cookie, scoped to the callback and sent on cross-site redirects (Lax).
    cookie = next(h for h in r.headers.getlist("Set-Cookie") if h.startswith("fhirbridge_launch="))
    assert "Path=/physician/callback" in cookie and "SameSite=Lax" in cookie and "HttpOnly" in cookie


def test_launch_from_an_unknown_issuer_is_refused_without_contacting_it(served, seeded):
    _h, smart, client = served
    for iss in ("http://127.0.0.1:9/fhir", smart.fhir_base + "x", "https://evil.example/fhir"):
        r = client.get("/physician/launch", query_string={"iss": iss, "launch": "abc"})
        assert r.status_code == 403 and "Location" not in r.headers
        assert "not allowed to open the app" in r.get_data(as_text=True)
    r = client.get("/physician/launch")
    assert r.status_code == 400 and "open this app from a patient" in r.get_data(as_text=True)


def test_a_callback_with_a_bad_state_or_none_pending_is_refused(served, seeded):
    _h, smart, client = served
    launch_id = smart.new_launch(seeded["patient"], None)
    r = client.get("/physician/launch", query_string={"iss": smart.fhir_base, "launch": launch_id})
    back = requests.get(r.headers["Location"], allow_redirects=False, timeout=10).headers["Location"]
    tampered = re.sub(r"state=[^&]+", "state=forged", back)
    r = client.get(tampered)
    assert r.status_code == 403 and "did not start here" in r.get_data(as_text=True)
    # The real state, in a browser that did not start the launch (no pending cookie): refused too.
    other = client.application.test_client()
    assert other.get(back).status_code == 403
    # Nothing was opened: the app refuses the patient's pages.
    assert client.get(f"/physician/patients/{pid(seeded['patient'])}").status_code == 403


def test_an_identity_token_for_another_client_is_refused(served, seeded, doctor):
    _h, smart, client = served
    smart.id_token_override = {"aud": "some-other-app"}
    r = launch(client, smart, seeded["patient"], doctor)
    assert r.status_code == 403 and "identity token could not be verified" in r.get_data(as_text=True)
    smart.id_token_override = None
    assert launch(client, smart, seeded["patient"], doctor).status_code == 200


def test_a_patient_user_cannot_place_orders(served, seeded):
    _h, smart, client = served
    r = launch(client, smart, seeded["patient"], seeded["patient"])
    assert r.status_code == 403 and "for clinicians" in r.get_data(as_text=True)


# --- who may see and order what ----------------------------------------------------------------------

def test_another_patients_pages_are_refused(served, seeded, doctor, fhir):
    h, smart, client = served
    launch(client, smart, seeded["patient"], doctor)
    other, _ = fhir.create({"resourceType": "Patient", "name": [{"family": "Elsewhere", "given": ["Otto"]}]})
    for path in (f"/physician/patients/{other['id']}", f"/physician/patients/{other['id']}/order"):
        r = client.get(path)
        assert r.status_code == 403 and "not opened for this patient" in r.get_data(as_text=True)
        assert "Elsewhere" not in r.get_data(as_text=True)
    token = csrf(client, f"/physician/patients/{pid(seeded['patient'])}/order")
    before = len(list(fhir.search("ServiceRequest", {"subject": f"Patient/{other['id']}"})))
    r = client.post(f"/physician/patients/{other['id']}/order", data={
        "csrf_token": token, "profile": "spine", "reviewer": "spine-center", "question": "?", "action": "order"})
    assert r.status_code == 403
    assert len(list(fhir.search("ServiceRequest", {"subject": f"Patient/{other['id']}"}))) == before
    # Another patient's Case is not found through this patient's context.
    case = h.delivered_case(f"Patient/{other['id']}")
    r = client.get(f"/physician/patients/{pid(seeded['patient'])}/cases/{case.id}")
    assert r.status_code == 404


def test_a_form_without_the_csrf_token_is_refused(served, seeded, doctor, fhir):
    _h, smart, client = served
    launch(client, smart, seeded["patient"], doctor)
    path = f"/physician/patients/{pid(seeded['patient'])}/order"
    before = len(list(fhir.search("ServiceRequest", {"subject": seeded["patient"]})))
    for token in (None, "forged-token"):
        data = {"profile": "spine", "reviewer": "spine-center", "question": "Fusion?", "action": "order"}
        if token:
            data["csrf_token"] = token
        r = client.post(path, data=data)
        assert r.status_code == 400 and "did not come from this page" in r.get_data(as_text=True)
    assert len(list(fhir.search("ServiceRequest", {"subject": seeded["patient"]}))) == before


def test_validation_errors_keep_what_was_typed(served, seeded, doctor):
    _h, smart, client = served
    launch(client, smart, seeded["patient"], doctor)
    path = f"/physician/patients/{pid(seeded['patient'])}/order"
    r = client.post(path, data={"csrf_token": csrf(client, path), "profile": "spine", "reviewer": "",
                                "question": "Is the L4-L5 fusion <needed>?", "priority": "urgent",
                                "action": "preview"})
    text = r.get_data(as_text=True)
    assert r.status_code == 400 and "The order is not complete" in text
    assert '<option value="spine" selected>' in text and '<option value="urgent" selected>' in text
    assert "Is the L4-L5 fusion &lt;needed&gt;?</textarea>" in text
    # The error is tied to its field, which gets the focus; the valid fields are not marked.
    assert re.search(r'<select id="reviewer" name="reviewer" aria-invalid="true" '
                     r'aria-describedby="reviewer-hint reviewer-error" autofocus>', text)
    assert 'id="reviewer-error"' in text and text.count('aria-invalid="true"') == 1
    r = client.post(path, data={"csrf_token": csrf(client, path), "profile": "nonsense", "reviewer": "nobody",
                                "question": " ", "action": "order"})
    text = r.get_data(as_text=True)
    assert r.status_code == 400 and text.count('aria-invalid="true"') == 3


def test_a_launch_that_does_not_name_the_user_places_no_order(served, seeded, fhir):
    """Issue 13, C4: the order's requester is required (BSeR) and only the launch's fhirUser says who orders;
    without it the app used to write an order naming nobody."""
    _h, smart, client = served
    assert launch(client, smart, seeded["patient"], None).status_code == 200      # the pages still open
    path = f"/physician/patients/{pid(seeded['patient'])}/order"
    form = {"csrf_token": csrf(client, path), "profile": "spine", "reviewer": "spine-center",
            "question": "Is surgery indicated now?", "priority": "routine"}
    shown = re.findall(r'name="shown" value="([^"]+)"',
                       client.post(path, data={**form, "action": "preview"}).get_data(as_text=True))
    before = len(list(fhir.search("ServiceRequest", {"subject": seeded["patient"]})))
    r = client.post(path, data={**form, "preview_for": "spine|spine-center", "shown": shown, "share": shown,
                                "action": "order"})
    text = r.get_data(as_text=True)
    assert r.status_code == 403 and "The order was not placed" in text and "fhirUser" in text
    assert len(list(fhir.search("ServiceRequest", {"subject": seeded["patient"]}))) == before


# --- an order with a record held back ---------------------------------------------------------------------

def test_an_order_withholds_the_deselected_record_from_the_package(served, seeded, doctor, fhir):
    h, smart, client = served
    launch(client, smart, seeded["patient"], doctor)
    path = f"/physician/patients/{pid(seeded['patient'])}/order"
    form = {"csrf_token": csrf(client, path), "profile": "spine", "reviewer": "spine-center",
            "question": "Is surgery indicated now?\nWould physiotherapy do?", "priority": "routine"}
    r = client.post(path, data={**form, "action": "preview"})
    text = r.get_data(as_text=True)
    assert r.status_code == 200 and "Records to be shared with Spine Center" in text
    shown = re.findall(r'name="shown" value="([^"]+)"', text)
    procedure = seeded["procedures"][0]
    assert procedure in shown and seeded["old_procedure"] not in shown
    assert "older than the 1095-day lookback window" in text or seeded["old_procedure"] not in text
    share = [ref for ref in shown if ref != procedure]
    r = client.post(path, data={**form, "preview_for": "spine|spine-center", "shown": shown, "share": share,
                                "action": "order"})
    assert r.status_code == 303, r.get_data(as_text=True)
    case_id = r.headers["Location"].rsplit("/", 1)[1]
    case = h.app.store.get(case_id)
    sr = fhir.read_ref(case.service_request)
    assert sr["status"] == "active" and excluded_records(sr) == {procedure}
    assert sr["requester"] == {"reference": doctor} and sr["subject"] == {"reference": seeded["patient"]}
    assert sr["note"][0]["text"].startswith("Is surgery indicated now?")
    page = client.get(r.headers["Location"]).get_data(as_text=True)
    assert "Physical therapy procedure" in page and "Ordered" in page      # held back, listed by name

    h.run()
    opened = h.open(h.app.store.get(case_id))
    manifest = opened.claims["manifest"]
    assert {"reference": procedure, "reason": DESELECTED} in manifest["withheld"]
    entries = {f"{e['resource']['resourceType']}/{e['resource'].get('id')}" for e in opened.document["entry"]}
    assert procedure not in manifest["shared"] and procedure not in entries
    # The order as sent does not carry the list of held-back records (it could name a sensitive one).
    order = next(e["resource"] for e in opened.document["entry"] if e["resource"]["resourceType"] == "ServiceRequest")
    assert excluded_records(order) == set()


# --- configuration -----------------------------------------------------------------------------------------

def test_physician_app_config_errors_name_the_key(hospital):
    base = hospital.config_path.read_text()
    for extra, key in (('\n[physician_app]\nclient_id = "x"\nclient_secret = "y"\n', "physician_app.client_secret"),
                       ('\n[physician_app]\nclient_id = ""\n', "physician_app.client_id"),
                       ('\n[physician_app]\nclient_id = "x"\n[[physician_app.issuers]]\nurl = "http://ehr.example/fhir"\n',
                        "physician_app.issuers[0].url"),
                       ('\n[physician_app]\nclient_id = "x"\n[[physician_app.issuers]]\nurl = "https://ehr.example/fhir"\n'
                        'hospital = "Nowhere"\n', "physician_app.issuers[0].hospital")):
        hospital.config_path.write_text(base + extra)
        with pytest.raises(ConfigError) as err:
            config.load(hospital.config_path)
        assert err.value.key == key and str(hospital.config_path) in str(err.value)
