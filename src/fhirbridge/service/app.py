"""The web application: one Flask app factory, served by gunicorn (`fhirbridge serve`).

    /api/...       hospital staff (service/api.py): orders, Cases, retry, cancel, audit
    /reviewer/...  reviewers without an endpoint of their own (service/reviewer_api.py)
    /fhir/...      FHIR-facing: subscription notifications from the EHR (service/notify.py; OperationOutcome)
    /healthz /readyz /.well-known/jwks.json (service/health.py)   /openapi.json /docs (service/openapi.py)
    /metrics (service/metrics.py)   /dashboard /physician (ui/)
    /cds-services  CDS Hooks 2.0 services for the EHR (service/cds_hooks.py; JWT-authenticated)

Every error is a JSON body with a clear message ({"error": {"status", "message"}}); FHIR-facing endpoints
answer with an OperationOutcome instead; pages answer with a page. Nothing clinical is ever in a response
of /api or /reviewer except the sealed (encrypted) files themselves.
"""
from __future__ import annotations

import logging
import os

from flask import Flask, render_template, request
from werkzeug.exceptions import HTTPException

from fhirbridge import jsonutil, ui
from fhirbridge.config import loader as config_mod
from fhirbridge.errors import ConfigError, FhirbridgeError, FhirError, OpinionNotYet, RejectedOpinion, SealError
from fhirbridge.service import metrics, request_ids
from fhirbridge.service.api import api
from fhirbridge.service.cds_hooks import cds_hooks
from fhirbridge.service.health import health, readiness
from fhirbridge.service.http import ApiError, json_error
from fhirbridge.service.notify import notify
from fhirbridge.service.openapi import docs
from fhirbridge.service.reviewer_api import reviewer_api
from fhirbridge.service.scheduler import Service
from fhirbridge.service.terminology import terminology
from fhirbridge.ui.dashboard import dashboard
from fhirbridge.ui.physician import install as install_physician

log = logging.getLogger("fhirbridge.service.app")
PAGE_PREFIXES = ("/dashboard", "/physician")


def create_app(config_path: str | os.PathLike | None = None, *, svc: Service | None = None) -> Flask:
    """The app for gunicorn (`fhirbridge.service.app:create_app()` reads FHIRBRIDGE_CONFIG). The scheduler is
    not started here: gunicorn's post_worker_init starts it in each worker (gunicorn_conf.py), and tests
    start it when they want it."""
    app = Flask("fhirbridge")
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024 * 1024
    app.extensions["fhirbridge"] = svc or Service(config_mod.load(config_path))
    # The route map, in one block.
    app.register_blueprint(api)            # /api
    app.register_blueprint(reviewer_api)   # /reviewer
    app.register_blueprint(health)         # /healthz /readyz /.well-known/jwks.json
    app.register_blueprint(notify)         # /fhir/notify/<hospital>
    app.register_blueprint(docs)           # /openapi.json /docs
    app.register_blueprint(terminology)    # /fhir/CodeSystem (our code systems, public)
    app.register_blueprint(cds_hooks)      # /cds-services (CDS Hooks; the EHR's signed JWT), when [cds] is on
    metrics.init_app(app)                  # /metrics
    _pages(app)                            # /dashboard
    # The dashboard's banner runs /readyz's very check, through its cache (the pages may not import the service).
    app.extensions["fhirbridge.readiness"] = lambda: readiness(app.extensions["fhirbridge"],
                                                               app.extensions.setdefault("fhirbridge.ready", {}))
    install_physician(app)                 # /physician, only when [physician_app] is configured
    request_ids.init_app(app)
    _errors(app)
    return app


def _pages(app: Flask) -> None:
    """The pages for people (ui/): sessions signed with a secret derived from the first hospital's private
    signing key, which every worker and replica already holds."""
    svc = app.extensions["fhirbridge"]
    # Served over https (public_url): the session cookie never travels over plain http.
    app.config["SESSION_COOKIE_SECURE"] = (svc.config.public_url or "").startswith("https://")
    material = jsonutil.dumps(svc.apps[0].hospital_keys.signing_key().as_dict(private=True))
    ui.install(app, secret=ui.derive_secret(material, "service-pages-session"))
    app.register_blueprint(dashboard)


def _errors(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api(exc: ApiError):
        return json_error(exc.status, exc.message)

    @app.errorhandler(RejectedOpinion)
    def _rejected(exc: RejectedOpinion):
        return json_error(409, str(exc))

    @app.errorhandler(OpinionNotYet)
    def _not_yet(exc: OpinionNotYet):
        # RFC 9110 15.6.4: 503 with Retry-After, the opinion to be sent again as it is.
        body, status = json_error(503, str(exc))
        return body, status, {"Retry-After": str(exc.retry_after)}

    @app.errorhandler(SealError)
    def _seal(exc: SealError):
        return json_error(400, str(exc))

    @app.errorhandler(FhirError)
    def _fhir(exc: FhirError):
        return json_error(503 if exc.transient else 502, str(exc))

    @app.errorhandler(ConfigError)
    def _config(exc: ConfigError):
        # A configuration error names our files and settings: the operator's log has it, the caller (a
        # reviewer, an EHR) only that it is ours to fix (issue 13, S9).
        log.error("configuration problem on %s %s: %s", request.method, request.path, exc)
        return json_error(500, "the service cannot handle this request because of a configuration problem; "
                               "its operator sees the details in its log")

    @app.errorhandler(FhirbridgeError)
    def _ours(exc: FhirbridgeError):
        return json_error(400, str(exc))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        if request.path.startswith(PAGE_PREFIXES):   # a person in a browser: a page, not JSON
            return render_template("error.html", title=exc.name, message=exc.description or exc.name,
                                   back=request.referrer if (request.referrer or "").startswith(request.host_url)
                                   else None), exc.code or 500
        return json_error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return json_error(500, f"internal error ({exc.__class__.__name__}); see the service log")
