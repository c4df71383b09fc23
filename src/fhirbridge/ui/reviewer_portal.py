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
import mimetypes
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests
from flask import Flask, Response, abort, flash, redirect, render_template, request, session, url_for
from werkzeug.exceptions import HTTPException

from fhirbridge import jsonutil
from fhirbridge.access.tokens import mint_reviewer_token
from fhirbridge.config.mappings import OpinionForm, load_opinion_form
from fhirbridge.crypto import files, jwe
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.crypto.urls import is_https_or_loopback
from fhirbridge.errors import ConfigError, FhirbridgeError, SealError
from fhirbridge.exchange import dicom_series, envelope
from fhirbridge.exchange.followup import QUESTION_PREFIX
from fhirbridge.exchange.opinion import AnswerError, build_opinion_document, reviewer_organization
from fhirbridge.exchange.render import render_opinion
from fhirbridge.exchange.reviewer import OpenedPackage, TrustStore, form_for, open_package, sealed_answer, studies_of
from fhirbridge.fhir.elements import summary_line
from fhirbridge.fhir.unreachable import why_unreachable
from fhirbridge.ui import check_csrf, derive_secret, dicom_render, image_view, install, portal_followups, safe_next
from fhirbridge.ui.record_view import Attachment, attachments_of, build, questions_of

log = logging.getLogger("fhirbridge.portal")
TOKEN_ENV = "FHIRBRIDGE_PORTAL_TOKEN"
MAX_INLINE_TEXT = 512 * 1024
PULL_TIMEOUT = (5, 60)
MiB = 1024 * 1024

# What a hospital's reviewer API sends is written to disk here, so it is checked first (a hospital, or whoever
# sits on the link to it, must not make the portal write outside its work directory or fill the disk).
# Ids as the hospital makes them (UUIDs); files as loop/seal.py names them, relative to the package.
PULLED_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
PACKAGE_FILE = re.compile(re.escape(envelope.ENVELOPE_FILE) + r"|attachments/att-[0-9]{3,6}\.jwe")
MAX_LISTING_BYTES = 1 * MiB                  # the list of Cases: ids, file names, due dates
MAX_ERROR_BYTES = 64 * 1024
# The envelope at the cap open_package reads it with (envelope.read_limited). An attachment file holds one
# Binary of at most the package plaintext cap (also the hospitals' default fhirbridge.max_attachment_bytes),
# sealed as base64url (a third more) after DEFLATE (a little more for data that does not compress).
DRAFT_TYP = "fhirbridge-draft+jwe"
MAX_PACKAGE_FILE = envelope.max_envelope_bytes(envelope.PACKAGE)
MAX_ATTACHMENT_FILE = envelope.max_plaintext_bytes(envelope.PACKAGE) * 4 // 3 + MiB


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
    form: str = "default"                       # for Cases whose collection profile has no form of its own
    token: str | None = None                    # login token (default: $FHIRBRIDGE_PORTAL_TOKEN)


@dataclass
class PortalCase:
    key: str                     # the portal's name for it (URLs, answered/): per hospital for pulled ones
    package_id: str
    directory: Path
    source: str                  # "pull" or "delivered"
    api: str | None = None       # the hospital's reviewer API, for pulled packages
    case_id: str | None = None
    due_at: float | None = None


def has_images(opened: OpenedPackage) -> bool:
    """Whether the package carries DICOM series (manifest attachments with a `dicom` entry)."""
    return any(isinstance(a, dict) and "dicom" in a for a in opened.manifest.get("attachments", []))


