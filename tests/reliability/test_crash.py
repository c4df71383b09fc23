"""Crash suite: a real `fhirbridge worker` process is killed (SIGKILL) at every step boundary and in the
middle of the write-back transaction, round after round. After the restarts every Case completes, no
opinion is lost, and the EHR, searched directly, holds exactly one Task, one DocumentReference and one
Provenance per Case.

The orders are accepted orders (loop/accepted_orders.py), placed in the EHR by the worker; `order.written`
kills it between the ServiceRequest's write and the row that records it.
The boundaries are hit exactly with the test hook FHIRBRIDGE_TEST_CRASH_AT (src/fhirbridge/ops/crashpoints.py):
`<step>.begin` (claimed, nothing done), `<step>.end` (done, not recorded), `<step>.recorded` (recorded, the
Task not yet brought in line), `intake.opened` (Case opened, no Task yet), `receive.written` (opinion file
kept, not accepted), `receive.accepted` (accepted, inbox file not yet moved), `file.committed` (the EHR
answered the transaction). The transaction itself is interrupted by the fault proxy: `tx.before-commit`
kills the worker while its transaction is on the way (the server then commits it for a client that is
gone), `tx.after-commit` once the server committed it, before the answer reaches the worker.

The suite runs once per write plan (issue 14): `atomic` against sekmet as it is; `ledger` and `once` against
sekmet behind the capability proxy as a POST-only EHR (tests/kit/ehrproxy.py profiles `post-only` and
`post-only-no-search`), where `file.DocumentReference.sent` / `file.Provenance.sent` (the write ledger says
sent, the POST not made) replace `file.committed` and `tx.*` cut the POST of the note. On `once` a Case whose
write may have landed stops at needs_review; the test plays the person who looks in the chart (sekmet,
searched directly) and answers with `resolve`. Never a second note, never a second Provenance.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from collections import Counter

import pytest

from fhirbridge.ehr import data_request
from fhirbridge.ehr.order import PLACER_SYSTEM
from fhirbridge.loop import supplement
from fhirbridge.loop.accepted_orders import OrderFields, accept
from fhirbridge.ops.crashpoints import FOLLOWUP_POINTS, POINTS, VARIABLE
from fhirbridge.store.order_requests import OrderRequests
from tests.kit.ehrproxy import PROFILES, EhrProxy
from tests.kit.faultproxy import FaultProxy
from tests.kit.hospital import TestHospital, Worker
from tests.reliability.relkit import duplicates, ehr_copies, review, size

pytestmark = pytest.mark.sekmet

# In pipeline order, so that each point has a Case that can still reach it.
SEQUENCE = ("order.written", "intake.opened", "collect.begin", "collect.end", "collect.recorded", "seal.begin",
            "seal.end", "seal.recorded", "deliver.begin", "deliver.end", "deliver.recorded",
            # Issue 16 part 2: one Case per round gets a request for more records, answered with a document
            # (Driver.supplement_one); its supplement step is cut at each of these.
            "supplement.begin", "supplement.DocumentReference.sent", "supplement.sealed", "supplement.delivered",
            "supplement.end", "supplement.recorded",
            "receive.written", "receive.accepted", "file.begin", "file.committed", "file.DocumentReference.sent",
            "file.Provenance.sent", "file.end", "file.recorded", "tx.before-commit", "tx.after-commit")
POST_POINTS = ("file.DocumentReference.sent", "file.Provenance.sent", "supplement.DocumentReference.sent")
UPLOAD = b"%PDF-1.4\n% an outside operative report (synthetic, crash suite)\n%%EOF\n"
TX = r"^/fhir/?$"
# plan -> (the capability profile of the EHR, None: sekmet as it is; the write a tx.* point cuts)
PLANS = {"atomic": (None, TX), "ledger": ("post-only", r"^/fhir/DocumentReference/?$"),
         "once": ("post-only-no-search", r"^/fhir/DocumentReference/?$")}


def sequence_for(plan: str) -> tuple[str, ...]:
    skip = POST_POINTS if plan == "atomic" else ("file.committed",)
    return tuple(p for p in SEQUENCE if p not in skip)
CASES_PER_ROUND = 5           # enough for every file-step point to find a Case whose transaction is unsent
ROUNDS = size(1, 3)           # kills: 18 per round
KILL_WITHIN = 60              # seconds for a worker to reach its crash point
SETTLE = size(120, 240)       # seconds for the last, unhindered worker to finish every Case
ENV = {"FHIRBRIDGE_SERVICE__WORK_SECONDS": "0.3", "FHIRBRIDGE_SERVICE__POLL_SECONDS": "0.5",
       "FHIRBRIDGE_SERVICE__INBOX_SECONDS": "0.5", "FHIRBRIDGE_SERVICE__LEASE_SECONDS": "3",
       "FHIRBRIDGE_HOSPITAL__HTTP__RETRIES": "2", "FHIRBRIDGE_HOSPITAL__HTTP__MAX_RETRY_AFTER": "0.2"}


def test_the_sequence_covers_every_crash_point():
    # The follow-up, addendum and correction paths have their own suite (test_crash_followups.py).
    assert set(SEQUENCE) - {"tx.before-commit", "tx.after-commit"} == set(POINTS) - set(FOLLOWUP_POINTS)


class Driver:
    """Starts workers with one crash point each, plays the reviewer (an opinion dropped in the inbox for every
    Case that reaches await_opinion, once), and counts the kills."""

    def __init__(self, hospital: TestHospital, proxy: FaultProxy, *, write: str = TX, fhir=None):
        self.hospital, self.proxy, self.store = hospital, proxy, hospital.app.store
        self.write, self.fhir = write, fhir      # the request tx.* cuts; sekmet itself, for the person's look
        self.reviewed = Counter()                # needs_review answered: filed / not filed
        self.answered: dict[str, str] = {}      # Case id -> the opinion (jti) sent for it
        self.kills: Counter = Counter()
        self.answering = False
        self.worker: Worker | None = None
        self.started = 0
        self.supplemented: dict[str, str] = {}   # Case id -> the request Task answered with a document

    def start(self, env: dict) -> Worker:
        self.started += 1
        self.worker = Worker(self.hospital, {**ENV, **env}, self.started)
        return self.worker

    def answer_waiting(self) -> None:
        if not self.answering:
            return
        inbox = self.hospital.app.config.inbox
        inbox.mkdir(parents=True, exist_ok=True)
        for case in self.store.list_cases(steps=("await_opinion",)):
            if case.id in self.answered:
                continue
            sealed = self.hospital.answer(case)
            # Dropped as a transport would: written aside, renamed in, so no worker reads half a file.
            tmp = inbox / f".{sealed.name}.part"
            shutil.copy(sealed, tmp)
            os.rename(tmp, inbox / sealed.name)
            self.answered[case.id] = sealed.stem.removeprefix("opinion-")

    def supplement_one(self) -> None:
        """The reviewer asks for more records on one Case awaiting the opinion, and the physician answers with a
        document: that Case is at `supplement` for the worker (unless one already is)."""
        if self.store.list_cases(steps=("supplement",)):
            return
        app = self.hospital.app
        case = next(c for c in self.store.list_cases(steps=("await_opinion",)) if c.id not in self.supplemented)
        task = data_request.request_records(app, case, "The operative report of the earlier surgery, please.")
        supplement.answer_request(app, self.store.get(case.id), task, records=[], actor="crash suite",
                                  upload=supplement.Upload("Operative report", "application/pdf", UPLOAD))
        self.supplemented[case.id] = task

    def review_waiting(self) -> None:
        """The person at needs_review: looks in the chart (sekmet itself) and answers with `resolve`."""
        for case in self.store.list_cases(steps=("needs_review",)):
            filed = review(self.hospital.app, self.fhir, case)
            if filed is False:           # resolve could not check the answer just then: again next time
                continue
            self.reviewed["filed" if filed else "not filed"] += 1

    def states(self) -> list:
        return sorted((c.step, (c.last_error or "")[:80]) for c in self.store.list_cases())

    def kill_run(self, point: str) -> None:
        rule = None
        if point == "tx.before-commit":
            rule = self.proxy.add(method="POST", path=self.write, action="forward",
                                  before=lambda _p: self.worker.kill(), times=1)
        elif point == "tx.after-commit":
            rule = self.proxy.add(method="POST", path=self.write, action="lose-response",
                                  after=lambda _p: self.worker.kill(), times=1)
        if point.startswith("supplement."):
            self.supplement_one()
        worker = self.start({} if rule else {VARIABLE: point})
        deadline = time.monotonic() + KILL_WITHIN
        while worker.proc.poll() is None:
            self.answer_waiting()
            assert time.monotonic() < deadline, f"{point} not reached in {KILL_WITHIN} s: {self.states()}\n" \
                                                f"{worker.tail()}"
            time.sleep(0.1)
        worker.proc.wait()
        assert worker.proc.returncode == -signal.SIGKILL, worker.tail()
        if rule:
            assert rule.hits == 1
            self.proxy.rules.remove(rule)
        self.kills[point] += 1

    def settle(self) -> None:
        """One worker without a crash point until every Case is done; then a clean stop."""
        self.answering = True
        worker = self.start({})
        deadline = time.monotonic() + SETTLE
        while True:
            self.answer_waiting()
            self.review_waiting()
            cases = self.store.list_cases()
            stuck = [(c.id[:8], c.step, c.last_error) for c in cases if c.step in ("failed", "cancelled")]
            assert not stuck, stuck
            if all(c.step == "done" for c in cases):
                break
            assert worker.proc.poll() is None, worker.tail()
            assert time.monotonic() < deadline, f"not done in {SETTLE} s: {self.states()}\n{worker.tail()}"
            time.sleep(0.2)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=60) == 0, worker.tail()


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_kill_9_at_every_boundary_loses_nothing_and_duplicates_nothing(tmp_path, ehr, own_patient, fhir, figures, plan):
    started = time.monotonic()
    profile_name, write = PLANS[plan]
    profile = PROFILES[profile_name] if profile_name else None
    proxy = EhrProxy(ehr.base_url, profile.behaviour) if profile else FaultProxy(ehr.base_url)
    hospital = TestHospital(tmp_path, proxy.base_url, env=ENV, ehr_pins=profile.pins if profile else None)
    assert hospital.app.write_plan.kind.name == plan.upper()
    driver = Driver(hospital, proxy, write=write, fhir=fhir)
    accepted: list[str] = []
    sequence = sequence_for(plan)
    try:
        for _round in range(ROUNDS):
            driver.answering = False
            # Accepted orders (POST /api/orders with Prefer: respond-async): the worker places them in the EHR,
            # and order.written kills it between the ServiceRequest's write and the row that records it.
            accepted += [accept(hospital.app, OrderFields(patient=own_patient["patient"], question="Is surgery "
                                                          "indicated now?", requester=hospital.physician(),
                                                          profile="spine"))[0]["id"]
                         for _ in range(CASES_PER_ROUND)]
            for i, point in enumerate(sequence):
                driver.answering = i >= sequence.index("receive.written")
                driver.kill_run(point)
        driver.settle()
    except BaseException:
        if driver.worker:
            driver.worker.kill()
            print(driver.worker.tail())
        raise
    finally:
        if driver.worker:
            driver.worker.kill()
        proxy.close()

    store = hospital.app.store
    cases = store.list_cases()
    # Every accepted order was placed once: one ServiceRequest with its placer identifier, however often the
    # worker placing it was killed.
    rows = [OrderRequests(store).get(rid) for rid in accepted]
    assert all(r is not None and r["state"] == "placed" for r in rows), rows
    placed = {rid: [sr["id"] for sr in fhir.search("ServiceRequest", {"identifier": f"{PLACER_SYSTEM}|{rid}"})]
              for rid in accepted}
    assert all(len(ids) == 1 for ids in placed.values()), placed
    orders = {r["service_request"] for r in rows if r}
    # Every order is one Case, finished with the opinion that was sent for it: none lost, none swapped.
    assert {c.service_request for c in cases} == orders and len(cases) == len(orders)
    lost = [c.id[:8] for c in cases if c.step != "done" or c.opinion_id != driver.answered.get(c.id)
            or not c.document_reference]
    assert not lost, lost
    # Each step's result recorded once, however often the step was cut short and redone.
    for c in cases:
        kinds = Counter(e["kind"] for e in store.events(c.id))
        assert [kinds[f"{s}.done"] for s in ("collect", "seal", "deliver", "file")] == [1, 1, 1, 1], (c.id[:8], kinds)
        extra = int(c.id in driver.supplemented)
        assert kinds["supplement.done"] == extra, (c.id[:8], kinds)
        assert sorted(a["kind"] for a in store.list_audit(case_id=c.id)) == ["disclosure"] * (1 + extra) + ["filed"]
    # One package per Case in the outbox (and one supplement per request answered), nothing half-copied.
    outbox = hospital.root / "outbox" / "spine-center"
    supplements = [s["package_id"] for c in cases for s in (c.data or {}).get("supplements", [])]
    assert len(supplements) == len(driver.supplemented) == ROUNDS
    assert sorted(p.name for p in outbox.iterdir()) == sorted([c.package_id for c in cases] + supplements)
    # The EHR: one uploaded document per request answered, and each request completed naming it.
    found = fhir.search("DocumentReference", {"patient": own_patient["patient"]})
    uploads = Counter(i["value"].split("/")[0] for d in found if d["resourceType"] == "DocumentReference"
                      for i in d.get("identifier", []) if i.get("system") == supplement.DOCUMENT_SYSTEM)
    assert uploads == Counter(list(driver.supplemented)), uploads
    for task in driver.supplemented.values():
        t = fhir.read_ref(task)
        assert t["status"] == "completed" and len(t["output"]) == 1, t
    # The inbox is drained: every opinion file accepted, or refused as one received before (its redelivery).
    inbox = hospital.app.config.inbox
    assert not list(inbox.glob("*.jwe")) and not list((inbox / "processing").glob("*"))
    for reason in (inbox / "refused").glob("*.reason.txt") if (inbox / "refused").exists() else []:
        assert "nothing written" in reason.read_text() and ("already" in reason.read_text()
                                                           or "received before" in reason.read_text())
    # The EHR itself: exactly one Task, one consult note and one Provenance per Case, and the Task completed.
    copies = ehr_copies(fhir, cases)
    assert all(copies[kind][c.id] == 1 for kind in copies for c in cases), copies
    assert all(fhir.read_ref(c.task)["status"] == "completed" for c in cases)

    if plan == "once":
        # Never a second POST: each note and each Provenance reached the EHR once (a write the person said was
        # not filed had been cut before it was sent).
        posts = {t: proxy.written(t, "POST") for t in ("DocumentReference", "Provenance")}
        assert posts == {"DocumentReference": len(cases) + len(driver.supplemented), "Provenance": len(cases)}, posts
    if plan != "once":
        assert not driver.reviewed, "only the once plan puts a question to a person"
    figures["crash" if plan == "atomic" else f"crash.{plan}"] = {
                        "plan": plan, "needs_review": dict(driver.reviewed),
                        "kills": sum(driver.kills.values()), "kills_per_point": dict(driver.kills),
                        "worker_starts": driver.started, "cases": len(cases),
                        "opinions_sent": len(driver.answered), "opinions_filed": sum(c.step == "done" for c in cases),
                        "opinions_lost": len(lost), "ehr_duplicates": duplicates(copies),
                        "supplements": len(supplements), "upload_duplicates": sum(n - 1 for n in uploads.values()),
                        "seconds": round(time.monotonic() - started, 1)}
    assert sum(driver.kills.values()) == ROUNDS * len(sequence)
