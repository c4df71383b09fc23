"""The reviewer's side: open a package, and answer it with a sealed opinion.

A reviewer holds its private JWKS (`--key`) and the public keys of the hospitals it trusts (`--trust`):
either ONE hospital's public JWKS file, or a directory holding one `<hospital>.jwks.json` file per hospital
(default: `trusted.jwks.json` or `trusted/` next to the key file). Each file is one hospital: a package is
verified only with the keys of the file holding the key that signed it, and the opinion is sealed only to
that same file's encryption keys. A merged file of two hospitals would let either sign packages the other
could be answered about, and seal every opinion to both (one hospital reading the other's patients), so
keys are never pooled across files and a kid found in two files is refused.

A package is accepted only if it is signed by a trusted hospital key and decrypts with the reviewer's key;
every separately encrypted attachment is checked against the SHA-256 the signed manifest gives for it.

**Who sent it** is the trusted entry whose keys verified the signatures, named as the reviewer named it: the
file's name without `.jwks.json` (`trusted/general-hospital.jwks.json` is "general-hospital"). The name a
package gives its sender (`iss.display`, the Bundle signature's `who`) is the signer's own claim: any trusted
hospital can write any name there, so it is shown only marked as unverified, and only where it differs
(`OpenedPackage.sender`).
"""
from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fhirbridge.config.mappings import load_opinion_form, opinion_form_names
from fhirbridge.crypto import files, jwe, jws, keys
from fhirbridge.crypto.keys import KeyRing, mixed_generations
from fhirbridge.errors import ConfigError, FhirbridgeError, SealError
from fhirbridge.exchange import dicom_series, envelope
from fhirbridge.exchange.key_images import problems as keys_problems
from fhirbridge.exchange.opinion import (
    AnswerError,
    build_opinion_document,
    check_answer,
    load_answer,
    reviewer_organization,
)

TRUST_FILE = "trusted.jwks.json"
TRUST_DIR = "trusted"
TRUST_SUFFIX = ".jwks.json"
UNVERIFIED = "not verified"
OPINION_LIFETIME = 30 * 86400


def trusted_name(path: Path) -> str:
    """The name of a trusted hospital: its trust file's name without .jwks.json, as the reviewer chose it (the
    default single file, which carries no name, is "the hospital in trusted.jwks.json")."""
    name = path.name
    if name == TRUST_FILE:
        return f"the hospital in {TRUST_FILE}"
    return name[:-len(TRUST_SUFFIX)] if name.endswith(TRUST_SUFFIX) and len(name) > len(TRUST_SUFFIX) else name


def _same_name(a: str, b: str) -> bool:
    """"General Hospital" and "general-hospital" name the same entry: case, spaces and punctuation aside."""
    def norm(s: str) -> str:
        return "".join(c for c in s.casefold() if c.isalnum())
    return norm(a) == norm(b)


def _show(kid: object) -> str:
    """A kid from an untrusted token, safe to print (bounded, no control characters)."""
    text = kid if isinstance(kid, str) else repr(kid)
    return text if text.isprintable() and len(text) <= 128 else repr(text)[:80]


