"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the real EHR, for the tests.

Rules match requests by method and a path regex and then, for the next `times` matching requests (each
with probability `chance`, drawn from the proxy's seeded generator), answer with a status (headers, body),
delay before forwarding, drop the connection without answering, forward and then drop the answer (the
server did the work; the client never hears: a lost response), forward and send only part of the body
(`truncate`: the Content-Length promises more, then the connection is reset), forward and answer late
(`slow-response`: the server did the work, the answer comes after `delay`), forward and then answer `status`
instead of the server's answer (`status-after-commit`: a gateway's 502 for work the server did), or just
forward. A rule that
fires goes on firing for its next `burst - 1` matches whatever its chance (bursts of 503). `rewrite_request`
changes the body sent upstream (a request the real server then rejects). `before`
and `after` are called with the request path before forwarding and once the upstream answered (the crash
suite kills a worker there: mid-transaction). Unmatched requests are forwarded unchanged. Absolute upstream
URLs in responses (paging links, Location) are rewritten to the proxy so that every request goes through it.
A subclass may refuse or re-authorise a request before any rule sees it (`admit`: tests/kit/scopegate.py),
and change what is sent upstream and what comes back (`transform_request`, `transform_response`: an EHR that
behaves like a vendor's, tests/kit/ehrproxy.py).
"""
from __future__ import annotations

import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length",
              "content-encoding", "host"}


@dataclass
class Rule:
    method: str | None = None          # None: any
    path: str = ".*"                   # regex searched in the path+query
    # status | delay | drop | lose-response | rewrite | truncate | slow-response | status-after-commit | forward
    action: str = "status"
    rewrite: object = None             # rewrite: callable(bytes) -> bytes applied to the upstream body
    rewrite_request: object = None     # callable(bytes) -> bytes applied to the body sent upstream
    before: object = None              # callable(path), run before forwarding
    after: object = None               # callable(path), run after the upstream answered, before we answer
    chance: float = 1.0                # probability that a matching request is hit
    burst: int = 1                     # once hit, also hit the next burst - 1 matching requests
    kind: str = ""                     # a name for the fault in the log (default: the action)
    _burst_left: int = 0
    status: int = 503
    headers: dict = field(default_factory=dict)
    body: bytes | None = None          # status: the answer's body (default: a transient OperationOutcome)
    delay: float = 0.0
    times: int = 1_000_000
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method in (None, method)) and re.search(self.path, path) is not None and self.hits < self.times


class FaultProxy:
    def __init__(self, upstream_base: str, *, seed: int = 0):
        self.random = random.Random(seed)
        self.upstream = upstream_base.rstrip("/")
        self.upstream_root = re.match(r"(https?://[^/]+)", self.upstream).group(1)
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str, int | str]] = []
        self.injected: Counter = Counter()   # faults injected, by rule kind (or action)
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a):
                pass

            def _handle(self):
                proxy._serve(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that hung up (a killed worker, a timeout): expected here, not worth a traceback

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.root = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.base_url = self.root + self.upstream[len(self.upstream_root):]

    def add(self, **kw) -> Rule:
        rule = Rule(**kw)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def count(self, method: str, path_regex: str) -> int:
        return sum(1 for m, p, _s in self.log if m == method and re.search(path_regex, p))

    def _rule_for(self, method: str, path: str) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if not rule.matches(method, path):
                    continue
                if rule._burst_left > 0 or rule.chance >= 1 or self.random.random() < rule.chance:
                    rule._burst_left = rule._burst_left - 1 if rule._burst_left > 0 else rule.burst - 1
                    rule.hits += 1
                    self.injected[rule.kind or rule.action] += 1
                    return rule
        return None

    def admit(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, bytes] | dict | None:
        """Before the rules: None forwards, a dict forwards with these headers replaced, (status, payload)
        answers with that OperationOutcome instead. Forwards everything here."""
        return None

    def transform_request(self, method: str, path: str, headers: dict, body: bytes) -> tuple[dict, bytes]:
        """After the rules, before forwarding: the headers and body sent upstream. Unchanged here."""
        return headers, body

    def transform_response(self, method: str, path: str, status: int, content: bytes) -> tuple[int, bytes]:
        """After the upstream answered, before the rules' answer actions: the status and body. Unchanged here."""
        return status, content

    def keeps_urls(self, path: str) -> bool:
        """Whether the answer to `path` is passed on without pointing its upstream URLs at the proxy."""
        return False

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        admitted = self.admit(h.command, h.path, dict(h.headers.items()), body)
        if isinstance(admitted, tuple):
            status, payload = admitted
            self.log.append((h.command, h.path, status))
            h.send_response(status)
            h.send_header("Content-Type", "application/fhir+json")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            return
        rule = self._rule_for(h.command, h.path)
        if rule and rule.action == "status":
            self.log.append((h.command, h.path, rule.status))
            payload = rule.body if rule.body is not None else (
                b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"transient",'
                b'"diagnostics":"injected fault"}]}')
            h.send_response(rule.status)
            for k, v in {"Content-Type": "application/fhir+json", **rule.headers}.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            return
        if rule and rule.action == "drop":
            self.log.append((h.command, h.path, "drop"))
            _drop(h)
            return
        if rule and rule.action == "delay":
            time.sleep(rule.delay)
        if rule and rule.before:
            rule.before(h.path)
        if rule and rule.rewrite_request:
            body = rule.rewrite_request(body)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
        if isinstance(admitted, dict):
            headers = {k: v for k, v in headers.items() if k.lower() not in {n.lower() for n in admitted}}
            headers.update(admitted)
        headers, body = self.transform_request(h.command, h.path, headers, body)
        try:
            r = requests.request(h.command, self.upstream_root + h.path, data=body or None, headers=headers,
                                 timeout=60)
        except requests.RequestException:
            self.log.append((h.command, h.path, "upstream-error"))
            _drop(h)
            return
        status, content = self.transform_response(h.command, h.path, r.status_code, r.content)
        if rule and rule.after:
            rule.after(h.path)
        if rule and rule.action == "lose-response":
            self.log.append((h.command, h.path, "lost"))
            _drop(h)
            return
        if rule and rule.action == "slow-response":
            time.sleep(rule.delay)
        if rule and rule.action == "status-after-commit":
            self.log.append((h.command, h.path, rule.status))
            payload = (b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"transient",'
                       b'"diagnostics":"injected fault after the upstream answered"}]}')
            h.send_response(rule.status)
            h.send_header("Content-Type", "application/fhir+json")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            return
        keep = self.keeps_urls(h.path)
        content = content if keep else content.replace(self.upstream_root.encode(), self.root.encode())
        if rule and rule.action == "rewrite":
            content = rule.rewrite(content)
        self.log.append((h.command, h.path, status))
        try:
            h.send_response(status)
            for k, v in r.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    h.send_header(k, v if keep else v.replace(self.upstream_root, self.root))
            h.send_header("Content-Length", str(len(content)))
            h.end_headers()
            if rule and rule.action == "truncate":
                # Half the promised body, then a reset: the client must see a broken answer, not a short one.
                h.wfile.write(content[: len(content) // 2])
                h.wfile.flush()
                self.log[-1] = (h.command, h.path, "truncated")
                _drop(h)
                return
            h.wfile.write(content)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test): nothing to answer


def _drop(h: BaseHTTPRequestHandler) -> None:
    """Close the connection without an answer (RST), like a crashed server or a cut network."""
    h.close_connection = True
    try:
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        h.connection.close()
    except OSError:
        pass
