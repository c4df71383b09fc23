"""Issue 16 parts 3 and 5: follow-up questions after the opinion, their answers as addendum notes, corrected
opinions as new versions, each written exactly once on every write plan (sekmet, behind the capability proxy
for the POST-only plans). What is written is counted in sekmet directly, never through the proxy.
"""
from __future__ import annotations

import base64
import tomllib

import pytest

from fhirbridge.ehr.write_plan import Kind
from fhirbridge.errors import RejectedOpinion
from fhirbridge.exchange import followup as wire
from fhirbridge.exchange.reviewer import answer_data, open_package
from fhirbridge.loop.followup import NotAskable, ask, message_dir, run_followups, thread
from fhirbridge.loop.followup_inbound import AlreadyAnswered, UnknownQuestion
from fhirbridge.loop.receive import process_inbox, receive_bytes, receive_file
from fhirbridge.loop.writeback import OPINION_ID_SYSTEM
from fhirbridge.store.followups import FollowUps, OverLimit
from tests.kit.ehrproxy import PROFILES, EhrProxy
from tests.kit.hospital import SAMPLE_ANSWER, TestHospital

pytestmark = pytest.mark.sekmet

FAST = {"FHIRBRIDGE_HOSPITAL__HTTP__RETRIES": "1", "FHIRBRIDGE_HOSPITAL__HTTP__MAX_RETRY_AFTER": "0.2"}
PLANS = {"atomic": None, "ledger": "post-only", "once": "post-only-no-search"}


@pytest.fixture
def planned(tmp_path, ehr, request):
    """A test hospital whose EHR makes the write plan named by the parameter."""
    name = PLANS[request.param]
    proxy = EhrProxy(ehr.base_url, PROFILES[name].behaviour) if name else None
    h = TestHospital(tmp_path, proxy.base_url if proxy else ehr.base_url, env=FAST,
                     ehr_pins=PROFILES[name].pins if name else None)
    assert h.app.write_plan.kind is Kind[request.param.upper()]
    try:
        yield h
    finally:
        h.close()
        if proxy:
            proxy.close()


def filed_case(h: TestHospital, patient: str):
    case = h.delivered_case(patient)
    receive_file(h.app, h.answer(case))
    h.run(intake=False)
    case = h.app.store.get(case.id)
    assert case.step == "done", case.last_error
    return case


def by_identifier(fhir, type_: str, message_id: str) -> list[dict]:
    return [r for r in fhir.search(type_, {"identifier": f"{OPINION_ID_SYSTEM}|urn:uuid:{message_id}"})
            if r["resourceType"] == type_]


def provenances(fhir, ref: str) -> int:
    return sum(1 for p in fhir.search("Provenance", {"target": ref}) if p["resourceType"] == "Provenance")


def reviewer_answers(h: TestHospital, case, row: dict, text: str) -> bytes:
    """The reviewer opens the delivered question (the outbox transport's folder) and seals an answer."""
    r = h.reviewers[case.reviewer]
    delivered = h.root / "outbox" / case.reviewer / f"{wire.QUESTION_PREFIX}{row['id']}"
    question = wire.open_question(delivered, r.key, r.trusted)
    assert question.claims["case_id"] == case.id and question.claims["seq"] == row["seq"]
    sealed, _claims = wire.seal_answer(question, text, r.key)
    return sealed


