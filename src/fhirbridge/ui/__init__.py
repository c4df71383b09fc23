"""Server-rendered pages for people: the reviewer portal, the physician's ordering app, the IT dashboard.

Flask + Jinja, little JavaScript, every asset shipped in the package (no CDN at run time). Shared here: the
`ui` blueprint (templates and the stylesheet), signed session cookies with a CSRF token for forms, and
the template context every page gets.

Rule: pages call the loop, the EHR layer, `access` and `exchange`; they never reimplement a step. May import
Flask and every layer below the service; never `service` (it mounts the pages, not the reverse), the CLI or
the demo. Every page is rendered on the server with no CDN, `no-store` and a CSRF token on every form.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import unquote, urlsplit

from flask import Blueprint, Flask, abort, request, session

from fhirbridge import VERSION
from fhirbridge.exchange.render import checklist_item

ui = Blueprint("ui", __name__, template_folder="templates", static_folder="static", static_url_path="/ui-static")


def install(app: Flask, *, secret: bytes) -> None:
    """Register the shared blueprint once, and make session cookies safe for pages that hold PHI."""
    if "ui" not in app.blueprints:
        app.register_blueprint(ui)
    app.secret_key = secret
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict",
                      SESSION_COOKIE_NAME="fhirbridge_session",
                      SESSION_COOKIE_SECURE=app.config.get("SESSION_COOKIE_SECURE", False))

    @app.context_processor
    def _common():
        return {"version": VERSION, "csrf_token": csrf_token, "checklist_item": checklist_item}

    @app.after_request
    def _security_headers(resp):
        # Every response, not only the pages: without nosniff a browser may guess a type that runs script
        # (WHATWG Fetch, "X-Content-Type-Options"), and a CSP only guards a document served with one.
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        if resp.mimetype == "text/html":
            # Pages show patient data: never cache them, never frame them, no third-party anything.
            resp.headers.setdefault("Cache-Control", "no-store")
            resp.headers.setdefault("X-Frame-Options", "SAMEORIGIN")
            resp.headers.setdefault("Content-Security-Policy", PAGE_CSP)
            resp.headers.setdefault("Referrer-Policy", "no-referrer")
        else:
            resp.headers.setdefault("Content-Security-Policy", DATA_CSP)
        return resp


# The pages: our own scripts, styles and frames only (no inline script: see sanitize.py).
PAGE_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
            "frame-ancestors 'self'; form-action 'self'; object-src 'self'")
# Everything else (JSON, assets, attachments): should a browser ever render one as a document, it loads
# nothing and runs nothing, in a unique origin that cannot read our pages (CSP Level 3 "sandbox", the HTML
# iframe sandbox flags with none allowed); only our own pages may frame it (the Case page frames a PDF).
# A policy on a script or stylesheet does not apply to the page that uses it, so our assets still work.
DATA_CSP = "default-src 'none'; frame-ancestors 'self'; sandbox"


def safe_next(value: str | None, default: str, *, within: str = "/") -> str:
    """Where a sign-in goes back to: `value` if it is a path on this site under `within`, else `default`.

    Only a path-absolute reference (RFC 3986 section 4.2: one "/", then not another) with no scheme and no
    authority is kept. Browsers read a backslash as "/" and drop tabs and newlines from URLs (WHATWG URL),
    so "/<backslash>evil" and "/<tab>/evil" mean "//evil", another site: backslashes, whitespace and control
    characters are refused anywhere, in the value and in its percent-decoded forms ("/%2F%2Fevil", "/%09/evil").
    """
    if not value:
        return default
    forms, decoded = [value], value
    while (decoded := unquote(decoded)) != forms[-1]:     # each round is shorter: this ends
        forms.append(decoded)
    for v in forms:
        if not v.startswith("/") or v.startswith("//") or "\\" in v:
            return default
        if any(c.isspace() or not c.isprintable() for c in v):
            return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not value.startswith(within):
        return default
    return value


def derive_secret(material: bytes, purpose: str) -> bytes:
    """A stable secret for signing cookies, derived from key material every worker and replica already
    shares (so sessions survive a worker restart and work behind a load balancer without new config)."""
    return hmac.new(material, f"fhirbridge/{purpose}".encode(), hashlib.sha256).digest()


def csrf_token() -> str:
    if "_csrf" not in session:
        session["_csrf"] = secrets.token_urlsafe(24)
    return session["_csrf"]


def check_csrf() -> None:
    """Every state-changing form carries the session's token (SameSite=Strict cookies are the first line)."""
    sent = request.form.get("csrf_token", "")
    if not sent or not hmac.compare_digest(sent, session.get("_csrf", "")):
        abort(400, "the form expired or did not come from this page: reload it and try again")
