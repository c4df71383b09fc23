"""Receive a sealed opinion: check everything before the Case moves, then hand it to the file step.

Refused (RejectedOpinion / SealError, nothing written, the Case unchanged) when: it does not decrypt with
the hospital's keys; it names a Case this service does not know; it is not signed by the reviewer that
Case was sent to; it answers another package; the Case is not awaiting an opinion (already filed,
cancelled...); its message id was seen before (replay); it has expired; its FHIR is invalid; or its
document is about another patient or order.

Accepted opinions are kept as received (still encrypted to the hospital's key) in the Case directory, so
the file step can be retried, and are re-verified there before filing.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import itertools
import logging
import os
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import orjson

from fhirbridge import jsonutil
from fhirbridge.crypto import jws
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.ehr.context import App
from fhirbridge.errors import CaseError, ConfigError, OpinionNotYet, RejectedOpinion, SealError
from fhirbridge.exchange import envelope
from fhirbridge.fhir.narrative import narrative_problems
from fhirbridge.fhir.validate import validate as validate_resource
from fhirbridge.loop.followup_inbound import accept_correction, receive_answer
from fhirbridge.ops.crashpoints import crash_point
from fhirbridge.steps import Step
from fhirbridge.store.store import LOCAL_PREFIX, Case, pid_alive

CONSULT_NOTE = ("http://loinc.org", "11488-4")
log = logging.getLogger("fhirbridge.receive")


@dataclass
class Received:
    case: Case
    opinion_id: str          # the message id: of the opinion, a correction, or a follow-up answer
    kind: str = "opinion"    # opinion | correction | answer


# One answer for an opinion that names a Case this service does not know, and for one that names another
# reviewer's Case (its signature cannot verify with that reviewer's keys): the same text and the same status,
# so whoever uploads learns neither which Cases exist nor who holds them (issue 13, S9). Which of the two it
# was goes to the operator's log only.
NOT_YOURS = ("the opinion is not signed by the reviewer of a Case this service knows (an unknown Case, another "
             "reviewer's Case, or a key that reviewer has not registered); nothing written")


class OpinionKeys:
    """The key set that must verify an opinion: that of the reviewer its Case was sent to (envelope.KeyResolver).
    The signing key's kid is passed on, so a reviewer publishing a rotated key set is re-read once. The
    claims' signature is checked here, before any message could tell a known Case from an unknown one."""

    def __init__(self, app: App):
        self.app = app

    def keyring_for(self, token: str, claims: dict) -> KeyRing:
        case = self.app.store.find(str(claims.get("case_id", "")))
        if case is None:
            log.warning("opinion refused: it names Case %.80r, which this service does not know", claims.get("case_id"))
            raise RejectedOpinion(NOT_YOURS)
        try:
            keys = self.app.reviewer_keys(case.reviewer, kid=envelope.peek_header(token).get("kid"))
            jws.verify_compact(token, keys, typ=envelope.OPINION)
        except SealError as exc:
            log.warning("opinion refused for Case %s: not verified by the keys of reviewer %s: %s", case.id,
                        case.reviewer, exc)
            raise RejectedOpinion(NOT_YOURS) from None
        return keys


def opinion_path(app: App, case: Case, opinion_id: str | None = None) -> Path:
    return app.case_dir(case.id) / f"opinion-{opinion_id or case.opinion_id}.jwe"


def envelope_typ(data: bytes) -> str | None:
    """The `typ` of a JWE's protected header, read without decrypting (which kind of message it says it is:
    the decryption checks it again). None when it cannot be read."""
    try:
        obj = orjson.loads(data)
        protected = obj.get("protected") if isinstance(obj, dict) else None
        header = orjson.loads(jsonutil.b64url_decode(protected)) if isinstance(protected, str) else {}
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return None
    typ = header.get("typ") if isinstance(header, dict) else None
    return typ if isinstance(typ, str) else None


