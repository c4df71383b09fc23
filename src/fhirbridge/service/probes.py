"""The probe listener: `/healthz` and `/readyz` on a port of their own, never queued behind the API.

Under load every gunicorn thread of a worker can be busy with slow work (an order written to the EHR, a
page of Cases), and a probe on the main port waits in the same queue: the load suite measured `/healthz` at
p50 0.7 s and p99 3.2 s with 200 clients, so a liveness probe with a 1 s timeout would restart a replica
that is merely busy. Each worker therefore also answers the two probes on `FHIRBRIDGE_PROBE_BIND` from a
small thread of its own. Every worker binds the same address with SO_REUSEPORT (Linux spreads the
connections over them), so the port answers as long as any worker does, and a worker gunicorn replaces
binds again when it starts.

Liveness here says the worker process runs and its interpreter schedules threads; a worker whose request
threads hang is gunicorn's to replace (its worker `timeout` heartbeat). Readiness is the very check the
main port's `/readyz` runs, with the same 5 s cache (`health.readiness`).
"""
from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fhirbridge import jsonutil

log = logging.getLogger(__name__)

Probe = Callable[[], tuple[dict, int]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    probes: dict[str, Probe]

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily):
        self.address_family = family   # read by TCPServer.__init__ when it makes the socket
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # Every worker of this server binds the same port: the kernel balances connections among them.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "fhirbridge-probes"
    sys_version = ""

    def do_GET(self) -> None:
        probe = self.server.probes.get(self.path.split("?", 1)[0])
        body: dict[str, object]
        if probe is None:
            body, status = {"error": {"status": 404, "message": "this port answers /healthz and /readyz only"}}, 404
        else:
            try:
                body, status = probe()
            except Exception as exc:  # noqa: BLE001 - a probe that breaks answers 503, it never kills the listener
                body, status = {"status": "not ready", "error": exc.__class__.__name__}, 503
        data = jsonutil.dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        # A probe every few seconds is not worth a log line (the main port's access log has the API).
        pass


def parse_bind(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"FHIRBRIDGE_PROBE_BIND={value!r}: give host:port, e.g. 0.0.0.0:8081")
    return (host.strip("[]") or "127.0.0.1"), int(port)


class ProbeListener:
    """`/healthz` and `/readyz` served from a daemon thread until `stop()`."""

    def __init__(self, bind: str, readiness: Probe):
        self.address = parse_bind(bind)
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        self._server = _Server(self.address, family)
        self._server.probes = {"/healthz": lambda: ({"status": "alive"}, 200), "/readyz": readiness}
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fhirbridge-probes",
                                        kwargs={"poll_interval": 0.5}, daemon=True)

    def start(self) -> ProbeListener:
        self._thread.start()
        log.debug("probe listener on %s:%d", *self.address)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
