"""WADO-RS: fhirbridge's DICOMweb retrieve of a generated CT series from a real Orthanc, side by side with

* raw GET: the same request (same URL, same Accept header, same client library) with the answer streamed
  into one file in 1 MiB chunks, nothing parsed, hashed or checked: the bound no retriever can beat;
* fhirbridge: `DicomwebClient.retrieve_series` as collect will use it: QIDO-RS for the instance list, the
  multipart answer parsed part by part into one 0600 file per instance, SHA-256 while writing, "DICM" and
  the header checked with pydicom, counts against QIDO, each file fsynced, the folder renamed when verified;
* fhirbridge, fsync off: the same without the per-instance fsync, to show what durability costs.

Each contender runs in a fresh interpreter per repetition (bench.common.run_isolated), so its peak RSS is
its own; time and peak are taken inside the child around the work only. The study is 512x512 16-bit CT
slices (0.5 MiB each, 12 bits of noise and a disc: Orthanc's gzip of the answer saves little, as for real
CT). Orthanc is the kit's (tests/kit/pacs.py: Debian's orthanc + orthanc-dicomweb); without it the section
says so and is skipped.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import requests

from fhirbridge.dicomweb import DicomwebClient
from fhirbridge.dicomweb.client import RETRIEVE_ACCEPT
from tests.kit.dicom_studies import large_series
from tests.kit.pacs import Pacs, find_orthanc

from .common import reset_peak, run_isolated, side_by_side

CHUNK = 1 << 20


# --- the contenders, each in a child process ---------------------------------------------------------

def raw_get(url: str, study: str, series: str, out: str) -> dict:
    target = Path(out)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    baseline = reset_peak()
    started = time.perf_counter()
    size = 0
    with requests.Session() as http:
        http.trust_env = False
        resp = http.get(f"{url}/studies/{study}/series/{series}", headers={"Accept": RETRIEVE_ACCEPT},
                        stream=True, timeout=(5, 300))
        resp.raise_for_status()
        with open(target / "answer.multipart", "wb") as f:
            for chunk in resp.iter_content(CHUNK):
                f.write(chunk)
                size += len(chunk)
    return {"seconds": time.perf_counter() - started, "baseline_rss": baseline, "bytes": size}


def fhirbridge_retrieve(url: str, study: str, series: str, out: str, fsync: bool = True) -> dict:
    target = Path(out)
    shutil.rmtree(target, ignore_errors=True)
    baseline = reset_peak()
    started = time.perf_counter()
    with DicomwebClient(url, fsync=fsync) as client:
        got = client.retrieve_series(study, series, target)
    return {"seconds": time.perf_counter() - started, "baseline_rss": baseline, "bytes": got.bytes,
            "instances": len(got.instances)}


# --- the section ------------------------------------------------------------------------------------

def run(root: Path, megabytes: int, repeats: int, *, log) -> dict:
    try:
        find_orthanc()
    except RuntimeError as exc:
        log(f"  skipped: {exc}")
        return {"skipped": str(exc)}
    log(f"  generating a {megabytes} MiB CT series")
    study = large_series(root / "study", megabytes)
    (series,) = study.series
    payload = sum(p.stat().st_size for p in study.files)
    pacs = Pacs.start(root / "pacs")
    try:
        log(f"  uploading {len(study.files)} instances to Orthanc")
        pacs.upload(study.files)
        args = {"url": pacs.dicomweb_url, "study": study.study_uid, "series": series}
        out = root / "out"
        contenders = {
            "raw GET": lambda: run_isolated("bench.wado_bench", "raw_get", {**args, "out": str(out / "raw")}),
            "fhirbridge": lambda: run_isolated("bench.wado_bench", "fhirbridge_retrieve",
                                               {**args, "out": str(out / "fb")}),
            "fhirbridge, fsync off": lambda: run_isolated("bench.wado_bench", "fhirbridge_retrieve",
                                                          {**args, "out": str(out / "fb-nofsync"), "fsync": False}),
        }
        log(f"  {repeats} repetitions of {len(contenders)} contenders")
        timings = side_by_side(contenders, repeats)
    finally:
        pacs.stop()
    median = {n: round(timings.median(n), 3) for n in contenders}
    results = timings.results
    return {
        "payload_bytes": payload, "instances": len(study.files), "repeats": repeats,
        "median_s": median,
        "mib_per_s": {n: round(payload / 2**20 / s, 1) for n, s in median.items()},
        "spread": {n: round(timings.spread(n), 3) for n in contenders},
        "vs_raw": {n: round(timings.ratio(n, "raw GET"), 2) for n in contenders if n != "raw GET"},
        "peak_extra_rss_bytes": {n: max(r["peak_rss"] - r["baseline_rss"] for r in results[n]) for n in contenders},
        "answer_bytes": results["raw GET"][0]["bytes"],
        "runs": timings.runs,
    }
