"""What every benchmark shares: side-by-side timing, the machine description, a local EHR with a hospital
configured against it, and peak memory of a contender run in its own process."""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from fhirbridge.config import loader as config
from fhirbridge.config.starter import write_starter
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.demo.localehr import LocalEhr
from fhirbridge.ehr.context import App
from fhirbridge.exchange.reviewer import write_reviewer_keys

REPO = Path(__file__).resolve().parents[1]


# --- timing -----------------------------------------------------------------------------------------

@dataclass
class Timings:
    """Seconds per repetition for each contender; all measured in the same interleaved run."""
    runs: dict[str, list[float]] = field(default_factory=dict)
    results: dict[str, list[Any]] = field(default_factory=dict)   # what each repetition returned

    def median(self, name: str) -> float:
        return statistics.median(self.runs[name])

    def ratio(self, name: str, against: str) -> float:
        """Median of the per-repetition ratios: each repetition's pair ran back to back, so a burst of
        load from other processes on the machine hits both sides of the same ratio."""
        return statistics.median(a / b for a, b in zip(self.runs[name], self.runs[against], strict=False))

    def spread(self, name: str) -> float:
        """Half the interquartile range relative to the median: the noise of this contender in this run."""
        xs = sorted(self.runs[name])
        if len(xs) < 2:
            return 0.0
        if len(xs) < 4:
            return (xs[-1] - xs[0]) / 2 / statistics.median(xs)
        q = statistics.quantiles(xs, n=4)
        return (q[2] - q[0]) / 2 / statistics.median(xs)


def side_by_side(contenders: dict[str, Callable[[], Any]], repeats: int, *, warmup: int = 1,
                 setup: Callable[[], None] | None = None) -> Timings:
    """Run every contender `repeats` times, interleaved (the order rotates each repetition so none always
    goes first or after the same one), after `warmup` untimed rounds. `setup` runs untimed before each.
    A contender that returns a dict with "seconds" (timed inside a child process, without its start-up)
    is credited with that time instead of the wall time around the call."""
    names = list(contenders)
    out = Timings({n: [] for n in names}, {n: [] for n in names})
    for rep in range(warmup + repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            if setup:
                setup()
            started = time.perf_counter()
            value = contenders[name]()
            elapsed = time.perf_counter() - started
            if isinstance(value, dict) and "seconds" in value:
                elapsed = value["seconds"]
            if rep >= warmup:
                out.runs[name].append(elapsed)
                out.results[name].append(value)
    return out


# --- the machine ------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": mem, "os": platform.platform(),
            "python": platform.python_version(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "packages": {d: version(d) for d in ("fhirbridge", "sekmet-fhir", "fhirclient", "joserfc",
                                                 "cryptography", "requests", "SQLAlchemy", "psycopg",
                                                 "fhir.resources")}}


# --- a hospital against a local EHR -----------------------------------------------------------------

class Hospital:
    """A hospital configured (keys, fhirbridge.toml) against `base_url`, with one reviewer, under `root`."""

    def __init__(self, root: Path, base_url: str, *, page_size: int | None = None):
        self.root = root
        reviewer_dir = root / "reviewer"
        self.reviewer_files = write_reviewer_keys(reviewer_dir, None)
        self.reviewer_key = KeyRing.load(self.reviewer_files["private_keys"])
        block = {"name": "bench-center", "display": "Bench Center", "jwks": str(self.reviewer_files["public_keys"]),
                 "profiles": ["spine", "default"], "system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.7.1",
                 "outbox": str(root / "outbox")}
        paths = write_starter(root / "hospital", fhir_base_url=base_url, hospital_name="Bench Hospital",
                              reviewers=[block])
        text = paths["config"].read_text()
        # The reads of a big record must not hit the default 30 s read timeout on a loaded machine.
        text = text.replace("timeout_read = 30.0", "timeout_read = 300.0")
        if page_size is not None:
            text = text.replace("page_size = 100", f"page_size = {page_size}")
        paths["config"].write_text(text)
        self.config_path = paths["config"]
        self.hospital_public = paths["public_keys"]
        shutil.copy(self.hospital_public, reviewer_dir / "trusted.jwks.json")
        self.trusted = KeyRing.load(reviewer_dir / "trusted.jwks.json")

    def app(self, **env: str) -> App:
        return App(config.load(self.config_path, environ={k.upper(): v for k, v in env.items()}))


class Bench(Hospital):
    """A sekmet server (its own, on a free loopback port) and a Hospital configured against it."""

    def __init__(self, root: Path, *, page_size: int | None = None):
        self.ehr = LocalEhr.start(root / "ehr")
        try:
            super().__init__(root, self.ehr.base_url, page_size=page_size)
        except BaseException:
            self.ehr.stop()
            raise

    def close(self) -> None:
        self.ehr.stop()


# --- peak memory in a process of its own ------------------------------------------------------------

def run_isolated(module: str, func: str, args: dict) -> dict:
    """Run `module.func(**args)` in a fresh interpreter; it returns a JSON-able dict (with "baseline_rss"
    taken by `reset_peak()` just before its work). The child adds its peak RSS since then, so contenders'
    peaks never mix."""
    code = ("import json,sys,importlib;"
            "sys.path.insert(0, sys.argv[1]);"
            "from bench.common import peak_rss;"
            "m=importlib.import_module(sys.argv[2]);a=json.loads(sys.argv[4]);"
            "out=getattr(m,sys.argv[3])(**a);"
            "out['peak_rss']=peak_rss();"
            "print(json.dumps(out))")
    done = subprocess.run([sys.executable, "-c", code, str(REPO), module, func, json.dumps(args)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{module}.{func} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> int:
    """Start measuring peak memory from now; returns the current RSS (the baseline). On Linux, writing 5 to
    /proc/self/clear_refs resets the high-water mark (VmHWM), so set-up before this point (imports, the
    parsed record) does not hide the work's own peak. Elsewhere: ru_maxrss, a lifetime peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status("VmRSS") or rss_now()
    except OSError:
        return rss_now()


def peak_rss() -> int:
    """Peak RSS since `reset_peak()` (Linux VmHWM), else the lifetime peak (ru_maxrss)."""
    return _status("VmHWM") or rss_now()


def rss_now() -> int:
    """Lifetime peak RSS of this process, in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def short_id() -> str:
    return uuid.uuid4().hex[:10]
