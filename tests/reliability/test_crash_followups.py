"""Crash suite of the conversation after the opinion (issue 16 parts 3 and 5): a real `fhirbridge worker` is
killed (SIGKILL) at every crash point of the follow-up, addendum and correction paths (ops/crashpoints.py
FOLLOWUP_POINTS), once per write plan. After the restarts every question is sent and answered and every answer
and correction filed, and sekmet, searched directly, holds exactly one Communication per question, one note
(addendum or new version) per answer and correction, and one Provenance per note: 0 duplicates.

On plan ONCE a write whose ledger row says `sent` stops its follow-up at needs_review; the test plays the person
who looks in the chart (sekmet itself) and answers with `resolve_followup` (`fhirbridge resolve --follow-up`).
"""
from __future__ import annotations

import signal
import time
import tomllib
from collections import Counter

import pytest

from fhirbridge.exchange import followup as wire
from fhirbridge.exchange.reviewer import answer_data, open_package
from fhirbridge.loop.followup import ask, ledger_prefixes, resolve_followup, run_followups
from fhirbridge.loop.receive import receive_bytes, receive_file
from fhirbridge.loop.writeback import OPINION_ID_SYSTEM
from fhirbridge.ops.crashpoints import FOLLOWUP_POINTS, VARIABLE
from fhirbridge.store.followups import FollowUps
from tests.kit.ehrproxy import PROFILES, EhrProxy
from tests.kit.hospital import SAMPLE_ANSWER, TestHospital, Worker
from tests.reliability.test_crash import ENV

pytestmark = pytest.mark.sekmet

# In path order; each plan skips the points its writes never pass (ATOMIC has no ledger, LEDGER/ONCE no
# transaction for a note).
SEQUENCE = ("followup.Communication.sent", "followup.written", "followup.end",
            "addendum.committed", "addendum.DocumentReference.sent", "addendum.Provenance.sent", "addendum.end",
            "correction.committed", "correction.DocumentReference.sent", "correction.Provenance.sent",
            "correction.end")
PLANS = {"atomic": None, "ledger": "post-only", "once": "post-only-no-search"}
KILL_WITHIN = 60
SETTLE = 180


def sequence_for(plan: str) -> tuple[str, ...]:
    if plan == "atomic":
        return tuple(p for p in SEQUENCE if not p.endswith(".sent"))
    return tuple(p for p in SEQUENCE if not p.endswith(".committed"))


def test_the_sequence_covers_every_follow_up_crash_point():
    assert set(SEQUENCE) == set(FOLLOWUP_POINTS)


def _kill_at(h: TestHospital, point: str, n: int) -> None:
    worker = Worker(h, {**ENV, VARIABLE: point}, f"{point}-{n}")
    deadline = time.monotonic() + KILL_WITHIN
    try:
        while worker.proc.poll() is None:
            assert time.monotonic() < deadline, f"{point} not reached in {KILL_WITHIN} s\n{worker.tail()}"
            time.sleep(0.1)
        worker.proc.wait()
        assert worker.proc.returncode == -signal.SIGKILL, worker.tail()
    finally:
        worker.kill()


