"""Serve, worker, subscribe: run fhirbridge as a service."""
from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path

from fhirbridge.cli.common import say
from fhirbridge.config import loader as config
from fhirbridge.ehr.context import App
from fhirbridge.ehr.subscriptions import subscribe
from fhirbridge.errors import FhirbridgeError, PortInUse, UsageError
from fhirbridge.service.scheduler import Service


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="run the service: HTTP API + scheduler, under gunicorn")
    s.add_argument("--bind", help="host:port (default 127.0.0.1:8080, or $FHIRBRIDGE_BIND)")
    s.add_argument("--probe-bind", help="also answer /healthz and /readyz on this host:port, from a thread of "
                   "their own that busy API requests never delay (or $FHIRBRIDGE_PROBE_BIND; default: off)")
    s.add_argument("--workers", type=int, help="gunicorn worker processes (default 2)")
    s.add_argument("--no-scheduler", action="store_true", help="serve HTTP only (run `fhirbridge worker` elsewhere)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("worker", help="run the scheduler only (intake, steps, inbox, overdue), no HTTP")
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("subscribe", help="have the EHR notify this service of new and revoked orders (FHIR R4 "
                                         "Subscriptions Backport, rest-hook to [service] public_url)")
    # SUPPRESS: without the option here, the global --hospital (given before the command) stays in effect.
    s.add_argument("--hospital", default=argparse.SUPPRESS, help="only this hospital (default: every one configured)")
    s.add_argument("--payload", choices=["id-only", "full-resource"], default="id-only",
                   help="what each notification carries: the order's id (read back from the EHR) or the order "
                        "itself (default: id-only)")
    s.add_argument("--heartbeat", type=int, default=120, metavar="SECONDS",
                   help="ask the EHR for a heartbeat this often, so missed events show (0: none; default 120)")
    s.add_argument("--topic", help="the EHR's SubscriptionTopic canonical URL (default: discovered from the EHR)")
    s.set_defaults(func=cmd_subscribe)


def cmd_serve(args) -> int:
    """Exec gunicorn with the project's config: the HTTP API plus, in each worker, the scheduler."""
    cfg_path = config.find_config_file(args.config).resolve()
    cfg = config.load(cfg_path)  # a bad config fails here with its clear message, not in every worker
    env = dict(os.environ, FHIRBRIDGE_CONFIG=str(cfg_path))
    bind = parse_bind(args.bind or os.environ.get("FHIRBRIDGE_BIND") or DEFAULT_BIND)
    check_can_listen(bind)  # one clear line here, not gunicorn's retries and tracebacks in the log
    env["FHIRBRIDGE_BIND"] = bind
    probe_bind = args.probe_bind or os.environ.get("FHIRBRIDGE_PROBE_BIND")
    if probe_bind:
        probe_bind = parse_bind(probe_bind)
        if probe_bind == bind:
            raise UsageError(f"--probe-bind {probe_bind} is the API's own address; give the probes a port of their own")
        check_can_listen(probe_bind, "--probe-bind")
        env["FHIRBRIDGE_PROBE_BIND"] = probe_bind
    # A reviewer's missing or wrong key file fails its Cases only when they reach seal: said now (and by
    # /readyz, as a "keys" check), so the operator does not learn it from a failed Case hours later.
    for problem in config.check_files(cfg):
        say(f"warning: {problem}", err=True)
    if args.workers:
        env["FHIRBRIDGE_WORKERS"] = str(args.workers)
    if args.no_scheduler:
        env["FHIRBRIDGE_SCHEDULER"] = "off"
    exe = Path(sys.executable).with_name("gunicorn")
    gunicorn = str(exe) if exe.exists() else shutil.which("gunicorn")
    if not gunicorn:
        raise FhirbridgeError("gunicorn is not installed next to this Python; reinstall fhirbridge")
    conf = Path(__file__).resolve().parent.parent / "service" / "gunicorn_conf.py"
    os.execve(gunicorn, [gunicorn, "-c", str(conf), "fhirbridge.service.app:create_app()"], env)
    return 0  # not reached


DEFAULT_BIND = "127.0.0.1:8080"


def parse_bind(value: str) -> str:
    """`--bind` as gunicorn needs it, host:port. A bare port (`8080`, `:8080`) listens on 127.0.0.1, like
    the default (gunicorn would read `8080` as a host named 8080); `unix:PATH` is passed on as is."""
    value = value.strip()
    if value.startswith("unix:"):
        return value
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "", value
    host = host or "127.0.0.1"
    if host.startswith("[") and host.endswith("]"):   # [::1]:8080
        host = host[1:-1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--bind {value!r}: give host:port (127.0.0.1:8080, 0.0.0.0:8080) or a port (8080); "
                         f"{port!r} is not a port number (1-65535)")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_can_listen(bind: str, option: str = "--bind") -> None:
    """Listen on `bind` for a moment, as gunicorn will (SO_REUSEADDR): a port another process holds, a host
    that is no address of this machine, or a privileged port are refused with what to do (`option`: the
    command-line option that names it)."""
    if bind.startswith("unix:"):
        return
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortInUse(f"cannot listen on {bind}: {host!r} is not a name or address of this machine "
                        f"({exc.strerror}); give {option} 127.0.0.1:{port} or 0.0.0.0:{port}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"cannot listen on {bind}: port {port} is in use by another program (another "
                            f"`fhirbridge serve`? `ss -ltnp 'sport = :{port}'` shows which); stop it or choose "
                            f"another port with {option} host:port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise PortInUse(f"cannot listen on {bind}: {host} is not an address of this machine; give "
                            f"{option} 127.0.0.1:{port} (this machine only) or 0.0.0.0:{port} (every "
                            "interface)") from None
        if exc.errno == errno.EACCES:
            raise PortInUse(f"cannot listen on {bind}: ports below 1024 need privileges; use a port above "
                            "1024 behind your reverse proxy") from None
        raise PortInUse(f"cannot listen on {bind}: {exc.strerror or exc}") from None
    finally:
        sock.close()


def cmd_worker(args) -> int:
    """The scheduler without HTTP: for worker-only replicas. Stops cleanly on SIGTERM/SIGINT."""
    svc = Service(config.load(args.config))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_a: done.set())
    svc.start()
    say(f"fhirbridge worker {svc.worker} running ({len(svc.apps)} hospital(s)); SIGTERM stops it")
    done.wait()
    say("stopping: finishing the step in hand, taking nothing new")
    svc.stop(wait=True)
    return 0


def cmd_subscribe(args) -> int:
    """Register (or bring up to date) each hospital's Subscriptions Backport subscription on its EHR."""
    cfg = config.load(args.config)
    if args.hospital:
        cfg.hospital_named(args.hospital)  # refused before anything is registered, with the configured names
    apps = ([App(cfg, hospital_name=args.hospital)] if args.hospital else App.per_hospital(cfg))
    status = 0
    try:
        for app in apps:
            result = subscribe(app, payload=args.payload, heartbeat=args.heartbeat, topic=args.topic)
            for warning in result.warnings:
                say(f"warning: {warning}", err=True)
            for off in result.turned_off:
                say(f"{off}: turned off (replaced by this one)")
            beat = f"heartbeat {result.heartbeat} s" if result.heartbeat else "no heartbeat"
            say(f"{result.subscription}: {result.status} ({result.action}; {app.hospital.name}; topic "
                f"{result.topic}; {result.payload}; {beat}; notifies {result.endpoint})")
            if result.status == "error":
                say(f"error: the EHR put {result.subscription} in error: {result.error or 'no reason given'}. "
                    f"Is fhirbridge serving {result.endpoint} (`fhirbridge serve`) and can the EHR reach it? "
                    "Then run `fhirbridge subscribe` again", err=True)
                status = 1
            elif result.status == "requested":
                say(f"note: the EHR has not confirmed the handshake yet; check {result.subscription} later",
                    err=True)
    finally:
        for app in apps:
            app.close()
        if apps and apps[0].shared_store is not None:
            apps[0].shared_store.close()
    return status
