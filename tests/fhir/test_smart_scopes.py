"""The SMART scopes fhirbridge asks for (fhir.auth.FEATURES) against a real sekmet that grants exactly them and
nothing more, behind the gate that authorises each transaction entry (tests/kit/scopegate.py).

Imports of what the scope derivation added sit inside the tests that need them, so the whole-loop test runs (and
fails, as it must) against code from before it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from fhirbridge.demo.localehr import seed_patient
from fhirbridge.ehr.capabilities import Capabilities
from fhirbridge.ehr.data_request import request_records
from fhirbridge.ehr.write_plan import Kind, choose
from fhirbridge.errors import FhirError
from fhirbridge.fhir.auth import SmartBackendAuth
from fhirbridge.fhir.client import FhirClient
from fhirbridge.loop.receive import receive_file
from tests.kit.hospital import TestHospital, docrefs, smart_ehr_running
from tests.kit.hospital import client_keys as new_client_keys
from tests.kit.scopegate import EXACT_SCOPES as EXACT

pytestmark = pytest.mark.sekmet

CLIENT_ID = "fhirbridge-scopes"
@pytest.fixture(scope="module")
def client_keys(tmp_path_factory) -> Path:
    return new_client_keys(tmp_path_factory.mktemp("scope-keys"))


@pytest.fixture(scope="module")
def exact_ehr(tmp_path_factory, client_keys):
    with smart_ehr_running(tmp_path_factory.mktemp("exact-ehr"), CLIENT_ID, client_keys, scopes=EXACT) as ehr:
        yield ehr


@pytest.fixture(scope="module")
def exact_seeded(exact_ehr) -> dict:
    with FhirClient(exact_ehr.direct_url, auth=exact_ehr.admin) as admin:   # the hospital's own systems
        return seed_patient(exact_ehr.ehr, admin, family="Scope-Testpatient", given="Carla", profile="spine")


def test_the_derivation_asks_for_exactly_the_granted_list():
    from fhirbridge.config.mappings import collected_types
    from fhirbridge.config.model import PACKAGE_MAPPINGS
    from fhirbridge.fhir.auth import COLLECTED_TYPES, DEFAULT_SCOPES, feature_needs, needed_scopes
    assert collected_types(PACKAGE_MAPPINGS) == COLLECTED_TYPES
    assert needed_scopes(feature_needs(audit_copies=True)) == tuple(EXACT)
    assert DEFAULT_SCOPES == tuple(s for s in EXACT if s != "system/AuditEvent.u")   # audit copies are opt-in
    assert "system/*.c" not in DEFAULT_SCOPES


def test_whole_loop_under_the_exact_grant(tmp_path, exact_ehr, client_keys, exact_seeded):
    """Order with a deselected record (POST then PUT ServiceRequest), collect, seal, deliver with the audit
    copy PUT to the EHR, a data request Task, receive, and file in one transaction the gate checks entry by
    entry (PUT Binary, PUT DocumentReference, POST Provenance, PUT Task): every request is allowed by the
    scopes fhirbridge asked for, which are exactly the ones granted."""
    hospital = TestHospital(tmp_path, exact_ehr.base_url, env={"FHIRBRIDGE_AUDIT__WRITE_TO_EHR": "true"})
    try:
        hospital.use_smart(CLIENT_ID, client_keys)
        auth = hospital.app.ehr._session.auth
        assert isinstance(auth, SmartBackendAuth)
        skipped = exact_seeded["medication_requests"][0]
        sr = hospital.order(exact_seeded["patient"], exclude=(skipped,))   # draft, then PUT active
        assert sr["status"] == "active"
        report = hospital.run()
        case = hospital.case_for(sr)
        assert case is not None and case.step == "await_opinion", (case and case.last_error, report.errors)
        assert set(auth.granted_scope.split()) == set(EXACT)
        [disclosure] = hospital.app.store.list_audit(case_id=case.id)
        assert disclosure["sent_to_ehr"] is True, disclosure["ehr_error"]     # PUT AuditEvent/<id>
        request_records(hospital.app, case, "The MRI of last spring, please")  # POST Task
        receive_file(hospital.app, hospital.answer(case))
        hospital.run(intake=False)
        case = hospital.app.store.get(case.id)
        assert case.step == "done", case.last_error
        assert exact_ehr.gate.refused == []
        assert [s for m, p, s in exact_ehr.gate.log if m == "POST" and p.rstrip("/").endswith("/fhir")] == [200]
        assert all(row["sent_to_ehr"] for row in hospital.app.store.list_audit(case_id=case.id))
        with FhirClient(exact_ehr.direct_url, auth=exact_ehr.admin) as admin:
            assert docrefs(admin, case) == 1
            assert admin.read_ref(case.task)["status"] == "completed"
    finally:
        hospital.close()


def test_write_back_passes_the_per_entry_check_with_the_default_scopes(tmp_path, exact_ehr, client_keys,
                                                                      exact_seeded):
    """Filing asks the scopes the transaction's entries need: `u` for PUT Binary/<id> and PUT
    DocumentReference/<id> (an update that creates), `c` for POST Provenance, `u` for PUT Task. The gate, like a
    server that authorises each entry, lets it through."""
    hospital = TestHospital(tmp_path, exact_ehr.base_url)
    try:
        hospital.use_smart(CLIENT_ID, client_keys)
        refused_before = len(exact_ehr.gate.refused)
        case = hospital.delivered_case(exact_seeded["patient"])
        receive_file(hospital.app, hospital.answer(case))
        hospital.run(intake=False)
        case = hospital.app.store.get(case.id)
        assert exact_ehr.gate.refused[refused_before:] == []
        assert case.step == "done", case.last_error
    finally:
        hospital.close()


def _transaction(binary_id: str, docref_id: str, patient: str) -> dict:
    binary = {"resourceType": "Binary", "id": binary_id, "contentType": "text/plain", "data": "aGk="}
    docref = {"resourceType": "DocumentReference", "id": docref_id, "status": "current",
              "subject": {"reference": patient},
              "content": [{"attachment": {"contentType": "text/plain", "url": f"Binary/{binary_id}"}}]}
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": binary, "request": {"method": "PUT", "url": f"Binary/{binary_id}"}},
        {"resource": docref, "request": {"method": "PUT", "url": f"DocumentReference/{docref_id}"}}]}


def test_the_gate_refuses_a_transaction_entry_the_token_does_not_grant(exact_ehr, client_keys, exact_seeded):
    """A token without `u` on DocumentReference (before the fix fhirbridge asked DocumentReference.c for a PUT
    that creates) has the transaction refused for that entry, with an OperationOutcome naming it, and nothing
    is written; with `u` the same transaction goes through."""
    refused_before = len(exact_ehr.gate.refused)
    old = SmartBackendAuth.from_keys(keys=client_keys, client_id=CLIENT_ID, fhir_base_url=exact_ehr.base_url,
                                     scopes=("system/Binary.u", "system/DocumentReference.rs"))
    with FhirClient(exact_ehr.base_url, auth=old, retries=0) as client, pytest.raises(FhirError) as err:
        client.transaction(_transaction("gate-b1", "gate-d1", exact_seeded["patient"]))
    assert err.value.status == 403
    assert "entry 1 (PUT DocumentReference/gate-d1) needs 'u' on DocumentReference" in str(err.value)
    assert exact_ehr.gate.refused[refused_before:] == [("DocumentReference", "u")]
    with FhirClient(exact_ehr.direct_url, auth=exact_ehr.admin) as admin, pytest.raises(FhirError) as gone:
        admin.read("Binary", "gate-b1")   # the transaction never reached the server
    assert gone.value.status == 404

    new = SmartBackendAuth.from_keys(keys=client_keys, client_id=CLIENT_ID, fhir_base_url=exact_ehr.base_url,
                                     scopes=("system/Binary.u", "system/DocumentReference.u"))
    with FhirClient(exact_ehr.base_url, auth=new, retries=0) as client:
        client.transaction(_transaction("gate-b2", "gate-d2", exact_seeded["patient"]))
    with FhirClient(exact_ehr.direct_url, auth=exact_ehr.admin) as admin:
        assert admin.read("DocumentReference", "gate-d2")["id"] == "gate-d2"


# ------------------------------------------------------------------ the scopes follow the write plan

# What EXACT_SCOPES becomes for each plan, written out (not derived) like EXACT itself: the POST-only plans create
# DocumentReference and Provenance with server-assigned ids (`c`, no `u`) and search them by identifier and
# target (`s`, which comes paired with `r`); they write no Binary (the document travels inline in the note,
# loop/post_writes.py), so Binary keeps only collect's `rs`; an EHR without Task writes is asked for no Task
# `c` or `u`.
LEDGER_CHANGES = {"system/Binary.rus": "system/Binary.rs",
                  "system/DocumentReference.rus": "system/DocumentReference.crs",
                  "system/Provenance.c": "system/Provenance.crs",
                  # Follow-up questions (loop/followup.py): POSTed and reconciled by identifier search.
                  "system/Communication.u": "system/Communication.crs"}
NO_TASK_WRITE_CHANGES = {"system/Task.crus": "system/Task.rs"}


def _plan_scopes(caps: Capabilities) -> set[str]:
    from fhirbridge.fhir.auth import feature_needs, needed_scopes
    plan = choose(caps)
    return set(needed_scopes(feature_needs(audit_copies=True, writeback=plan.writes, task_write=plan.task_write,
                                           followups=plan.followup_writes)))


def _changed(changes: dict[str, str]) -> set[str]:
    return {changes.get(s, s) for s in EXACT}


def test_the_atomic_plan_asks_for_exactly_the_granted_list():
    assert choose(Capabilities()).kind is Kind.ATOMIC
    assert _plan_scopes(Capabilities()) == set(EXACT)


def test_the_ledger_plan_asks_to_create_and_search_not_to_update():
    caps = Capabilities(transaction=False)
    assert choose(caps).kind is Kind.LEDGER
    assert _plan_scopes(caps) == _changed(LEDGER_CHANGES)


def test_the_once_plan_asks_for_no_search_it_cannot_use():
    caps = Capabilities(transaction=False, docref_identifier_search=False, provenance_target_search=False)
    assert choose(caps).kind is Kind.ONCE
    # DocumentReference keeps `rs` (collect searches notes); Provenance is only created.
    assert _plan_scopes(caps) == _changed({**LEDGER_CHANGES, "system/Provenance.c": "system/Provenance.c",
                                           "system/Communication.u": "system/Communication.c"})


def test_an_ehr_without_task_writes_is_asked_for_no_task_write(tmp_path, ehr):
    """From the configuration: pinned `task_write = false` (and `transaction = false`) reach the scopes the App
    asks for, before any token exists."""
    assert _plan_scopes(Capabilities(task_write=False)) == _changed(NO_TASK_WRITE_CHANGES)
    hospital = TestHospital(tmp_path, ehr.base_url, env={"FHIRBRIDGE_AUDIT__WRITE_TO_EHR": "true"})
    try:
        hospital.config_path.write_text(hospital.config_path.read_text()
                                        + "\n[hospital.ehr]\ntask_write = false\ntransaction = false\n")
        app = hospital.new_app()
        assert set(app.smart_scopes) == _changed({**LEDGER_CHANGES, **NO_TASK_WRITE_CHANGES})
        assert not any(rtype == "Task" and i in ("create", "update")
                       for pairs in app.smart_needs.values() for rtype, i in pairs)
        app.close()
    finally:
        hospital.close()
