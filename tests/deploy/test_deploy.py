"""deploy/: the Dockerfile, compose file, Kubernetes manifests and systemd unit are linted with the real tools
(hadolint, kubernetes-validate, yamllint, systemd-analyze; each shown to catch a broken copy) and checked for
what operations rely on; deploy/gunicorn.conf.py boots the app, which then works an order with /metrics and
JSON logs showing it."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from fhirbridge.config import loader as config
from fhirbridge.demo.localehr import free_port
from tests.kit import processes

METRICS_TOKEN = "metrics-token-for-the-deploy-test"
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install -e '.[lint]')")
    return found


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kw)


def k8s_docs() -> dict[str, dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") and doc.get("apiVersion", "").startswith(("v1", "apps/")):
                out[doc["kind"]] = doc
    return out


# --- linters ---------------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint(tmp_path):
    hadolint = tool("hadolint")
    result = run(hadolint, DEPLOY / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "Dockerfile"
    broken.write_text((DEPLOY / "Dockerfile").read_text().replace(
        "USER 10001:10001", "USER 10001:10001\nRUN sudo apt-get install curl"))
    assert run(hadolint, broken).returncode != 0   # the linter is really looking


def test_kubernetes_manifests_match_the_api_schemas(tmp_path):
    validate = tool("kubernetes-validate")
    manifests = [p for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]
    assert {p.name for p in manifests} >= {"deployment.yaml", "service.yaml", "configmap.yaml", "pvc.yaml",
                                          "secret.example.yaml"}
    result = run(validate, "--strict", *manifests)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "deployment.yaml"
    broken.write_text((K8S / "deployment.yaml").read_text().replace("replicas: 2", "replicas: two")
                      .replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"))
    assert run(validate, "--strict", broken).returncode != 0


def test_yaml_passes_yamllint():
    yamllint = tool("yamllint")
    result = run(yamllint, "--strict", "-c", DEPLOY / ".yamllint.yaml", DEPLOY)
    assert result.returncode == 0, result.stdout + result.stderr


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    unit = (DEPLOY / "systemd" / "fhirbridge.service").read_text()
    # verify checks that ExecStart exists: point it at this environment's fhirbridge.
    exe = shutil.which("fhirbridge", path=str(BIN))
    local = tmp_path / "fhirbridge.service"
    local.write_text(unit.replace("/opt/fhirbridge/bin/fhirbridge", exe))
    result = run(analyze, "verify", local)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(local.read_text().replace("ProtectSystem=", "ProtectSystm="))
    assert "Unknown key" in run(analyze, "verify", broken).stderr
    # What operations rely on: a stop that outlasts gunicorn's graceful timeout, not root, secrets from a file.
    fields = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert int(fields["TimeoutStopSec"]) > 60 and fields["User"] != "root"
    assert fields["ExecStart"].endswith("fhirbridge serve --bind 127.0.0.1:8080")
    assert fields["EnvironmentFile"] == "/etc/fhirbridge/fhirbridge.env"


# --- what the files must say -----------------------------------------------------------------------------

def test_dockerfile_is_slim_non_root_with_a_healthcheck_and_no_secrets():
    text = (DEPLOY / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all("slim" in f and not f.endswith(":latest") for f in froms)
    user = re.findall(r"^USER (\S+)", text, re.M)[-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) >= 1000
    health = re.search(r"^HEALTHCHECK .*\n(?:.*\\\n)*.*", text, re.M).group(0)
    assert "/healthz" in health
    probe_port = re.search(r"FHIRBRIDGE_PROBE_BIND=0\.0\.0\.0:(\d+)", text).group(1)
    assert f"127.0.0.1:{probe_port}/healthz" in health and re.search(rf"^EXPOSE .*\b{probe_port}\b", text, re.M)
    copied = re.findall(r"^COPY (?!--from)(\S+)", text, re.M)
    assert set(copied) == {"pyproject.toml", "mappings", "src"}
    assert not re.search(r"^(ENV|ARG) .*(TOKEN|PASSWORD|SECRET)", text, re.M | re.I)
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore      # everything is excluded unless listed
    assert "**/*.jwks.json" in ignore


def test_compose_runs_fhirbridge_with_postgres_and_an_optional_demo_ehr():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"fhirbridge", "postgres", "demo-ehr"}
    fb, pg, demo = services["fhirbridge"], services["postgres"], services["demo-ehr"]
    assert fb["depends_on"]["postgres"]["condition"] == "service_healthy" and pg["healthcheck"]["test"]
    assert demo["profiles"] == ["demo"] and "profiles" not in fb and "profiles" not in pg
    assert fb["build"]["dockerfile"] == "deploy/Dockerfile"
    assert int(fb["stop_grace_period"].rstrip("s")) > 60
    assert "./config:/etc/fhirbridge:ro" in fb["volumes"]
    # Every secret comes from deploy/.env (required: compose stops with the message if it is missing).
    for env in (fb["environment"], pg["environment"]):
        for key, value in env.items():
            if re.search("PASSWORD|TOKEN|STORE_URL", key):
                assert re.search(r"\$\{[A-Z_]+:\?[^}]+\}", value), (key, value)
    example = dict(line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example == {"POSTGRES_PASSWORD": "", "FHIRBRIDGE_API_TOKEN": "", "FHIRBRIDGE_METRICS_TOKEN": ""}
    # The demo EHR's own settings name the address fhirbridge reaches it at.
    settings = yaml.safe_load((DEPLOY / "demo-ehr" / "settings.yaml").read_text())
    assert settings["base_url"] == f"http://demo-ehr:{settings['port']}/fhir"
    assert f"127.0.0.1:{settings['port']}:{settings['port']}" in demo["ports"]


def test_kubernetes_deployment_has_what_operations_need(hospital):
    docs = k8s_docs()
    dep = docs["Deployment"]
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    assert spec["replicas"] == 2
    c = pod["containers"][0]
    routes = {r.rule for r in __import__("fhirbridge.service.app", fromlist=["x"]).create_app(
        svc=__import__("fhirbridge.service.scheduler", fromlist=["x"]).Service(config.load(hospital.config_path)))
        .url_map.iter_rules()}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and "/healthz" in routes
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and "/readyz" in routes
    # The probes ask the probe listener's port, which the container opens and the service is told to serve.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == "probes", probe
    assert env["FHIRBRIDGE_PROBE_BIND"] == f"0.0.0.0:{ports['probes']}" and ports["probes"] != ports["http"]
    assert (dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
            and "/metrics" in routes)
    assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    sec = pod["securityContext"]
    docker_uid = int(re.findall(r"^USER (\d+)", (DEPLOY / "Dockerfile").read_text(), re.M)[-1])
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] == docker_uid
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["terminationGracePeriodSeconds"] > 60
    env = {e["name"]: e for e in c["env"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # Metrics of both workers go to a writable directory; secrets only from the Secret.
    assert any(env["PROMETHEUS_MULTIPROC_DIR"]["value"].startswith(p) and "emptyDir" in volumes[n]
               for p, n in mounts.items())
    secret = docs["Secret"]
    for e in env.values():
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
        else:
            assert not re.search("TOKEN|PASSWORD|STORE_URL", e["name"]), e
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]   # replicas share data_dir
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]
    assert docs["Service"]["spec"]["selector"] == spec["selector"]["matchLabels"]


def test_kubernetes_configmap_is_a_valid_config_without_secrets(tmp_path):
    docs = k8s_docs()
    data = docs["ConfigMap"]["data"]
    text = data["fhirbridge.toml"]
    for word in ("token", "password", "api_token", "store_url ="):
        assert not re.search(rf"^\s*{word}", text, re.M | re.I), word
    for name, value in data.items():
        if name.endswith(".jwks.json"):
            assert all("d" not in k for k in json.loads(value)["keys"])
    # It loads as fhirbridge loads it in the pod (store URL from the Secret's env variable).
    path = tmp_path / "fhirbridge.toml"
    path.write_text(text)
    cfg = config.load(path, environ={"FHIRBRIDGE_FHIRBRIDGE__STORE_URL": "postgresql+psycopg://u:p@db/fb"})
    dep = docs["Deployment"]["spec"]["template"]["spec"]
    key_mount = next(m["mountPath"] for m in dep["containers"][0]["volumeMounts"] if m["name"] == "keys")
    key_items = {i["path"] for v in dep["volumes"] if v["name"] == "keys" for i in v["secret"]["items"]}
    assert cfg.hospital.keys.parent == Path(key_mount) and cfg.hospital.keys.name in key_items
    assert str(cfg.data_dir) == next(m["mountPath"] for m in dep["containers"][0]["volumeMounts"]
                                     if m["name"] == "data")
    config_mount = next(m["mountPath"] for m in dep["containers"][0]["volumeMounts"] if m["name"] == "config")
    for r in cfg.reviewers.values():
        assert r.jwks.parent == Path(config_mount) and r.jwks.name in data


def test_no_private_key_material_anywhere_in_deploy():
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert "PRIVATE KEY" not in text and not re.search(r'"d"\s*:', text), path


def test_gunicorn_conf_re_exports_the_project_settings():
    text = (DEPLOY / "gunicorn.conf.py").read_text()
    assert "from fhirbridge.service.gunicorn_conf import *" in text
    # Loaded in a child, as gunicorn does (it sets the metrics directory in its environment).
    code = ("import runpy, os; ns = runpy.run_path('deploy/gunicorn.conf.py'); "
            "print(ns['logger_class'], ns['worker_class'], 'PROMETHEUS_MULTIPROC_DIR' in os.environ, "
            "callable(ns['child_exit']), callable(ns['post_worker_init'])); "
            "import shutil; shutil.rmtree(os.environ['PROMETHEUS_MULTIPROC_DIR'])")
    result = run(sys.executable, "-c", code, cwd=ROOT)
    assert result.stdout.split() == ["fhirbridge.service.gunicorn_logger.GunicornLogger", "gthread", "True", "True",
                                     "True"], result.stderr


# --- gunicorn boots the app: the demo run ------------------------------------------------------------------

TOKEN = "staff-token-" + "y" * 20


@pytest.mark.sekmet
def test_gunicorn_config_boots_the_app_and_metrics_and_logs_show_a_referral(tmp_path, ehr, seeded):
    from tests.kit.hospital import TestHospital
    env = {"FHIRBRIDGE_API__TOKENS": TOKEN, "FHIRBRIDGE_SERVICE__WORK_SECONDS": "0.5",
           "FHIRBRIDGE_SERVICE__POLL_SECONDS": "2"}
    hospital = TestHospital(tmp_path, ehr.base_url, env=env)
    port, probe_port = free_port(), free_port()
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    proc = None
    try:
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen(
                [str(BIN / "gunicorn"), "-c", str(DEPLOY / "gunicorn.conf.py"), "fhirbridge.service.app:create_app()"],
                cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                start_new_session=True,   # its own process group: the cleanup below stops master and workers
                env={**{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}, **env,
                     "FHIRBRIDGE_CONFIG": str(hospital.config_path), "FHIRBRIDGE_BIND": f"127.0.0.1:{port}",
                     "FHIRBRIDGE_WORKERS": "2", "FHIRBRIDGE_LOG_FORMAT": "json", "FHIRBRIDGE_GRACEFUL_TIMEOUT": "20",
                     "FHIRBRIDGE_METRICS__TOKEN": METRICS_TOKEN,
                     "FHIRBRIDGE_PROBE_BIND": f"127.0.0.1:{probe_port}"})
        processes.wait_for_http(f"{base}/healthz", what=f"gunicorn with deploy/gunicorn.conf.py (pid {proc.pid})",
                                proc=proc, log=err)
        # Each worker's probe listener (service/probes.py) answers on the port of its own, with the same checks.
        processes.wait_for_http(f"http://127.0.0.1:{probe_port}/healthz", what="the probe listener", proc=proc,
                                log=err)
        probe_ready = requests.get(f"http://127.0.0.1:{probe_port}/readyz", timeout=30).json()
        assert probe_ready["checks"].keys() == requests.get(f"{base}/readyz", timeout=30).json()["checks"].keys()
        assert probe_ready["checks"]["store"] == "ok"
        created = requests.post(f"{base}/api/orders", headers={**auth, "X-Request-ID": "demo-order-1"}, timeout=60,
                                json={"patient": seeded["patient"], "question": "Is surgery indicated now?",
                                      "profile": "spine", "requester": seeded["physician"]})
        assert created.status_code == 201, created.text
        assert created.headers["X-Request-ID"] == "demo-order-1"
        case_id = created.json()["case"]["id"]
        deadline = time.monotonic() + 90
        while requests.get(f"{base}/api/cases/{case_id}", headers=auth, timeout=10).json()["step"] != "await_opinion":
            assert time.monotonic() < deadline, err.read_text(errors="replace")
            time.sleep(0.5)

        # Both workers' figures in one scrape (multiprocess directory), the store's figures alongside.
        from tests.kit.metrics import parse, total, value
        name = hospital.app.hospital.name

        def scrape() -> dict:
            return parse(requests.get(f"{base}/metrics", timeout=10,
                                      headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text)

        # The runner records a step's figures just after the store has the Case's next step (loop/runner.py
        # _run_one): under load the Case can read await_opinion a moment before the delivery is counted.
        deadline = time.monotonic() + 30
        while total(scrape(), "fhirbridge_packages_sent_total", hospital=name, reviewer="spine-center") != 1:
            assert time.monotonic() < deadline, "the delivery was never counted"
            time.sleep(0.2)
        samples = {}
        for _ in range(4):  # whichever worker answers, the figures are the same
            samples = scrape()
            assert total(samples, "fhirbridge_packages_sent_total", hospital=name, reviewer="spine-center") == 1
        assert value(samples, "fhirbridge_cases", hospital=name, step="await_opinion") == 1
        for step in ("collect", "seal", "deliver"):
            assert total(samples, "fhirbridge_step_duration_seconds_count", hospital=name, step=step,
                         outcome="done") == 1, step
        assert total(samples, "fhirbridge_ehr_requests_total", hospital=name, resource_type="ServiceRequest") >= 2
        assert total(samples, "fhirbridge_ehr_request_duration_seconds_count", hospital=name) >= 10
        assert value(samples, "fhirbridge_queue_depth", hospital=name, state="due") == 0
    finally:
        try:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=40)
        finally:
            if proc is not None:
                processes.stop(proc)   # whatever is left of its process group (nothing after a clean exit)
            hospital.close()
    assert code == 0, err.read_text(errors="replace")

    # Logs: every line on both streams is JSON; step lines carry the Case id, access lines the request id.
    lines = [json.loads(line) for f in (out, err) for line in f.read_text().splitlines() if line.strip()]
    steps = [x for x in lines if x["logger"] == "fhirbridge.loop.runner"]
    assert {x["message"] for x in steps} >= {"collect: ok -> seal", "seal: ok -> deliver",
                                             "deliver: ok -> await_opinion"}
    assert all(x["case_id"] == case_id for x in steps)
    access = [x for x in lines if x["logger"] == "gunicorn.access"]
    order_line = next(x for x in access if x.get("request_id") == "demo-order-1")
    assert (order_line["method"], order_line["path"], order_line["status"]) == ("POST", "/api/orders", 201)
    assert any(x["message"].startswith("Booting worker") for x in lines)
    text = out.read_text() + err.read_text()
    assert "Zeltwanger" not in text and TOKEN not in text
