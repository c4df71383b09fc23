"""Images (issue 15): a CT study from a real Orthanc to sealed package attachments, and back out at the reviewer,
each side by side with its bound, at several sizes (the 10 MiB - 1 GiB curve of the issue's "Performance").

* PACS -> package, fhirbridge: what collect and seal do with a Case's images: `loop.images.collect_images`
  (QIDO-RS for the series, WADO-RS per series in parallel into 0600 files with SHA-256, every part checked,
  counts against QIDO-RS and the ImagingStudy, the series index written), then per series
  `exchange.dicom_series.encrypt_series` (tar -> streamed JWE, no zip, fsynced, renamed);
* PACS -> package, bound: a plain WADO-RS download of each series of the same study (same URL, Accept
  header and client library; the answer streamed into one file, nothing parsed, hashed or checked), then
  AES-256-GCM + base64url of its bytes into one file per series, fsynced once: the work no sealer can skip;
* extract, fhirbridge: `dicom_series.extract_images` on those attachments (decrypt, tar, each member hashed
  while written and checked against the manifest, folders renamed when complete) plus the DICOMDIR;
* extract, bound: base64url-decode + AES-256-GCM decrypt of the bound's files, written as one file per
  instance of the same sizes, one fsync per series folder's files at the end.

Each contender runs in a fresh interpreter per repetition (bench.common.run_isolated), so its peak RSS is its
own; time and peak are taken inside the child around the work only. Orthanc is the kit's
(tests/kit/pacs.py); without it the section says so and is skipped. Sizes: `FHIRBRIDGE_BENCH_IMAGES_MB`
(comma-separated MiB; default 10,64,256), 0.5 MiB slices in one series per 64 MiB (at most 8).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import requests

from fhirbridge.dicomweb.client import RETRIEVE_ACCEPT
from tests.kit.dicom_studies import endpoint_resource, imaging_study_resource, large_series
from tests.kit.pacs import Pacs, find_orthanc

from .common import reset_peak, run_isolated, side_by_side

CHUNK = 1 << 20
B64_CHUNK = 3 << 20        # a multiple of 3: base64 of consecutive chunks concatenates
DEFAULT_MB = (10, 64, 256)
CASE = "0b3c5e2a-images-bench"


def sizes_from_env() -> list[int]:
    raw = os.environ.get("FHIRBRIDGE_BENCH_IMAGES_MB", "")
    return [int(x) for x in raw.split(",") if x.strip()] or list(DEFAULT_MB)


# --- the contenders, each in a child process ---------------------------------------------------------

def _keys(root: Path):
    from fhirbridge.crypto.keys import KeyRing

    jwks = json.loads((root / "reviewer.jwks.json").read_text())
    private = KeyRing(jwks)
    public = KeyRing({"keys": [{k: v for k, v in key.items() if k not in ("d", "p", "q", "dp", "dq", "qi")}
                               for key in jwks["keys"]]})
    return private, public.encryption_keys()


def package_fhirbridge(root: str, url: str) -> dict:
    from fhirbridge.config.mappings import ImagingRule
    from fhirbridge.config.model import Pacs as PacsConfig
    from fhirbridge.exchange import dicom_series
    from fhirbridge.loop import images

    root_p = Path(root)
    work = root_p / "fb"
    shutil.rmtree(work, ignore_errors=True)
    resources = json.loads((root_p / "resources.json").read_text())
    _, recipients = _keys(root_p)
    app = SimpleNamespace(hospital=SimpleNamespace(pacs=PacsConfig(url=url, timeout_read=300.0)),
                          case_dir=lambda case_id: work / case_id, progress=lambda msg: None,
                          store=SimpleNamespace(add_event=lambda *a, **k: None), smart_scopes=())
    profile = SimpleNamespace(name="bench", imaging=ImagingRule(max_study_bytes=8 << 30, max_package_bytes=8 << 30))
    out = work / "package" / "attachments"
    baseline = reset_peak()
    started = time.perf_counter()
    got = images.collect_images(app, CASE, resources, profile)  # type: ignore[arg-type]
    collected = time.perf_counter() - started
    manifest = []
    out.mkdir(parents=True)
    for study in got:
        assert study["status"] == "included", study
        for n, series in enumerate(study["series"], 1):
            members = images.members(app, CASE, series)  # type: ignore[arg-type]
            name = f"att-{n:03d}.jwe"
            info = dicom_series.encrypt_series(members, out / name, recipients, typ="bench")
            manifest.append({"file": f"attachments/{name}", "size": info["plaintext_size"],
                             "sha256": info["plaintext_sha256"], "content_type": dicom_series.CONTENT_TYPE,
                             "dicom": {"study_uid": study["study_uid"], "series_uid": series["series_uid"],
                                       "instances": [m.entry for m in members]}})
    seconds = time.perf_counter() - started
    (work / "package" / "manifest.json").write_text(json.dumps({"attachments": manifest}))
    return {"seconds": seconds, "collect_seconds": collected, "baseline_rss": baseline,
            "instances": sum(len(a["dicom"]["instances"]) for a in manifest)}


def _aes_b64(src: Path, dst: Path, key: bytes, iv: bytes) -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(key), modes.GCM(iv)).encryptor()
    with open(src, "rb") as f, open(dst, "wb") as out:
        while block := f.read(B64_CHUNK):
            out.write(base64.urlsafe_b64encode(enc.update(block)))
        out.write(base64.urlsafe_b64encode(enc.finalize() + enc.tag))
        out.flush()
        os.fsync(out.fileno())


def package_bound(root: str, url: str, study: str, series: list[str]) -> dict:
    work = Path(root) / "bound"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    key, iv = os.urandom(32), os.urandom(12)
    baseline = reset_peak()
    started = time.perf_counter()
    with requests.Session() as http:
        http.trust_env = False
        for n, uid in enumerate(series, 1):
            resp = http.get(f"{url}/studies/{study}/series/{uid}", headers={"Accept": RETRIEVE_ACCEPT},
                            stream=True, timeout=(5, 300))
            resp.raise_for_status()
            with open(work / f"series-{n}.multipart", "wb") as f:
                for chunk in resp.iter_content(CHUNK):
                    f.write(chunk)
    for n in range(1, len(series) + 1):
        _aes_b64(work / f"series-{n}.multipart", work / f"series-{n}.enc", key, iv)
    seconds = time.perf_counter() - started
    (work / "key").write_bytes(key + iv)
    return {"seconds": seconds, "baseline_rss": baseline}


def extract_fhirbridge(root: str) -> dict:
    from fhirbridge.exchange import dicom_series

    root_p = Path(root)
    package = root_p / "fb" / "package"
    opened = SimpleNamespace(path=package, manifest=json.loads((package / "manifest.json").read_text()))
    private, _ = _keys(root_p)
    out = root_p / "fb-extract"
    shutil.rmtree(out, ignore_errors=True)
    baseline = reset_peak()
    started = time.perf_counter()
    done = dicom_series.extract_images(opened, private, out)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "baseline_rss": baseline, "instances": sum(s["instances"] for s in done)}


def extract_bound(root: str, sizes: list[list[int]]) -> dict:
    """Decode + decrypt each series file and cut it into instance files of the given sizes (the multipart
    framing of the bound's download is a few hundred bytes per part: negligible, kept in the cut)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    work = Path(root) / "bound"
    out = Path(root) / "bound-extract"
    shutil.rmtree(out, ignore_errors=True)
    secret = (work / "key").read_bytes()
    key, iv = secret[:32], secret[32:]
    baseline = reset_peak()
    started = time.perf_counter()
    for n, instance_sizes in enumerate(sizes, 1):
        folder = out / f"series-{n}"
        folder.mkdir(parents=True)
        # The tag is not checked (it ends the last block): the GHASH and AES-CTR work is all done by update.
        dec = Cipher(algorithms.AES(key), modes.GCM(iv)).decryptor()
        with open(work / f"series-{n}.enc", "rb") as f:
            plain = bytearray()
            i = 0
            current = open(folder / "0.dcm", "wb")
            left = instance_sizes[0]
            while block := f.read(B64_CHUNK * 4 // 3):
                plain = dec.update(base64.urlsafe_b64decode(block))
                view = memoryview(plain)
                while view:
                    take = min(left, len(view))
                    current.write(view[:take])
                    view, left = view[take:], left - take
                    if left == 0 and i + 1 < len(instance_sizes):
                        current.close()
                        i += 1
                        current = open(folder / f"{i}.dcm", "wb")
                        left = instance_sizes[i]
                    elif left == 0:
                        left = 1 << 62       # the tail (tag, framing) goes to the last file
            current.close()
        for p in folder.iterdir():
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "baseline_rss": baseline}


# --- the section ------------------------------------------------------------------------------------

def run(root: Path, megabytes: list[int], repeats: int, *, log) -> dict:
    try:
        find_orthanc()
    except RuntimeError as exc:
        log(f"  skipped: {exc}")
        return {"skipped": str(exc)}
    points = []
    for mb in megabytes:
        point_root = root / f"{mb}mib"
        point_root.mkdir(parents=True)
        points.append(_point(point_root, mb, repeats, log))
        shutil.rmtree(point_root, ignore_errors=True)
    return {"repeats": repeats, "points": points}


def _point(point_root: Path, mb: int, repeats: int, log) -> dict:
    from fhirbridge.crypto.keys import generate_jwks

    series_count = max(1, min(8, mb // 64))
    log(f"  {mb} MiB: generating a CT study in {series_count} series")
    study = large_series(point_root / "study", mb, series=series_count)
    payload = sum(p.stat().st_size for p in study.files)
    (point_root / "reviewer.jwks.json").write_text(json.dumps(generate_jwks()))
    pacs = Pacs.start(point_root / "pacs")
    try:
        log(f"  {mb} MiB: uploading {len(study.files)} instances to Orthanc")
        pacs.upload(study.files)
        endpoint = {**endpoint_resource(pacs.dicomweb_url), "id": "bench-pacs"}
        imaging = {**imaging_study_resource(study, "Patient/bench", "Endpoint/bench-pacs"), "id": "bench-study"}
        (point_root / "resources.json").write_text(json.dumps([imaging, endpoint]))
        series = list(study.series)
        sizes = [[p.stat().st_size for p in sorted(study.series[s], key=_number)] for s in series]
        args = {"root": str(point_root)}
        contenders = {
            "package: fhirbridge": lambda: run_isolated("bench.images_bench", "package_fhirbridge",
                                                        {**args, "url": pacs.dicomweb_url}),
            "package: bound": lambda: run_isolated("bench.images_bench", "package_bound",
                                                   {**args, "url": pacs.dicomweb_url,
                                                    "study": study.study_uid, "series": series}),
        }
        log(f"  {mb} MiB: {repeats} repetitions of PACS -> package")
        package = side_by_side(contenders, repeats)
        extractors = {
            "extract: fhirbridge": lambda: run_isolated("bench.images_bench", "extract_fhirbridge", args),
            "extract: bound": lambda: run_isolated("bench.images_bench", "extract_bound",
                                                   {**args, "sizes": sizes}),
        }
        log(f"  {mb} MiB: {repeats} repetitions of extract")
        extract = side_by_side(extractors, repeats)
    finally:
        pacs.stop()
    timings = {**package.runs, **extract.runs}
    results = {**package.results, **extract.results}
    median = {n: round(sorted(v)[len(v) // 2], 3) for n, v in timings.items()}
    point = {
        "megabytes": mb, "payload_bytes": payload, "instances": len(study.files), "series": series_count,
        "median_s": median, "mib_per_s": {n: round(payload / 2**20 / s, 1) for n, s in median.items()},
        "package_vs_bound": round(package.ratio("package: fhirbridge", "package: bound"), 2),
        "extract_vs_bound": round(extract.ratio("extract: fhirbridge", "extract: bound"), 2),
        "collect_share": round(sorted(r["collect_seconds"] for r in results["package: fhirbridge"])
                               [len(results["package: fhirbridge"]) // 2] / median["package: fhirbridge"], 2),
        "peak_extra_rss_bytes": {n: max(r["peak_rss"] - r["baseline_rss"] for r in rs)
                                 for n, rs in results.items()},
        "runs": timings,
    }
    log(f"  {mb} MiB: package {point['package_vs_bound']}x bound, extract {point['extract_vs_bound']}x bound, "
        f"peak {max(point['peak_extra_rss_bytes'].values()) / 2**20:.0f} MiB")
    return point


def _number(path: Path) -> int:
    import pydicom

    return int(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["InstanceNumber"]).InstanceNumber)


# --- goals and the table (bench/run.py) --------------------------------------------------------------

def goals(section: dict) -> list[tuple]:
    """Issue 15's goals at each size: (figure, value, goal, met)."""
    if "skipped" in section:
        return []
    out: list[tuple] = []
    for p in section["points"]:
        at = f"{p['payload_bytes'] / 2**20:.0f} MiB, {p['instances']} instances"
        out.append((f"PACS -> package / bound, {at}", f"{p['package_vs_bound']:.2f}x", "<= 1.3x",
                    p["package_vs_bound"] <= 1.3))
        out.append((f"extract / bound, {at}", f"{p['extract_vs_bound']:.2f}x", "<= 1.3x", p["extract_vs_bound"] <= 1.3))
        peak = max(p["peak_extra_rss_bytes"][n] for n in ("package: fhirbridge", "extract: fhirbridge"))
        out.append((f"peak RSS of fhirbridge, {at}", f"{peak / 2**20:.0f} MiB", "<= 128 MiB", peak <= 128 << 20))
    return out


def table_lines(section: dict, grid) -> list[str]:
    if "skipped" in section:
        return [f"Images: skipped ({section['skipped']})", ""]
    names = list(section["points"][0]["median_s"])
    return ["Images: PACS -> package and extract (median s; peak = extra RSS of the contender's process)",
            grid(["MiB", "instances", "series", *[f"{n} s" for n in names], "package/bound", "extract/bound",
                  *[f"{n} peak MiB" for n in names]],
                 [[f"{p['payload_bytes'] / 2**20:.0f}", p["instances"], p["series"], *[p["median_s"][n] for n in names],
                   p["package_vs_bound"], p["extract_vs_bound"],
                   *[f"{p['peak_extra_rss_bytes'][n] / 2**20:.0f}" for n in names]] for p in section["points"]]), ""]
