"""The audit trail: a BALP AuditEvent per disclosure and per opinion filed, in the store (and the EHR when
configured), listed by `fhirbridge audit --patient`; never the patient's name or clinical text."""
from __future__ import annotations

import dataclasses
import json
import re
import time

import pytest
from sqlalchemy import update

from fhirbridge import jsonutil
from fhirbridge.cli import main as cli
from fhirbridge.config import loader as config
from fhirbridge.config.model import Transport
from fhirbridge.ehr import audit
from fhirbridge.errors import FhirError
from fhirbridge.exchange import followup as wire
from fhirbridge.fhir.validate import validate
from fhirbridge.loop.followup import ask, run_followups
from fhirbridge.loop.receive import receive_bytes, receive_file
from fhirbridge.ops import doctor, metrics
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from fhirbridge.store.followups import FollowUps
from fhirbridge.store.tables import audit_events
from tests.kit import balp
from tests.kit import metrics as prom
from tests.kit.cli import run as run_cli
from tests.kit.hospital import SEEDED_FAMILY, SEEDED_GIVEN, TestHospital

pytestmark = pytest.mark.sekmet

REVIEWER = "urn:ietf:rfc:3986|urn:oid:2.999.9.1"
DCM = "http://dicom.nema.org/resources/ontology/DCM"


def _codes(ev: dict, code: str) -> list[dict]:
    return [a for a in ev["agent"] if any(c["code"] == code for c in a["type"]["coding"])]


def _no_phi(rows: list[dict]) -> None:
    text = jsonutil.dumps([r["resource"] for r in rows]).decode()
    assert SEEDED_FAMILY not in text and SEEDED_GIVEN not in text


