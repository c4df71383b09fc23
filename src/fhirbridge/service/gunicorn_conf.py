"""gunicorn configuration for `fhirbridge serve` (deploy/gunicorn.conf.py re-exports it).

Each gunicorn worker builds the app (`fhirbridge.service.app:create_app()`, config from FHIRBRIDGE_CONFIG) and, once
initialised, starts its own scheduler; the Case store's claims keep workers and replicas from doing the
same work. On SIGTERM gunicorn stops accepting requests and each worker's `worker_exit` stops its
scheduler: the step in hand finishes (up to graceful_timeout), nothing new is claimed, and an unfinished
step's lease lapses so another replica resumes it. Settings come from FHIRBRIDGE_* variables.
"""
import os
import shutil
import tempfile
from pathlib import Path

from fhirbridge.ops import logs

# Metrics from every worker in one place (prometheus_client multiprocess mode, see ops/metrics.py). Set before any
# worker imports prometheus_client; a directory of our own unless the operator gives one (e.g. an emptyDir).
_OWN_METRICS_DIR = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _OWN_METRICS_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="fhirbridge-metrics-")
# Only now: prometheus_client picks its mode when it is first imported.
from prometheus_client import multiprocess  # noqa: E402

from fhirbridge.service.health import readiness  # noqa: E402
from fhirbridge.service.probes import ProbeListener  # noqa: E402

logs.setup(level="INFO")
logger_class = "fhirbridge.service.gunicorn_logger.GunicornLogger"

bind = os.environ.get("FHIRBRIDGE_BIND", "127.0.0.1:8080")
workers = int(os.environ.get("FHIRBRIDGE_WORKERS", "2"))
worker_class = "gthread"
threads = int(os.environ.get("FHIRBRIDGE_THREADS", "4"))
timeout = int(os.environ.get("FHIRBRIDGE_TIMEOUT", "120"))
graceful_timeout = int(os.environ.get("FHIRBRIDGE_GRACEFUL_TIMEOUT", "60"))
keepalive = 5
accesslog = "-"
# No query strings in the access log: they could carry identifiers.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms %({x-request-id}o)s'
errorlog = "-"
# gunicorn 27's control socket defaults to one path per user ($HOME/.gunicorn/gunicorn.ctl): two servers on
# one host would share it, and a read-only home would break start-up. fhirbridge does not use it.
control_socket_disable = True
loglevel = os.environ.get("FHIRBRIDGE_LOG_LEVEL", "info")


def post_worker_init(worker):
    if os.environ.get("FHIRBRIDGE_SCHEDULER", "on") != "off":
        worker.wsgi.extensions["fhirbridge"].start()
    probe_bind = os.environ.get("FHIRBRIDGE_PROBE_BIND")
    if probe_bind:
        # The probes on a port of their own (service/probes.py): never queued behind this worker's API threads.
        ext = worker.wsgi.extensions
        cache = ext.setdefault("fhirbridge.ready", {})
        worker.fhirbridge_probes = ProbeListener(probe_bind, lambda: readiness(ext["fhirbridge"], cache)).start()


def worker_exit(server, worker):
    probes = getattr(worker, "fhirbridge_probes", None)
    if probes is not None:
        probes.stop()
    svc = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("fhirbridge")
    if svc is not None:
        # Finish the step in hand if it can be done well within graceful_timeout, then release claims.
        svc.stop(wait=True, deadline=max(1.0, graceful_timeout - 15))


def on_starting(server):
    # Counters of an earlier run of this server must not be added to this one's.
    metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for f in metrics_dir.glob("*.db"):
        f.unlink()


def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _OWN_METRICS_DIR:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