class TrustStore:
    """The hospitals a reviewer trusts: one PUBLIC key set per hospital, each from its own file.

    `hospitals` are the per-hospital KeyRings; `keyring_for(token, claims)` (the envelope.KeyResolver
    protocol) picks the one whose file holds the kid in the claims JWS header.
    """

    def __init__(self, hospitals: list[KeyRing] | tuple[KeyRing, ...], *, source: str):
        if not hospitals:
            raise ConfigError(f"no trusted hospital key files (*{TRUST_SUFFIX})", file=source)
        owner: dict[str, KeyRing] = {}
        for ring in hospitals:
            if ring.has_private:
                # A private JWKS is the hospital's secret: the reviewer must never hold it (it could then
                # read every package and sign as the hospital), so it is refused, not just ignored.
                raise ConfigError("holds private keys: a reviewer trusts only a hospital's PUBLIC keys "
                                  "(the file `fhirbridge keys jwks` prints at the hospital)", file=ring.source)
            signing = [kid for kid in ring.kids if ring.verification_key(kid) is not None]
            if not signing:
                raise ConfigError("holds no signing key: packages from this hospital could not be verified",
                                  file=ring.source)
            if (mixed := mixed_generations(ring)) is not None:
                # One file is one hospital; to trust several, one *.jwks.json per hospital in a directory.
                raise ConfigError(f"{mixed} (to trust several hospitals, put one *{TRUST_SUFFIX} file per "
                                  "hospital in a directory and pass that)", file=ring.source)
            for kid in ring.kids:
                if kid in owner:
                    raise ConfigError(f"key {kid} is also in {owner[kid].source}: every key must belong to one "
                                      "hospital's file (do not merge hospitals' key sets)", file=ring.source)
                owner[kid] = ring
        self.hospitals: tuple[KeyRing, ...] = tuple(hospitals)
        self.source = source
        self._owner = owner

    @classmethod
    def load(cls, path: str | Path) -> TrustStore:
        """A single hospital's public JWKS file, or a directory of `*.jwks.json` files, one per hospital."""
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.glob(f"*{TRUST_SUFFIX}") if p.is_file())
            if not files:
                raise ConfigError(f"no *{TRUST_SUFFIX} files here: put one public JWKS per trusted hospital "
                                  "in this directory", file=str(path))
            return cls([KeyRing.load(f, label=trusted_name(f)) for f in files], source=str(path))
        return cls([KeyRing.load(path, label=trusted_name(path))], source=str(path))

    @classmethod
    def of(cls, trusted: KeyRing | TrustStore) -> TrustStore:
        """A TrustStore as is; a single KeyRing as the store of that one hospital."""
        if isinstance(trusted, TrustStore):
            return trusted
        if isinstance(trusted, KeyRing):
            if trusted.label == KeyRing.label_default and trusted.source != KeyRing.source_default:
                trusted = trusted.labelled(trusted_name(Path(trusted.source)))   # named by its file, as load does
            return cls([trusted], source=trusted.source)
        raise TypeError("trusted must be a KeyRing or a TrustStore")

    def __repr__(self) -> str:
        return f"TrustStore({self.source!r}, hospitals={[r.source for r in self.hospitals]!r})"

    def hospital_for_kid(self, kid: object) -> KeyRing:
        ring = self._owner.get(kid) if isinstance(kid, str) else None
        if ring is None:
            raise SealError(f"signed by key {_show(kid)}, which is not a trusted key of any hospital you trust")
        return ring

    def keyring_for(self, token: str, claims: dict) -> KeyRing:
        """The one hospital's key set that must verify this claims JWS (chosen by its header's kid only;
        nothing is trusted until that key set has verified the signatures)."""
        kid = envelope.peek_header(token).get("kid")
        if not isinstance(kid, str) or not kid:
            raise SealError("signature names no key: the JWS header has no kid")
        # Only the keys of the generation that signed: the answer is sealed to them and no others.
        return self.hospital_for_kid(kid).only_generation(kid)


@dataclass
class OpenedPackage:
    path: Path           # the package directory
    claims: dict
    document: dict
    hospital: KeyRing | None = None   # the one hospital key set that verified it (the opinion goes to it only)

    @property
    def manifest(self) -> dict:
        return self.claims.get("manifest", {})

    @property
    def sender(self) -> str:
        """Who sent the package: the trusted hospital whose keys verified it, by the reviewer's name for it;
        the package's own name for its sender follows, marked unverified, only when it says something else."""
        declared = envelope.party(self.claims, "iss").get("display")
        declared = declared.strip() if isinstance(declared, str) else ""
        verified = self.hospital.label if self.hospital is not None else None
        if verified is None:
            return f"{declared} ({UNVERIFIED})" if declared else f"unknown ({UNVERIFIED})"
        if not declared or _same_name(declared, verified):
            return verified
        return f"{verified} (calls itself \"{declared[:120]}\": {UNVERIFIED})"