def _look(fhir, app, row: dict) -> str | None:
    """The person at needs_review: is the write in doubt in the chart? (sekmet itself, by identifier)."""
    ledger = app.store.ledger(row["case_id"])
    [(kind, entry)] = [(k, v) for k, v in ledger.items() if v["state"] == "sent" and k.startswith(ledger_prefixes(row))]
    rtype = kind.split(".", 1)[1]
    if rtype == "Provenance":
        note = entry["identifier"].split("|")[0]
        found = [p for p in fhir.search("Provenance", {"target": note}) if p["resourceType"] == "Provenance"]
    else:
        found = [r for r in fhir.search(rtype, {"identifier": entry["identifier"]}) if r["resourceType"] == rtype]
    return f"{rtype}/{found[0]['id']}" if found else None


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_kill_9_in_the_follow_up_paths_duplicates_nothing(tmp_path, ehr, own_patient, fhir, figures, plan):
    started = time.monotonic()
    profile = PROFILES[PLANS[plan]] if PLANS[plan] else None
    proxy = EhrProxy(ehr.base_url, profile.behaviour) if profile else None
    h = TestHospital(tmp_path, proxy.base_url if proxy else ehr.base_url, env=ENV,
                     ehr_pins=profile.pins if profile else None)
    assert h.app.write_plan.kind.name == plan.upper()
    app, followups = h.app, FollowUps(h.app.store)
    reviewer = h.reviewers["spine-center"]
    sequence = sequence_for(plan)
    kills: Counter = Counter()
    reviewed = 0
    try:
        cases = []
        for _ in range(4):   # questions spread over the Cases (3 each at most), one correction per Case
            case = h.delivered_case(own_patient["patient"])
            receive_file(app, h.answer(case))
            h.run(intake=False)
            cases.append(app.store.get(case.id))
            assert cases[-1].step == "done", cases[-1].last_error
        asked = iter([c for c in cases for _ in range(3)])
        corrected = iter(cases)

        def answer(row: dict) -> None:
            delivered = h.root / "outbox" / "spine-center" / f"{wire.QUESTION_PREFIX}{row['id']}"
            question = wire.open_question(delivered, reviewer.key, reviewer.trusted)
            receive_bytes(app, wire.seal_answer(question, f"Answer to question {row['seq']}.", reviewer.key)[0])

        for n, point in enumerate(sequence):
            if point.startswith("followup."):
                ask(app, next(asked), f"Follow-up question before the kill at {point}?")
            elif point.startswith("addendum."):
                row = ask(app, next(asked), f"A question answered before the kill at {point}?")
                assert run_followups(app, followup_id=row["id"]) == 1
                answer(followups.get(row["id"]))
            else:
                case = next(corrected)
                opened = open_package(h.package_path(case), reviewer.key, reviewer.trusted)
                data = {**tomllib.loads(SAMPLE_ANSWER), "free_text": f"Corrected before the kill at {point}."}
                receive_bytes(app, answer_data(opened, data, reviewer.key, mappings_dir=app.config.mappings_dir,
                                               replaces=case.opinion_id)[0])
            _kill_at(h, point, n)
            kills[point] += 1

        # Settle: a worker without a crash point; the test answers what is sent and resolves what needs review.
        worker = Worker(h, ENV, "settle")
        deadline = time.monotonic() + SETTLE
        try:
            while True:
                rows = [r for c in cases for r in followups.of_case(c.id)]
                for r in rows:
                    if r["state"] == "sent":
                        answer(r)
                    elif r["state"] == "needs_review":
                        resolve_followup(app, app.store.get(r["case_id"]), r["id"], filed=_look(fhir, app, r))
                        reviewed += 1
                assert not [r for r in rows if r["state"] == "failed"], [r["error"] for r in rows]
                if all(r["state"] == "filed" for r in rows):
                    break
                assert worker.proc.poll() is None, worker.tail()
                assert time.monotonic() < deadline, ([(r["kind"], r["seq"], r["state"], r["error"]) for r in rows],
                                                     worker.tail())
                time.sleep(0.3)
        finally:
            worker.stop()
        if plan == "once":
            # Never a second POST: each write reached the EHR once (one the person said was not filed had been cut
            # before it was sent). The opinions' own notes and Provenances were POSTed too, once per Case.
            done = [r for c in cases for r in followups.of_case(c.id)]
            notes = len(done) + len(cases)
            posts = {t: proxy.written(t, "POST") for t in ("Communication", "DocumentReference", "Provenance")}
            assert posts == {"Communication": sum(r["kind"] == "question" for r in done), "DocumentReference": notes,
                             "Provenance": notes}, posts
    finally:
        h.close()
        if proxy:
            proxy.close()

    rows = [r for c in cases for r in followups.of_case(c.id)]
    questions = [r for r in rows if r["kind"] == "question"]
    corrections = [r for r in rows if r["kind"] == "correction"]
    copies = Counter()
    for r in questions:
        comms = [c for c in fhir.search("Communication", {"identifier": f"{OPINION_ID_SYSTEM}|urn:uuid:{r['id']}"})
                 if c["resourceType"] == "Communication"]
        copies[f"Communication {len(comms)}"] += 1
    for r in questions + corrections:
        notes = [d for d in fhir.search("DocumentReference",
                                        {"identifier": f"{OPINION_ID_SYSTEM}|urn:uuid:{r['answer_id']}"})
                 if d["resourceType"] == "DocumentReference"]
        copies[f"{r['kind']} note {len(notes)}"] += 1
        assert [f"DocumentReference/{d['id']}" for d in notes] == [r["note"]]
        provs = [p for p in fhir.search("Provenance", {"target": r["note"]}) if p["resourceType"] == "Provenance"]
        copies[f"{r['kind']} provenance {len(provs)}"] += 1
    assert copies == Counter({"Communication 1": len(questions), "question note 1": len(questions),
                              "question provenance 1": len(questions), "correction note 1": len(corrections),
                              "correction provenance 1": len(corrections)}), copies
    if plan != "once":
        assert reviewed == 0, "only the once plan puts a question to a person"
    figures[f"crash.followups.{plan}"] = {"plan": plan, "kills": sum(kills.values()), "kills_per_point": dict(kills),
                                          "questions": len(questions), "corrections": len(corrections),
                                          "needs_review": reviewed, "ehr_duplicates": 0,
                                          "seconds": round(time.monotonic() - started, 1)}
    assert sum(kills.values()) == len(sequence)