def test_a_delivered_case_records_one_disclosure(hospital, seeded):
    case = hospital.delivered_case(seeded["patient"])
    rows = hospital.app.store.list_audit(patient=seeded["patient"])
    assert len(rows) == 1
    row = rows[0]
    assert (row["kind"], row["case_id"], row["recipient"]) == ("disclosure", case.id, REVIEWER)
    assert row["sent_to_ehr"] is False                       # write_to_ehr is off by default
    ev = row["resource"]
    assert validate(ev) == []
    assert ev["meta"]["profile"] == [
        "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PrivacyDisclosure.Source"]
    assert ev["type"] == {"system": DCM, "code": "110106", "display": "Export"}
    assert ev["subtype"][0]["code"] == "disclose" and ev["action"] == "R" and ev["outcome"] == "0"
    assert ev["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
    # Source: the hospital; recipient: the reviewer organisation, by identifier.
    assert _codes(ev, "110153")[0]["who"]["identifier"]["value"] == hospital.app.hospital.identifier_value
    assert _codes(ev, "110152")[0]["who"]["identifier"]["value"] == "urn:oid:2.999.9.1"
    # Entities: the patient (by reference only), the order, and the package with counts (no content).
    patient = [e for e in ev["entity"] if e["role"]["code"] == "1"]
    assert [e["what"] for e in patient] == [{"reference": seeded["patient"]}]
    assert {"reference": case.service_request} in [e["what"] for e in ev["entity"]]
    package = next(e for e in ev["entity"] if "identifier" in e["what"])
    assert package["what"]["identifier"]["value"] == f"urn:uuid:{case.package_id}"
    details = {d["type"]: d["valueString"] for d in package["detail"]}
    assert int(details["records shared"]) > 0
    assert "DiagnosticReport=" in details["record types"]
    _no_phi(rows)

    # Recording the same disclosure again (a repeated step) keeps one record.
    assert audit.record_disclosure(hospital.app, hospital.app.store.get(case.id)) is False
    hospital.run(intake=False)
    assert len(hospital.app.store.list_audit(patient=seeded["patient"])) == 1


def test_filing_records_the_write_back_and_the_command_lists_both(hospital, seeded, capsys):
    case = hospital.delivered_case(seeded["patient"])
    receive_file(hospital.app, hospital.answer(case))
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "done", case.last_error

    rows = hospital.app.store.list_audit(patient=seeded["patient"])
    assert [r["kind"] for r in rows] == ["disclosure", "filed"]
    filed = rows[1]["resource"]
    assert validate(filed) == []
    assert filed["type"]["code"] == "110107" and filed["action"] == "C"
    assert {"reference": case.document_reference} in [e["what"] for e in filed["entity"]]
    assert _codes(filed, "110153")[0]["who"]["identifier"]["value"] == "urn:oid:2.999.9.1"   # the reviewer sent it
    _no_phi(rows)

    cfg = str(hospital.config_path)
    capsys.readouterr()
    assert cli.main(["--config", cfg, "audit", "--patient", seeded["patient"], "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["patient"] == seeded["patient"]
    first, second = listed["events"]
    assert first["kind"] == "disclosure" and first["recipient"] == "Spine Center"
    assert first["package"] == f"urn:uuid:{case.package_id}" and first["order"] == case.service_request
    assert second["kind"] == "filed" and second["document_reference"] == case.document_reference

    patient_id = seeded["patient"].split("/", 1)[1]
    assert cli.main(["--config", cfg, "audit", "--patient", patient_id]) == 0
    out = capsys.readouterr().out
    assert f"accounting of disclosures for {seeded['patient']}" in out
    assert "sent package" in out and "opinion filed" in out and case.package_id in out
    assert "Spine Center" in out and SEEDED_FAMILY not in out

    assert cli.main(["--config", cfg, "audit", "--patient", "Patient/nobody"]) == 0
    assert "no disclosures recorded for Patient/nobody" in capsys.readouterr().out


def _elapse_backoff(h) -> None:
    """As if every owed AuditEvent's retry time had come (the backoff is real time: 30 s and more)."""
    with h.app.store.engine.begin() as conn:
        conn.execute(update(audit_events).where(audit_events.c.sent_to_ehr.is_(False))
                     .values(ehr_retry_at=time.time() - 1))


@pytest.fixture
def auditing_hospital(tmp_path, ehr):
    h = TestHospital(tmp_path, ehr.base_url, env={"FHIRBRIDGE_AUDIT__WRITE_TO_EHR": "true"})
    yield h
    h.close()


def test_with_write_to_ehr_the_audit_event_is_in_the_ehr(auditing_hospital, seeded, fhir):
    h = auditing_hospital
    assert h.app.config.audit.write_to_ehr
    case = h.delivered_case(seeded["patient"])
    [row] = h.app.store.list_audit(case_id=case.id)
    assert row["sent_to_ehr"] is True and row["ehr_error"] is None
    stored = fhir.read("AuditEvent", row["id"])
    assert validate(stored) == []
    assert stored["type"]["code"] == "110106"
    found = [r for r in fhir.search("AuditEvent", {"patient": seeded["patient"]})
             if r.get("resourceType") == "AuditEvent" and r["id"] == row["id"]]
    assert len(found) == 1
    assert SEEDED_FAMILY not in jsonutil.dumps(stored).decode()


def test_an_ehr_that_refuses_the_audit_event_does_not_fail_the_case(auditing_hospital, seeded, fhir, monkeypatch):
    h = auditing_hospital
    real_update = type(h.app.ehr).update

    def refuse(self, resource, **kw):
        if resource.get("resourceType") == "AuditEvent":
            raise FhirError("PUT AuditEvent: 503 Service Unavailable", status=503, transient=True)
        return real_update(self, resource, **kw)

    monkeypatch.setattr(type(h.app.ehr), "update", refuse)
    case = h.delivered_case(seeded["patient"])                # the Case went on regardless
    [row] = h.app.store.list_audit(case_id=case.id)
    assert row["sent_to_ehr"] is False and "503" in row["ehr_error"]
    with pytest.raises(FhirError):
        fhir.read("AuditEvent", row["id"])

    monkeypatch.setattr(type(h.app.ehr), "update", real_update)
    _elapse_backoff(h)
    h.run(intake=False)                                       # the next run once it is due sends what is pending
    [row] = h.app.store.list_audit(case_id=case.id)
    assert row["sent_to_ehr"] is True and row["ehr_error"] is None
    assert validate(fhir.read("AuditEvent", row["id"])) == []


# --- C2: the profiles the AuditEvents declare (BALP), and the copies the EHR refuses ----------------------

def test_every_audit_event_meets_the_balp_profile_it_declares(auditing_hospital, seeded, fhir):
    """Each AuditEvent emitted (disclosure and filed), as stored and as the EHR holds it, meets every
    constraint of its declared BALP profile that tests/kit/balp.py encodes (agent network 1..1,
    val-audit-source, the SNOMED custodian, the slices) and is valid R4B."""
    h = auditing_hospital
    case = h.delivered_case(seeded["patient"])
    receive_file(h.app, h.answer(case))
    h.run(intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "done"
    # A follow-up question and its answer, filed as an addendum (issue 16): a disclosure and an import too.
    ask(h.app, case, "Would physiotherapy first change your advice?", asked_by=h.physician())
    assert run_followups(h.app) == 1
    [row] = FollowUps(h.app.store).of_case(case.id, "question")
    rv = h.reviewers[case.reviewer]
    question = wire.open_question(h.root / "outbox" / case.reviewer / f"{wire.QUESTION_PREFIX}{row['id']}",
                                  rv.key, rv.trusted)
    receive_bytes(h.app, wire.seal_answer(question, "No: surgery remains the advice.", rv.key)[0], source="answer")
    assert run_followups(h.app) == 1
    rows = h.app.store.list_audit(case_id=case.id)
    assert [r["kind"] for r in rows] == ["disclosure", "filed", "question", "addendum"]
    assert all(r["sent_to_ehr"] for r in rows)
    assert "physiotherapy" not in jsonutil.dumps([r["resource"] for r in rows]).decode()
    for row in rows:
        for ev in (row["resource"], fhir.read("AuditEvent", row["id"])):
            assert balp.problems(ev) == [], (row["kind"], balp.problems(ev))
            assert validate(ev) == []
    disclosure, filed, asked, addendum = (r["resource"] for r in rows)
    assert asked["source"]["observer"] == _codes(asked, "110153")[0]["who"]
    assert addendum["source"]["observer"] == _codes(addendum, "110152")[0]["who"]
    [note] = [e["what"]["reference"] for e in addendum["entity"] if "reference" in e["what"]
              and e["what"]["reference"].startswith("DocumentReference/")]
    assert note == FollowUps(h.app.store).of_case(case.id, "question")[0]["note"]
    # The custodian is BALP's SNOMED CT agent, not v3-ParticipationType#CST.
    [custodian] = [a for a in disclosure["agent"] if a["type"]["coding"][0]["system"] == "http://snomed.info/sct"]
    assert custodian["type"]["coding"] == [{"system": "http://snomed.info/sct", "code": "159541003",
                                            "display": "Record keeping/library clerk"}]
    assert custodian["who"] == h.app.hospital.organization_ref()
    assert "v3-ParticipationType" not in jsonutil.dumps(rows[0]["resource"]).decode()
    # The hospital records both: it is the audit source, by the very Reference its agent carries.
    assert disclosure["source"]["observer"] == _codes(disclosure, "110153")[0]["who"]
    assert filed["source"]["observer"] == _codes(filed, "110152")[0]["who"]
    # The reviewer of the test hospital is reached through its outbox folder.
    outbox = h.app.config.reviewer(case.reviewer).transport.path
    assert _codes(disclosure, "110152")[0]["network"] == {"address": outbox.absolute().as_uri(), "type": "5"}


def test_the_reviewer_network_address_follows_its_transport_without_credentials(hospital):
    app = hospital.app
    reviewer = app.config.reviewer("spine-center")
    https = dataclasses.replace(reviewer, transport=Transport("https", url="https://bob:pw@rev.example:8443/in/?t=1"))
    assert audit.reviewer_network(app, https) == {"address": "https://rev.example:8443/in", "type": "5"}
    pull = dataclasses.replace(reviewer, transport=Transport("pull"))
    served = dataclasses.replace(app.config, public_url="https://bridge.example")
    app.config = served
    assert audit.reviewer_network(app, pull) == {"address": "https://bridge.example/reviewer", "type": "5"}
    assert audit.our_network(app) == {"address": "https://bridge.example", "type": "5"}


ADMIN = "audit-dashboard-admin-0123456789"
REFUSAL = (b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing",'
           b'"diagnostics":"AuditEvent does not meet the profile required here"}]}')


def _status_out(capsys, h) -> str:
    code, out, err = run_cli(capsys, "--config", h.config_path, "status")
    assert code == 0, err
    return out


def test_an_audit_event_the_ehr_refuses_is_counted_shown_retried_with_backoff_and_delivered(
        tmp_path, proxy, seeded, fhir, capsys, monkeypatch):
    monkeypatch.setenv("FHIRBRIDGE_AUDIT__WRITE_TO_EHR", "true")     # the commands below read it too
    h = TestHospital(tmp_path, proxy.base_url, env={"FHIRBRIDGE_AUDIT__WRITE_TO_EHR": "true"})
    try:
        name = h.app.hospital.name
        failures = metrics.AUDIT_WRITE_FAILURES.labels(name, "422")
        before = failures._value.get()
        refuse = proxy.add(method="PUT", path=r"/AuditEvent/", status=422, body=REFUSAL)
        case = h.delivered_case(seeded["patient"])              # the Case goes on regardless
        assert h.app.store.get(case.id).last_error is None
        [row] = h.app.store.audit_owed(hospital=h.app.hospital.key)["rows"]
        assert (row["ehr_attempts"], row["case_id"]) == (1, case.id)
        assert "422" in row["ehr_error"] and "does not meet the profile" in row["ehr_error"]
        assert row["ehr_retry_at"] >= row["ehr_tried_at"] + audit.RETRY_FIRST - 1
        assert failures._value.get() == before + 1                # counted ...
        scraped = prom.parse(metrics.render(h.app.store, {h.app.hospital.key: name}, audit_to_ehr=True).decode())
        assert prom.value(scraped, "fhirbridge_audit_events_owed", hospital=name) == 1
        assert prom.value(scraped, "fhirbridge_audit_ehr_write_failures_total", hospital=name, status="422") >= 1
        out = _status_out(capsys, h)                              # ... and shown
        assert "1 AuditEvent(s) not yet in the EHR" in out and "does not meet the profile" in out
        code, out, _ = run_cli(capsys, "--config", h.config_path, "status", case.id[:8])
        assert "audit in EHR: 0 of 1 written; owed: EHR answered 422" in out
        [check] = [c for c in doctor.run(h.app.config, h.app.hospital).checks if c.name == "audit: EHR copy"]
        assert check.status == "warn" and "1 AuditEvent(s)" in check.detail and "422" in check.detail
        h.config_path.write_text(h.config_path.read_text() + f'\n[api]\ntokens = ["{ADMIN}"]\n')
        svc = Service(config.load(h.config_path, environ=h.env))
        try:
            page = _dashboard(svc)
            assert "Audit trail in the EHR" in page and "1 owed" in page and "does not meet the profile" in page
        finally:
            svc.stop(wait=True)

        # Backoff: the next run before the retry time writes nothing; once due it tries again (refused again:
        # the wait doubles), and the Case never sees it.
        puts = proxy.count("PUT", r"/AuditEvent/")
        h.run(intake=False)
        assert proxy.count("PUT", r"/AuditEvent/") == puts
        _elapse_backoff(h)
        h.run(intake=False)
        assert proxy.count("PUT", r"/AuditEvent/") == puts + 1
        [row] = h.app.store.audit_owed(hospital=h.app.hospital.key)["rows"]
        assert row["ehr_attempts"] == 2 and row["ehr_retry_at"] >= row["ehr_tried_at"] + 2 * audit.RETRY_FIRST - 1
        assert failures._value.get() == before + 2
        assert h.app.store.get(case.id).step == "await_opinion" and h.app.store.get(case.id).last_error is None

        # The EHR accepts again: `fhirbridge run --now` delivers it; nothing owed is left anywhere.
        refuse.times = refuse.hits
        code, _, err = run_cli(capsys, "--config", h.config_path, "run", "--now", "--no-intake")
        assert code == 0, err
        [done] = h.app.store.list_audit(case_id=case.id)
        assert done["sent_to_ehr"] is True and done["ehr_error"] is None
        assert balp.problems(fhir.read("AuditEvent", done["id"])) == []
        assert "not yet in the EHR" not in _status_out(capsys, h)
        scraped = prom.parse(metrics.render(h.app.store, {h.app.hospital.key: name}, audit_to_ehr=True).decode())
        assert prom.value(scraped, "fhirbridge_audit_events_owed", hospital=name) == 0
        [check] = [c for c in doctor.run(h.app.config, h.app.hospital).checks if c.name == "audit: EHR copy"]
        assert check.status == "pass"
    finally:
        h.close()


def _dashboard(svc) -> str:
    client = create_app(svc=svc).test_client()
    login = client.get("/dashboard/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', login).group(1)
    r = client.post("/dashboard/login", data={"csrf_token": csrf, "token": ADMIN})
    assert r.status_code == 302, r.get_data(as_text=True)
    return client.get("/dashboard/").get_data(as_text=True)
