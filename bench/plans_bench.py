"""Write plans (issue 14): the whole `file` step per write plan, side by side in one run, with the HTTP round
trips each makes per filed opinion.

Set-up (untimed): Cases are taken through the real loop until each waits at the `file` step (as in
writeback_bench). The same sekmet serves every plan: the plan is chosen by pinning capabilities in
`[hospital.ehr]` (a copy of the bench's config per plan), which is what changes what fhirbridge sends:
* atomic: read Task, one transaction (PUT Binary, PUT DocumentReference, POST Provenance, PUT Task);
* ledger: read Task, POST DocumentReference (If-None-Exist), POST Provenance, PUT Task, each recorded in the
  write ledger before it is sent;
* once: the same POSTs, no conditional create and no identifier search.
The ratio of each plan's step to the atomic plan's is the median of the per-repetition ratios.
"""
from __future__ import annotations

import statistics

from fhirbridge.config import loader as config
from fhirbridge.ehr.context import App
from fhirbridge.loop.runner import run_step
from fhirbridge.store.store import worker_id

from . import synth, traffic
from .common import Bench, side_by_side
from .writeback_bench import cases_at_file_step

PINS = {
    "atomic": "",
    "ledger": "transaction = false\nupdate_create = false\n",
    "once": "transaction = false\nupdate_create = false\nconditional_create = false\n"
            "docref_identifier_search = false\nprovenance_target_search = false\n",
}
# The PDF rendering is not selected here: its cost is the renderer's (exchange/pdf.py), not the plan's.
DOC = 'attachment_types = ["application/fhir+json", "text/plain"]\n'


def app_for(bench: Bench, plan: str) -> App:
    path = bench.config_path.with_name(f"fhirbridge-plan-{plan}.toml")
    extra = PINS[plan] + (DOC if plan != "atomic" else "")
    path.write_text(bench.config_path.read_text() + (f"\n[hospital.ehr]\n{extra}" if extra else ""))
    app = App(config.load(path, environ={}))
    assert app.write_plan.kind.name == plan.upper(), app.write_plan
    return app


def run(bench: Bench, repeats: int, log=print) -> dict:
    setup = bench.app()
    patient = synth.load(setup.ehr, 10, order=False)
    need = repeats + 1   # + warm-up
    ready = cases_at_file_step(bench, setup, patient.ref, len(PINS) * need)
    setup.close()
    apps = {plan: app_for(bench, plan) for plan in PINS}
    cases = {plan: ready[i * need:(i + 1) * need] for i, plan in enumerate(PINS)}
    trips: dict[str, list[list[str]]] = {plan: [] for plan in PINS}

    def step(plan: str):
        def go():
            app = apps[plan]
            case = app.store.claim(case_id=cases[plan].pop().id, worker=worker_id(), lease_seconds=300)
            with traffic.counted() as seen:
                if not run_step(app, case):
                    raise RuntimeError(f"{plan} file step failed: {app.store.get(case.id).last_error}")
            trips[plan].append(seen)
        return go

    t = side_by_side({f"file step, {plan}": step(plan) for plan in PINS}, repeats)
    for app in apps.values():
        app.close()
    names = list(t.runs)
    row = {"median_s": {n: round(t.median(n), 4) for n in names},
           "spread": {n: round(t.spread(n), 3) for n in names},
           "runs": {n: [round(x, 4) for x in v] for n, v in t.runs.items()},
           "vs_atomic": {n: round(t.ratio(n, "file step, atomic"), 2) for n in names[1:]},
           "round_trips": {k: statistics.median(len(x) for x in v) for k, v in trips.items()},
           "requests": {k: v[-1] for k, v in trips.items()}}
    log("  write plans: " + ", ".join(f"{n} {row['median_s'][n] * 1000:.1f} ms" for n in names)
        + f"; round trips {row['round_trips']}")
    return row
