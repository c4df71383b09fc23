"""fhirbridge's own code systems, served at /fhir/CodeSystem (issue 13, C6): a receiver resolves every code
fhirbridge writes. The last test runs the whole loop and walks every coding fhirbridge wrote into the EHR."""
from __future__ import annotations

import base64

import pytest
import requests

from fhirbridge import jsonutil
from fhirbridge.config import loader as config
from fhirbridge.ehr.data_request import request_records
from fhirbridge.loop.receive import receive_file
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service

pytestmark = pytest.mark.sekmet

BASE = "http://fhirbridge.org/fhir/CodeSystem/"
# Code systems a receiver knows without asking us: HL7 (core, terminology.hl7.org, IGs under hl7.org/fhir/...),
# IHE (the XDS format codes, BALP), LOINC, SNOMED CT, MIME types, languages, UCUM, DICOM (BALP), ASTM E1762
# signature types (the R4 signature-type system).
STANDARD = ("http://terminology.hl7.org/", "http://hl7.org/fhir/", "http://ihe.net/fhir/", "https://profiles.ihe.net/",
            "http://loinc.org", "http://snomed.info/sct",
            "urn:ietf:bcp:13", "urn:ietf:bcp:47", "http://unitsofmeasure.org",
            "http://dicom.nema.org/resources/ontology/DCM", "urn:iso-astm:E1762-95:2013")


@pytest.fixture
def served(hospital):
    svc = Service(config.load(hospital.config_path))
    yield hospital, create_app(svc=svc).test_client()
    svc.stop(wait=True)


def test_a_code_system_is_read_by_id_and_found_by_its_canonical_url(served):
    _h, client = served
    r = client.get("/fhir/CodeSystem/referral-step")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/fhir+json")
    cs = r.get_json()
    assert cs["resourceType"] == "CodeSystem" and cs["url"] == BASE + "referral-step"
    assert cs["status"] == "active" and cs["content"] == "complete" and cs["version"]
    assert {"collecting", "sent-to-reviewer", "overdue"} <= {c["code"] for c in cs["concept"]}
    for query in ({"url": BASE + "concordance"}, {"url": f"{BASE}concordance|1.0.0"},
                  {"url": BASE + "concordance", "version": "1.0.0"}):
        bundle = client.get("/fhir/CodeSystem", query_string=query).get_json()
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset" and bundle["total"] == 1, query
        assert bundle["entry"][0]["resource"]["id"] == "concordance"
    assert client.get("/fhir/CodeSystem", query_string={"url": BASE + "concordance|9"}).get_json()["total"] == 0
    assert client.get("/fhir/CodeSystem", query_string={"url": "urn:nothing"}).get_json()["total"] == 0
    everything = client.get("/fhir/CodeSystem").get_json()
    assert {e["resource"]["id"] for e in everything["entry"]} == {
        "opinion-observation", "concordance", "recommendation", "referral-step", "collection-profile",
        "opinion-answer", "radpeer", "outcome-measure"}


def test_the_collection_profiles_are_a_code_system_of_this_hospitals_mappings(served):
    h, client = served
    (h.app.config.mappings_dir / "collect" / "neuro.toml").write_text(
        'description = "Neurology: imaging and notes"\n[resources.ImagingStudy]\n')
    client.application.extensions.pop("fhirbridge.terminology", None)   # as after a restart
    cs = client.get("/fhir/CodeSystem/collection-profile").get_json()
    assert cs["url"] == BASE + "collection-profile"
    assert {"default", "spine", "neuro"} <= {c["code"] for c in cs["concept"]}
    assert next(c for c in cs["concept"] if c["code"] == "neuro")["display"] == "Neurology"


def test_errors_are_operation_outcomes(served):
    _h, client = served
    r = client.get("/fhir/CodeSystem/nothing-here")
    assert r.status_code == 404 and r.headers["Content-Type"].startswith("application/fhir+json")
    assert r.get_json()["resourceType"] == "OperationOutcome"
    r = client.get("/fhir/CodeSystem", query_string={"name": "x"})
    assert r.status_code == 400 and r.get_json()["issue"][0]["code"] == "not-supported"


