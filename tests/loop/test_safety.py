"""Safety properties a review found broken: each test reproduces the harm it guards against.

Wrong party, wrong record, lost opinion, duplicate note, leaked sensitive label, a cancelled referral
revived, a step done twice.
"""
from __future__ import annotations

import base64
import time

import pytest

from fhirbridge.errors import CaseError, RejectedOpinion
from fhirbridge.loop import collect as collect_mod
from fhirbridge.loop.actions import cancel, retry
from fhirbridge.loop.receive import receive_bytes, receive_file
from fhirbridge.loop.writeback import OPINION_ID_SYSTEM
from fhirbridge.store.store import Store
from tests.kit.hospital import craft_opinion

pytestmark = pytest.mark.sekmet


@pytest.fixture
def two(two_reviewers):
    return two_reviewers


# --- the reviewer cannot choose what is written where ---------------------------------------------

def test_opinion_cannot_name_an_existing_binary_to_overwrite(hospital, seeded, fhir):
    case = hospital.delivered_case(seeded["patient"])
    victim = seeded["binaries"][0]
    before = fhir.read_ref(victim)

    def target_victim(doc):
        doc["identifier"]["value"] = f"urn:uuid:{victim.split('/')[1]}"
    with pytest.raises(RejectedOpinion, match="identifier must be urn:uuid:<its message id>"):
        receive_bytes(hospital.app, craft_opinion(hospital, case, doc=target_victim))
    after = fhir.read_ref(victim)
    assert after["contentType"] == before["contentType"] and after["meta"]["versionId"] == before["meta"]["versionId"]


def test_filed_binary_id_is_chosen_by_the_hospital(hospital, seeded, fhir):
    case = hospital.delivered_case(seeded["patient"])
    receive_file(hospital.app, hospital.answer(case))
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    doc = fhir.read_ref(case.document_reference)
    binary_ref = doc["content"][0]["attachment"]["url"]
    assert binary_ref != f"Binary/{case.opinion_id}"
    assert fhir.read_ref(binary_ref)["securityContext"]["reference"] == case.patient


def test_identifier_already_on_another_patients_note_is_neither_matched_nor_touched(hospital, seeded, fhir):
    """A note elsewhere that carries this opinion's identifier must not be taken for ours (the opinion would
    be lost, the Task would point at another patient's note) nor changed: ours is filed on our patient under
    its own derived id, and the other note stays as it was."""
    case = hospital.delivered_case(seeded["patient"])
    opinion = hospital.answer(case)
    received = receive_file(hospital.app, opinion)
    other_patient = fhir.create({"resourceType": "Patient", "name": [{"family": "Other"}]})[0]
    other, _ = fhir.create({"resourceType": "DocumentReference", "status": "current",
                            "identifier": [{"system": OPINION_ID_SYSTEM, "value": f"urn:uuid:{received.opinion_id}"}],
                            "subject": {"reference": f"Patient/{other_patient['id']}"},
                            "content": [{"attachment": {"contentType": "text/plain",
                                                        "data": base64.b64encode(b"x").decode()}}]})
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "done", case.last_error
    assert case.document_reference != f"DocumentReference/{other['id']}"
    ours = fhir.read_ref(case.document_reference)
    assert ours["subject"]["reference"] == case.patient
    assert ours["context"]["related"] == [{"reference": case.service_request}]
    task = fhir.read_ref(case.task)
    assert task["status"] == "completed"
    assert [o["valueReference"]["reference"] for o in task["output"]] == [case.document_reference]
    after = fhir.read("DocumentReference", other["id"])
    assert after["subject"]["reference"] == f"Patient/{other_patient['id']}"
    assert after["meta"]["versionId"] == other["meta"]["versionId"]


# --- routing: the reviewer the physician chose, or nobody -----------------------------------------

def test_order_naming_a_reviewer_by_reference_goes_to_that_reviewer(two, seeded, fhir):
    cardio = two.app.config.reviewers["other-center"]
    org = fhir.create({"resourceType": "Organization", "name": "Cardio Center",
                       "identifier": [{"system": cardio.identifier_system, "value": cardio.identifier_value}]})[0]
    sr = two.order(seeded["patient"])
    sr["performer"] = [{"reference": f"Organization/{org['id']}"}]
    fhir.update(sr)
    two.run()
    case = two.case_for(sr)
    assert case.reviewer == "other-center" and case.step == "await_opinion"
    assert (two.root / "outbox" / "other-center" / case.package_id).exists()
    assert not (two.root / "outbox" / "spine-center").exists()