class Portal:
    def __init__(self, s: PortalSettings):
        self.s = s
        for url in s.pull:
            # Over plain http anyone on the way could read the records and the tokens, and answer in the
            # hospital's place (the same rule as a reviewer's jwks_url in the hospital's configuration).
            if not is_https_or_loopback(url):
                raise ConfigError(f"{url!r} is not an https:// URL: a hospital's reviewer API sends patient records "
                                  "and gets your signed tokens (plain http only to 127.0.0.1, localhost or ::1)",
                                  key="--pull")
        self.key = KeyRing.load(s.key)
        self.trust = TrustStore.load(s.trust)
        self.form = load_opinion_form(s.mappings_dir, s.form)
        self.cases: dict[str, PortalCase] = {}
        self._opened: dict[str, OpenedPackage] = {}
        self._images: dict[str, image_view.ImageSet] = {}
        # Pulled packages and answers are patient records: owner-only whatever the umask, and a work
        # directory an older version left open is narrowed (issue 13, S11).
        files.narrow_tree(s.work_dir)
        files.private_dir(s.work_dir / "pulled")
        files.private_dir(s.work_dir / "answered")
        files.private_dir(s.work_dir / "images")
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
                # followup-<id>: a follow-up question about a Case answered before (ui/portal_followups.py).
                if (d / envelope.ENVELOPE_FILE).is_file() and d.name not in self.cases \
                        and not d.name.startswith(QUESTION_PREFIX):
                    self.cases[d.name] = PortalCase(d.name, d.name, d, "delivered")
        for api in self.s.pull:
            api = api.rstrip("/")
            try:
                problems += self._pull(api)
            except (requests.RequestException, FhirbridgeError, ValueError) as exc:
                problems.append(f"could not fetch new cases from {api}: {failure_text(exc, api)}")
        return problems

    def _pull(self, api: str) -> list[str]:
        """Fetch what `api` lists that is not here yet; returns the Cases refused (neither fetched nor written)."""
        listing = io.BytesIO()
        self._fetch(api, "/cases", listing, MAX_LISTING_BYTES)
        listed = jsonutil.loads(listing.getvalue())
        listed = listed.get("cases") if isinstance(listed, dict) else None
        if not isinstance(listed, list):
            raise PullRefused("the answer is not a list of cases")
        # One directory per hospital API: two hospitals naming the same package id stay two Cases.
        root = (self.s.work_dir / "pulled" / hashlib.sha256(api.encode()).hexdigest()[:16]).resolve()
        problems, live = [], set()
        for c in listed:
            try:
                pid, case_id, files, due_at = _listed_case(c)
                directory = _inside(root, pid)
                targets = [(name, _inside(directory, name)) for name in files]      # all checked first
                for name, target in targets:
                    if not target.exists():
                        limit = MAX_PACKAGE_FILE if name == envelope.ENVELOPE_FILE else MAX_ATTACHMENT_FILE
                        # ?package=: the Case's first package or a supplement of it (issue 16 part 2)
                        self._download(api, f"/cases/{case_id}/package/{name}?package={pid}", target, limit)
            except PullRefused as exc:
                problems.append(f"refused a case from {api}: {exc}")
                continue
            key = f"{root.name}.{pid}"
            live.add(key)
            self.cases[key] = PortalCase(key, pid, directory, "pull", api=api, case_id=case_id, due_at=due_at)
        # A Case answered before, with a follow-up question for us (ui/portal_followups.py): back in the inbox
        # (after a restart of the portal too), closed for the opinion, open for the question.
        for q in portal_followups.listing(self, api):
            q_pid, q_case = q.get("package_id"), q.get("case")
            if not isinstance(q_pid, str) or not isinstance(q_case, str):
                continue
            try:
                q_dir = _inside(root, q_pid)
            except PullRefused:
                continue
            key = f"{root.name}.{q_pid}"
            if key not in self.cases and (q_dir / envelope.ENVELOPE_FILE).is_file():
                self.cases[key] = PortalCase(key, q_pid, q_dir, "closed", api=api, case_id=q_case)
        # A Case the hospital no longer lists (withdrawn, declined, answered) cannot be answered any more.
        for key, pc in self.cases.items():
            if pc.api == api and key not in live:
                pc.due_at = None
                pc.source = "closed"
        return problems

    def _fetch(self, api: str, path: str, sink, limit: int) -> None:
        """GET `api` + `path` into `sink`, refusing more than `limit` bytes (as sent, and as decoded). No
        redirects: the hospital's API answers itself, and the token it gets is minted for it alone."""
        with requests.get(f"{api}{path}", headers=self._auth(api), timeout=PULL_TIMEOUT, stream=True,
                          allow_redirects=False) as r:
            if r.status_code != 200:
                body = r.raw.read(MAX_ERROR_BYTES, decode_content=True)
                raise FhirbridgeError(f"HTTP {r.status_code} for {path}: {_error_text(body, r.reason)}")
            if int(r.headers.get("Content-Length") or 0) > limit:
                raise PullRefused(f"{path} is larger than {limit} bytes")
            size = 0
            for chunk in r.iter_content(256 * 1024):
                size += len(chunk)
                if size > limit:
                    raise PullRefused(f"{path} is larger than {limit} bytes")
                sink.write(chunk)

    def _download(self, api: str, path: str, target: Path, limit: int) -> None:
        """A package file, written under a temporary name and renamed when complete (never half a file)."""
        files.private_dir(target.parent)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with files.open_private(tmp, exclusive=True) as f:
                self._fetch(api, path, f, limit)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    # --- opening ------------------------------------------------------------------------------------------

    def opened(self, pid: str) -> OpenedPackage:
        if pid not in self._opened:
            pc = self.cases.get(pid)
            if pc is None:
                abort(404)
            # The DICOM series are checked by extracting them, in the same single pass (each was decrypted
            # twice: once to verify here, again to extract, issue 15); a package whose series do not match
            # its signed manifest is refused here as before, and is never cached as opened.
            opened = open_package(pc.directory, self.key, self.trust, verify_images=False)
            self._images[pid] = self._extract_images(pid, opened)
            self._opened[pid] = opened
        return self._opened[pid]

    def attachment(self, pid: str, index: int) -> tuple[bytes, Attachment]:
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
            return data, att
        for e in opened.document.get("entry", []):
            r = e.get("resource", {})
            if url.startswith("inline:") and r.get("resourceType") == "DocumentReference" \
                    and url == f"inline:{r.get('id')}":
                a = next(c["attachment"] for c in r.get("content", []) if c.get("attachment", {}).get("data"))
                return base64.b64decode(a["data"]), att
            if r.get("resourceType") == "Binary" and url == f"Binary/{r.get('id')}":
                return base64.b64decode(r.get("data", "")), att
        abort(404)

    # --- images ---------------------------------------------------------------------------------------------

    def images(self, pid: str) -> image_view.ImageSet:
        """The package's images (extracted when the package was opened) and listed; an empty set for a package
        without images."""
        self.opened(pid)
        return self._images[pid]

    def _extract_images(self, pid: str, opened: OpenedPackage) -> image_view.ImageSet:
        """Every series extracted once into the work directory (0700 folders, 0600 files: they are the
        patient's images in the clear), each checked against the signed manifest as it is decrypted."""
        if not has_images(opened):
            return image_view.ImageSet(series=[], reports={})
        outdir = self.s.work_dir / "images" / hashlib.sha256(pid.encode()).hexdigest()[:24]
        done = outdir / ".complete"
        if not done.exists():
            # A folder left by an extraction that was cut off is redone from scratch; one that completed was
            # checked then, and its files are what the viewer shows.
            files.remove_tree(outdir)
            files.private_dir(outdir)
            try:
                dicom_series.extract_images(opened, self.key, outdir)
            except BaseException:
                files.remove_tree(outdir)
                raise
            files.write_atomic(done, b"")
        return image_view.scan(outdir, opened.document)

    def _keys_path(self, pid: str) -> Path:
        return self.s.work_dir / "answered" / f"{pid}.key-images.json"

    def key_images(self, pid: str) -> list[dict]:
        """The key images marked for this Case, in the order they were marked."""
        p = self._keys_path(pid)
        return list(jsonutil.loads(p.read_bytes())) if p.exists() else []

    def toggle_key_image(self, pid: str, k: image_view.KeyImage, modality: str) -> bool:
        """Mark `k`, or unmark it if it was marked; returns whether it is marked now."""
        marked = self.key_images(pid)
        entry = {**k.as_dict(), "modality": modality}
        same = [m for m in marked if (m["sop_uid"], m["frame"]) == (k.sop_uid, k.frame)]
        marked = [m for m in marked if m not in same] if same else [*marked, entry]
        envelope.write_atomic(self._keys_path(pid), jsonutil.dumps(marked))
        return not same

    def form_name(self, pid: str) -> str:
        """The opinion form of this Case: its collection profile's (exchange.reviewer.form_for), else --form."""
        return form_for(self.opened(pid), self.s.mappings_dir, self.s.form)

    def form_of(self, pid: str) -> OpinionForm:
        return load_opinion_form(self.s.mappings_dir, self.form_name(pid))

    def supplement_of(self, pid: str) -> str | None:
        """The package id a supplement adds to (issue 16 part 2: more records on request), or None."""
        try:
            value = self.opened(pid).manifest.get("supplement_of")
        except (FhirbridgeError, OSError):
            return None
        return str(value) if value else None

    def supplements_for(self, pid: str) -> list[str]:
        """The supplements that add to this Case's package, oldest first (same source, same hospital)."""
        pc = self.cases[pid]
        out = [(self.opened(k).claims.get("iat") or 0, k) for k, other in self.cases.items()
               if k != pid and other.api == pc.api and self.supplement_of(k) == pc.package_id]
        return [k for _iat, k in sorted(out)]

    def answered(self, pid: str) -> dict | None:
        p = self.s.work_dir / "answered" / f"{pid}.json"
        return jsonutil.loads(p.read_bytes()) if p.exists() else None

    def mark_answered(self, pid: str, what: dict, document: dict | None = None) -> None:
        if document is not None:
            # The opinion as sent, so the reviewer can read it again: a patient record, so encrypted to the
            # reviewer's own key at rest, like the pulled packages (written before the marker that points at it).
            envelope.write_atomic(self._sent_path(pid), jwe.encrypt_bytes(
                jsonutil.dumps(document), self.key.encryption_keys(), typ="fhirbridge-sent-opinion+jwe"))
        envelope.write_atomic(self.s.work_dir / "answered" / f"{pid}.json", jsonutil.dumps({**what, "at": time.time()}))

    def _sent_values_path(self, pid: str) -> Path:
        return self.s.work_dir / "answered" / f"{pid}.sent-form.jwe"

    def save_sent_values(self, pid: str, values: dict) -> None:
        """The form as sent (encrypted like a draft): a corrected opinion starts from it."""
        envelope.write_atomic(self._sent_values_path(pid), jwe.encrypt_bytes(
            jsonutil.dumps({"values": values, "at": time.time()}), self.key.encryption_keys(), typ=DRAFT_TYP))

    def sent_values(self, pid: str) -> dict:
        p = self._sent_values_path(pid)
        return jsonutil.loads(jwe.decrypt_bytes(p.read_bytes(), self.key))["values"] if p.exists() else {}

    # --- drafts: the form as the reviewer left it, encrypted to the reviewer's own key (a patient record) ----

    def _draft_path(self, pid: str) -> Path:
        return self.s.work_dir / "answered" / f"{pid}.draft.jwe"

    def save_draft(self, pid: str, values: dict) -> None:
        envelope.write_atomic(self._draft_path(pid), jwe.encrypt_bytes(
            jsonutil.dumps({"values": values, "at": time.time()}), self.key.encryption_keys(), typ=DRAFT_TYP))

    def draft(self, pid: str) -> dict | None:
        """{"values", "at"} of the saved draft, or None."""
        p = self._draft_path(pid)
        return jsonutil.loads(jwe.decrypt_bytes(p.read_bytes(), self.key)) if p.exists() else None

    def drop_draft(self, pid: str) -> None:
        self._draft_path(pid).unlink(missing_ok=True)

    def _sent_path(self, pid: str) -> Path:
        return self.s.work_dir / "answered" / f"{pid}.opinion.jwe"

    def sent_opinion(self, pid: str) -> str | None:
        """The opinion this reviewer sent for the Case, as text (None if none is kept here)."""
        p = self._sent_path(pid)
        if not p.exists():
            return None
        return render_opinion(jsonutil.loads(jwe.decrypt_bytes(p.read_bytes(), self.key)), with_patient=False)


