"""The reviewer's side: open a package, and answer it with a sealed opinion.

A reviewer holds its private JWKS (`--key`) and the public keys of the hospitals it trusts (`--trust`,
by default `trusted.jwks.json` next to the key file). A package is accepted only if it is signed by a
trusted hospital key and decrypts with the reviewer's key; every separately encrypted attachment is
checked against the SHA-256 the signed manifest gives for it.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import envelope
from .crypto import jwe, jws
from .crypto.keys import KeyRing
from .errors import SealError
from .mappings_load import load_opinion_form
from .opinion import AnswerError, build_opinion_document, check_answer, load_answer, reviewer_organization

TRUST_FILE = "trusted.jwks.json"
OPINION_LIFETIME = 30 * 86400


@dataclass
class OpenedPackage:
    path: Path           # the package directory
    claims: dict
    document: dict

    @property
    def manifest(self) -> dict:
        return self.claims.get("manifest", {})


def package_paths(path: Path) -> tuple[Path, Path]:
    """Accept the package directory or its package.jwe; return (directory, envelope file)."""
    path = Path(path)
    if path.is_dir():
        return path, path / envelope.ENVELOPE_FILE
    return path.parent, path


def trust_for(key_path: Path, explicit: Path | None) -> KeyRing:
    path = explicit or Path(key_path).parent / TRUST_FILE
    if not path.exists():
        raise SealError(f"no trusted hospital keys at {path}: pass --trust with the hospital's public JWKS "
                        "(the file `fhirbridge keys jwks` prints at the hospital)")
    return KeyRing.load(path)


class _HashSink:
    def __init__(self):
        self.h, self.size = hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.h.update(data)
        self.size += len(data)
        return len(data)


def open_package(path: Path, key: KeyRing, trusted: KeyRing, *, check_expiry: bool = True) -> OpenedPackage:
    directory, env_file = package_paths(path)
    claims, document = envelope.open_sealed(envelope.read_limited(env_file), typ=envelope.PACKAGE, decrypt=key,
                                            trusted=trusted, check_expiry=check_expiry)
    opened = OpenedPackage(directory, claims, document)
    for att in opened.manifest.get("attachments", []):
        verify_attachment(opened, att, key)
    return opened


def _attachment_path(opened: OpenedPackage, att: dict) -> Path:
    p = (opened.path / att["file"]).resolve()
    if opened.path.resolve() not in p.parents:  # a manifest must not point outside its package
        raise SealError(f"attachment path {att['file']!r} leaves the package")
    return p


def verify_attachment(opened: OpenedPackage, att: dict, key: KeyRing) -> None:
    path = _attachment_path(opened, att)
    if not path.exists():
        raise SealError(f"attachment {att['file']} named in the manifest is missing")
    sink = _HashSink()
    with open(path, "rb") as src:
        jwe.decrypt_stream(src, sink, key, max_plaintext=att["size"])
    if sink.h.hexdigest() != att["sha256"] or sink.size != att["size"]:
        raise SealError(f"attachment {att['file']} does not match the signed manifest")


def extract_attachments(opened: OpenedPackage, key: KeyRing, outdir: Path) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for att in opened.manifest.get("attachments", []):
        dst = outdir / Path(att["file"]).name.replace(".jwe", _suffix(att["content_type"]))
        jwe.decrypt_to_path(_attachment_path(opened, att), dst, key, max_plaintext=att["size"])
        if hashlib.sha256(dst.read_bytes()).hexdigest() != att["sha256"]:
            dst.unlink()
            raise SealError(f"attachment {att['file']} does not match the signed manifest")
        written.append(dst)
    return written


def _suffix(content_type: str) -> str:
    return {"application/pdf": ".pdf", "text/plain": ".txt", "image/jpeg": ".jpg", "image/png": ".png",
            "application/dicom": ".dcm"}.get(content_type.split(";")[0].strip(), ".bin")


def answer(opened: OpenedPackage, answer_file: Path, key: KeyRing, hospital: KeyRing, *,
           mappings_dir: Path, form: str = "default") -> tuple[bytes, dict]:
    """Build, sign and seal the opinion; returns (sealed bytes, claims)."""
    form_def = load_opinion_form(mappings_dir, form)
    data = load_answer(answer_file)
    problems = check_answer(data, form_def)
    if problems:
        raise AnswerError(str(answer_file), problems)
    claims = opened.claims
    entries = {f"{e['resource']['resourceType']}/{e['resource'].get('id')}": e for e in opened.document["entry"]}
    patient_entry = entries.get(claims["patient"])
    sr_entry = entries.get(claims["service_request"])
    if not patient_entry or not sr_entry:
        raise SealError("the package's document lacks its Patient or ServiceRequest")
    opinion_id = str(uuid.uuid4())
    timestamp = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    org = reviewer_organization(claims["aud"])
    document = build_opinion_document(data, form_def, opinion_id=opinion_id, timestamp=timestamp,
                                      patient_entry=patient_entry, service_request_entry=sr_entry, reviewer_org=org)
    document = jws.sign_bundle(document, key, who={"identifier": {"system": claims["aud"]["system"],
                                                                  "value": claims["aud"]["value"]},
                                                   "display": claims["aud"].get("display")}, when=timestamp)
    now = int(time.time())
    out_claims = {"jti": opinion_id, "iat": now, "exp": now + OPINION_LIFETIME, "iss": claims["aud"],
                  "aud": claims["iss"], "case_id": claims["case_id"], "package_id": claims["package_id"],
                  "service_request": claims["service_request"], "patient": claims["patient"]}
    sealed = envelope.seal(typ=envelope.OPINION, claims=out_claims, document=document, signer=key,
                           recipient=hospital)
    return sealed, out_claims
