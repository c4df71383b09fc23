"""The probe listener (service/probes.py): /healthz and /readyz on a port of their own, answered while every
API thread of the worker is busy; the same readiness as the main port; a port several workers share."""
from __future__ import annotations

import threading
import time

import pytest
import requests

from fhirbridge.demo.localehr import free_port
from fhirbridge.service.probes import ProbeListener, parse_bind
from tests.kit.faultproxy import FaultProxy
from tests.kit.hospital import Served, TestHospital


def test_two_listeners_share_one_port_and_answer_only_the_probes():
    port = free_port()
    a = ProbeListener(f"127.0.0.1:{port}", lambda: ({"status": "ready", "checks": {}}, 200)).start()
    b = ProbeListener(f"127.0.0.1:{port}", lambda: ({"status": "ready", "checks": {}}, 200)).start()
    try:
        base = f"http://127.0.0.1:{port}"
        assert requests.get(f"{base}/healthz", timeout=30).json() == {"status": "alive"}
        ready = requests.get(f"{base}/readyz?verbose=1", timeout=30)
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert ready.headers["Cache-Control"] == "no-store"
        other = requests.get(f"{base}/api/cases", timeout=30)
        assert other.status_code == 404 and "/healthz and /readyz only" in other.json()["error"]["message"]
        a.stop()
        # The port goes on answering from the worker that is left.
        assert requests.get(f"{base}/healthz", timeout=30).status_code == 200
    finally:
        b.stop()


def test_a_readiness_check_that_breaks_answers_503():
    def broken():
        raise RuntimeError("boom")
    probes = ProbeListener(f"127.0.0.1:{free_port()}", broken).start()
    try:
        r = requests.get(f"http://127.0.0.1:{probes.port}/readyz", timeout=30)
        assert r.status_code == 503 and r.json() == {"status": "not ready", "error": "RuntimeError"}
    finally:
        probes.stop()


@pytest.mark.parametrize("value", ["8081x", "host", "host:port"])
def test_a_bad_probe_address_is_refused_with_the_variable_named(value):
    with pytest.raises(ValueError, match="FHIRBRIDGE_PROBE_BIND"):
        parse_bind(value)


@pytest.mark.sekmet
def test_the_probe_port_answers_while_the_only_api_thread_is_held(tmp_path, ehr):
    """One worker with one thread: a /readyz on the main port holds that thread while the EHR is slow to answer
    /metadata; a /healthz on the main port then waits behind it, but the probe port answers at once."""
    proxy = FaultProxy(ehr.base_url)
    hospital = TestHospital(tmp_path, proxy.base_url)
    held, release = threading.Event(), threading.Event()
    probe_port = free_port()
    env = {"FHIRBRIDGE_SCHEDULER": "off", "FHIRBRIDGE_THREADS": "1",
           "FHIRBRIDGE_PROBE_BIND": f"127.0.0.1:{probe_port}"}
    served = None
    try:
        served = Served(hospital, env, workers=1)
        probes = f"http://127.0.0.1:{probe_port}"
        assert requests.get(f"{probes}/readyz", timeout=30).json()["checks"]["store"] == "ok"
        time.sleep(5.1)   # past the readiness cache (5 s), so the next /readyz asks the EHR again

        def hold(_path):
            held.set()
            release.wait(2.0)   # under the readiness check's 3 s read timeout: the EHR is slow, not down
        proxy.add(method="GET", path=r"/metadata", action="forward", before=hold, times=1)
        main: dict[str, float] = {}
        readyz = threading.Thread(target=lambda: requests.get(f"{served.base}/readyz", timeout=60))
        readyz.start()
        assert held.wait(30), "the main port's /readyz never reached the EHR"

        def main_healthz():
            requests.get(f"{served.base}/healthz", timeout=60)
            main["answered"] = time.monotonic()
        waiting = threading.Thread(target=main_healthz)
        waiting.start()
        answer = requests.get(f"{probes}/healthz", timeout=30)
        still_held = not release.is_set()
        released_at = time.monotonic()
        release.set()
        readyz.join(60)
        waiting.join(60)
        assert answer.status_code == 200 and answer.json() == {"status": "alive"}
        assert still_held, "the probe port answered only after the held API thread was released"
        assert main["answered"] >= released_at, "the main port's /healthz was not queued behind the held thread"
    finally:
        release.set()
        if served:
            served.kill()
        hospital.close()
        proxy.close()