def receive_bytes(app: App, data: bytes, *, source: str = "opinion") -> Received:
    """An opinion, a corrected opinion (its claims say what it `replaces`) or the answer to a follow-up
    question (envelope ANSWER: loop/followup_inbound.py), by the type the envelope declares."""
    if envelope_typ(data) == f"{envelope.ANSWER}+jwe":
        case, answer_id = receive_answer(app, data, source=source)
        return Received(case=case, opinion_id=answer_id, kind="answer")
    try:
        claims, document = envelope.open_sealed(data, typ=envelope.OPINION, decrypt=app.hospital_keys,
                                                trusted=OpinionKeys(app))
    except SealError as exc:
        raise SealError(f"{source}: refused: {exc}") from None
    case = app.store.get(claims["case_id"])
    reviewer = app.config.reviewer(case.reviewer)
    jti = str(claims["jti"])
    correction = claims.get("replaces") is not None
    _refuse_unless(not correction or case.step == Step.DONE,
                   f"the correction replaces an opinion of Case {case.id[:8]}, which has none filed yet (it is "
                   f"{case.step}); nothing written")
    _refuse_unless(correction or case.step != Step.DONE,
                   f"Case {case.id[:8]} already has its opinion filed as {case.document_reference}; nothing written")
    _refuse_unless(not (case.step == Step.FILE and case.opinion_id == jti),
                   f"this opinion was already received for Case {case.id[:8]} and is being filed; nothing written")
    _refuse_unless(not app.store.message_seen(jti), f"opinion {jti} was received before (a replay); nothing written")
    _refuse_unless(correction or case.step in (Step.AWAIT_OPINION, Step.DELIVER, Step.SUPPLEMENT),
                   f"Case {case.id[:8]} is {case.step}, not awaiting an opinion; nothing written")
    assert case.package_id is not None  # sealing records it before the Case reaches deliver
    _refuse_unless(claims.get("package_id") == case.package_id,
                   f"the opinion answers package {claims.get('package_id')}, but Case {case.id[:8]} was sent "
                   f"package {case.package_id}; nothing written")
    # The claims are signed by the reviewer, but a reviewer's tool can still be wrong: a member of the wrong
    # type is a refusal with the reason, never a crash that would leave the file in the inbox for ever.
    # iss/aud are identifier URIs (RFC 7519 StringOrURI); an opinion from an older reviewer tool names them
    # by {system, value} objects, which party_uri reads the same way (exchange/envelope.py).
    h = app.hospital
    _refuse_unless(case.hospital == h.key and envelope.party_uri(claims.get("aud"))
                   == envelope.organization_uri(h.identifier_system, h.identifier_value),
                   "the opinion is addressed to another hospital than the one that decrypted it; nothing written")
    iss = envelope.party_uri(claims.get("iss"))
    expected = envelope.organization_uri(reviewer.identifier_system, reviewer.identifier_value)
    _refuse_unless(iss == expected, f"the opinion says it is from {iss!r}, but Case {case.id[:8]} was sent to "
                                    f"{expected!r}; nothing written")
    _refuse_unless(claims.get("patient") == case.patient and claims.get("service_request") == case.service_request,
                   f"the opinion's claims name another patient or order than Case {case.id[:8]}; nothing written")
    # The document's identifier becomes the note's identifier in the chart: it must be the signed message
    # id, a UUID, so a reviewer can neither reuse another note's identifier nor choose what it overwrites.
    _refuse_unless(_is_uuid(jti) and document.get("identifier", {}) == {"system": "urn:ietf:rfc:3986",
                                                                      "value": f"urn:uuid:{jti}"},
                   "the opinion document's identifier must be urn:uuid:<its message id>; nothing written")
    check_document(app, case, document)
    if not correction and case.step == Step.SUPPLEMENT:
        _not_yet(case)
    if correction:
        # A corrected opinion: filed as a new version of the note by the follow-up worker (loop/followup.py).
        accept_correction(app, case, claims, data)
        return Received(case=app.store.get(case.id), opinion_id=jti, kind="correction")
    path = opinion_path(app, case, jti)
    # The file is written before the Case moves (so an accepted opinion always has its file), under a name
    # that only this jti uses: two workers receiving the same opinion write the same bytes to it.
    envelope.write_atomic(path, data)
    crash_point("receive.written")
    accepted = app.store.accept_opinion(case.id, jti=jti, package_id=case.package_id,
                                        detail={"opinion_id": jti, "from": reviewer.name})
    if accepted is None:
        now = app.store.get(case.id)
        if now.opinion_id != jti:  # never delete the file of an opinion another worker accepted
            path.unlink(missing_ok=True)
        if now.step == Step.SUPPLEMENT:
            _not_yet(now)          # the physician sent more records meanwhile: wait for them, as above
        raise RejectedOpinion(f"Case {case.id[:8]} took another opinion meanwhile (it is {now.step}) or this one "
                              "was seen before; nothing written")
    log.info("case %s: %s -> %s (opinion received)", case.id, case.step, accepted.step,
             extra={"case_id": case.id, "from_step": case.step, "to_step": accepted.step})
    return Received(case=accepted, opinion_id=jti)


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def _not_yet(case) -> NoReturn:
    # The supplement step returns the Case to await_opinion as soon as the records have gone; refusing the
    # opinion would make the reviewer send it again for nothing. Raised after every check of the opinion, so
    # one that can never be taken is refused at once rather than deferred.
    raise OpinionNotYet(f"Case {case.id[:8]} is sending you the records you asked for; the opinion is taken once "
                        f"they have gone (try again in a minute); nothing written")