@pytest.mark.parametrize("planned", sorted(PLANS), indirect=True)
def test_a_question_and_its_answer_are_written_exactly_once(planned, fhir, seeded):
    h = planned
    case = filed_case(h, seeded["patient"])
    row = ask(h.app, case, "Would you still advise surgery if the pain settles with physiotherapy?",
              asked_by=h.physician())
    assert row["state"] == "asked" and row["seq"] == 1
    assert run_followups(h.app) == 1
    row = FollowUps(h.app.store).get(row["id"])
    assert row["state"] == "sent", row["error"]
    [comm] = by_identifier(fhir, "Communication", row["id"])
    assert f"Communication/{comm['id']}" == row["communication"]
    assert comm["status"] == "completed"
    assert comm["basedOn"] == [{"reference": case.service_request}]
    assert comm["about"] == [{"reference": case.document_reference}]
    assert comm["subject"]["reference"] == seeded["patient"]
    assert comm["sender"]["reference"] == h.physician()
    assert comm["recipient"][0]["identifier"]["value"] == "urn:oid:2.999.9.1"
    assert "physiotherapy" in comm["payload"][0]["contentString"]
    # Running again sends nothing more: the row is sent; the sealed message is kept for the pull API.
    assert run_followups(h.app) == 0
    assert (message_dir(h.app, case.id, row["id"]) / "package.jwe").exists()

    sealed = reviewer_answers(h, case, row, "Yes: the disc herniation compresses the L5 root.\n\nRe-image first.")
    received = receive_bytes(h.app, sealed, source="answer")
    assert received.kind == "answer" and received.case.id == case.id
    assert run_followups(h.app) == 1
    row = FollowUps(h.app.store).get(row["id"])
    assert row["state"] == "filed", row["error"]
    [note] = by_identifier(fhir, "DocumentReference", row["answer_id"])
    assert f"DocumentReference/{note['id']}" == row["note"]
    assert note["relatesTo"] == [{"code": "appends", "target": {"reference": case.document_reference}}]
    assert note["subject"]["reference"] == seeded["patient"]
    assert {"reference": case.service_request} in note["context"]["related"]
    assert provenances(fhir, row["note"]) == 1
    texts = [base64.b64decode(c["attachment"]["data"]).decode() for c in note["content"]
             if c["attachment"]["contentType"].startswith("text/plain")]
    assert texts and "L5 root" in texts[0] and "physiotherapy" in texts[0]

    # A replay of the same answer, and a second answer to the question: refused, nothing written.
    with pytest.raises(AlreadyAnswered):
        receive_bytes(h.app, sealed)
    with pytest.raises(AlreadyAnswered):
        receive_bytes(h.app, reviewer_answers(h, case, row, "Another answer"))
    assert run_followups(h.app) == 0
    assert len(by_identifier(fhir, "DocumentReference", row["answer_id"])) == 1
    assert len(by_identifier(fhir, "Communication", row["id"])) == 1
    [item] = thread(h.app, case)
    assert item["state"] == "filed" and "physiotherapy" in item["question"] and "L5 root" in item["answer"]


def test_the_limit_an_unknown_question_and_an_unfiled_case_are_refused(hospital, fhir, seeded):
    h = hospital
    case = h.delivered_case(seeded["patient"])
    with pytest.raises(NotAskable):
        ask(h.app, case, "Too early?")
    receive_file(h.app, h.answer(case))
    h.run(intake=False)
    case = h.app.store.get(case.id)
    rows = [ask(h.app, case, f"Question {i}?") for i in range(3)]
    assert [r["seq"] for r in rows] == [1, 2, 3]
    with pytest.raises(OverLimit, match="the most its reviewer answers"):
        ask(h.app, case, "A fourth?")
    assert len(FollowUps(h.app.store).of_case(case.id)) == 3
    assert not list((h.app.case_dir(case.id)).glob("question-*.jwe"))[3:]
    assert run_followups(h.app) == 3
    # An answer naming a question this hospital never asked: refused, nothing written.
    r = h.reviewers[case.reviewer]
    question = wire.open_question(h.root / "outbox" / case.reviewer / f"{wire.QUESTION_PREFIX}{rows[0]['id']}",
                                  r.key, r.trusted)
    forged = wire.OpenedQuestion({**question.claims, "jti": "00000000-0000-4000-8000-000000000000"},
                                 question.communication, question.hospital)
    sealed, _ = wire.seal_answer(forged, "An answer to nothing", r.key)
    with pytest.raises(UnknownQuestion) as refused:
        receive_bytes(h.app, sealed)
    assert refused.value.exit_code == 2
    assert all(row["state"] == "sent" for row in FollowUps(h.app.store).of_case(case.id))