def codings(node, out: list) -> list:
    if isinstance(node, dict):
        if isinstance(node.get("system"), str) and isinstance(node.get("code"), str):
            out.append((node["system"], node["code"]))
        for value in node.values():
            codings(value, out)
    elif isinstance(node, list):
        for value in node:
            codings(value, out)
    return out


def test_every_code_fhirbridge_writes_is_standard_or_served_here(tmp_path, ehr, seeded, fhir):
    """Order (with a deselected record), collect, seal, deliver with the audit copy in the EHR, a data request,
    receive and file; then every coding of every version of what fhirbridge wrote to the EHR (the order, the
    referral Task's every version, the data-request Task, the DocumentReference, the opinion document in the
    Binary, the Provenance, the AuditEvents) is either from a standard code system or from one that
    /fhir/CodeSystem serves with that very code in it. The one exception is the hospital's own order code,
    which its mappings name (a hospital-local code, the hospital's to publish)."""
    from tests.kit.hospital import TestHospital
    h = TestHospital(tmp_path, ehr.base_url, env={"FHIRBRIDGE_AUDIT__WRITE_TO_EHR": "true"})
    svc = Service(config.load(h.config_path))
    try:
        client = create_app(svc=svc).test_client()
        sr = h.order(seeded["patient"], exclude=(seeded["medication_requests"][0],))
        h.run()
        case = h.case_for(sr)
        assert case.step == "await_opinion", case.last_error
        data_request = request_records(h.app, case, "The MRI report of last March, please")
        receive_file(h.app, h.answer(case))
        h.run(intake=False)
        case = h.app.store.get(case.id)
        assert case.step == "done", case.last_error

        written = [fhir.read_ref(case.service_request), fhir.read_ref(data_request)]
        history = requests.get(f"{ehr.base_url}/{case.task}/_history", params={"_count": 100}, timeout=10,
                               headers={"Accept": "application/fhir+json"}).json()
        versions = [e["resource"] for e in history.get("entry", []) if e.get("resource")]
        assert len(versions) >= 6, len(versions)      # every step the Task showed, 2.0 to 7.0
        written += versions
        docref = fhir.read_ref(case.document_reference)
        written.append(docref)
        binary = fhir.read_ref(docref["content"][0]["attachment"]["url"])
        document = jsonutil.loads(base64.b64decode(binary["data"]))
        written += [e["resource"] for e in document["entry"]]
        written += [p for p in fhir.search("Provenance", {"target": case.document_reference})
                    if p["resourceType"] == "Provenance"]
        audits = h.app.store.list_audit(case_id=case.id)
        assert audits and all(a["sent_to_ehr"] for a in audits), audits
        written += [fhir.read_ref(f"AuditEvent/{a['id']}") for a in audits]

        hospital_local = h.app.order_codes.order_code["system"]
        found = sorted({c for r in written for c in codings(r, [])})
        ours = []
        for system, code in found:
            if system == hospital_local or system.startswith(STANDARD):
                continue
            r = client.get("/fhir/CodeSystem", query_string={"url": system})
            bundle = r.get_json() if r.status_code == 200 else {}
            assert bundle.get("total") == 1, f"{system}|{code} is neither standard nor served at /fhir/CodeSystem"
            concepts = {c["code"] for c in bundle["entry"][0]["resource"]["concept"]}
            assert code in concepts, f"{system} is served, but without the code {code!r}"
            ours.append((system, code))
        # The walk met our own codes (it is not vacuous): a referral step, the opinion's, the profile.
        assert {s for s, _ in ours} >= {BASE + "referral-step", BASE + "opinion-observation", BASE + "concordance",
                                       BASE + "recommendation", BASE + "collection-profile"}, ours
    finally:
        svc.stop(wait=True)
        h.close()