def test_order_naming_an_unknown_reviewer_is_not_sent_anywhere_and_retry_routes_it(two, seeded, fhir):
    stranger = fhir.create({"resourceType": "Organization", "name": "Unknown Clinic",
                            "identifier": [{"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.77"}]})[0]
    sr = two.order(seeded["patient"])
    sr["performer"] = [{"reference": f"Organization/{stranger['id']}"}]
    fhir.update(sr)
    two.run()
    case = two.case_for(sr)
    assert case.step == "failed" and "not a configured reviewer" in case.last_error
    assert not (two.root / "outbox").exists()
    task = fhir.read_ref(case.task)                      # visible in the EHR
    assert task["status"] == "failed" and "not a configured reviewer" in task["statusReason"]["text"]

    # Hospital IT onboards the clinic as a reviewer: retry routes the order to it.
    cfg = two.config_path.read_text().replace('value = "urn:oid:2.999.9.2"', 'value = "urn:oid:2.999.77"')
    two.config_path.write_text(cfg)
    two.app.close()
    two.app = two.new_app()
    retry(two.app, two.app.store.get(case.id))
    two.run()
    case = two.app.store.get(case.id)
    assert case.reviewer == "other-center" and case.step == "await_opinion"
    assert fhir.read_ref(case.task)["owner"]["identifier"]["value"] == "urn:oid:2.999.77"


# --- sensitive records are neither sent nor named --------------------------------------------------

def test_sensitive_records_are_neither_sent_nor_listed(hospital, ehr, fhir):
    from fhirbridge.demo.localehr import seed_patient
    seeded = seed_patient(ehr, fhir, family="Sensitive", given="Case")
    hiv = fhir.create({"resourceType": "Condition", "subject": {"reference": seeded["patient"]},
                       "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                              "code": "HIV"}]},
                       "code": {"text": "Human immunodeficiency virus infection"}})[0]
    case = hospital.delivered_case(seeded["patient"])
    opened = hospital.open(case)
    ref = f"Condition/{hiv['id']}"
    everything = str(opened.document) + str(opened.claims)
    assert ref not in everything and hiv["id"] not in everything
    assert "HIV" not in everything and "immunodeficiency" not in everything
    assert "disclosure policy" in opened.manifest["policy_note"]
    # The hospital itself still knows what it withheld and why (in its encrypted work file).
    from fhirbridge.loop.collect import load_collected
    held = {w["reference"]: w["reason"] for w in load_collected(hospital.app, case).withheld}
    assert "HIV" in held[ref]


# --- a step done by a worker that lost its claim is dropped ---------------------------------------

def test_a_worker_that_lost_its_claim_does_not_overwrite_the_newer_state(hospital, seeded, monkeypatch):
    sr = hospital.order(seeded["patient"])
    hospital.run(case_id="none")
    case = hospital.case_for(sr)
    real = collect_mod.collect

    def slow_collect(app, *a, **k):
        out = real(app, *a, **k)
        # Meanwhile our lease lapsed and another worker claimed the Case.
        app.store.update(case.id, claimed_by="other-host:1:1", claimed_until=time.time() + 600)
        return out

    monkeypatch.setattr("fhirbridge.loop.collect.collect", slow_collect)
    hospital.run(intake=False)
    after = hospital.app.store.get(case.id)
    assert after.step == "collect" and after.claimed_by == "other-host:1:1"
    assert "step.discarded" in [e["kind"] for e in hospital.app.store.events(case.id)]


def test_lease_is_renewed_while_a_slow_step_runs(hospital, seeded, monkeypatch):
    import fhirbridge.loop.runner as wf
    monkeypatch.setattr(wf, "LEASE_SECONDS", 0.6)
    sr = hospital.order(seeded["patient"])
    hospital.run(case_id="none")
    case = hospital.case_for(sr)
    stolen = []
    real = collect_mod.collect

    def slow_collect(app, *a, **k):
        time.sleep(1.5)                                     # 2.5 leases
        stolen.append(app.store.claim(case_id=case.id, worker="thief", lease_seconds=60))
        return real(app, *a, **k)

    monkeypatch.setattr(collect_mod, "collect", slow_collect)
    hospital.run(intake=False)
    assert stolen == [None]                                 # the lease was kept alive: nobody could take it
    assert hospital.app.store.get(case.id).step == "await_opinion"