@pytest.mark.parametrize("planned", sorted(PLANS), indirect=True)
def test_a_corrected_opinion_is_a_new_version_filed_once(planned, fhir, seeded):
    h = planned
    case = filed_case(h, seeded["patient"])
    r = h.reviewers[case.reviewer]
    opened = open_package(h.package_path(case), r.key, r.trusted)
    data = {**tomllib.loads(SAMPLE_ANSWER), "free_text": "Corrected: no surgery now; physiotherapy first.",
            "recommendation": "non-surgical-care", "concordance": "discordant"}
    assert (h.app.store.get(case.id).recommendation, h.app.store.outcomes.get(case.id).recommendation) == \
        ("proceed-as-planned", "proceed-as-planned")
    sealed, claims = answer_data(opened, data, r.key, mappings_dir=h.app.config.mappings_dir,
                                 replaces=case.opinion_id)
    received = receive_bytes(h.app, sealed)
    assert received.kind == "correction"
    with pytest.raises(RejectedOpinion):
        receive_bytes(h.app, sealed)   # a replay
    assert run_followups(h.app) == 1
    [row] = FollowUps(h.app.store).of_case(case.id, "correction")
    assert row["state"] == "filed", row["error"]
    [note] = by_identifier(fhir, "DocumentReference", claims["jti"])
    assert note["relatesTo"] == [{"code": "replaces", "target": {"reference": case.document_reference}}]
    assert provenances(fhir, row["note"]) == 1
    [imported] = [a["resource"] for a in h.app.store.list_audit(patient=case.patient, case_id=case.id)
                  if a["kind"] == "correction"]          # BALP: the corrected opinion, imported once
    assert imported["type"]["code"] == "110107"
    # The figures count the current version: the Case's summary and its outcome row carry the corrected codes.
    now = h.app.store.get(case.id)
    assert (now.recommendation, now.concordance, now.filed_at) == ("non-surgical-care", "discordant", case.filed_at)
    outcome = h.app.store.outcomes.get(case.id)
    assert (outcome.recommendation, outcome.concordance) == ("non-surgical-care", "discordant")
    assert {"reference": row["note"]} in [e["what"] for e in imported["entity"]]
    old = fhir.read_ref(case.document_reference)
    if h.app.write_plan.kind is Kind.ATOMIC:
        assert old["status"] == "superseded"
    else:
        assert old["status"] == "current"
        assert any(e["kind"] == "correction.not_superseded" for e in h.app.store.events(case.id))
    # A correction of a version that is no longer current is refused.
    stale, _ = answer_data(opened, data, r.key, mappings_dir=h.app.config.mappings_dir, replaces=case.opinion_id)
    with pytest.raises(RejectedOpinion, match="current version"):
        receive_bytes(h.app, stale)



def test_an_answer_dropped_in_the_inbox_is_filed_and_its_copy_refused(hospital, fhir, seeded):
    """The inbox takes answers as it takes opinions: accepted once, a second copy refused with the reason."""
    h = hospital
    case = filed_case(h, seeded["patient"])
    row = ask(h.app, case, "Is a brace needed?")
    assert run_followups(h.app) == 1
    sealed = reviewer_answers(h, case, FollowUps(h.app.store).get(row["id"]), "No brace.")
    inbox = h.app.config.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "answer-1.jwe").write_bytes(sealed)
    (inbox / "answer-2.jwe").write_bytes(sealed)
    result = process_inbox(h.app)
    assert [r.kind for r in result.accepted] == ["answer"]
    assert len(result.refused) == 1 and "replay" in result.refused[0][1]
    assert run_followups(h.app) == 1
    row = FollowUps(h.app.store).get(row["id"])
    assert row["state"] == "filed" and len(by_identifier(fhir, "DocumentReference", row["answer_id"])) == 1
