"""Seal: fhirbridge's seal step (document + JCS/JWS signature + streaming JWE per file) side by side with

* bound, the true floor (issue 19): what no sealer of a signed document can skip. Canonicalise the
  document (orjson with sorted keys, the fastest serialiser there is, of the document fhirbridge signed,
  parsed before the clock starts), sign it (SHA-256 of the canonical bytes for the manifest, the JWS
  signing input hashed and signed by the same P-256 key), and encrypt the same plaintext bytes (the
  envelope fhirbridge encrypted, and each attachment) through raw DEFLATE + AES-256-GCM + base64url,
  streamed in 1 MiB chunks. Building the document, the manifest and the claims are fhirbridge's own cost;
* joserfc: one-shot JWE (General JSON, A256GCM, zip DEF, to the same recipient keys) of the same bytes,
  each file read whole: what a user of a JOSE library would otherwise write.

Each contender runs in a fresh interpreter per repetition, so its peak RSS (ru_maxrss) is its own; the
time and the peak are taken inside the child, around the work only (not interpreter start-up or imports).
The EHR is not involved: the attachments are served from local files by a stand-in for the EHR client's
`download_binary`, so the figure is the cost of sealing, not of the network (collect measures that).
Attachment bytes are random, like the already-compressed PDFs and images real attachments are.
"""
from __future__ import annotations

import base64
import gc
import json
import os
import random
import shutil
import time
import zlib
from pathlib import Path

from . import synth
from .common import Hospital, reset_peak, run_isolated, side_by_side

CHUNK = 1 << 20
ALGORITHMS = ["ECDH-ES+A256KW", "RSA-OAEP-256", "A256GCM", "DEF"]


# --- set-up, in the parent ---------------------------------------------------------------------------

def prepare(root: Path, *, resources: int, attachment_mb: list[int]) -> dict:
    """A hospital, a collected record of `resources` resources with attachments of the given sizes (MiB)
    as local files, one fhirbridge seal made to learn the envelope's plaintext; returns the paths."""
    root.mkdir(parents=True, exist_ok=True)
    hospital = Hospital(root, "http://127.0.0.1:9/fhir")
    pid, items, sr = synth.resources(resources, "seal")
    sr = {**sr, "id": "bs-seal"}
    att_dir = root / "attachments"
    att_dir.mkdir()
    attachments = []
    rng = random.Random(7)
    for i, mb in enumerate(attachment_mb):
        path = att_dir / f"att-{i}"
        with open(path, "wb") as f:
            for _ in range(mb):
                f.write(rng.randbytes(CHUNK))
        attachments.append({"url": f"Binary/att-{i}", "owner": f"DocumentReference/bdoc-{i}",
                            "path": "content[0].attachment", "content_type": "application/pdf",
                            "title": f"Scan {i}", "size": mb * CHUNK})
    collected = {"service_request": sr, "patient": items[0], "resources": items[1:], "withheld": [],
                 "attachments": attachments, "profile": "default", "lookback_days": 730,
                 "collected_at": "2025-01-01T00:00:00Z"}
    (root / "collected.json").write_text(json.dumps(collected))
    args = {"root": str(root)}
    run_isolated("bench.seal_bench", "seal_fhirbridge", {**args, "keep_plaintext": True})
    inputs = [str(root / "envelope.plain")] + [str(att_dir / f"att-{i}") for i in range(len(attachment_mb))]
    (root / "inputs.json").write_text(json.dumps(inputs))
    payload = sum(os.path.getsize(p) for p in inputs)
    return {"root": str(root), "hospital": hospital, "payload_bytes": payload,
            "attachment_bytes": sum(a["size"] for a in attachments),
            "envelope_plain_bytes": os.path.getsize(inputs[0])}


# --- the contenders, each in a child process ---------------------------------------------------------

class _LocalBinaries:
    """Stands in for the EHR client during the seal benchmark: serves attachments from local files."""

    def __init__(self, directory: Path):
        self.directory = directory

    def download_binary(self, ref: str, dst, *, max_bytes: int) -> dict:
        import hashlib
        digest, size = hashlib.sha256(), 0
        with open(self.directory / ref.split("/", 1)[1], "rb") as src:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        return {"content_type": "application/pdf", "size": size, "sha256": digest.hexdigest()}