def _message(r: requests.Response) -> str:
    return _error_text(r.content, r.reason)


def _error_text(body: bytes, reason: str | None) -> str:
    try:
        return str(jsonutil.loads(body)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return reason or ""


class PullRefused(FhirbridgeError):
    """What a hospital's reviewer API answered is not written here; the message says what and why."""


def _shown(value: object) -> str:
    return repr(value)[:80]


def _listed_case(c: object) -> tuple[str, str, list[str], float | None]:
    """One Case of a hospital's listing, checked: (package id, case id, file names, due at)."""
    if not isinstance(c, dict):
        raise PullRefused(f"a listed case is not a JSON object: {_shown(c)}")
    pid, case_id, files, due_at = c.get("package_id"), c.get("id"), c.get("files", []), c.get("due_at")
    for what, value in (("package id", pid), ("case id", case_id)):
        if not isinstance(value, str) or not PULLED_ID.fullmatch(value):
            raise PullRefused(f"its {what} {_shown(value)} is not a plain id (letters, digits, '-'; at most 64)")
    assert isinstance(pid, str) and isinstance(case_id, str)    # checked just above
    if not isinstance(files, list):
        raise PullRefused(f"package {pid}: its files are not a list")
    for name in files:
        if not isinstance(name, str) or not PACKAGE_FILE.fullmatch(name):
            raise PullRefused(f"package {pid}: {_shown(name)} is not a file a package has "
                              f"({envelope.ENVELOPE_FILE}, attachments/att-NNN.jwe)")
    if due_at is not None and (isinstance(due_at, bool) or not isinstance(due_at, (int, float))):
        raise PullRefused(f"package {pid}: its due_at {_shown(due_at)} is not a time")
    return pid, case_id, files, due_at


def _inside(root: Path, name: str) -> Path:
    """`root / name`, resolved, if it stays below `root` (which must be resolved); refused otherwise."""
    target = (root / name).resolve()
    if target == root or not target.is_relative_to(root):
        raise PullRefused(f"{_shown(name)} would be outside the portal's work directory")
    return target


# --- attachments ----------------------------------------------------------------------------------------

# An attachment's content type is whatever the EHR (or whoever wrote the Binary) chose. Rendered on the
# portal's origin, an SVG or HTML one would run script that reads every decrypted Case and the CSRF token.
# Only these types are shown in the browser, by viewers that run none of the file's script; every other
# type (SVG, HTML, XML, JavaScript, unknown) is downloaded as opaque bytes.
INLINE_TYPES = {"application/pdf": ".pdf", "image/png": ".png", "image/jpeg": ".jpg", "text/plain": ".txt"}
_BUILTIN_TYPES = mimetypes.MimeTypes()      # Python's own table only: the same names on every machine


def attachment_response(data: bytes, att: Attachment) -> Response:
    """An attachment as the browser gets it: inline if its type is on the allow-list, else a download.

    Either way with nosniff (so the browser keeps the type we name: WHATWG Fetch) and the `sandbox` CSP that
    ui.install gives every response that is not one of our pages (a unique origin, no script). PDFs keep
    the sandbox too: Chromium's viewer runs in a frame of its own and still shows a sandboxed PDF (checked
    by test_the_case_page_still_shows_its_attachments_and_svg_only_downloads); a viewer that refused one
    would show nothing, which is better than a PDF viewer's script on our origin.
    """
    base = att.content_type.split(";")[0].strip().lower()
    if base in INLINE_TYPES:
        # Plain text in UTF-8 whatever charset the EHR named: a charset such as UTF-7 could smuggle markup.
        mimetype = "text/plain; charset=utf-8" if base == "text/plain" else base
        disposition, ext = "inline", INLINE_TYPES[base]
    else:
        mimetype, disposition = "application/octet-stream", "attachment"
        ext = _BUILTIN_TYPES.guess_extension(base, strict=False) or ".bin"
    resp = Response(data, content_type=mimetype)
    # RFC 6266 section 4.3: a quoted ASCII file name; only letters, digits, ".", "_" and "-" are kept, so
    # the EHR's title can neither end the header, add a parameter nor name a directory.
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", att.title).strip("._-")[:60].removesuffix(ext) or \
        f"attachment-{att.index + 1}"
    resp.headers["Content-Disposition"] = f'{disposition}; filename="{stem}{ext}"'
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Cache-Control"] = "no-store"
    return resp


# --- the form -------------------------------------------------------------------------------------------

def read_form(form_def, questions: list[str], form, studies: dict[str, dict] | None = None
              ) -> tuple[dict, dict[str, str]]:
    """The answer as the opinion form wants it, and a message per field that is wrong. A `studies` field is one
    radio group per imaging study of the package (`<field>-<n>`, with a comment `<field>-<n>-comment`)."""
    data: dict = {}
    study_keys = list(studies or {})
    for f in form_def.fields.values():
        if f.kind == "studies":
            data[f.name] = [{"study": key, "score": form.get(f"{f.name}-{i}", "").strip(),
                             **({"comment": c} if (c := form.get(f"{f.name}-{i}-comment", "").strip()) else {})}
                            for i, key in enumerate(study_keys)]
        elif f.kind == "answers":
            data[f.name] = [{"question": q, "answer": form.get(f"answers-{i}", "").strip()}
                            for i, q in enumerate(questions)]
        elif f.kind == "list":
            data[f.name] = [line.strip() for line in form.get(f.name, "").splitlines() if line.strip()]
        else:
            data[f.name] = form.get(f.name, "").strip()
    errors: dict[str, str] = {}
    for f in form_def.fields.values():
        v = data[f.name]  # the loop above set every field
        if f.kind == "studies":
            if any(e["score"] not in f.choices for e in v) and (f.required or any(e["score"] for e in v)):
                errors[f.name] = f"{f.label}: score each study"
            elif not any(e["score"] for e in v):
                data[f.name] = []
        elif f.kind == "answers":
            if any(not a["answer"] for a in v):
                errors[f.name] = "Answer each question the referring physician asked"
        elif f.required and not v:
            errors[f.name] = f"{f.label} is required" + (": choose one" if f.kind == "choice" else "")
        elif f.kind == "choice" and v and v not in f.choices:
            errors[f.name] = f"choose one of the listed options for {f.label}"
    return {k: v for k, v in data.items() if v not in ("", [])}, errors


def preview_text(form: OpinionForm, opened: OpenedPackage, data: dict, key_images: list[dict] | None = None) -> str:
    claims = opened.claims
    entries = {f"{e['resource']['resourceType']}/{e['resource'].get('id')}": e for e in opened.document["entry"]}
    doc = build_opinion_document(data, form, opinion_id=str(uuid.uuid4()), timestamp="(when sent)",
                                 studies=studies_of(opened),
                                 patient_entry=entries[claims["patient"]],
                                 service_request_entry=entries[claims["service_request"]],
                                 reviewer_org=reviewer_organization(envelope.party(claims, "aud")),
                                 key_images=key_images)
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
                return redirect(safe_next(request.args.get("next"), url_for("inbox")))
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
        now = time.time()
        firsts = {(pc.api, pc.package_id) for pc in portal.cases.values()}
        for pid, pc in sorted(portal.cases.items()):
            if (pc.api, portal.supplement_of(pid)) in firsts:
                continue    # a supplement is shown on its first package's row ("new records")
            try:
                opened = portal.opened(pid)
                qs = questions_of(opened.manifest.get("question"))
                view = build(opened, attachment_text=lambda _i: None)
                answered, closed = portal.answered(pid), pc.source == "closed"
                # The hospital's listing names the same due date as the package (both from Reviewer.due_at).
                due = pc.due_at or view.answer_by
                rows.append({"pid": pid, "package": pc.package_id, "patient": view.patient,
                             "question": qs[0] if qs else "", "hospital": opened.sender,
                             "requester": view.requester, "priority": view.priority, "urgent": view.urgent,
                             "sent": opened.claims.get("iat"), "due": due,
                             "overdue": bool(due and due < now and not answered and not closed),
                             "answered": answered, "closed": closed, "error": None,
                             "new_records": portal.supplements_for(pid),
                             "supplement_of": opened.manifest.get("supplement_of"),
                             "questions": portal_followups.open_count(portal, pid) if answered else 0})
            except (FhirbridgeError, OSError) as exc:
                rows.append({"pid": pid, "package": pc.package_id, "error": str(exc), "patient": "", "question": "",
                             "hospital": "", "requester": {}, "priority": "", "urgent": False, "sent": None,
                             "due": None, "overdue": False, "answered": None, "closed": False,
                             "new_records": [], "supplement_of": None, "questions": 0})
        # Open Cases first; among them stat, asap, urgent before routine (R4 request-priority), then the one due
        # soonest. A package that cannot be opened sorts with the open ones, by its (unknown) due date last.
        rows.sort(key=lambda r: (bool(r["answered"]) or r["closed"], envelope.urgency_rank(str(r["priority"])),
                                 r["due"] or float("inf")))
        return render_template("reviewer/inbox.html", title="Inbox", rows=rows, nav=nav("inbox"),
                               where="Reviewer portal", fmt=_fmt)

    def _case_page(pid: str, *, values: dict | None = None, errors: dict | None = None, preview: str | None = None,
                   status: int = 200, correcting: bool = False):
        opened = portal.opened(pid)

        def text_of(i: int) -> str | None:
            data, _att = portal.attachment(pid, i)
            if len(data) > MAX_INLINE_TEXT:
                return None
            return data.decode("utf-8", errors="replace")
        view = build(opened, attachment_text=text_of)
        pc = portal.cases[pid]
        due = pc.due_at or view.answer_by
        answered = portal.answered(pid)
        draft = None if answered else portal.draft(pid)
        if values is None and draft:
            values = draft["values"]   # resumed where the reviewer left it
        if values is None and answered and answered.get("opinion"):
            values = portal.sent_values(pid)   # a correction starts from what was sent
        return render_template("reviewer/case.html", title=f"Case {pc.package_id[:8]}", v=view,
                               checklist=opened.manifest.get("checklist") or [],
                               supplement_of=_first_of(pid), supplements=portal.supplements_for(pid),
                               added=opened.manifest.get("added_on_request") or [],
                               asked=(opened.manifest.get("request") or {}).get("text"),
                               sent_without=opened.manifest.get("sent_without") or [],
                               draft=draft, followups=portal_followups.questions(portal, pid) if answered
                               and not answered.get("declined") else [],
                               form=portal.form_of(pid), form_name=portal.form_name(pid),
                               studies=[(key, summary_line(r)) for key, r in studies_of(opened).items()],
                               values=values or {}, errors=errors or {}, preview=preview, pc=pc, due=due,
                               overdue=bool(due and due < time.time() and not answered and pc.source != "closed"),
                               answered=answered, sent_opinion=portal.sent_opinion(pid) if answered else None,
                               images=has_images(opened), marked=portal.key_images(pid), correcting=correcting,
                               nav=nav("case"), where="Reviewer portal", fmt=_fmt), status

    def _first_of(pid: str) -> str | None:
        """The portal key of the first package a supplement adds to (its opinion is answered there)."""
        first = portal.supplement_of(pid)
        if first is None:
            return None
        api = portal.cases[pid].api
        return next((k for k, pc in portal.cases.items() if pc.package_id == first and pc.api == api), first)

    @app.get("/cases/<pid>")
    def case(pid: str):
        return _case_page(pid)

    @app.get("/cases/<pid>/attachments/<int:index>")
    def attachment(pid: str, index: int):
        data, att = portal.attachment(pid, index)
        return attachment_response(data, att)

    # --- the viewer: series, slices, frames, window/level, key images -------------------------------------

    def _series_of(pid: str, series_uid: str) -> image_view.Series:
        s = portal.images(pid).by_uid(series_uid)
        return s if s is not None else abort(404)

    @app.get("/cases/<pid>/images")
    def images(pid: str):
        opened = portal.opened(pid)
        imgs = portal.images(pid)
        current = imgs.by_uid(request.args.get("series", "")) or (imgs.series[0] if imgs.series else None)
        index = _arg_int("i", 0, len(current.instances) - 1 if current else 0)
        frames = current.instances[index].frames if current and current.instances else 1
        frame = _arg_int("frame", 1, frames)
        marked = portal.key_images(pid)
        pc = portal.cases[pid]
        return render_template("reviewer/images.html", title=f"Images, Case {pc.package_id[:8]}", pc=pc,
                               imgs=imgs, current=current, index=index, frame=frame, marked=marked,
                               presets=dicom_render.CT_PRESETS, answered=portal.answered(pid),
                               patient=build(opened, attachment_text=lambda _i: None).patient,
                               nav=nav("case"), where="Reviewer portal")

    @app.get("/cases/<pid>/images/<series_uid>/<int:index>.png")
    def frame_png(pid: str, series_uid: str, index: int):
        inst = _series_of(pid, series_uid).instance(index) or abort(404)
        frame = _arg_int("frame", 1, inst.frames) - 1
        window = dicom_render.parse_window(request.args.get("wc"), request.args.get("ww"))
        try:
            png = dicom_render.render_png(inst.path, frame=frame, window=window)
        except dicom_render.CannotDisplay as exc:
            return _no_store(Response(str(exc), status=422, content_type="text/plain; charset=utf-8"))
        return _no_store(Response(png, content_type="image/png"))

    @app.get("/cases/<pid>/images/<series_uid>/thumbnail.png")
    def thumbnail(pid: str, series_uid: str):
        s = _series_of(pid, series_uid)
        inst = s.instance(len(s.instances) // 2) or abort(404)
        try:
            png = dicom_render.render_png(inst.path, frame=0, max_side=dicom_render.THUMBNAIL)
        except dicom_render.CannotDisplay as exc:
            return _no_store(Response(str(exc), status=422, content_type="text/plain; charset=utf-8"))
        return _no_store(Response(png, content_type="image/png"))

    @app.get("/cases/<pid>/images/<series_uid>/<int:index>.dcm")
    def instance_file(pid: str, series_uid: str, index: int):
        inst = _series_of(pid, series_uid).instance(index) or abort(404)
        resp = Response(inst.path.read_bytes(), content_type="application/dicom")
        # The SOP Instance UID is digits and dots (checked by the extraction's file names): a safe file name.
        name = inst.sop_uid if image_view.UID.fullmatch(inst.sop_uid) else f"instance-{index + 1}"
        resp.headers["Content-Disposition"] = f'attachment; filename="{name}.dcm"'
        return _no_store(resp)

    @app.post("/cases/<pid>/key-images")
    def key_images(pid: str):
        check_csrf()
        if portal.answered(pid):
            flash("This Case was answered already: its key images went with the opinion.", "error")
            return redirect(url_for("images", pid=pid))
        imgs = portal.images(pid)
        series_uid, sop_uid = request.form.get("series", ""), request.form.get("sop", "")
        k = image_view.key_image(imgs, series_uid, sop_uid, request.form.get("frame", ""))
        if k is None:
            abort(400, "that image is not in this package")
        s = imgs.by_uid(series_uid)
        assert s is not None                          # key_image found it
        on = portal.toggle_key_image(pid, k, s.modality)
        flash(f"{'Marked' if on else 'Unmarked'} as a key image: {s.title()}, image "
              f"{(s.find(sop_uid) or (0, None))[0] + 1}, frame {k.frame}.", "ok")
        return redirect(url_for("images", pid=pid, series=series_uid, i=request.form.get("i", "0"),
                                frame=k.frame))

    @app.post("/cases/<pid>/opinion")
    def opinion(pid: str):
        check_csrf()
        opened = portal.opened(pid)
        if portal.supplement_of(pid):
            abort(409, "this package adds records to an earlier one: answer the first package")
        if portal.answered(pid):
            flash("This Case was answered already.", "error")
            return redirect(url_for("case", pid=pid))
        questions = questions_of(opened.manifest.get("question"))
        form_def = portal.form_of(pid)
        data, errors = read_form(form_def, questions, request.form, studies=studies_of(opened))
        values = {k: v for k, v in request.form.to_dict().items() if k not in ("csrf_token", "action")}
        if request.form.get("action") == "draft":
            # Kept as typed, checked or not: a draft is for coming back to, not for sending.
            portal.save_draft(pid, values)
            flash("Draft saved. It is kept encrypted here; come back to it at any time.", "ok")
            return redirect(url_for("case", pid=pid, _anchor="opinion-form"))
        if errors:
            return _case_page(pid, values=values, errors=errors, status=422)
        if request.form.get("action") != "send":
            return _case_page(pid, values=values, preview=preview_text(form_def, opened, data,
                                                                       portal.key_images(pid)))
        try:
            sealed, claims, document = sealed_answer(opened, data, portal.key, mappings_dir=settings.mappings_dir,
                                                     form=portal.form_name(pid), source="the form",
                                                     key_images=portal.key_images(pid))
        except AnswerError as exc:
            return _case_page(pid, values=values, errors={"_": "; ".join(exc.problems)}, status=422)
        pc = portal.cases[pid]
        try:
            where = _send(portal, pc, sealed, claims)
        except (requests.RequestException, FhirbridgeError) as exc:
            flash(f"Not sent: {failure_text(exc, pc.api)}. Your answer is kept below; try again.", "error")
            return _case_page(pid, values=values, status=502)
        portal.save_sent_values(pid, values)
        portal.mark_answered(pid, {"opinion": claims["jti"], "where": where, "form": portal.form_name(pid)},
                             document=document)
        portal.drop_draft(pid)
        flash(f"Signed and sent: {where}.", "ok")
        return redirect(url_for("case", pid=pid))

    @app.post("/cases/<pid>/correction")
    def correction(pid: str):
        """A corrected opinion: the same form, sealed as a new version that replaces the current one (the
        opinion sent last from here). The hospital refuses one that does not correct its current version."""
        check_csrf()
        opened = portal.opened(pid)
        answered = portal.answered(pid)
        if not answered or not answered.get("opinion"):
            abort(409, "there is no opinion sent from here to correct")
        form_def = portal.form_of(pid)
        data, errors = read_form(form_def, questions_of(opened.manifest.get("question")), request.form,
                                 studies=studies_of(opened))
        values = {k: v for k, v in request.form.to_dict().items() if k not in ("csrf_token", "action")}
        if errors:
            return _case_page(pid, values=values, errors=errors, status=422, correcting=True)
        if request.form.get("action") != "send":
            return _case_page(pid, values=values, correcting=True,
                              preview=preview_text(form_def, opened, data, portal.key_images(pid)))
        try:
            sealed, claims, document = sealed_answer(opened, data, portal.key, mappings_dir=settings.mappings_dir,
                                                     form=portal.form_name(pid), source="the form",
                                                     key_images=portal.key_images(pid),
                                                     replaces=answered["opinion"])
        except AnswerError as exc:
            return _case_page(pid, values=values, errors={"_": "; ".join(exc.problems)}, status=422,
                              correcting=True)
        pc = portal.cases[pid]
        try:
            where = _send(portal, pc, sealed, claims)
        except (requests.RequestException, FhirbridgeError) as exc:
            flash(f"Not sent: {failure_text(exc, pc.api)}. Your correction is kept below; try again.", "error")
            return _case_page(pid, values=values, status=502, correcting=True)
        portal.save_sent_values(pid, values)
        # The correction is now the current version: a further one replaces it, not the first.
        portal.mark_answered(pid, {**answered, "opinion": claims["jti"], "where": where,
                                   "corrections": int(answered.get("corrections") or 0) + 1,
                                   "first_opinion": answered.get("first_opinion") or answered["opinion"]},
                             document=document)
        flash(f"Corrected opinion signed and sent: {where}. The hospital files it in place of the earlier one.",
              "ok")
        return redirect(url_for("case", pid=pid))

    def _to_hospital(pid: str, field: str, what: str, body_key: str, missing: str, extra: dict | None = None):
        """Decline or ask for records: a short text the hospital's API takes; the form again if it is empty."""
        check_csrf()
        pc = portal.cases.get(pid) or abort(404)
        text = request.form.get(field, "").strip()
        if not text:
            return None, _case_page(pid, values=request.form.to_dict(), errors={field: missing}, status=422)
        try:
            _hospital_call(portal, pc, what, {body_key: text, **(extra or {})})
        except (requests.RequestException, FhirbridgeError) as exc:
            # The hospital did not take it: say so, and keep what the reviewer wrote for another try.
            flash(f"Not sent: {failure_text(exc, pc.api)}. What you wrote is kept below; try again.", "error")
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
        # A FHIR search naming the records (CDex data-request-query), if the reviewer gives one.
        query = request.form.get("request_query", "").strip()
        _pc, page = _to_hospital(pid, "request_text", "requests", "text", "say which records you need",
                                 {"query": query} if query else None)
        if page is not None:
            return page
        flash("Your request for more records was sent to the hospital.", "ok")
        return redirect(url_for("case", pid=pid))

    portal_followups.install(app, portal, _send)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        return render_template("reviewer/error.html", title=exc.name, message=exc.description or exc.name,
                               nav=nav(""), where="Reviewer portal"), exc.code or 500

    @app.errorhandler(SealError)
    def _sealed(exc: SealError):
        return render_template("reviewer/error.html", title="Cannot open this package", message=str(exc),
                               nav=nav(""), where="Reviewer portal"), 422

    return app


def failure_text(exc: Exception, api: str | None) -> str:
    """What a reviewer reads when a hospital's API could not be reached: why, in words (the hospital is
    down, its name does not resolve), never requests' `HTTPConnectionPool(host=...)...` text."""
    if isinstance(exc, requests.RequestException) and not isinstance(exc, requests.HTTPError):
        return f"the hospital's service could not be reached: {why_unreachable(exc, api)}"
    return str(exc)


def _send(portal: Portal, pc: PortalCase, sealed: bytes, claims: dict, name: str | None = None) -> str:
    """Hand a sealed opinion (or a follow-up answer, `name` its file name) to the hospital."""
    if pc.api:
        r = requests.post(f"{pc.api}/opinions", data=sealed, timeout=PULL_TIMEOUT,
                          headers={**portal._auth(pc.api), "Content-Type": "application/jose+json"})
        if r.status_code != 202:
            raise FhirbridgeError(f"the hospital answered HTTP {r.status_code}: {_message(r)}")
        return "uploaded to the hospital"
    if not portal.s.answers_dir:
        raise FhirbridgeError("no --answers directory is configured for delivered packages")
    files.private_dir(portal.s.answers_dir)
    envelope.write_atomic(portal.s.answers_dir / (name or f"opinion-{claims['jti']}.jwe"), sealed)
    return f"written to {portal.s.answers_dir}"


def _hospital_call(portal: Portal, pc: PortalCase, what: str, body: dict) -> None:
    if not pc.api or not pc.case_id:
        raise FhirbridgeError("only Cases pulled from a hospital's reviewer API can be declined or asked about here")
    r = requests.post(f"{pc.api}/cases/{pc.case_id}/{what}", json=body, headers=portal._auth(pc.api),
                      timeout=PULL_TIMEOUT)
    if r.status_code not in (200, 201):
        raise FhirbridgeError(f"the hospital answered HTTP {r.status_code}: {_message(r)}")


def _arg_int(name: str, low: int, high: int) -> int:
    """A whole-number query argument clamped to [low, high] (low when absent or not a number)."""
    try:
        return min(max(int(request.args.get(name, low)), low), max(high, low))
    except ValueError:
        return low


def _no_store(resp: Response) -> Response:
    # A rendered frame or a DICOM file is the patient's image: never kept by the browser or a proxy.
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def _fmt(epoch) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(epoch)) if epoch else ""
