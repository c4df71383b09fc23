"""The reviewer portal (`fhirbridge reviewer serve`): runs at the reviewer's site, with the reviewer's key.

Packages come from a directory (what an outbox or HTTPS transport delivers there) and/or are pulled from a
hospital's reviewer API with a freshly signed token per request. Opening a package verifies and decrypts
it here (the private key never leaves this process); the page shows the question, the patient, a timeline
of the records, imaging with its DICOMweb link, medications with dosage, attachments, and what was
withheld. The opinion form is built from `mappings/opinion/<form>.toml`; "sign and send" seals the answer
to the hospital that sent the package and uploads it (pull) or writes it to the answers directory.

People log in with the portal token (FHIRBRIDGE_PORTAL_TOKEN); sessions are signed cookies derived from the
reviewer's key, so nothing else needs configuring.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import io
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests
from flask import Flask, Response, abort, flash, redirect, render_template, request, session, url_for
from werkzeug.exceptions import HTTPException

from fhirbridge import jsonutil
from fhirbridge.access.tokens import mint_reviewer_token
from fhirbridge.config.mappings import load_opinion_form
from fhirbridge.crypto import jwe
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.errors import FhirbridgeError, SealError
from fhirbridge.exchange import envelope
from fhirbridge.exchange.opinion import AnswerError, build_opinion_document, reviewer_organization
from fhirbridge.exchange.render import render_opinion
from fhirbridge.exchange.reviewer import OpenedPackage, TrustStore, answer_data, open_package
from fhirbridge.ui import check_csrf, derive_secret, install
from fhirbridge.ui.record_view import attachments_of, build, questions_of

log = logging.getLogger("fhirbridge.portal")
TOKEN_ENV = "FHIRBRIDGE_PORTAL_TOKEN"
MAX_INLINE_TEXT = 512 * 1024
PULL_TIMEOUT = (5, 60)


@dataclass
class PortalSettings:
    key: Path                                   # the reviewer's private JWKS
    trust: Path                                 # trusted hospitals' public keys (file or directory)
    work_dir: Path                              # pulled packages, what was answered
    mappings_dir: Path
    packages_dir: Path | None = None            # delivered packages (outbox / https transport)
    answers_dir: Path | None = None             # where sealed opinions go when not uploaded
    pull: list[str] = field(default_factory=list)   # hospitals' reviewer API base URLs (…/reviewer)
    issuer: str | None = None                   # our organisation identifier value, as the hospitals have it
    form: str = "default"
    token: str | None = None                    # login token (default: $FHIRBRIDGE_PORTAL_TOKEN)


@dataclass
class PortalCase:
    package_id: str
    directory: Path
    source: str                  # "pull" or "delivered"
    api: str | None = None       # the hospital's reviewer API, for pulled packages
    case_id: str | None = None
    due_at: float | None = None


class Portal:
    def __init__(self, s: PortalSettings):
        self.s = s
        self.key = KeyRing.load(s.key)
        self.trust = TrustStore.load(s.trust)
        self.form = load_opinion_form(s.mappings_dir, s.form)
        self.cases: dict[str, PortalCase] = {}
        self._opened: dict[str, OpenedPackage] = {}
        (s.work_dir / "pulled").mkdir(parents=True, exist_ok=True, mode=0o700)
        (s.work_dir / "answered").mkdir(parents=True, exist_ok=True, mode=0o700)
        if s.pull and not s.issuer:
            raise FhirbridgeError("--issuer (your organisation identifier as the hospital has it) is needed to pull")

    # --- where packages come from ----------------------------------------------------------------------

    def token(self, api: str) -> str:
        # Only pulled Cases talk to a hospital's API, and pulling needs the issuer (checked above).
        assert self.s.issuer is not None
        return mint_reviewer_token(self.key, issuer=self.s.issuer, audience=api.rstrip("/"))

    def _auth(self, api: str) -> dict:
        return {"Authorization": f"Bearer {self.token(api)}"}

    def refresh(self) -> list[str]:
        """Find delivered packages and pull new ones; returns problems to show (never raises)."""
        problems = []
        if self.s.packages_dir and self.s.packages_dir.is_dir():
            for d in sorted(self.s.packages_dir.iterdir()):
                if (d / envelope.ENVELOPE_FILE).is_file() and d.name not in self.cases:
                    self.cases[d.name] = PortalCase(d.name, d, "delivered")
        for api in self.s.pull:
            try:
                self._pull(api.rstrip("/"))
            except (requests.RequestException, FhirbridgeError, ValueError) as exc:
                problems.append(f"could not fetch new cases from {api}: {exc}")
        return problems

    def _pull(self, api: str) -> None:
        r = requests.get(f"{api}/cases", headers=self._auth(api), timeout=PULL_TIMEOUT)
        if r.status_code != 200:
            raise FhirbridgeError(f"HTTP {r.status_code}: {_message(r)}")
        listed = r.json().get("cases", [])
        for c in listed:
            pid = str(c["package_id"])
            d = self.s.work_dir / "pulled" / pid
            for name in c.get("files", []):
                target = (d / name).resolve()
                if d.resolve() not in target.parents:
                    raise FhirbridgeError(f"the hospital named a file outside the package: {name!r}")
                if target.exists():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                f = requests.get(f"{api}/cases/{c['id']}/package/{name}", headers=self._auth(api),
                                 timeout=PULL_TIMEOUT)
                if f.status_code != 200:
                    raise FhirbridgeError(f"HTTP {f.status_code} for {name}: {_message(f)}")
                envelope.write_atomic(target, f.content)
            self.cases[pid] = PortalCase(pid, d, "pull", api=api, case_id=c["id"], due_at=c.get("due_at"))
        # A Case the hospital no longer lists (withdrawn, declined, answered) cannot be answered any more.
        live = {str(c["package_id"]) for c in listed}
        for pid, pc in list(self.cases.items()):
            if pc.api == api and pid not in live:
                pc.due_at = None
                pc.source = "closed"

    # --- opening ------------------------------------------------------------------------------------------

    def opened(self, pid: str) -> OpenedPackage:
        if pid not in self._opened:
            pc = self.cases.get(pid)
            if pc is None:
                abort(404)
            self._opened[pid] = open_package(pc.directory, self.key, self.trust)
        return self._opened[pid]

    def attachment(self, pid: str, index: int) -> tuple[bytes, str]:
        opened = self.opened(pid)
        atts = attachments_of(opened)
        if not 0 <= index < len(atts):
            abort(404)
        att, url = atts[index]
        files = {a["url"]: a for a in opened.manifest.get("attachments", [])}
        if url in files:
            meta = files[url]
            path = (opened.path / meta["file"]).resolve()
            if opened.path.resolve() not in path.parents:
                abort(404)
            sink = io.BytesIO()
            with open(path, "rb") as src:
                jwe.decrypt_stream(src, sink, self.key, max_plaintext=meta["size"])
            data = sink.getvalue()
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise SealError(f"attachment {meta['file']} does not match the signed manifest")
            return data, att.content_type
        for e in opened.document.get("entry", []):
            r = e.get("resource", {})
            if url.startswith("inline:") and r.get("resourceType") == "DocumentReference" \
                    and url == f"inline:{r.get('id')}":
                a = next(c["attachment"] for c in r.get("content", []) if c.get("attachment", {}).get("data"))
                return base64.b64decode(a["data"]), att.content_type
            if r.get("resourceType") == "Binary" and url == f"Binary/{r.get('id')}":
                return base64.b64decode(r.get("data", "")), att.content_type
        abort(404)

    def answered(self, pid: str) -> dict | None:
        p = self.s.work_dir / "answered" / f"{pid}.json"
        return jsonutil.loads(p.read_bytes()) if p.exists() else None

    def mark_answered(self, pid: str, what: dict) -> None:
        envelope.write_atomic(self.s.work_dir / "answered" / f"{pid}.json", jsonutil.dumps({**what, "at": time.time()}))


def _message(r: requests.Response) -> str:
    try:
        return str(r.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return r.reason or ""


# --- the form -------------------------------------------------------------------------------------------

def read_form(form_def, questions: list[str], form) -> tuple[dict, dict[str, str]]:
    """The answer as the opinion form wants it, and a message per field that is wrong."""
    data: dict = {}
    for f in form_def.fields.values():
        if f.kind == "answers":
            data[f.name] = [{"question": q, "answer": form.get(f"answers-{i}", "").strip()}
                            for i, q in enumerate(questions)]
        elif f.kind == "list":
            data[f.name] = [line.strip() for line in form.get(f.name, "").splitlines() if line.strip()]
        else:
            data[f.name] = form.get(f.name, "").strip()
    errors: dict[str, str] = {}
    for f in form_def.fields.values():
        v = data[f.name]  # the loop above set every field
        if f.kind == "answers":
            if any(not a["answer"] for a in v):
                errors[f.name] = "Answer each question the referring physician asked"
        elif f.required and not v:
            errors[f.name] = f"{f.label} is required" + (": choose one" if f.kind == "choice" else "")
        elif f.kind == "choice" and v and v not in f.choices:
            errors[f.name] = f"choose one of the listed options for {f.label}"
    return {k: v for k, v in data.items() if v not in ("", [])}, errors


def preview_text(portal: Portal, opened: OpenedPackage, data: dict) -> str:
    claims = opened.claims
    entries = {f"{e['resource']['resourceType']}/{e['resource'].get('id')}": e for e in opened.document["entry"]}
    doc = build_opinion_document(data, portal.form, opinion_id=str(uuid.uuid4()), timestamp="(when sent)",
                                 patient_entry=entries[claims["patient"]],
                                 service_request_entry=entries[claims["service_request"]],
                                 reviewer_org=reviewer_organization(claims["aud"]))
    return render_opinion(doc)


# --- the app --------------------------------------------------------------------------------------------

def create_portal(settings: PortalSettings) -> Flask:
    portal = Portal(settings)
    token = settings.token or os.environ.get(TOKEN_ENV)
    if not token or len(token) < 16:
        raise FhirbridgeError(f"set {TOKEN_ENV} to a login token of at least 16 characters for the portal's users")
    app = Flask("fhirbridge.portal")
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    key_material = jsonutil.dumps(portal.key.signing_key().as_dict(private=True))
    install(app, secret=derive_secret(key_material, "reviewer-portal-session"))
    app.extensions["portal"] = portal

    def nav(current: str) -> list:
        return [("Inbox", url_for("inbox"), current == "inbox")]

    @app.before_request
    def _login_required():
        if request.endpoint in ("login", "ui.static") or session.get("reviewer"):
            return None
        return redirect(url_for("login", next=request.path))

    @app.route("/login", methods=["GET", "POST"])
    def login():
        error = None
        if request.method == "POST":
            check_csrf()
            if hmac.compare_digest(request.form.get("token", "").encode(), token.encode()):
                session.clear()
                session["reviewer"] = True
                nxt = request.args.get("next", "")
                return redirect(nxt if nxt.startswith("/") and not nxt.startswith("//") else url_for("inbox"))
            error = "That token is not right. Ask whoever runs this portal for the current one."
        return render_template("reviewer/login.html", title="Sign in", error=error, where="Reviewer portal"), \
            401 if error else 200

    @app.post("/logout")
    def logout():
        check_csrf()
        session.clear()
        return redirect(url_for("login"))

    @app.get("/")
    def inbox():
        for problem in portal.refresh():
            flash(problem, "error")
        rows = []
        for pid, pc in sorted(portal.cases.items()):
            try:
                opened = portal.opened(pid)
                qs = questions_of(opened.manifest.get("question"))
                patient = build(opened, attachment_text=lambda _i: None).patient
                rows.append({"pid": pid, "patient": patient, "question": qs[0] if qs else "",
                             "hospital": (opened.claims.get("iss") or {}).get("display", ""),
                             "sent": opened.claims.get("iat"), "due": pc.due_at or opened.claims.get("exp"),
                             "answered": portal.answered(pid), "closed": pc.source == "closed", "error": None})
            except (FhirbridgeError, OSError) as exc:
                rows.append({"pid": pid, "error": str(exc), "patient": "", "question": "", "hospital": "",
                             "sent": None, "due": None, "answered": None, "closed": False})
        rows.sort(key=lambda r: (bool(r["answered"]) or r["closed"], r["due"] or 0))
        return render_template("reviewer/inbox.html", title="Inbox", rows=rows, nav=nav("inbox"),
                               where="Reviewer portal", fmt=_fmt)

    def _case_page(pid: str, *, values: dict | None = None, errors: dict | None = None, preview: str | None = None,
                   status: int = 200):
        opened = portal.opened(pid)

        def text_of(i: int) -> str | None:
            data, ctype = portal.attachment(pid, i)
            if len(data) > MAX_INLINE_TEXT:
                return None
            return data.decode("utf-8", errors="replace")
        view = build(opened, attachment_text=text_of)
        pc = portal.cases[pid]
        return render_template("reviewer/case.html", title=f"Case {pid[:8]}", v=view, form=portal.form,
                               values=values or {}, errors=errors or {}, preview=preview, pc=pc,
                               answered=portal.answered(pid), nav=nav("case"), where="Reviewer portal",
                               fmt=_fmt), status

    @app.get("/cases/<pid>")
    def case(pid: str):
        return _case_page(pid)

    @app.get("/cases/<pid>/attachments/<int:index>")
    def attachment(pid: str, index: int):
        data, ctype = portal.attachment(pid, index)
        resp = Response(data, mimetype=ctype.split(";")[0].strip() or "application/octet-stream")
        resp.headers["Content-Disposition"] = "inline"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.post("/cases/<pid>/opinion")
    def opinion(pid: str):
        check_csrf()
        opened = portal.opened(pid)
        if portal.answered(pid):
            flash("This Case was answered already.", "error")
            return redirect(url_for("case", pid=pid))
        questions = questions_of(opened.manifest.get("question"))
        data, errors = read_form(portal.form, questions, request.form)
        values = request.form.to_dict()
        if errors:
            return _case_page(pid, values=values, errors=errors, status=422)
        if request.form.get("action") != "send":
            return _case_page(pid, values=values, preview=preview_text(portal, opened, data))
        try:
            sealed, claims = answer_data(opened, data, portal.key, mappings_dir=settings.mappings_dir,
                                         form=settings.form, source="the form")
        except AnswerError as exc:
            return _case_page(pid, values=values, errors={"_": "; ".join(exc.problems)}, status=422)
        pc = portal.cases[pid]
        try:
            where = _send(portal, pc, sealed, claims)
        except (requests.RequestException, FhirbridgeError) as exc:
            flash(f"Not sent: {exc}. Your answer is kept below; try again.", "error")
            return _case_page(pid, values=values, status=502)
        portal.mark_answered(pid, {"opinion": claims["jti"], "where": where})
        flash(f"Signed and sent: {where}.", "ok")
        return redirect(url_for("case", pid=pid))

    def _to_hospital(pid: str, field: str, what: str, body_key: str, missing: str):
        """Decline or ask for records: a short text the hospital's API takes; the form again if it is empty."""
        check_csrf()
        pc = portal.cases.get(pid) or abort(404)
        text = request.form.get(field, "").strip()
        if not text:
            return None, _case_page(pid, values=request.form.to_dict(), errors={field: missing}, status=422)
        try:
            _hospital_call(portal, pc, what, {body_key: text})
        except (requests.RequestException, FhirbridgeError) as exc:
            # The hospital did not take it: say so, and keep what the reviewer wrote for another try.
            flash(f"Not sent: {exc}. What you wrote is kept below; try again.", "error")
            return None, _case_page(pid, values=request.form.to_dict(), status=502)
        return pc, None

    @app.post("/cases/<pid>/decline")
    def decline(pid: str):
        pc, page = _to_hospital(pid, "decline_reason", "decline", "reason",
                                "say why you decline, for the referring physician")
        if page is not None:
            return page
        portal.mark_answered(pid, {"declined": True, "where": "declined"})
        flash("Declined; the hospital has been told why.", "ok")
        return redirect(url_for("inbox"))

    @app.post("/cases/<pid>/request")
    def ask(pid: str):
        _pc, page = _to_hospital(pid, "request_text", "requests", "text", "say which records you need")
        if page is not None:
            return page
        flash("Your request for more records was sent to the hospital.", "ok")
        return redirect(url_for("case", pid=pid))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        return render_template("reviewer/error.html", title=exc.name, message=exc.description or exc.name,
                               nav=nav(""), where="Reviewer portal"), exc.code or 500

    @app.errorhandler(SealError)
    def _sealed(exc: SealError):
        return render_template("reviewer/error.html", title="Cannot open this package", message=str(exc),
                               nav=nav(""), where="Reviewer portal"), 422

    return app


