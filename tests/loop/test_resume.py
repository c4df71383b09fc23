"""A run killed in the middle of any step: the next run resumes the Case, and nothing is sent or filed twice.

The "kill" is a BaseException raised from inside the step (it escapes the step's error handling, as a
SIGKILL would) and the claim is then attributed to a process that no longer exists, exactly what a
killed `fhirbridge run` leaves behind. The next run must take the Case over at once, not after the lease.
"""
from __future__ import annotations

import subprocess

import pytest

from fhirbridge.exchange import envelope as envelope_mod
from fhirbridge.exchange import transport as deliver_mod
from fhirbridge.loop import collect as collect_mod
from fhirbridge.loop.receive import receive_file
from fhirbridge.loop.writeback import OPINION_ID_SYSTEM
from fhirbridge.store.store import LOCAL_PREFIX

pytestmark = pytest.mark.sekmet


class Killed(BaseException):
    pass


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"], start_new_session=True)
    proc.wait()
    return proc.pid


def _die(*_a, **_k):
    raise Killed()


def _as_if_killed(hospital, case_id):
    hospital.app.store.update(case_id, claimed_by=f"{LOCAL_PREFIX}{_dead_pid()}")



@pytest.mark.parametrize("where", ["collect", "seal", "deliver"])
def test_killed_mid_step_resumes_and_delivers_one_package(hospital, seeded, monkeypatch, where):
    sr = hospital.order(seeded["patient"])
    target = {"collect": (collect_mod, "_follow_references"),   # after the searches, before writing
              "seal": (envelope_mod, "seal_signed_document_to"),  # attachments encrypted, envelope not yet
              "deliver": (deliver_mod, "package_files")}[where] # copied to .partial, not yet renamed
    with monkeypatch.context() as m:
        m.setattr(*target, _die)
        with pytest.raises(Killed):
            hospital.run()
    case = hospital.case_for(sr)
    assert case.step == where and case.claimed_by            # the dead run still holds it
    _as_if_killed(hospital, case.id)

    hospital.run()
    case = hospital.app.store.get(case.id)
    assert case.step == "await_opinion", case.last_error
    assert "resumed" in [e["kind"] for e in hospital.app.store.events(case.id)]
    outbox = hospital.root / "outbox" / case.reviewer
    assert [p.name for p in outbox.iterdir()] == [case.package_id]   # one package, no .partial left
    hospital.open(case)                                               # and it is whole


def test_killed_after_the_write_back_committed_files_once(hospital, seeded, fhir, monkeypatch):
    case = hospital.delivered_case(seeded["patient"])
    receive_file(hospital.app, hospital.answer(case))
    real = hospital.app.ehr.transaction

    def commit_then_die(bundle):
        real(bundle)
        raise Killed()

    with monkeypatch.context() as m:
        m.setattr(hospital.app.ehr, "transaction", commit_then_die)
        with pytest.raises(Killed):
            hospital.run(intake=False)
    assert hospital.app.store.get(case.id).step == "file"
    _as_if_killed(hospital, case.id)
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "done"
    docs = [d for d in fhir.search("DocumentReference",
                                   {"identifier": f"{OPINION_ID_SYSTEM}|urn:uuid:{case.opinion_id}"})
            if d["resourceType"] == "DocumentReference"]
    assert len(docs) == 1 and case.document_reference == f"DocumentReference/{docs[0]['id']}"
    provs = [p for p in fhir.search("Provenance", {"target": case.document_reference})
             if p["resourceType"] == "Provenance"]
    assert len(provs) == 1


def test_a_live_claim_is_not_taken_over(hospital, seeded):
    sr = hospital.order(seeded["patient"])
    hospital.run(case_id="none")
    case = hospital.case_for(sr)
    hospital.app.store.claim(case_id=case.id, worker=f"{LOCAL_PREFIX}1", lease_seconds=600)  # pid 1 lives
    assert hospital.run().steps_done == 0
    assert hospital.app.store.get(case.id).step == "collect"