# --- cancellation wins -----------------------------------------------------------------------------

def test_cancel_during_a_step_is_not_undone_by_the_worker(hospital, seeded, monkeypatch):
    sr = hospital.order(seeded["patient"])
    hospital.run(case_id="none")
    case = hospital.case_for(sr)
    real = collect_mod.collect

    def collect_then_cancelled(app, *a, **k):
        out = real(app, *a, **k)
        cancel(app, app.store.get(case.id), "physician withdrew the order")
        return out

    monkeypatch.setattr("fhirbridge.loop.collect.collect", collect_then_cancelled)
    hospital.run(intake=False)
    monkeypatch.undo()
    hospital.run(intake=False)
    assert hospital.app.store.get(case.id).step == "cancelled"
    assert not (hospital.root / "outbox").exists()


def test_order_revoked_while_waiting_to_deliver_is_not_delivered(hospital, seeded, fhir):
    sr = hospital.order(seeded["patient"])
    hospital.run(case_id="none")
    case = hospital.case_for(sr)
    hospital.app.store.update(case.id, step="deliver", package_id=None)  # as if sealed and waiting
    sr = fhir.read_ref(f"ServiceRequest/{sr['id']}")
    sr["status"] = "revoked"
    fhir.update(sr)
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "cancelled" and "revoked" in case.last_error
    assert not (hospital.root / "outbox").exists()
    assert fhir.read_ref(case.task)["status"] == "cancelled"


def test_task_cancelled_in_the_ehr_stops_the_case_and_is_not_revived(hospital, seeded, fhir):
    sr = hospital.order(seeded["patient"])
    hospital.run(case_id="none")
    case = hospital.case_for(sr)
    task = fhir.read_ref(case.task)
    task["status"] = "cancelled"
    task["statusReason"] = {"text": "patient declined"}
    fhir.update(task)
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "cancelled" and "patient declined" in case.last_error
    assert fhir.read_ref(case.task)["status"] == "cancelled"
    assert not (hospital.root / "outbox").exists()


def test_a_finished_case_cannot_be_cancelled(hospital, seeded, fhir):
    case = hospital.delivered_case(seeded["patient"])
    receive_file(hospital.app, hospital.answer(case))
    hospital.run(intake=False)
    with pytest.raises(CaseError, match="already done"):
        cancel(hospital.app, hospital.app.store.get(case.id), "oops")
    assert fhir.read_ref(case.task)["status"] == "completed"


# --- opinions: one per Case, never lost ------------------------------------------------------------

def test_second_opinion_for_a_case_already_taking_one_is_refused_and_not_marked_seen(hospital, seeded):
    case = hospital.delivered_case(seeded["patient"])
    first = craft_opinion(hospital, case)
    second = craft_opinion(hospital, case)
    receive_bytes(hospital.app, first)
    with pytest.raises(RejectedOpinion):
        receive_bytes(hospital.app, second)
    case = hospital.app.store.get(case.id)
    files = sorted(p.name for p in hospital.app.case_dir(case.id).glob("opinion-*.jwe"))
    assert files == [f"opinion-{case.opinion_id}.jwe"]


def test_accept_is_atomic_in_the_store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    case, _ = store.open_case(case_id="c1", hospital="h", service_request="ServiceRequest/1", patient="Patient/1",
                              reviewer="r", profile="default")
    store.update("c1", step="await_opinion", package_id="p1")
    assert store.accept_opinion("c1", jti="a", package_id="p1", detail={}) is not None
    assert store.accept_opinion("c1", jti="b", package_id="p1", detail={}) is None
    assert not store.message_seen("b")                      # the loser can be sent again later
    assert store.get("c1").opinion_id == "a"


def test_opinion_arriving_before_the_delivery_was_recorded_is_accepted(hospital, seeded):
    """A run killed right after the outbox rename: the reviewer already has the package and answers."""
    case = hospital.delivered_case(seeded["patient"])
    hospital.app.store.update(case.id, step="deliver")
    receive_file(hospital.app, hospital.answer(case))
    hospital.run(intake=False)
    assert hospital.app.store.get(case.id).step == "done"


def test_unsafe_narrative_in_an_opinion_is_refused(hospital, seeded):
    case = hospital.delivered_case(seeded["patient"])

    def script(doc):
        doc["entry"][0]["resource"]["section"][0]["text"]["div"] = (
            '<div xmlns="http://www.w3.org/1999/xhtml"><img src="x" onerror="alert(1)"/>hi</div>')
    with pytest.raises(RejectedOpinion, match="not safe XHTML"):
        receive_bytes(hospital.app, craft_opinion(hospital, case, doc=script))