def _refuse_unless(ok: bool, message: str) -> None:
    if not ok:
        raise RejectedOpinion(message)


def check_document(app: App, case: Case, document: dict) -> None:
    """The opinion must be a valid Consult note about this Case's patient and order, with safe narrative."""
    problems = []
    for i, entry in enumerate(document.get("entry", [])):
        res = entry.get("resource", {})
        for reason in validate_resource(res):
            problems.append(f"entry {i} ({res.get('resourceType', '?')}): {reason}")
    if problems:
        raise RejectedOpinion("the opinion is not valid FHIR; nothing written:\n  " + "\n  ".join(problems[:10]))
    bundle_only = {k: v for k, v in document.items() if k != "entry"}
    reasons = validate_resource({**bundle_only, "entry": []})
    if reasons or document.get("type") != "document":
        raise RejectedOpinion("the opinion is not a FHIR document Bundle: " + "; ".join(reasons or ["type"]))
    comp = document["entry"][0].get("resource", {}) if document.get("entry") else {}
    if comp.get("resourceType") != "Composition":
        raise RejectedOpinion("the opinion document does not start with a Composition; nothing written")
    codings = {(c.get("system"), c.get("code")) for c in comp.get("type", {}).get("coding", [])}
    if CONSULT_NOTE not in codings:
        raise RejectedOpinion("the opinion's Composition is not a Consult note (LOINC 11488-4); nothing written")
    if not same_ref(comp.get("subject", {}).get("reference", ""), case.patient, app):
        raise RejectedOpinion(f"the opinion is about a different patient than Case {case.id[:8]}; nothing written")
    foci = [s["focus"].get("reference", "") for s in comp.get("section", []) if s.get("focus")]
    if not all(same_ref(f, case.service_request, app) for f in foci):
        raise RejectedOpinion(f"the opinion answers a different order than Case {case.id[:8]}; nothing written")
    for entry in document["entry"]:
        res = entry.get("resource", {})
        if res.get("resourceType") == "Patient" and f"Patient/{res.get('id')}" != case.patient:
            raise RejectedOpinion(f"the opinion carries another patient's record than Case {case.id[:8]}; "
                                  "nothing written")
    # Every narrative of the document, not only the sections: the whole Bundle is filed in the chart (as a
    # Binary), where a viewer may render any of them. The R4 allow-list and why: fhir/narrative.py.
    unsafe = list(dict.fromkeys(p for div in _narratives(document) for p in narrative_problems(div)))
    if unsafe:
        raise RejectedOpinion("the opinion's narrative is not safe XHTML (FHIR R4 narrative rules txt-1/txt-2): "
                              + "; ".join(unsafe[:5]) + "; nothing written")


def _narratives(node):
    """Every Narrative.div in the document: resources' and sections' text, contained resources' too."""
    if isinstance(node, dict):
        if isinstance(node.get("text"), dict) and "div" in node["text"]:
            yield node["text"]["div"]
        for value in node.values():
            yield from _narratives(value)
    elif isinstance(node, list):
        for value in node:
            yield from _narratives(value)