def package_paths(path: Path) -> tuple[Path, Path]:
    """Accept the package directory or its package.jwe; return (directory, envelope file)."""
    path = Path(path)
    if path.is_dir():
        return path, path / envelope.ENVELOPE_FILE
    return path.parent, path


def trust_for(key_path: Path, explicit: Path | None) -> TrustStore:
    """The trusted hospitals: `explicit` (file or directory), else `trusted.jwks.json` or `trusted/` next to
    the key file."""
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise SealError(f"no trusted hospital keys at {path}: pass --trust with a hospital's public JWKS "
                            "file or a directory of them (one per hospital)")
        return TrustStore.load(path)
    here = Path(key_path).parent
    file, directory = here / TRUST_FILE, here / TRUST_DIR
    if file.exists() and directory.is_dir():
        # Which one was meant is not ours to guess: a forgotten old file would quietly keep a hospital trusted.
        raise SealError(f"both {file} and {directory}/ exist: keep one (or pass --trust)")
    if directory.is_dir():
        return TrustStore.load(directory)
    if file.exists():
        return TrustStore.load(file)
    raise SealError(f"no trusted hospital keys at {file} or {directory}/: pass --trust with the hospital's public "
                    "JWKS (the file `fhirbridge keys jwks` prints at the hospital), or a directory of them")


class _HashSink:
    def __init__(self):
        self.h, self.size = hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.h.update(data)
        self.size += len(data)
        return len(data)


def open_package(path: Path, key: KeyRing, trusted: KeyRing | TrustStore, *,
                 check_expiry: bool = True, verify_attachments: bool = True,
                 verify_images: bool = True) -> OpenedPackage:
    """Open and verify a package with the keys of the one trusted hospital that signed it. `trusted` is a
    TrustStore, or a KeyRing for a single hospital (never a private key set).

    `verify_attachments` False: the separate attachments are not decrypted here, because the caller extracts
    them at once (`extract`), which checks each against the signed manifest in the same single pass.
    `verify_images` False: the same for the DICOM series only (the portal extracts them as it opens the
    package, dicom_series.extract_images, so each series is decrypted once, not once to verify and again to
    extract); the other attachments are still verified here."""
    store = TrustStore.of(trusted)
    directory, env_file = package_paths(path)
    sealed = envelope.read_limited(env_file, envelope.PACKAGE)
    opened_env = envelope.open_verified(sealed, typ=envelope.PACKAGE, decrypt=key, trusted=store,
                                        check_expiry=check_expiry)
    opened = OpenedPackage(directory, opened_env.claims, opened_env.document, hospital=opened_env.keys)
    if verify_attachments:
        for att in opened.manifest.get("attachments", []):
            if verify_images or not isinstance(att.get("dicom"), dict):
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
    """The separate attachments that are not DICOM series into `outdir` (series: `extract`), each in one pass:
    decrypted to a private temporary file while its SHA-256 is computed, named only when it matches the
    manifest (it used to be decrypted twice, then read back whole to hash it: issue 15, "Performance")."""
    files.private_dir(outdir)   # the decrypted attachments are patient records (each file is 0600 too)
    written = []
    for att in opened.manifest.get("attachments", []):
        if isinstance(att.get("dicom"), dict):
            continue
        dst = outdir / Path(att["file"]).name.replace(".jwe", _suffix(att["content_type"]))
        info = jwe.decrypt_to_path(_attachment_path(opened, att), dst, key, max_plaintext=att["size"])
        if info["plaintext_sha256"] != att["sha256"] or info["plaintext_size"] != att["size"]:
            dst.unlink()
            raise SealError(f"attachment {att['file']} does not match the signed manifest")
        written.append(dst)
    return written


def extract(opened: OpenedPackage, key: KeyRing, outdir: Path) -> list[Path]:
    """`reviewer open --extract DIR`: the attachments (extract_attachments) and the images, as DICOM part-10
    files by study and series with a DICOMDIR (dicom_series.extract_images). The paths written: the
    attachment files, each series' folder, and the DICOMDIR."""
    written = extract_attachments(opened, key, outdir)
    series = dicom_series.extract_images(opened, key, outdir)
    written += [Path(s["folder"]) for s in series]
    if series:
        written.append(Path(outdir) / dicom_series.DICOMDIR)
    return written