def test_opinion_carrying_another_patient_is_refused(hospital, seeded):
    case = hospital.delivered_case(seeded["patient"])

    def swap(doc):
        for e in doc["entry"]:
            if e["resource"]["resourceType"] == "Patient":
                e["resource"]["id"] = "someone-else"
    with pytest.raises(RejectedOpinion, match="another patient"):
        receive_bytes(hospital.app, craft_opinion(hospital, case, doc=swap))


# --- a lost store never re-sends a referral --------------------------------------------------------

def test_after_losing_the_store_nothing_is_sent_again(hospital, seeded, fhir, tmp_path):
    sent = hospital.delivered_case(seeded["patient"])
    filed = hospital.delivered_case(seeded["patient"])
    receive_file(hospital.app, hospital.answer(filed))
    hospital.run(intake=False)
    outbox = hospital.root / "outbox" / "spine-center"
    before = sorted(p.name for p in outbox.iterdir())

    fresh = hospital.new_app(FHIRBRIDGE_FHIRBRIDGE__STORE_URL=f"sqlite:///{tmp_path / 'restored.db'}")
    try:
        hospital.run(app=fresh)
        again_sent = fresh.store.find_by_order(fresh.hospital.key, sent.service_request)
        again_filed = fresh.store.find_by_order(fresh.hospital.key, filed.service_request)
        assert again_sent.step == "failed" and "no record of it" in again_sent.last_error
        assert again_filed.step == "done"
        assert sorted(p.name for p in outbox.iterdir()) == before   # nothing new went to the reviewer
    finally:
        fresh.close()


def test_the_same_opinion_received_twice_at_once_is_filed_once_and_keeps_its_file(hospital, seeded):
    import threading

    from fhirbridge.loop.receive import opinion_path, process_inbox
    case = hospital.delivered_case(seeded["patient"])
    data = hospital.answer(case).read_bytes()
    barrier, results = threading.Barrier(2), []

    def receive():
        barrier.wait()
        try:
            receive_bytes(hospital.app, data)
            results.append("accepted")
        except RejectedOpinion:
            results.append("refused")

    threads = [threading.Thread(target=receive) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["accepted", "refused"]
    case = hospital.app.store.get(case.id)
    assert case.step == "file" and opinion_path(hospital.app, case).exists()
    hospital.run(intake=False)
    assert hospital.app.store.get(case.id).step == "done"

    # Two inbox passes racing over one file: exactly one takes it.
    second = hospital.delivered_case(seeded["patient"])
    inbox = hospital.app.config.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "answer.jwe").write_bytes(hospital.answer(second).read_bytes())
    passes, barrier2 = [], threading.Barrier(2)

    def sweep():
        barrier2.wait()
        passes.append(process_inbox(hospital.app))

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(p.accepted) for p in passes) == 1 and not any(p.refused or p.deferred for p in passes)
    assert [f.name for f in (inbox / "accepted").iterdir()] == ["answer.jwe"]


def test_a_replica_on_another_data_dir_refuses_to_start(hospital, tmp_path):
    from fhirbridge.config import loader as config_mod
    from fhirbridge.errors import ConfigError
    from fhirbridge.service.scheduler import Service
    first = Service(config_mod.load(hospital.config_path))          # registers its data_dir with the store
    first.stop()
    again = Service(config_mod.load(hospital.config_path))          # same data_dir: fine
    again.stop()
    store_url = f"sqlite:///{hospital.app.config.data_dir / 'fhirbridge.db'}"
    elsewhere = config_mod.load(hospital.config_path, environ={
        "FHIRBRIDGE_FHIRBRIDGE__DATA_DIR": str(tmp_path / "local-disk"), "FHIRBRIDGE_FHIRBRIDGE__STORE_URL": store_url})
    with pytest.raises(ConfigError, match="must share one data_dir"):
        Service(elsewhere)


def test_a_case_whose_work_file_is_gone_collects_again_instead_of_waiting_forever(hospital, seeded):
    from fhirbridge.loop.collect import COLLECTED_FILE
    sr = hospital.order(seeded["patient"])
    hospital.run(case_id="none")
    case = hospital.case_for(sr)
    hospital.app.store.update(case.id, step="seal")                 # as if collected on a lost disk
    assert not (hospital.app.case_dir(case.id) / COLLECTED_FILE).exists()
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "await_opinion"
    assert [e["kind"] for e in hospital.app.store.events(case.id)].count("collect.done") == 1


