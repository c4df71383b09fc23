"""Count the HTTP requests fhirbridge sends (every `requests` session in the process) while code runs."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from urllib.parse import urlsplit

import requests


@contextmanager
def counted():
    """Yields a list that fills with "METHOD /path" for every request sent meanwhile. Patching
    Session.send is the instrument here: it sees exactly what goes on the wire, retries excepted."""
    seen: list[str] = []
    lock = threading.Lock()
    real = requests.Session.send

    def send(self, request, **kw):
        with lock:
            seen.append(f"{request.method} {urlsplit(request.url).path}")
        return real(self, request, **kw)

    requests.Session.send = send
    try:
        yield seen
    finally:
        requests.Session.send = real


@contextmanager
def urls():
    """Yields a list that fills with the full URL of every GET sent meanwhile."""
    seen: list[str] = []
    real = requests.Session.send

    def send(self, request, **kw):
        if request.method == "GET":
            seen.append(request.url)
        return real(self, request, **kw)

    requests.Session.send = send
    try:
        yield seen
    finally:
        requests.Session.send = real
