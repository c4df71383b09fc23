"""Write-back: filing one received opinion in the EHR, side by side with the one raw transaction POST of
the same resources, and the HTTP round trips fhirbridge makes per filed opinion.

Set-up (untimed): Cases are taken through the real loop (order, collect, seal, deliver, the reviewer's
answer, receive) until each waits at the `file` step. Then, interleaved:

* fhirbridge `file_opinion`: open and re-verify the sealed opinion, look for an already filed copy, read
  the Task, POST one transaction (Binary, DocumentReference, Provenance, Task);
* fhirbridge file step: the same through `workflow.run_step`, as the service runs it (store records, the
  BALP AuditEvent, the Task sync after the step);
* raw: `requests.post` of the transaction Bundle fhirbridge builds for another Case (built untimed):
  the least any client could do to file the same resources.
"""
from __future__ import annotations

import statistics

import requests

from fhirbridge import jsonutil
from fhirbridge.demo.localehr import referring_physician
from fhirbridge.ehr.order import place_order
from fhirbridge.exchange import envelope
from fhirbridge.exchange.reviewer import answer, open_package
from fhirbridge.loop.receive import opinion_path, receive_file
from fhirbridge.loop.runner import run_pending, run_step
from fhirbridge.loop.writeback import build_transaction, file_opinion
from fhirbridge.store.store import worker_id

from . import synth, traffic
from .common import Bench, side_by_side

ANSWER = '''\
concordance = "concordant"
recommendation = "proceed-as-planned"
alternatives = ["Physiotherapy"]
risks_benefits = "Synthetic benchmark answer."
urgency = "routine"
free_text = "Agree with the plan."
'''


def cases_at_file_step(bench: Bench, app, patient_ref: str, n: int) -> list:
    """`n` Cases taken through the loop until their opinions are received (step `file`). All are ordered
    and delivered first, then all answered: a run in between would file the ones already received."""
    orders = [place_order(app, patient=patient_ref, question="Is surgery indicated now?", profile="default",
                     requester=referring_physician(app.ehr))
              for _ in range(n)]
    run_pending(app)
    out = []
    for sr in orders:
        case = app.store.find_by_order(app.hospital.key, f"ServiceRequest/{sr['id']}")
        if case is None or case.step != "await_opinion":
            raise RuntimeError(f"benchmark Case did not reach await_opinion: {case and case.last_error}")
        receive_file(app, reviewer_answers(bench, app, case))
        out.append(app.store.get(case.id))
    return out


def reviewer_answers(bench: Bench, app, case):
    opened = open_package(bench.root / "outbox" / case.package_id, bench.reviewer_key, bench.trusted)
    answer_file = bench.root / f"answer-{case.id[:8]}.toml"
    answer_file.write_text(ANSWER)
    sealed, claims = answer(opened, answer_file, bench.reviewer_key, bench.trusted,
                            mappings_dir=app.config.mappings_dir)
    out = bench.root / f"opinion-{claims['jti']}.jwe"
    out.write_bytes(sealed)
    return out


def raw_transaction(app, case) -> bytes:
    """The transaction fhirbridge would POST for this Case, as bytes (built here, untimed)."""
    claims, document = envelope.open_sealed(opinion_path(app, case).read_bytes(), typ=envelope.OPINION,
                                            decrypt=app.hospital_keys, trusted=app.reviewer_keys(case.reviewer),
                                            check_expiry=False)
    task = app.ehr.read_ref(case.task)
    tx = build_transaction(app, case, claims, document, task)
    tx["entry"][-1]["request"]["ifMatch"] = f'W/"{task["meta"]["versionId"]}"'
    return jsonutil.dumps(tx)


def run(bench: Bench, repeats: int, log=print) -> dict:
    app = bench.app()
    patient = synth.load(app.ehr, 10, order=False)
    need = repeats + 1   # + warm-up
    ready = cases_at_file_step(bench, app, patient.ref, 3 * need)
    cases = {k: ready[i * need:(i + 1) * need] for i, k in enumerate(("file_opinion", "file step", "raw"))}
    raw_bodies = [raw_transaction(app, c) for c in cases["raw"]]
    session = requests.Session()
    session.trust_env = False
    trips: dict[str, list[list[str]]] = {"file_opinion": [], "file step": [], "raw": []}

    def fb_file_opinion():
        case = cases["file_opinion"].pop()
        with traffic.counted() as seen:
            file_opinion(app, case)
        trips["file_opinion"].append(seen)

    def fb_step():
        case = app.store.claim(case_id=cases["file step"].pop().id, worker=worker_id(), lease_seconds=300)
        with traffic.counted() as seen:
            if not run_step(app, case):
                raise RuntimeError(f"file step failed: {app.store.get(case.id).last_error}")
        trips["file step"].append(seen)

    def raw():
        body = raw_bodies.pop()
        with traffic.counted() as seen:
            r = session.post(app.hospital.fhir_base_url, data=body,
                             headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"})
            r.raise_for_status()
        trips["raw"].append(seen)

    t = side_by_side({"fhirbridge file_opinion": fb_file_opinion, "fhirbridge file step": fb_step,
                      "raw transaction POST": raw}, repeats)
    session.close()
    app.close()
    names = list(t.runs)
    row = {"median_s": {n: round(t.median(n), 4) for n in names},
           "spread": {n: round(t.spread(n), 3) for n in names},
           "runs": {n: [round(x, 4) for x in v] for n, v in t.runs.items()},
           "vs_raw": {n: round(t.ratio(n, "raw transaction POST"), 2) for n in names[:2]},
           "round_trips": {k: statistics.median(len(x) for x in v) for k, v in trips.items()},
           "requests": {k: v[-1] for k, v in trips.items()}}
    log("  write-back: " + ", ".join(f"{n} {row['median_s'][n] * 1000:.1f} ms" for n in names)
        + f"; round trips {row['round_trips']}; {row['requests']['file step']}")
    return row
