"""`fhirbridge serve` for real: gunicorn with two workers against the session EHR. Health, readiness, the
OpenAPI document and docs page, the staff API with and without a token, an order carried to await_opinion
by the served process's own scheduler, and a clean exit on SIGTERM.
"""
from __future__ import annotations

import re
import signal
import time

import pytest
import requests

from fhirbridge.ehr.task import business_step
from tests.kit.hospital import Served, TestHospital

TOKEN = "staff-token-" + "x" * 20
GRACEFUL_SECONDS = 20
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture
def served(tmp_path, ehr):
    env = {"FHIRBRIDGE_API__TOKENS": TOKEN, "FHIRBRIDGE_SERVICE__WORK_SECONDS": "0.5",
           "FHIRBRIDGE_SERVICE__POLL_SECONDS": "2", "FHIRBRIDGE_SERVICE__INBOX_SECONDS": "5"}
    hospital = TestHospital(tmp_path, ehr.base_url, env=env)
    served = None
    try:
        served = Served(hospital, {**env, "FHIRBRIDGE_GRACEFUL_TIMEOUT": str(GRACEFUL_SECONDS)})
        yield served.base, served.proc, served.log, hospital
    finally:
        if served:
            served.kill()
        hospital.close()


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def _resolve(spec: dict, ref: str):
    node = spec
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_served_by_gunicorn_end_to_end(served, seeded):
    base, proc, log, _hospital = served
    auth = {"Authorization": f"Bearer {TOKEN}"}

    ready = requests.get(f"{base}/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["store"] == "ok"
    assert [v for k, v in checks.items() if k.startswith("ehr:")] == ["ok"]

    spec = requests.get(f"{base}/openapi.json", timeout=10).json()
    assert re.fullmatch(r"3\.1\.\d+", spec["openapi"])
    assert spec["info"]["title"] and spec["info"]["version"]
    assert {"/api/orders", "/api/cases/{case_id}", "/healthz", "/readyz"} <= set(spec["paths"])
    for path, item in spec["paths"].items():
        operations = {m: op for m, op in item.items() if m in HTTP_METHODS}
        assert operations, path
        for method, op in operations.items():
            assert op.get("responses"), f"{method.upper()} {path} has no responses"
            for code in op["responses"]:
                assert code == "default" or re.fullmatch(r"[1-5](\d\d|XX)", code), (path, code)
        for name in re.findall(r"{([^}]+)}", path):   # every templated segment is a declared path parameter
            params = item.get("parameters", []) + [p for op in operations.values() for p in op.get("parameters", [])]
            assert any(p.get("in") == "path" and p.get("name") == name for p in params), (path, name)
    for ref in set(_refs(spec)):
        assert ref.startswith("#/"), ref
        _resolve(spec, ref)                                   # every local reference resolves

    page = requests.get(f"{base}/docs", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "<html" in page.text.lower() and "/api/orders" in page.text

    refused = requests.get(f"{base}/api/cases", timeout=10)
    assert refused.status_code == 401
    assert refused.headers["Content-Type"].startswith("application/json")
    assert refused.json()["error"]["status"] == 401
    assert requests.get(f"{base}/api/cases", headers={"Authorization": "Bearer wrong-token-0123456789"},
                        timeout=10).status_code == 401

    created = requests.post(f"{base}/api/orders", headers=auth, timeout=60,
                            json={"patient": seeded["patient"], "question": "Is surgery indicated now?",
                                  "profile": "spine", "requester": seeded["physician"]})
    assert created.status_code == 201, created.text
    case_id = created.json()["case"]["id"]

    # Nothing else runs: the scheduler inside the served workers takes the Case to await_opinion.
    deadline = time.monotonic() + 60
    while True:
        case = requests.get(f"{base}/api/cases/{case_id}", headers=auth, timeout=10).json()
        if case["step"] == "await_opinion":
            break
        assert case["step"] in ("collect", "seal", "deliver"), case
        assert time.monotonic() < deadline, f"still at {case['step']} after 60 s: {case['last_error']}"
        time.sleep(0.5)
    kinds = [e["kind"] for e in case["events"]]
    assert [k for k in kinds if k.endswith(".done")] == ["collect.done", "seal.done", "deliver.done"]

    text = log.read_text(errors="replace")
    assert len(re.findall(r"Booting worker with pid", text)) == 2, text

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=GRACEFUL_SECONDS + 10) == 0, log.read_text(errors="replace")
    assert "Shutting down" in log.read_text(errors="replace")


def test_order_written_in_the_ehr_is_delivered_by_the_served_process_alone(served, seeded, ehr):
    """The issue's acceptance: a ServiceRequest created in the EHR (as a physician's order is) becomes a
    delivered package with no command but `serve`, and the Task's history in the EHR shows each step."""
    base, proc, log, hospital = served
    sr = hospital.order(seeded["patient"], "Laminectomy or conservative care?")   # written to the EHR only
    auth = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + 60
    case = None
    while time.monotonic() < deadline:
        cases = requests.get(f"{base}/api/cases", headers=auth, timeout=10).json()["cases"]
        case = next((c for c in cases if c["service_request"] == f"ServiceRequest/{sr['id']}"), None)
        if case and case["step"] == "await_opinion":
            break
        time.sleep(0.5)
    assert case and case["step"] == "await_opinion", case
    assert (hospital.root / "outbox" / case["reviewer"] / case["package_id"] / "package.jwe").exists()
    history = requests.get(f"{ehr.base_url}/{case['task']}/_history", params={"_count": 100}, timeout=10,
                           headers={"Accept": "application/fhir+json"}).json()
    # Each version's step, whichever code system shows it (BSeR's 2.0 for `received`, ours for the rest).
    codes = [business_step(e["resource"]) for e in history.get("entry", [])
             if e.get("resource", {}).get("businessStatus")]
    for step in ("received", "collecting", "packaging", "sending", "sent-to-reviewer"):
        assert step in codes, (step, codes)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=GRACEFUL_SECONDS + 10) == 0, log.read_text(errors="replace")
