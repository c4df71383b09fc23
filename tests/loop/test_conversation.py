"""Issue 16, "Done when": one Case walked through the whole conversation against the real EHR (sekmet):
an urgent oncology order -> the reviewer asks for the discharge summary -> the physician supplies it (a
supplement package) -> the reviewer answers with the oncology form -> the physician asks two follow-up
questions -> the reviewer answers both. The EHR then holds exactly one opinion note, two addendum notes
appending it (each with its Provenance), the two Communications and the completed Tasks; the staff API, the
physician page's thread, `status` and the reviewer's view of the package show the same conversation.

Each step's own paths (faults, replays, every write plan, the browser pages) are tested beside its module:
tests/loop/test_supplement.py, tests/loop/test_followups.py, tests/ui/test_physician_followups.py,
tests/ui/test_portal_records.py, tests/ui/test_portal_followups.py.
"""
from __future__ import annotations

import re

import pytest

from fhirbridge.config import loader as config
from fhirbridge.demo.localehr import seed_patient
from fhirbridge.ehr import audit, data_request
from fhirbridge.exchange import followup as wire
from fhirbridge.exchange.render import render_package
from fhirbridge.exchange.reviewer import open_package
from fhirbridge.fhir.validate import validate
from fhirbridge.loop import supplement
from fhirbridge.loop.followup import ask, run_followups, thread
from fhirbridge.loop.receive import receive_bytes, receive_file
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from fhirbridge.store.followups import FollowUps
from tests.kit.hospital import SAMPLE_ANSWER
from tests.loop.test_supplement import QUERY, discharge_summary

pytestmark = pytest.mark.sekmet

ADMIN = "conversation-admin-token-0123456789"
ONCOLOGY = ('histology = "confirmed"\ngrade = "revised"\ngrade_detail = "G2, not G3"\ntnm_stage = "revised"\n'
            'tnm = "cT2 cN0 cM0"\ntreatment_sequencing = "sequence-changed"\n'
            'sequencing_detail = "Neoadjuvant chemotherapy before surgery"\n')
QUESTIONS = ("Would you still advise neoadjuvant chemotherapy if the patient declines a port?",
             "Should the staging CT be repeated before surgery?")
ANSWERS = ("Yes: oral capecitabine is an option without a port.", "Yes, within four weeks of surgery.")


def _own(ehr, fhir) -> dict:
    return seed_patient(ehr, fhir, family="Lindqvist", given="Astrid", profile="oncology")


def _resources(fhir, type_: str, params: dict) -> list[dict]:
    return [r for r in fhir.search(type_, params) if r["resourceType"] == type_]


