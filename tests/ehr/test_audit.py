"""The audit trail: a BALP AuditEvent per disclosure and per opinion filed, in the store (and the EHR when
configured), listed by `fhirbridge audit --patient`; never the patient's name or clinical text."""
from __future__ import annotations

import json

import pytest

from fhirbridge import jsonutil
from fhirbridge.cli import main as cli
from fhirbridge.ehr import audit
from fhirbridge.errors import FhirError
from fhirbridge.fhir.validate import validate
from fhirbridge.loop.receive import receive_file
from tests.kit.hospital import SEEDED_FAMILY, SEEDED_GIVEN

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


@pytest.fixture
def auditing_hospital(tmp_path, ehr):
    from tests.kit.hospital import TestHospital
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
    h.run(intake=False)                                       # the next run sends what is pending
    [row] = h.app.store.list_audit(case_id=case.id)
    assert row["sent_to_ehr"] is True and row["ehr_error"] is None
    assert validate(fhir.read("AuditEvent", row["id"])) == []