def _app_and_case(root: Path):
    from fhirbridge.config import loader as config
    from fhirbridge.ehr.context import App
    from fhirbridge.store.store import Case

    app = App(config.load(root / "hospital" / "fhirbridge.toml", environ={}))
    app.__dict__["ehr"] = _LocalBinaries(root / "attachments")   # the cached_property, replaced
    case = Case(id="0b3c5e2a-seal-bench", hospital="bench", service_request="ServiceRequest/bs-seal",
                patient="Patient/bp-seal", reviewer="bench-center", profile="default", step="seal",
                task=None, package_id=None, opinion_id=None, document_reference=None, attempts=0,
                last_error=None, next_attempt_at=None, claimed_by=None, claimed_until=None,
                created_at=0.0, updated_at=0.0, data={})
    return app, case


def seal_fhirbridge(root: str, keep_plaintext: bool = False) -> dict:
    from fhirbridge.crypto import jwe
    from fhirbridge.loop.collect import Collected
    from fhirbridge.loop.seal import seal_case

    root_p = Path(root)
    app, case = _app_and_case(root_p)
    collected = Collected.from_dict(json.loads((root_p / "collected.json").read_text()))
    app.hospital_keys, app.reviewer_keys(case.reviewer)     # keys loaded before the baseline
    shutil.rmtree(app.case_dir(case.id), ignore_errors=True)
    gc.collect()
    base = reset_peak()
    started = time.perf_counter()
    package_id, summary = seal_case(app, case, collected)
    seconds = time.perf_counter() - started
    out = app.case_dir(case.id) / "package" / package_id
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    if keep_plaintext:
        from fhirbridge.crypto.keys import KeyRing
        key = KeyRing.load(root_p / "reviewer" / "reviewer.private.jwks.json")
        plain = jwe.decrypt_bytes((out / "package.jwe").read_bytes(), key)
        (root_p / "envelope.plain").write_bytes(plain)
    shutil.rmtree(app.case_dir(case.id), ignore_errors=True)
    return {"seconds": seconds, "baseline_rss": base, "output_bytes": size, "files": summary["attachment_files"] + 1}


def _inputs(root: Path) -> list[Path]:
    return [Path(p) for p in json.loads((root / "inputs.json").read_text())]


def seal_bound(root: str) -> dict:
    import hashlib

    import orjson
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    root_p = Path(root)
    out_dir = root_p / "out-bound"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    inputs = _inputs(root_p)
    document = orjson.loads(inputs[0].read_bytes())["document"]   # parsed before the clock, as fhirbridge's is
    document.pop("signature", None)
    signing_key = ec.generate_private_key(ec.SECP256R1())
    gc.collect()
    base = reset_peak()
    started = time.perf_counter()
    # Canonicalise and sign: the canonical bytes are hashed for the manifest, and their base64url form
    # (RFC 7515 signing input) hashed and signed pre-hashed.
    canonical = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    hashlib.sha256(canonical).hexdigest()
    signing_input = hashlib.sha256(b"eyJhbGciOiJFUzI1NiJ9.")
    signing_input.update(base64.urlsafe_b64encode(canonical).rstrip(b"="))
    signing_key.sign(signing_input.digest(), ec.ECDSA(Prehashed(hashes.SHA256())))
    del canonical
    total = 0
    for src_path in inputs:
        enc = Cipher(algorithms.AES(os.urandom(32)), modes.GCM(os.urandom(12))).encryptor()
        deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        rest = b""
        with open(src_path, "rb") as src, open(out_dir / src_path.name, "wb") as dst:
            def emit(ct: bytes, final: bool = False) -> None:
                nonlocal rest
                data = rest + ct
                n = len(data) if final else len(data) - len(data) % 3
                rest = data[n:]
                dst.write(base64.urlsafe_b64encode(data[:n]).rstrip(b"="))
            while chunk := src.read(CHUNK):
                emit(enc.update(deflater.compress(chunk)))
            emit(enc.update(deflater.flush()) + enc.finalize(), final=True)
            dst.write(base64.urlsafe_b64encode(enc.tag).rstrip(b"="))
        total += (out_dir / src_path.name).stat().st_size
    seconds = time.perf_counter() - started
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"seconds": seconds, "baseline_rss": base, "output_bytes": total}