def test_one_case_goes_through_the_whole_conversation_and_the_chart_holds_each_part_once(hospital, ehr, fhir):
    h = hospital
    text = h.config_path.read_text() + f'\n[api]\ntokens = ["{ADMIN}"]\n'
    h.config_path.write_text(text)
    svc = Service(config.load(h.config_path))
    h.app.close()
    h.app = svc.apps[0]
    client = create_app(svc=svc).test_client()
    staff = {"Authorization": f"Bearer {ADMIN}"}
    try:
        own = _own(ehr, fhir)
        # 1. An urgent order: the package says so first.
        case = h.delivered_case(own["patient"], profile="oncology", priority="urgent")
        opened = h.open(case)
        assert "URGENT" in render_package(opened.claims, opened.document, sender=opened.sender)

        # 2. The reviewer asks for the discharge summary; the chart has one since the package went.
        task = data_request.request_records(h.app, case, "Please send the discharge summary of the last stay.",
                                            QUERY)
        stored, _ = fhir.create(discharge_summary(own["patient"]))
        summary = f"DocumentReference/{stored['id']}"
        listed = client.get(f"/api/cases/{case.id}/requests", headers=staff).get_json()
        [req] = listed["requests"]
        assert req["task"] == task and [c["reference"] for c in req["candidates"] if c["proposed"]] == [summary]

        # 3. The physician supplies it (over the staff API, as the physician page does): a supplement goes.
        r = client.post(f"/api/cases/{case.id}/requests/{task.split('/')[1]}/answer", json={"records": [summary]},
                        headers=staff)
        assert r.status_code == 202, r.get_json()
        h.run(intake=False)
        case = h.app.store.get(case.id)
        assert case.step == "await_opinion", case.last_error
        assert fhir.read_ref(task)["status"] == "completed"
        [sent] = case.data["supplements"]
        rv = h.reviewers[case.reviewer]
        supplement_pkg = open_package(h.root / "outbox" / case.reviewer / sent["package_id"], rv.key, rv.trusted)
        assert supplement_pkg.manifest["supplement_of"] == case.package_id
        assert [a["reference"] for a in supplement_pkg.manifest["added_on_request"]] == [summary]
        assert summary in supplement.already_sent(h.app, case)

        # 4. The reviewer answers with the oncology form; the opinion is filed.
        receive_file(h.app, h.answer(case, ONCOLOGY + SAMPLE_ANSWER))
        h.run(intake=False)
        case = h.app.store.get(case.id)
        assert case.step == "done", case.last_error
        note = case.document_reference

        # 5. Two follow-up questions (one from the API, one as the physician page asks), both answered.
        r = client.post(f"/api/cases/{case.id}/follow-ups", json={"question": QUESTIONS[0]}, headers=staff)
        assert r.status_code == 202, r.get_json()
        ask(h.app, case, QUESTIONS[1], asked_by=h.physician())
        assert run_followups(h.app) == 2
        rows = client.get(f"/api/cases/{case.id}/follow-ups", headers=staff).get_json()["follow_ups"]
        assert [row["state"] for row in rows] == ["sent", "sent"]
        for row, answer_text in zip(rows, ANSWERS, strict=True):
            delivered = h.root / "outbox" / case.reviewer / f"{wire.QUESTION_PREFIX}{row['id']}"
            question = wire.open_question(delivered, rv.key, rv.trusted)
            sealed, _claims = wire.seal_answer(question, answer_text, rv.key)
            assert receive_bytes(h.app, sealed, source="answer").kind == "answer"
        assert run_followups(h.app) == 2
        assert run_followups(h.app) == 0                     # nothing is left to write

        # 6. The chart: one opinion note, two addenda appending it, each with its Provenance; two
        #    Communications about the note; the referral Task and the data request completed.
        notes = _resources(fhir, "DocumentReference", {"patient": own["patient"]})
        addenda = [d for d in notes if any(rel.get("code") == "appends" for rel in d.get("relatesTo", []))]
        assert len(addenda) == 2
        assert all(d["relatesTo"] == [{"code": "appends", "target": {"reference": note}}] for d in addenda)
        opinions = [d for d in notes if f"DocumentReference/{d['id']}" == note]
        assert len(opinions) == 1 and "relatesTo" not in opinions[0]
        assert not [d for d in notes if d is not opinions[0] and d not in addenda
                    and d.get("context", {}).get("related") == [{"reference": case.service_request}]
                    and d["type"] == opinions[0]["type"]]                   # no second opinion note
        for d in [*opinions, *addenda]:
            assert len(_resources(fhir, "Provenance", {"target": f"DocumentReference/{d['id']}"})) == 1
        comms = _resources(fhir, "Communication", {"based-on": case.service_request})
        assert len(comms) == 2
        assert all(c["about"] == [{"reference": note}] and c["status"] == "completed" for c in comms)
        assert sorted(c["payload"][0]["contentString"] for c in comms) == sorted(QUESTIONS)
        assert fhir.read_ref(case.task)["status"] == "completed"
        assert fhir.read_ref(task)["status"] == "completed"

        # 7. What people see: the staff API, the physician page's thread, `status`.
        rows = client.get(f"/api/cases/{case.id}/follow-ups", headers=staff).get_json()
        assert [row["state"] for row in rows["follow_ups"]] == ["filed", "filed"] and rows["remaining"] == 1
        items = thread(h.app, case)
        assert [(i["question"], i["answer"]) for i in items] == list(zip(QUESTIONS, ANSWERS, strict=True))
        listed = client.get(f"/api/cases/{case.id}/requests", headers=staff).get_json()
        assert [q["status"] for q in listed["requests"]] == ["completed"]
        events = [e["kind"] for e in h.app.store.events(case.id)]
        assert "supplement.done" in events

        # 8. The accounting of disclosures (BALP): the package, the supplement, the opinion, each question
        #    sent and each addendum filed, once each, valid FHIR, naming the messages and notes, never the text.
        audits = h.app.store.list_audit(patient=own["patient"])
        assert sorted(a["kind"] for a in audits) == sorted(["disclosure", "disclosure", "filed", "question",
                                                            "question", "addendum", "addendum"])
        assert all(validate(a["resource"]) == [] for a in audits)
        messages = {e["what"]["identifier"]["value"] for a in audits for e in a["resource"]["entity"]
                    if a["kind"] in ("question", "addendum") and "identifier" in e["what"]}
        assert messages == {f"urn:uuid:{row['id']}" for row in rows["follow_ups"]} | \
            {f"urn:uuid:{row['answer_id']}" for row in FollowUps(h.app.store).of_case(case.id, "question")}
        filed_notes = {e["what"]["reference"] for a in audits if a["kind"] == "addendum"
                       for e in a["resource"]["entity"] if "reference" in e["what"]}
        assert filed_notes >= {f"DocumentReference/{d['id']}" for d in addenda}
        assert not re.search(r"capecitabine|staging CT", repr([a["resource"] for a in audits]))
        first = FollowUps(h.app.store).of_case(case.id, "question")[0]   # a step repeated records nothing new
        assert audit.record_followup_sent(h.app, case, followup_id=first["id"], seq=first["seq"],
                                          communication=first["communication"]) is False
        assert audit.record_followup_filed(h.app, case, kind=audit.ADDENDUM_FILED, message_id=first["answer_id"],
                                           seq=first["seq"], document_reference=first["note"]) is False
        assert len(h.app.store.list_audit(patient=own["patient"])) == len(audits)
        login = client.get("/dashboard/login").get_data(as_text=True)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', login).group(1)
        assert client.post("/dashboard/login", data={"csrf_token": csrf, "token": ADMIN}).status_code == 302
        page = " ".join(re.sub(r"<[^>]+>", " ", client.get(f"/dashboard/cases/{case.id}").get_data(as_text=True))
                        .split())
        assert "Supplement package sealed and delivered" in page
        assert page.count("The physician asked the reviewer a follow-up question") == 2
        assert page.count("filed in the chart as an addendum to the opinion note") == 2
        assert not re.search(r"capecitabine|staging CT", repr(h.app.store.events(case.id)))   # no text in the log
    finally:
        svc.stop(wait=True)
