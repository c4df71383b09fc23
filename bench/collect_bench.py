"""Collect: fhirbridge pulling one patient's records, side by side with

* bound, the best fetch (issue 19): the fastest way this server hands over the same records, measured in
  the same run, each repetition's bound the faster of
  - `Patient/$everything` (sekmet offers it) with one page as large as the record, and
  - fhirbridge's own searches and reads as it sends them with `_count` = BEST_PAGE (recorded from its
    session), replayed by 8 threads;
  both by a minimal `requests` script, each thread its own keep-alive session, bodies read and nothing else.
  The bound used to replay fhirbridge's requests at its configured page size, so a worse request plan
  inflated the bound and flattered the ratio (at 10k resources 2.2x the best fetch);
* naive: what a user would otherwise write: `fhirclient`, one search per type at the server's default page
  size, following next links, then each referenced resource read one by one (depth 2, like fhirbridge).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import requests

from fhirbridge.loop.collect import FOLLOW_DEPTH, FOLLOW_TYPES, collect, iter_references

from . import synth, traffic
from .common import Bench, side_by_side

BOUND_THREADS = 8
BEST_PAGE = 10000   # larger than any record here: each search is one page


def record_urls(fn) -> list[str]:
    """The URL of every GET fhirbridge sends (its client and the sibling clients it fetches with) in `fn`."""
    with traffic.urls() as seen:
        fn()
    return seen


class Replayer:
    """The bound: fetch a list of URLs with a thread pool of keep-alive sessions, bodies read, not parsed."""

    def __init__(self, threads: int = BOUND_THREADS):
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(threads)

    def _session(self) -> requests.Session:
        s = getattr(self.local, "s", None)
        if s is None:
            s = self.local.s = requests.Session()
            s.trust_env = False
            s.headers["Accept"] = "application/fhir+json"
        return s

    def _get(self, url: str) -> int:
        r = self._session().get(url, timeout=300)
        r.raise_for_status()
        return len(r.content)

    def fetch(self, urls: list[str]) -> int:
        return sum(self.pool.map(self._get, urls))

    def close(self) -> None:
        self.pool.shutdown()


def everything(base_url: str, patient_id: str) -> int:
    """`Patient/$everything` in pages of BEST_PAGE, next links followed; bodies read, not parsed."""
    s = requests.Session()
    s.trust_env = False
    s.headers["Accept"] = "application/fhir+json"
    url: str | None = f"{base_url}/Patient/{patient_id}/$everything?_count={BEST_PAGE}"
    total = 0
    while url:
        r = s.get(url, timeout=300)
        r.raise_for_status()
        total += len(r.content)
        url = None
        if b'"next"' in r.content:   # parse only when there is a next page to find
            url = next((link["url"] for link in r.json().get("link", []) if link.get("relation") == "next"), None)
    s.close()
    return total


def naive_fhirclient(base_url: str, patient_id: str, types: list[str]) -> int:
    """A sequential pull with fhirclient at the server's default page size; returns resources fetched."""
    import importlib

    from fhirclient import client as fc

    smart = fc.FHIRClient(settings={"app_id": "bench", "api_base": base_url + "/"})
    server = smart.server

    def model(rtype: str):
        return getattr(importlib.import_module(f"fhirclient.models.{rtype.lower()}"), rtype)

    model("Patient").read(patient_id, server)
    got: list = []
    for rtype in types:
        got += list(model(rtype).where(struct={"patient": patient_id}).perform_resources_iter(server))
    seen = {f"{r.resource_type}/{r.id}" for r in got}
    frontier = got
    for _ in range(FOLLOW_DEPTH):
        wanted = []
        for r in frontier:
            for ref in iter_references(r.as_json()):
                parts = ref.split("/")
                if len(parts) == 2 and parts[0] in FOLLOW_TYPES and ref not in seen:
                    seen.add(ref)
                    wanted.append(parts)
        frontier = [model(t).read(i, server) for t, i in wanted]
        got += frontier
    return len(got)