def _suffix(content_type: str) -> str:
    return {"application/pdf": ".pdf", "text/plain": ".txt", "image/jpeg": ".jpg", "image/png": ".png",
            "application/dicom": ".dcm"}.get(content_type.split(";")[0].strip(), ".bin")


def _recipient(opened: OpenedPackage, hospital: KeyRing | TrustStore | None) -> KeyRing:
    """The key set the opinion is sealed to: the hospital that signed the package, and only it."""
    signer = opened.hospital
    if isinstance(hospital, KeyRing) and signer is not None and \
            not set(signer.kids) <= set(hospital.kids):
        raise SealError(f"the package was signed with the keys of {signer.label}, not of {hospital.label}: an "
                        "opinion is sealed only to the hospital that sent the package")
    if signer is None and isinstance(hospital, KeyRing):
        signer = TrustStore.of(hospital).hospitals[0]   # the same rules as a trust file: one hospital, public
    if signer is None:
        raise SealError("the package was not opened with open_package: which hospital sent it is unknown")
    if signer.has_private:
        raise SealError(f"{signer.label} holds private keys; an opinion is sealed to a hospital's public keys")
    return signer


def form_for(opened: OpenedPackage, mappings_dir: Path, fallback: str = "default") -> str:
    """The opinion form for this package: mappings/opinion/<profile>.toml for the Case's collection profile
    (the manifest's `profile`: spine, cardiac, oncology, radiology), else `fallback`. The specialty's form
    asks what that specialty's second opinion must answer; every form ends with the same coded outcome."""
    profile = opened.manifest.get("profile")
    if isinstance(profile, str) and profile != "default" and profile in opinion_form_names(mappings_dir):
        return profile
    return fallback


def answer(opened: OpenedPackage, answer_file: Path, key: KeyRing, hospital: KeyRing | TrustStore | None = None,
           *, mappings_dir: Path, form: str | None = None, replaces: str | None = None) -> tuple[bytes, dict]:
    """Build, sign and seal the opinion; returns (sealed bytes, claims).

    The opinion is encrypted to the encryption keys of the hospital whose key verified the package
    (`opened.hospital`) and to no other. `hospital` is only a cross-check: a KeyRing that is not that
    hospital's key set is refused; a TrustStore (what `trust_for` returns) changes nothing."""
    return answer_data(opened, load_answer(answer_file), key, hospital, mappings_dir=mappings_dir, form=form,
                       source=str(answer_file), replaces=replaces)


def studies_of(opened: OpenedPackage) -> dict[str, dict]:
    """The package's imaging studies by "ImagingStudy/<id>", in the document's order (a `studies` field)."""
    return {f"ImagingStudy/{r.get('id')}": r for e in opened.document.get("entry", [])
            for r in [e.get("resource", {})] if r.get("resourceType") == "ImagingStudy"}


def answer_data(opened: OpenedPackage, data: dict, key: KeyRing, hospital: KeyRing | TrustStore | None = None,
                *, mappings_dir: Path, form: str | None = None, source: str = "the answer",
                replaces: str | None = None) -> tuple[bytes, dict]:
    """`answer` for an answer already read (the portal's form): checked against the form, then sealed.
    `form` None: the form of the package's collection profile (`form_for`)."""
    sealed, claims, _document = sealed_answer(opened, data, key, hospital, mappings_dir=mappings_dir, form=form,
                                              source=source, replaces=replaces)
    return sealed, claims


