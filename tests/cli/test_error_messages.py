"""Error messages for the common mistakes (issue 17, part 3): each says what is wrong and what to do, in one
line, with a stable exit code. Found by trying them as hospital IT would; each test failed before the fix."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from fhirbridge import errors
from fhirbridge.config import loader as config
from fhirbridge.demo.localehr import free_port
from fhirbridge.errors import ConfigError, FhirError
from fhirbridge.fhir.client import FhirClient
from fhirbridge.loop.actions import cancel
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service
from tests.kit import processes
from tests.kit.cli import init_site, run


def fhirbridge(*argv, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`fhirbridge ARGV` as a separate process (what the operator sees: no pytest capturing in between)."""
    return subprocess.run([sys.executable, "-m", "fhirbridge", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


# --- https:// to a plain-http port; DNS -------------------------------------------------------------------

@pytest.mark.sekmet
def test_https_to_a_plain_http_port_says_so_not_untrusted_certificate(ehr):
    url = ehr.base_url.replace("http://", "https://")
    with pytest.raises(FhirError) as err:
        FhirClient(url, retries=0).capabilities()
    text = str(err.value)
    assert "answered in plain HTTP, not TLS" in text and "certificate" not in text
    assert err.value.transient


@pytest.mark.sekmet
def test_doctor_on_https_to_a_plain_http_port_says_so(hospital, ehr):
    env = {"FHIRBRIDGE_HOSPITAL__FHIR_BASE_URL": ehr.base_url.replace("http://", "https://"),
           "FHIRBRIDGE_HOSPITAL__HTTP__RETRIES": "0"}
    done = fhirbridge("--config", hospital.config_path, "doctor", env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 1
    assert "plain HTTP, not TLS" in out and "not trusted" not in out, out


def test_a_dns_failure_is_named_as_such():
    with pytest.raises(FhirError) as err:
        FhirClient("http://no-such-ehr.invalid/fhir", retries=0).capabilities()
    text = str(err.value)
    assert "DNS: the name 'no-such-ehr.invalid' does not resolve" in text
    assert "ConnectionError" not in text and "HTTPConnectionPool" not in text


# --- configuration from the environment ----------------------------------------------------------------

def test_a_wrongly_typed_environment_override_names_the_variable_and_its_value(tmp_path, capsys):
    cfg = init_site(tmp_path, capsys)
    with pytest.raises(ConfigError) as err:
        config.load(cfg, environ={"FHIRBRIDGE_HOSPITAL__HTTP__RETRIES": "three"})
    text = str(err.value)
    assert "EnvValue" not in text and "a int" not in text
    assert ("hospital.http.retries: must be a whole number (int), but FHIRBRIDGE_HOSPITAL__HTTP__RETRIES='three' "
            "is not") in text
    with pytest.raises(ConfigError) as err:
        config.load(cfg, environ={"FHIRBRIDGE_SERVICE__POLL_SECONDS": "soon"})
    assert "must be a number (float), but FHIRBRIDGE_SERVICE__POLL_SECONDS='soon' is not" in str(err.value)


def test_a_wrongly_typed_key_in_the_file_says_what_it_wants_in_words(tmp_path, capsys):
    cfg = init_site(tmp_path, capsys)
    cfg.write_text(re.sub(r"^retries = \d+", 'retries = "3"', cfg.read_text(), count=1, flags=re.M))
    with pytest.raises(ConfigError) as err:
        config.load(cfg)
    assert "hospital.http.retries: must be a whole number (int), got text '3'" in str(err.value)


# --- the store is down ---------------------------------------------------------------------------------

def test_status_with_the_database_down_is_one_line_and_exit_5(tmp_path, capsys):
    cfg = init_site(tmp_path, capsys)
    closed = free_port()
    done = fhirbridge("--config", cfg, "status",
                      env={"FHIRBRIDGE_FHIRBRIDGE__STORE_URL": f"postgresql+psycopg://fb@127.0.0.1:{closed}/fb"})
    assert done.returncode == 5, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: cannot reach the Case store ([fhirbridge] store_url):")
    assert f"port {closed} failed: Connection refused" in done.stderr and "fhirbridge doctor" in done.stderr


# --- serve: the port in use, --bind PORT, a reviewer's key file missing ---------------------------------

def test_serve_on_a_port_in_use_is_one_line_and_exit_6(tmp_path, capsys):
    cfg = init_site(tmp_path, capsys)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        done = fhirbridge("--config", cfg, "serve", "--bind", f"127.0.0.1:{port}", timeout=30)
    finally:
        taken.close()
    assert done.returncode == 6, done.stdout + done.stderr
    assert done.stderr.strip() == (f"error: cannot listen on 127.0.0.1:{port}: port {port} is in use by another "
                                   f"program (another `fhirbridge serve`? `ss -ltnp 'sport = :{port}'` shows "
                                   "which); stop it or choose another port with --bind host:port")
    assert "gunicorn" not in (done.stdout + done.stderr).lower()


def test_serve_bind_that_is_no_port_is_refused(tmp_path, capsys):
    cfg = init_site(tmp_path, capsys)
    # A process of its own: a `serve` that got past its checks would exec gunicorn in place of the caller.
    done = fhirbridge("--config", cfg, "serve", "--bind", "localhost:http", timeout=30)
    assert done.returncode == 2 and "give host:port (127.0.0.1:8080, 0.0.0.0:8080) or a port (8080)" in done.stderr


def test_serve_probe_bind_on_the_api_address_or_a_port_in_use_is_refused(tmp_path, capsys):
    cfg = init_site(tmp_path, capsys)
    port = free_port()
    same = fhirbridge("--config", cfg, "serve", "--bind", str(port), "--probe-bind", f"127.0.0.1:{port}", timeout=30)
    assert same.returncode == 2 and "is the API's own address; give the probes a port of their own" in same.stderr
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    busy = taken.getsockname()[1]
    try:
        done = fhirbridge("--config", cfg, "serve", "--bind", str(port), "--probe-bind", str(busy), timeout=30)
    finally:
        taken.close()
    assert done.returncode == 6 and f"cannot listen on 127.0.0.1:{busy}: port {busy} is in use" in done.stderr
    assert "choose another port with --probe-bind host:port" in done.stderr
    assert "gunicorn" not in (done.stdout + done.stderr).lower()


@pytest.mark.sekmet
def test_serve_bind_port_alone_listens_on_loopback_and_warns_of_a_missing_reviewer_key(hospital):
    """`--bind 8080` was read as a host named 8080; and with a reviewer's key file gone, serve said nothing and
    /readyz said "ready" until that reviewer's first Case failed at seal."""
    jwks = next(iter(hospital.reviewers.values())).files["public_keys"]
    jwks.rename(jwks.with_suffix(".moved"))
    port = free_port()
    log = hospital.root / "serve.log"
    with processes.running([sys.executable, "-m", "fhirbridge", "--config", hospital.config_path, "serve",
                            "--bind", str(port), "--workers", "1", "--no-scheduler"], log=log) as proc:
        processes.wait_for_http(f"http://127.0.0.1:{port}/healthz", what="serve --bind PORT", proc=proc, log=log,
                                timeout=processes.READY_SECONDS)
        ready = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=30)
    text = log.read_text()
    assert re.search(rf"warning: .*reviewers\[0\]\.jwks: .*{re.escape(str(jwks))}", text), text[-2000:]
    body = ready.json()
    assert ready.status_code == 200 and body["status"] == "degraded"
    assert str(jwks) in body["checks"]["keys"]


@pytest.mark.sekmet
def test_readiness_names_a_missing_reviewer_key_file(hospital):
    svc = Service(config.load(hospital.config_path))
    try:
        client = create_app(svc=svc).test_client()
        assert client.get("/readyz").get_json()["checks"]["keys"] == "ok"
        jwks = next(iter(hospital.reviewers.values())).files["public_keys"]
        jwks.unlink()
        client = create_app(svc=svc).test_client()      # a new app: the 5 s cache is per app
        body = client.get("/readyz").get_json()
        assert body["status"] == "degraded" and str(jwks) in body["checks"]["keys"]
    finally:
        svc.stop()


# --- --hospital Nowhere; retry of a finished Case ------------------------------------------------------

def test_an_unknown_hospital_is_refused_with_the_known_names(tmp_path, capsys):
    cfg = init_site(tmp_path, capsys)
    code, out, err = run(capsys, "--config", cfg, "--hospital", "Nowhere", "status")
    assert code == 2 and not out
    assert "no hospital named 'Nowhere' (configured: General Hospital)" in err
    # A process of its own: before the fix `worker` ignored the option and ran until stopped.
    done = fhirbridge("--config", cfg, "--hospital", "Nowhere", "worker", timeout=20)
    assert done.returncode == 2 and "--hospital does not apply to `worker`" in done.stderr


@pytest.mark.sekmet
def test_retry_of_a_finished_case_is_refused(hospital, seeded, capsys):
    sr = hospital.order(seeded["patient"])
    hospital.run()
    case = cancel(hospital.app, hospital.case_for(sr), "ordered twice")
    code, out, err = run(capsys, "--config", hospital.config_path, "retry", case.id)
    assert code == 1 and "will continue it" not in out + err
    assert f"error: Case {case.id[:8]} is cancelled, a final state: there is nothing to retry" in err
    assert hospital.app.store.get(case.id).step == "cancelled"


# --- the exit codes are documented, and the table matches the code ---------------------------------------

def test_the_exit_code_table_matches_the_code():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "troubleshoot.md").read_text()
    table = doc.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| `(\d+)` \| ([^|]+)\|", table, re.M)}
    constants = {v for k, v in vars(errors).items() if k.startswith("EXIT_") and isinstance(v, int)}
    kinds = {cls.exit_code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.FhirbridgeError)}
    assert constants | kinds == set(documented), (sorted(constants | kinds), sorted(documented))