def _send(portal: Portal, pc: PortalCase, sealed: bytes, claims: dict) -> str:
    if pc.api:
        r = requests.post(f"{pc.api}/opinions", data=sealed, timeout=PULL_TIMEOUT,
                          headers={**portal._auth(pc.api), "Content-Type": "application/jose+json"})
        if r.status_code != 202:
            raise FhirbridgeError(f"the hospital answered HTTP {r.status_code}: {_message(r)}")
        return "uploaded to the hospital"
    if not portal.s.answers_dir:
        raise FhirbridgeError("no --answers directory is configured for delivered packages")
    portal.s.answers_dir.mkdir(parents=True, exist_ok=True)
    envelope.write_atomic(portal.s.answers_dir / f"opinion-{claims['jti']}.jwe", sealed)
    return f"written to {portal.s.answers_dir}"


def _hospital_call(portal: Portal, pc: PortalCase, what: str, body: dict) -> None:
    if not pc.api or not pc.case_id:
        raise FhirbridgeError("only Cases pulled from a hospital's reviewer API can be declined or asked about here")
    r = requests.post(f"{pc.api}/cases/{pc.case_id}/{what}", json=body, headers=portal._auth(pc.api),
                      timeout=PULL_TIMEOUT)
    if r.status_code not in (200, 201):
        raise FhirbridgeError(f"the hospital answered HTTP {r.status_code}: {_message(r)}")


def _fmt(epoch) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(epoch)) if epoch else ""