def test_overdue_flag_never_reopens_a_completed_task(hospital, seeded, fhir):
    from fhirbridge.ehr import task as ehr_task
    case = hospital.delivered_case(seeded["patient"])
    receive_file(hospital.app, hospital.answer(case))
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    before = fhir.read_ref(case.task)
    ehr_task.set_task_status(hospital.app, case, "overdue", only_from=("sent-to-reviewer",))  # a late flag
    ehr_task.set_task_status(hospital.app, case, "await_opinion")                           # a late sync
    after = fhir.read_ref(case.task)
    assert after["status"] == "completed" and after["meta"]["versionId"] == before["meta"]["versionId"]


def test_workers_starting_together_on_a_fresh_volume_all_agree(tmp_path):
    import threading
    from types import SimpleNamespace

    from fhirbridge.service.scheduler import check_shared_data_dir
    errors = []
    cfg = SimpleNamespace(data_dir=tmp_path / "shared", file=tmp_path / "fhirbridge.toml")
    stores = [Store(f"sqlite:///{tmp_path / 's.db'}") for _ in range(4)]
    barrier = threading.Barrier(4)

    def start(store):
        barrier.wait()
        try:
            check_shared_data_dir(cfg, store)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_stopping_service_releases_the_claims_it_holds(hospital, seeded):
    from fhirbridge.config import loader as config_mod
    from fhirbridge.service.scheduler import Service
    sr = hospital.order(seeded["patient"])
    hospital.run(case_id="none")
    case = hospital.case_for(sr)
    svc = Service(config_mod.load(hospital.config_path))
    svc.store.claim(case_id=case.id, worker=svc.worker, lease_seconds=600)   # as if a step were in hand
    svc.store.claim_cursor(hospital.app.hospital.key, "service-requests", worker=svc.worker, lease_seconds=600)
    svc.stop(deadline=1)
    fresh = hospital.app.store.get(case.id)
    assert fresh.claimed_by is None and fresh.claimed_until is None
    assert hospital.app.store.claim_cursor(hospital.app.hospital.key, "service-requests", worker="next",
                                           lease_seconds=5)[0]


# --- the order must still be the one the Case was opened for (S2) ---------------------------------------

@pytest.mark.parametrize("edit, reason", [
    (lambda sr: sr.update(code={"coding": [{"system": "http://loinc.org", "code": "36801-9"}]}),
     "not a second-opinion order"),
    (lambda sr: sr.update(status="completed"), "not active"),
    (lambda sr: sr.update(subject={"reference": "Patient/someone-else"}), "subject is not the Case's patient"),
    (lambda sr: sr.update(performer=[{"identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.9.2"}}]),
     "names another reviewer"),
])
def test_an_order_changed_after_intake_stops_the_case_before_anything_is_sent(two_reviewers, seeded, fhir,
                                                                             edit, reason):
    """Whatever opened the Case, the EHR's own copy of the order, read before each outbound step, must still
    be an active second-opinion order for the Case's patient, routed to the Case's reviewer."""
    h = two_reviewers
    sr = h.order(seeded["patient"], reviewer=next(iter(h.reviewers)))
    h.run(case_id="none")
    case = h.case_for(sr)
    current = fhir.read_ref(f"ServiceRequest/{sr['id']}")
    edit(current)
    fhir.update(current)
    h.run(intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "cancelled" and reason in case.last_error, case.last_error
    assert not (h.root / "outbox").exists()
    assert fhir.read_ref(case.task)["status"] == "cancelled"


def test_an_order_changed_while_waiting_to_deliver_is_not_delivered(hospital, seeded, fhir):
    sr = hospital.order(seeded["patient"])
    hospital.run(case_id="none")
    case = hospital.case_for(sr)
    hospital.app.store.update(case.id, step="deliver", package_id=None)  # as if sealed and waiting
    current = fhir.read_ref(f"ServiceRequest/{sr['id']}")
    current["code"] = {"coding": [{"system": "http://loinc.org", "code": "36801-9"}]}
    fhir.update(current)
    hospital.run(intake=False)
    case = hospital.app.store.get(case.id)
    assert case.step == "cancelled" and "not a second-opinion order" in case.last_error
    assert not (hospital.root / "outbox").exists()