def same_ref(ref: str, local: str, app: App) -> bool:
    base = app.hospital.fhir_base_url.rstrip("/") + "/"
    return ref == local or ref == base + local


def recipient_kids(data: bytes) -> set[str]:
    """The key ids a JWE is encrypted to, read without decrypting (to pick the hospital it is for)."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return set()
    recipients = obj.get("recipients") if isinstance(obj, dict) else None
    if not isinstance(recipients, list):
        recipients = [obj] if isinstance(obj, dict) else []
    return {str(r.get("header", {}).get("kid")) for r in recipients if isinstance(r, dict)}


def app_for(apps: list[App], data: bytes) -> App:
    """Of the hospitals this deployment serves, the one an envelope is encrypted to (the first if none)."""
    if len(apps) > 1:
        kids = recipient_kids(data)
        for app in apps:
            if any(app.hospital_keys.decryption_key(k) for k in kids):
                return app
    return apps[0]


def receive_file(app: App, path: Path) -> Received:
    return receive_bytes(app, envelope.read_limited(path, envelope.OPINION), source=str(path))


@dataclass
class InboxResult:
    accepted: list[Received] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)   # moved to inbox/refused/ with a reason
    deferred: list[tuple[Path, str]] = field(default_factory=list)  # left in the inbox: our problem, not the file's


def process_inbox(app: App, *, apps: list[App] | None = None) -> InboxResult:
    """Receive every *.jwe in the inbox. Accepted files move to inbox/accepted/, refused ones to
    inbox/refused/ with a .reason.txt beside them. A file that fails for a reason of ours (a reviewer's key
    file missing, a full disk) stays in the inbox for the next run. Nothing is deleted, nothing is lost,
    and one bad file never stops the rest of the run.

    Whoever can drop files in the inbox must not make us write anywhere else: the inbox and its folders
    are held open (never a symlink), the folders are ours and 0700, every move and write goes through
    those descriptors and never through a symlink, and only regular files are read."""
    result = InboxResult()
    folders = _open_inbox(app.config.inbox)
    if folders is None:
        return result
    inbox = app.config.inbox
    try:
        top, processing = folders["inbox"], folders["processing"]
        for found in sorted(n for n in os.listdir(top) if n.endswith(".jwe")):
            # Claim the file by renaming it: of several workers ticking at once, exactly one gets each file.
            claimed = f"{found}.{worker_tag()}"
            try:
                os.rename(found, claimed, src_dir_fd=top, dst_dir_fd=processing)
            except FileNotFoundError:
                continue
            # The claim's age, not the file's: a copy that kept an old mtime is not "stale" at once. A file of
            # another user's that we may not touch keeps its own; it must not stop the whole inbox.
            with contextlib.suppress(OSError):
                os.utime(claimed, dir_fd=processing, follow_symlinks=False)
            try:
                data = _read_claimed(processing, claimed, found)
                target = app_for(apps or [app], data)
                result.accepted.append(receive_bytes(target, data, source=found))
                crash_point("receive.accepted")
                _move(processing, claimed, folders["accepted"], found)
            except (RejectedOpinion, SealError, CaseError) as exc:
                result.refused.append((inbox / found, str(exc)))
                _write_reason(folders["refused"], _move(processing, claimed, folders["refused"], found), str(exc))
            except Exception as exc:  # noqa: BLE001 - kept for the next run, reported now
                result.deferred.append((inbox / found, f"{exc.__class__.__name__}: {exc}"))
                _move(processing, claimed, top, found)
        # A worker killed mid-file leaves it in processing/: put such files back for the next pass, at once
        # when the process that claimed it was on this host and is gone, else after ten minutes (another host's).
        for stale in fnmatch.filter(os.listdir(processing), "*.jwe.*"):
            try:
                if _abandoned(processing, stale):
                    _move(processing, stale, top, stale.rsplit(".", 1)[0])
            except FileNotFoundError:
                continue  # another worker put it back first
    finally:
        for fd in folders.values():
            os.close(fd)
    return result


_FOLDERS = ("processing", "accepted", "refused")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_inbox(inbox: Path) -> dict[str, int] | None:
    """The inbox and its folders as open descriptors ("inbox", "processing", ...), or None when there is
    no inbox. A symlink in their place is refused: it would send the opinions, and the reason files we
    write, wherever its maker chose."""
    try:
        top = os.open(inbox, _DIR_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        if inbox.is_symlink():  # Linux says ENOTDIR for a link to a directory opened with O_NOFOLLOW
            raise ConfigError(f"{inbox} is a symbolic link; set it to the real directory (a link in the inbox's "
                              "place could be re-pointed by others)", key="fhirbridge.inbox") from None
        return None
    fds = {"inbox": top}
    try:
        for name in _FOLDERS:
            fds[name] = _private_folder(top, inbox / name)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def _private_folder(top: int, path: Path) -> int:
    """One inbox folder, opened: made 0700 whatever the umask, and refused unless it is a real directory of
    ours (anyone who can write in the inbox could have made it, or a link in its place, before we did)."""
    try:
        os.mkdir(path.name, 0o700, dir_fd=top)
    except FileExistsError:
        pass
    try:
        fd = os.open(path.name, _DIR_FLAGS, dir_fd=top)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        what = "a symbolic link" if stat.S_ISLNK(os.stat(path.name, dir_fd=top, follow_symlinks=False).st_mode) \
            else "not a directory"
        raise ConfigError(f"{path} is {what}; remove it and fhirbridge makes the folder itself",
                          key="fhirbridge.inbox") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise ConfigError(f"{path} belongs to another user (uid {st.st_uid}); remove it and fhirbridge makes "
                          "the folder itself", key="fhirbridge.inbox")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.fchmod(fd, 0o700)  # mkdir's mode is masked by the umask; a folder of an older version was 0755
    return fd


def _read_claimed(folder: int, name: str, shown: str) -> bytes:
    """The claimed file's bytes, if it is a regular file within the opinion cap: a dropped symlink is not
    followed (it would read any file we can) and a FIFO or device is not opened for reading (it would hang)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            raise SealError(f"{shown}: refused: not a regular file") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SealError(f"{shown}: refused: not a regular file")
        limit = envelope.max_envelope_bytes(envelope.OPINION)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise SealError(f"{shown}: refused: larger than the {limit} byte limit for an opinion")
    return data


