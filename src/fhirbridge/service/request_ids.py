"""Request ids on every log line of a request (X-Request-ID in, or a new one), and the Case id of a request
about one Case, through the context variables of ops.logs."""
from __future__ import annotations

from flask import Flask, g, request

from fhirbridge.ops.logs import CASE_ID, REQUEST_ID, request_id_from


def init_app(app: Flask) -> None:
    """Give every request an id (X-Request-ID in, or a new one), on each line it logs and on its response;
    a request about one Case (/api/cases/<id>/...) carries that Case's id too."""
    @app.before_request
    def _ids():
        g.fhirbridge_log_tokens = [REQUEST_ID.set(request_id_from(request.headers.get("X-Request-ID")))]
        case_id = (request.view_args or {}).get("case_id")
        if case_id:
            g.fhirbridge_log_tokens.append(CASE_ID.set(case_id))

    @app.after_request
    def _echo(response):
        rid = REQUEST_ID.get()
        if rid:
            response.headers["X-Request-ID"] = rid
        return response

    @app.teardown_request
    def _reset(_exc=None):
        tokens = g.pop("fhirbridge_log_tokens", [])
        for var, token in zip((REQUEST_ID, CASE_ID), tokens, strict=False):  # no CASE_ID token outside a Case
            var.reset(token)