def sealed_answer(opened: OpenedPackage, data: dict, key: KeyRing, hospital: KeyRing | TrustStore | None = None,
                  *, mappings_dir: Path, form: str | None = None,
                  source: str = "the answer", key_images: list[dict] | None = None,
                  replaces: str | None = None) -> tuple[bytes, dict, dict]:
    """`answer_data`, also returning the signed opinion document (the portal keeps it for the reviewer).
    `key_images`: the frames the reviewer marked in the portal's viewer (exchange/key_images.py).
    `replaces`: the message id of the opinion this one corrects (a corrected opinion: a new version the hospital
    files with relatesTo `replaces` the earlier note; R4 Composition.relatesTo, document-relationship-type)."""
    recipient = _recipient(opened, hospital)
    form_def = load_opinion_form(mappings_dir, form or form_for(opened, mappings_dir))
    problems = check_answer(data, form_def)
    studies = studies_of(opened)
    for f in form_def.fields.values():
        if f.kind == "studies" and isinstance(data.get(f.name), list) and not problems:
            problems += [f"{f.name}: {v['study']} is not an imaging study of this package (it has: "
                         f"{', '.join(studies) or 'none'})" for v in data[f.name] if v["study"] not in studies]
    if key_images:
        problems += keys_problems(key_images)
        held = {i.get("sop_uid") for a in opened.manifest.get("attachments", []) if isinstance(a.get("dicom"), dict)
                for i in a["dicom"].get("instances", [])}
        if not problems:
            problems += [f"key image {k['sop_uid']} is not an image of this package" for k in key_images
                         if k["sop_uid"] not in held]
    if problems:
        raise AnswerError(source, problems)
    claims = opened.claims
    entries = {f"{e['resource']['resourceType']}/{e['resource'].get('id')}": e for e in opened.document["entry"]}
    patient_entry = entries.get(claims["patient"])
    sr_entry = entries.get(claims["service_request"])
    if not patient_entry or not sr_entry:
        raise SealError("the package's document lacks its Patient or ServiceRequest")
    opinion_id = str(uuid.uuid4())
    timestamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    us = envelope.party(claims, "aud")   # the reviewer, as the package names it
    org = reviewer_organization(us)
    document = build_opinion_document(data, form_def, opinion_id=opinion_id, timestamp=timestamp,
                                      patient_entry=patient_entry, service_request_entry=sr_entry, reviewer_org=org,
                                      studies=studies, key_images=key_images)
    if replaces:
        document["entry"][0]["resource"]["relatesTo"] = [
            {"code": "replaces", "targetIdentifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{replaces}"}}]
    document = jws.sign_bundle(document, key, who={"identifier": {"system": us["system"], "value": us["value"]},
                                                   "display": us.get("display")}, when=timestamp)
    now = int(time.time())
    out_claims = {"jti": opinion_id, "iat": now, "exp": now + OPINION_LIFETIME, **envelope.reply_addressing(claims),
                  "case_id": claims["case_id"], "package_id": claims["package_id"],
                  "service_request": claims["service_request"], "patient": claims["patient"]}
    if replaces:
        out_claims["replaces"] = replaces
    sealed = envelope.seal(typ=envelope.OPINION, claims=out_claims, document=document, signer=key,
                           recipient=recipient)
    return sealed, out_claims, document


def write_reviewer_keys(directory: Path, hospital_public_jwks: Path | None = None, *, rsa: bool = True) -> dict:
    """A reviewer's key pair (EC signing, EC + RSA encryption) and, optionally, its trusted hospital keys.

    The trust file is checked before any key is written, so a wrong path can simply be corrected and rerun.
    """
    directory = Path(directory)
    trust = None
    if hospital_public_jwks:
        ring = KeyRing.load(hospital_public_jwks)
        if ring.has_private:
            raise FhirbridgeError(f"{hospital_public_jwks} holds private keys: a reviewer must be given only the "
                                  "hospital's PUBLIC keys (`fhirbridge keys jwks`)")
        TrustStore.of(ring)  # the same rules as when it is used: one hospital, one signing key
        trust = ring.public_jwks()
    files.private_dir(directory)
    jwks = keys.generate_jwks(rsa_enc=rsa)
    private = directory / "reviewer.private.jwks.json"
    public = directory / "reviewer.public.jwks.json"
    keys.write_private_jwks(private, jwks)
    keys.write_public_jwks(public, keys.public_jwks(jwks))
    out = {"private_keys": private, "public_keys": public}
    if trust is not None:
        out["trusted"] = directory / "trusted.jwks.json"
        keys.write_public_jwks(out["trusted"], trust)
    return out