def _abandoned(folder: int, name: str) -> bool:
    host, _, rest = name.rsplit(".", 1)[1].partition("-")
    pid = rest.partition("-")[0]
    if host == _HOST_TAG and pid.isdigit() and not pid_alive(int(pid)):
        return True
    return time.time() - os.stat(name, dir_fd=folder, follow_symlinks=False).st_mtime > 600


def _taken(folder: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=folder, follow_symlinks=False)  # lstat: a dangling or planted link is taken too
    except FileNotFoundError:
        return False
    return True


def _move(src: int, name: str, folder: int, wanted: str) -> str:
    """Move `name` into `folder` as `wanted`, or as `stem.N.suffix` when that is taken; returns the name used.
    A rename replaces a link at the destination rather than writing through it, and none is replaced here."""
    stem, dot, suffix = wanted.partition(".")
    dest, n = wanted, 1
    while _taken(folder, dest):
        dest = f"{stem}.{n}{dot}{suffix}"
        n += 1
    os.rename(name, dest, src_dir_fd=src, dst_dir_fd=folder)
    return dest


def _write_reason(folder: int, name: str, reason: str) -> None:
    """`<name>.reason.txt` (or `<name>.reason-N.txt` if that exists), created new, 0600, never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for n in itertools.count():
        try:
            fd = os.open(f"{name}.reason.txt" if n == 0 else f"{name}.reason-{n}.txt", flags, 0o600, dir_fd=folder)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(reason + "\n")
        return


# This host (and pid namespace), as a name-safe tag: a claimed inbox file names the host and pid that claimed it.
_HOST_TAG = hashlib.sha256(LOCAL_PREFIX.encode()).hexdigest()[:8]


def worker_tag() -> str:
    return f"{_HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