def seal_joserfc(root: str) -> dict:
    from joserfc import jwe as joserfc_jwe

    from fhirbridge.crypto.keys import KeyRing

    root_p = Path(root)
    recipients = KeyRing.load(root_p / "reviewer" / "reviewer.public.jwks.json").encryption_keys()
    out_dir = root_p / "out-joserfc"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    gc.collect()
    base = reset_peak()
    started = time.perf_counter()
    total = 0
    for src_path in _inputs(root_p):
        obj = joserfc_jwe.GeneralJSONEncryption({"enc": "A256GCM", "zip": "DEF"}, src_path.read_bytes())
        for key in recipients:
            obj.add_recipient({"alg": key.alg}, key)
        doc = joserfc_jwe.encrypt_json(obj, None, algorithms=ALGORITHMS)
        data = json.dumps(doc).encode()
        (out_dir / src_path.name).write_bytes(data)
        total += len(data)
        del obj, doc, data
    seconds = time.perf_counter() - started
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"seconds": seconds, "baseline_rss": base, "output_bytes": total}


def diagnose(root: Path) -> dict:
    """Where a document seal's time goes (best of 3, CPU seconds): building the document, its canonical
    form as the signature makes it (in pieces), the signature with the digest, the envelope's plaintext in
    pieces; against orjson with sorted keys of the same document, the floor's canonicalisation."""
    import orjson

    from fhirbridge import jsonutil
    from fhirbridge.crypto import jws
    from fhirbridge.crypto.keys import KeyRing
    from fhirbridge.loop.collect import Collected
    from fhirbridge.loop.document import build_document, hospital_organization

    collected = Collected.from_dict(json.loads((root / "collected.json").read_text()))
    keys = KeyRing.load(root / "hospital" / "keys" / "hospital.private.jwks.json")

    def build():
        return build_document(collected, package_id="00000000-0000-0000-0000-000000000000",
                              base_url="http://127.0.0.1:9/fhir", hospital_org=hospital_organization("H", "urn:x", "1"),
                              timestamp="2025-01-01T00:00:00Z")

    doc = build()

    def best(fn) -> float:
        out = float("inf")
        for _ in range(3):
            started = time.process_time()
            fn()
            out = min(out, time.process_time() - started)
        return round(out, 4)

    out = {"document_bytes": len(orjson.dumps(doc)),
           "build_document_s": best(build),
           "jcs_canonical_pieces_s": best(lambda: b"".join(jsonutil.canonical_chunks(doc))),
           "orjson_sorted_s": best(lambda: orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)),
           "plaintext_pieces_s": best(lambda: b"".join(jsonutil.dumps_chunks(doc))),
           "sign_with_digest_s": best(lambda: jws.sign_bundle_with_digest(doc, keys, who={}, when="x"))}
    return out


# --- the benchmark -----------------------------------------------------------------------------------

CONTENDERS = {"fhirbridge": "seal_fhirbridge", "bound": "seal_bound", "joserfc one-shot": "seal_joserfc"}


def run(root: Path, scenarios: list[dict], repeats: int, log=print) -> dict:
    rows = []
    for sc in scenarios:
        prep = prepare(root / sc["name"], resources=sc["resources"], attachment_mb=sc["attachment_mb"])
        args = {"root": prep["root"]}
        contenders = {name: (lambda f=func, a=args: run_isolated("bench.seal_bench", f, a))
                      for name, func in CONTENDERS.items()}
        t = side_by_side(contenders, repeats, warmup=0)
        payload = prep["payload_bytes"]
        peaks = {n: max(r["peak_rss"] - r["baseline_rss"] for r in t.results[n]) for n in contenders}
        row = {"scenario": sc["name"], "resources": sc["resources"], "attachment_mb": sc["attachment_mb"],
               "payload_bytes": payload, "envelope_plain_bytes": prep["envelope_plain_bytes"],
               "median_s": {n: round(t.median(n), 4) for n in contenders},
               "spread": {n: round(t.spread(n), 3) for n in contenders},
               "runs": {n: [round(x, 4) for x in v] for n, v in t.runs.items()},
               "mb_per_s": {n: round(payload / t.median(n) / 2**20, 1) for n in contenders},
               "peak_extra_rss_bytes": peaks,
               "peak_over_payload": {n: round(v / payload, 3) for n, v in peaks.items()},
               "fhirbridge_vs_bound": round(t.ratio("fhirbridge", "bound"), 3),
               "joserfc_vs_bound": round(t.ratio("joserfc one-shot", "bound"), 3)}
        row["diagnosis"] = diagnose(Path(prep["root"]))
        log(f"  seal {sc['name']}: " + ", ".join(f"{n} {row['median_s'][n]:.3f} s / peak +{peaks[n] / 2**20:.0f} MiB"
                                                 for n in contenders)
            + f"; fhirbridge/bound {row['fhirbridge_vs_bound']}, payload {payload / 2**20:.1f} MiB")
        rows.append(row)
        shutil.rmtree(prep["root"], ignore_errors=True)
    return {"rows": rows}