def diagnose(app, patient, profile, now) -> dict:
    """Where fhirbridge's time goes, measured after the side-by-side run: the CPU one collect costs this
    process, and how much of it is structural validation (fhir.resources) of the records received."""
    import time

    from fhirbridge.fhir.validate import validate

    cpu, wall = time.process_time(), time.perf_counter()
    collected = collect(app, patient.service_request, profile, now=now)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    records = [collected.patient, *collected.resources]
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for r in records:
            validate(r)
        best = min(best, time.process_time() - started)
    return {"collect_wall_s": round(wall, 4), "collect_cpu_s": round(cpu, 4), "validate_cpu_s": round(best, 4),
            "validate_us_per_resource": round(best / len(records) * 1e6, 1)}


def run(bench: Bench, sizes: list[int], repeats: dict[int, int], *, naive: bool = True,
        page_sizes: tuple[int | None, ...] = (None,), log=print) -> dict:
    app_by_page = {ps: (bench.app(**({"FHIRBRIDGE_HOSPITAL__HTTP__PAGE_SIZE": str(ps)} if ps else {})))
                   for ps in (*page_sizes, BEST_PAGE)}
    any_app = next(iter(app_by_page.values()))
    profile = any_app.profile("default")
    replayer = Replayer()
    results = []
    try:
        for size in sizes:
            patient = synth.load(any_app.ehr, size)
            log(f"  collect: patient of {size} resources loaded in {patient.load_seconds:.1f} s")
            now = datetime.now(UTC)
            contenders, requests_by = {}, {}
            for ps, app in app_by_page.items():
                holder: dict = {}
                urls = record_urls(lambda a=app, h=holder, p=patient, n=now: h.setdefault(
                    "c", collect(a, p.service_request, profile, now=n)))
                shared = len(holder["c"].resources)
                if shared != size:
                    raise RuntimeError(f"fhirbridge collected {shared} of {size} resources")
                if ps == BEST_PAGE:
                    requests_by["best fetch: searches"] = len(urls)
                    contenders["best fetch: searches"] = lambda u=urls: replayer.fetch(u)
                    continue
                label = "fhirbridge" if ps is None else f"fhirbridge page_size={ps}"
                requests_by[label] = len(urls)
                contenders[label] = lambda a=app, p=patient, n=now: collect(a, p.service_request, profile, now=n)
            contenders["best fetch: $everything"] = lambda p=patient: everything(bench.ehr.base_url, p.id)
            if naive:
                fetched = naive_fhirclient(bench.ehr.base_url, patient.id, list(profile.rules))
                if fetched != size:
                    raise RuntimeError(f"naive fhirclient fetched {fetched} of {size} resources")
                contenders["naive fhirclient"] = lambda p=patient: naive_fhirclient(bench.ehr.base_url, p.id,
                                                                                    list(profile.rules))
            t = side_by_side(contenders, repeats[size])
            # Each repetition's bound is the faster best fetch of that repetition (both ran next to the rest).
            t.runs["bound"] = [min(a, b) for a, b in zip(t.runs["best fetch: searches"],
                                                         t.runs["best fetch: $everything"], strict=True)]
            row = {"size": size, "load_seconds": round(patient.load_seconds, 2), "requests": requests_by,
                   "median_s": {k: round(t.median(k), 4) for k in t.runs},
                   "spread": {k: round(t.spread(k), 3) for k in t.runs},
                   "runs": {k: [round(x, 4) for x in v] for k, v in t.runs.items()},
                   "vs_bound": {}, "naive_over": {}}
            for ps in page_sizes:
                label = "fhirbridge" if ps is None else f"fhirbridge page_size={ps}"
                row["vs_bound"][label] = round(t.ratio(label, "bound"), 3)
                if naive:
                    row["naive_over"][label] = round(t.ratio("naive fhirclient", label), 2)
            row["diagnosis"] = diagnose(app_by_page[page_sizes[0]], patient, profile, now)
            log(f"  collect {size}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in row["median_s"].items())
                + f"; vs bound {row['vs_bound']}; naive/fb {row['naive_over']}")
            results.append(row)
    finally:
        replayer.close()
        for app in app_by_page.values():
            app.close()
    # Linear growth: the cost per resource at each size, relative to the 1,000-resource patient.
    per: dict = {}
    for row in results:
        for k, v in row["median_s"].items():
            per.setdefault(k, {})[row["size"]] = v / row["size"]
    return {"rows": results, "seconds_per_resource": {k: {s: round(x * 1e6, 1) for s, x in v.items()}
                                                      for k, v in per.items()},
            "unit_seconds_per_resource": "microseconds"}
