"""GET /metrics: the Prometheus text exposition of ops.metrics (this process's figures and the store's).

Off with `[metrics] enabled = false`. A bearer token (`[metrics] token`) is required unless
`[metrics] unauthenticated = true`: the figures name the hospitals and reviewers served here.
"""
from __future__ import annotations

import hmac

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST

from fhirbridge.ops.metrics import render

endpoint = Blueprint("metrics", __name__)


@endpoint.get("/metrics")
def metrics_view():
    svc = current_app.extensions["fhirbridge"]
    settings = svc.config.metrics
    if not settings.enabled:
        return Response("metrics are off ([metrics] enabled = false)\n", status=404, mimetype="text/plain")
    if not settings.token and not settings.unauthenticated:
        # The figures name the hospitals and reviewers served here: not for anyone who reaches the port.
        return Response("metrics need a bearer token: set [metrics] token (FHIRBRIDGE_METRICS__TOKEN) and give "
                        "it to Prometheus (bearer_token), or [metrics] unauthenticated = true where only your "
                        "scrape network reaches this port\n", status=401, mimetype="text/plain",
                        headers={"WWW-Authenticate": "Bearer"})
    if settings.token:
        given = request.headers.get("Authorization", "")
        if not (given.lower().startswith("bearer ")
                and hmac.compare_digest(given[7:].strip().encode(), settings.token.encode())):
            return Response("a valid bearer token is required ([metrics] token)\n", status=401, mimetype="text/plain",
                            headers={"WWW-Authenticate": "Bearer"})
    names = {h.key: h.name for h in svc.config.hospitals.values()}
    return Response(render(svc.store, names, audit_to_ehr=svc.config.audit.write_to_ehr),
                    mimetype=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> None:
    app.register_blueprint(endpoint)
