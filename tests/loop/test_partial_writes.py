"""Issue 14's two defects: a server that does not run the write-back transaction all-or-nothing.

Both were found running the loop against a second FHIR server. The EHR here is sekmet behind the capability
proxy (tests/kit/ehrproxy.py), running the transaction as a batch; fhirbridge is NOT told (no pins): it picks
the atomic plan and must still notice, reconcile and file exactly once. The Task is edited by someone else
just before the write-back reaches the EHR (a nurse adding a note to it), so its If-Match entry is refused.
"""
from __future__ import annotations

import pytest

from fhirbridge.errors import PartialTransaction
from fhirbridge.fhir.client import FhirClient
from fhirbridge.loop.receive import receive_file
from tests.kit.ehrproxy import Behaviour, EhrProxy
from tests.kit.hospital import TestHospital, docrefs

pytestmark = pytest.mark.sekmet

FAST = {"FHIRBRIDGE_HOSPITAL__HTTP__RETRIES": "1", "FHIRBRIDGE_HOSPITAL__HTTP__MAX_RETRY_AFTER": "0.2"}


def _provenances(fhir, case) -> int:
    return sum(1 for p in fhir.search("Provenance", {"target": case.document_reference or ""})
               if p["resourceType"] == "Provenance")


def _edit_task_first(fhir, case):
    """A `before` hook: someone edits the Task right before our transaction reaches the EHR."""
    def edit(_path: str) -> None:
        task = fhir.read_ref(case.task)
        task.setdefault("note", []).append({"text": "called the patient"})
        fhir.update(task)
    return edit


def _case_at_file(tmp_path, ehr, behaviour, seeded):
    proxy = EhrProxy(ehr.base_url, behaviour)
    h = TestHospital(tmp_path, proxy.base_url, env=FAST)
    case = h.delivered_case(seeded["patient"])
    receive_file(h.app, h.answer(case))
    return proxy, h, h.app.store.get(case.id)


@pytest.mark.parametrize("behaviour", [Behaviour(batch_transactions=True), Behaviour(no_rollback=True)],
                         ids=["batch-200-with-412-entry", "no-rollback-412"])
def test_refused_task_entry_is_not_filed_and_the_retry_reuses_what_was_written(tmp_path, ehr, fhir, seeded,
                                                                               behaviour):
    proxy, h, case = _case_at_file(tmp_path, ehr, behaviour, seeded)
    try:
        assert h.app.write_plan.kind.name == "ATOMIC"      # nothing told fhirbridge the server is like this
        proxy.add(method="POST", path=r"^/fhir/?$", action="forward", before=_edit_task_first(fhir, case), times=1)
        h.run(intake=False)
        case = h.app.store.get(case.id)
        # Defect (a): HTTP 200 with a 412 entry was taken for success (Case done, Task without output).
        # Defect (b): the 412 made it look for our note, find it and call it filed.
        assert case.step == "file", "a refused Task entry must not count as filed"
        assert case.last_error and "reconcile" in case.last_error
        task = fhir.read_ref(case.task)
        assert task["status"] != "completed"
        assert docrefs(fhir, case) == 1                    # the server did write the note (no rollback) ...

        h.run(intake=False, ignore_backoff=True)           # ... so the retry must reuse it and the Provenance
        case = h.app.store.get(case.id)
        assert case.step == "done", case.last_error
        task = fhir.read_ref(case.task)
        assert task["status"] == "completed"
        assert [o["valueReference"]["reference"] for o in task["output"]] == [case.document_reference]
        assert docrefs(fhir, case) == 1
        assert _provenances(fhir, case) == 1               # no second Provenance
        assert proxy.written("Provenance", "POST") == 1
    finally:
        h.close()
        proxy.close()


def test_transaction_response_with_a_refused_entry_raises(ehr, fhir, seeded):
    """FhirClient.transaction checks every entry's response.status, not only the HTTP status."""
    proxy = EhrProxy(ehr.base_url, Behaviour(batch_transactions=True))
    try:
        task = fhir.create({"resourceType": "Task", "status": "requested", "intent": "order",
                            "for": {"reference": seeded["patient"]}})[0]
        tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Basic", "code": {"text": "partial-tx"}},
             "request": {"method": "POST", "url": "Basic"}},
            {"resource": {**task, "status": "cancelled"},
             "request": {"method": "PUT", "url": f"Task/{task['id']}", "ifMatch": 'W/"999"'}}]}
        with FhirClient(proxy.base_url) as client, pytest.raises(PartialTransaction) as err:
            client.transaction(tx)
        assert err.value.transient and err.value.status == 412
        assert err.value.statuses[0].startswith("2") and err.value.statuses[1] == "412"
        assert fhir.read_ref(f"Task/{task['id']}")["status"] == "requested"
    finally:
        proxy.close()
