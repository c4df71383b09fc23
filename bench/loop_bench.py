"""Whole loop: Cases per hour on this machine against sekmet, and how the time grows with patient size.

Per Case, what fhirbridge does is timed: intake, collect, seal and deliver (`run_pending`), then receiving
the sealed opinion and filing it (`receive_file` + `run_pending`). Placing the order (the physician, in
the EHR) and the reviewer opening the package and answering are not fhirbridge's work; the reviewer's
time is reported on its own. Sizes are interleaved in each repetition, so the growth ratios are side by
side. One worker process, steps one after another: Cases per hour = 3600 / seconds per Case.
"""
from __future__ import annotations

import statistics
import time

from fhirbridge.demo.localehr import referring_physician
from fhirbridge.ehr.order import place_order
from fhirbridge.loop.receive import receive_file
from fhirbridge.loop.runner import run_pending

from . import synth
from .common import Bench, side_by_side
from .writeback_bench import reviewer_answers

STEPS = ("collect", "seal", "deliver", "file")


def run(bench: Bench, sizes: list[int], repeats: int, log=print) -> dict:
    app = bench.app()
    patients = {s: synth.load(app.ehr, s, order=False) for s in sizes}
    reviewer_s: dict[int, list[float]] = {s: [] for s in sizes}
    steps: dict[int, dict[str, list[float]]] = {s: {k: [] for k in STEPS} for s in sizes}

    def one_case(size: int) -> dict:
        sr = place_order(app, patient=patients[size].ref, question="Is surgery indicated now?", profile="default",
                     requester=referring_physician(app.ehr))
        started = time.perf_counter()
        run_pending(app)
        outbound = time.perf_counter() - started
        case = app.store.find_by_order(app.hospital.key, f"ServiceRequest/{sr['id']}")
        if case.step != "await_opinion":
            raise RuntimeError(f"loop Case stopped at {case.step}: {case.last_error}")
        r0 = time.perf_counter()
        opinion = reviewer_answers(bench, app, case)
        reviewer_s[size].append(time.perf_counter() - r0)
        started = time.perf_counter()
        receive_file(app, opinion)
        run_pending(app, intake=False)
        inbound = time.perf_counter() - started
        case = app.store.get(case.id)
        if case.step != "done":
            raise RuntimeError(f"loop Case stopped at {case.step}: {case.last_error}")
        for e in app.store.events(case.id):
            step = e["kind"].removesuffix(".done")
            if e["kind"].endswith(".done") and step in STEPS:
                steps[size][step].append(e["detail"].get("seconds", 0.0))
        return {"seconds": outbound + inbound}

    t = side_by_side({s: (lambda s=s: one_case(s)) for s in sizes}, repeats)
    app.close()
    smallest = sizes[0]
    rows = []
    for s in sizes:
        sec = t.median(s)
        rows.append({"size": s, "seconds_per_case": round(sec, 3), "cases_per_hour": round(3600 / sec),
                     "spread": round(t.spread(s), 3),
                     "vs_smallest": round(t.ratio(s, smallest), 2),
                     "ms_per_resource": round(sec / s * 1000, 3),
                     "step_seconds": {k: round(statistics.median(v), 3) for k, v in steps[s].items() if v},
                     "reviewer_seconds": round(statistics.median(reviewer_s[s]), 3),
                     "runs": [round(x, 3) for x in t.runs[s]]})
        log(f"  loop {s}: {sec:.2f} s per Case = {3600 / sec:.0f} Cases/hour; steps {rows[-1]['step_seconds']}")
    return {"rows": rows}
