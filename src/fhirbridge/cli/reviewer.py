"""`fhirbridge reviewer ...`: the reviewer's side (keys, portal, token, open, answer, import-pacs)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from werkzeug.serving import make_server

from fhirbridge import jsonutil
from fhirbridge.access.tokens import mint_reviewer_token
from fhirbridge.cli.common import say
from fhirbridge.config.model import PACKAGE_MAPPINGS
from fhirbridge.crypto import files, urls
from fhirbridge.crypto.keys import KeyRing
from fhirbridge.dicomweb import DicomwebClient, make_auth
from fhirbridge.exchange.dicom_series import extract_images, import_to_pacs
from fhirbridge.exchange.envelope import party, write_atomic
from fhirbridge.exchange.followup import QUESTION_PREFIX, FollowUpError, open_question, seal_answer
from fhirbridge.exchange.opinion import load_answer
from fhirbridge.exchange.render import render_package, terminal_safe
from fhirbridge.exchange.reviewer import (
    TRUST_DIR,
    TRUST_FILE,
    answer,
    extract,
    open_package,
    trust_for,
    write_reviewer_keys,
)
from fhirbridge.ui.reviewer_portal import PortalSettings, create_portal


def add_parsers(sub: argparse._SubParsersAction) -> None:
    rev = sub.add_parser("reviewer", help="the reviewer's side: open a package, answer it").add_subparsers(
        dest="reviewer_cmd", required=True)
    s = rev.add_parser("keys", help="make a reviewer key pair in DIR")
    s.add_argument("dir")
    s.add_argument("--trust", help="the hospital's public JWKS to trust (copied to DIR/trusted.jwks.json; to trust "
                                   "several hospitals, use a DIR/trusted/ directory with one <hospital>.jwks.json "
                                   "file each instead)")
    s.set_defaults(func=cmd_reviewer_keys)
    s = rev.add_parser("serve", help="the reviewer portal: read packages and answer them in a browser")
    s.add_argument("--key", required=True, help="the reviewer's private JWKS")
    s.add_argument("--trust", help="trusted hospitals' public JWKS (file or directory; default next to --key)")
    s.add_argument("--packages", help="directory where packages are delivered to you (outbox / https transport)")
    s.add_argument("--answers", help="directory for sealed opinions of delivered packages (the hospital's inbox)")
    s.add_argument("--pull", action="append", default=[], metavar="URL",
                   help="a hospital's reviewer API (<its public URL>/reviewer); repeatable")
    s.add_argument("--issuer", help="your organisation identifier value, as the hospitals have it (for --pull)")
    s.add_argument("--work", default="reviewer-portal", help="working directory (pulled packages, answers sent)")
    s.add_argument("--form", default="default", help="opinion form in mappings/opinion/ for Cases whose collection "
                                                      "profile has no form of its own (default: default)")
    s.add_argument("--mappings", help="mappings directory (default: the shipped one)")
    s.add_argument("--bind", default="127.0.0.1:8090", help="host:port (default 127.0.0.1:8090)")
    s.set_defaults(func=cmd_reviewer_serve)
    s = rev.add_parser("token", help="print a short-lived signed token for the hospital's reviewer API")
    s.add_argument("--key", required=True, help="the reviewer's private JWKS")
    s.add_argument("--issuer", required=True, help="your organisation identifier value, as the hospital has it")
    s.add_argument("--audience", required=True, help="the hospital's reviewer API: <its public URL>/reviewer")
    s.add_argument("--lifetime", type=int, default=120, help="seconds (at most 300)")
    s.set_defaults(func=cmd_reviewer_token)
    for name, helptext in (("open", "verify, decrypt and summarise a package"),
                           ("answer", "turn a structured answer into a sealed opinion")):
        s = rev.add_parser(name, help=helptext)
        s.add_argument("package", help="the package directory (or its package.jwe)")
        s.add_argument("--key", required=True, help="the reviewer's private JWKS")
        s.add_argument("--trust", help="the trusted hospitals: one hospital's public JWKS file, or a directory of "
                                       "*.jwks.json files, one per hospital (default: trusted.jwks.json or "
                                       "trusted/ next to --key); the opinion is sealed only to the hospital "
                                       "that signed the package")
        if name == "open":
            s.add_argument("--json", metavar="FILE", help="write the full document Bundle as JSON ('-': stdout)")
            s.add_argument("--extract", metavar="DIR", help="decrypt the separate attachments into DIR, "
                                                              "and the images as DICOM files by study and series, "
                                                              "with a DICOMDIR")
            s.set_defaults(func=cmd_reviewer_open)
        else:
            s.add_argument("--opinion", required=True, help="the structured answer (TOML or JSON)")
            s.add_argument("--out", required=True, help="where to write the sealed opinion")
            s.add_argument("--form", help="opinion form in mappings/opinion/ (default: the one named like the "
                                          "package's collection profile, else default)")
            s.add_argument("--mappings", help="mappings directory (default: the shipped one)")
            which = s.add_mutually_exclusive_group()
            which.add_argument("--follow-up", metavar="ID",
                               help="answer the hospital's follow-up question ID (delivered as followup-ID next to "
                                    "the package, or fetched from the reviewer API; a path to it works too): "
                                    "--opinion then holds `answer = \"...\"` (TOML/JSON) or plain text (.txt)")
            which.add_argument("--corrects", metavar="OPINION_ID",
                               help="send a corrected opinion: it replaces the opinion OPINION_ID you sent (the "
                                    "hospital files it as a new version of the note)")
            s.set_defaults(func=cmd_reviewer_answer)
    s = rev.add_parser("import-pacs", help="store a package's images in your own PACS (STOW-RS), counts checked")
    s.add_argument("package", help="the package directory (or its package.jwe)")
    s.add_argument("--key", required=True, help="the reviewer's private JWKS")
    s.add_argument("--trust", help="the trusted hospitals (as for `reviewer open`)")
    s.add_argument("--url", required=True, help="your PACS's DICOMweb base URL (https, or http to loopback)")
    s.add_argument("--auth", choices=("none", "basic", "bearer"), default="none",
                   help="basic: --username and the password in FHIRBRIDGE_PACS_PASSWORD; bearer: the token in "
                        "FHIRBRIDGE_PACS_TOKEN (secrets never on the command line)")
    s.add_argument("--username", help="basic: the user name")
    s.set_defaults(func=cmd_reviewer_import_pacs)


def cmd_reviewer_keys(args) -> int:
    out = write_reviewer_keys(Path(args.dir), Path(args.trust) if args.trust else None)
    for k, p in out.items():
        print(f"wrote {p} ({k.replace('_', ' ')})")
    return 0


def cmd_reviewer_serve(args) -> int:
    """The portal for the reviewer's staff; it holds the private key, so it listens on loopback by default
    (put it behind the site's TLS proxy to reach it from elsewhere)."""

    key = Path(args.key)
    trust = Path(args.trust) if args.trust else (key.parent / TRUST_DIR if (key.parent / TRUST_DIR).is_dir()
                                                 else key.parent / TRUST_FILE)
    settings = PortalSettings(key=key, trust=trust, work_dir=Path(args.work),
                              mappings_dir=Path(args.mappings) if args.mappings else PACKAGE_MAPPINGS,
                              packages_dir=Path(args.packages) if args.packages else None,
                              answers_dir=Path(args.answers) if args.answers else None,
                              pull=args.pull, issuer=args.issuer, form=args.form)
    host, _, port = args.bind.rpartition(":")
    server = make_server(host or "127.0.0.1", int(port), create_portal(settings), threaded=True)
    print(f"reviewer portal on http://{args.bind}/ (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def cmd_reviewer_token(args) -> int:
    """One token per request: the hospital refuses a token it has seen before."""
    print(mint_reviewer_token(KeyRing.load(Path(args.key)), issuer=args.issuer, audience=args.audience,
                              lifetime=args.lifetime))
    return 0


def _reviewer_keys(args):
    key = KeyRing.load(Path(args.key))
    return key, trust_for(Path(args.key), Path(args.trust) if args.trust else None)


def cmd_reviewer_open(args) -> int:
    key, trusted = _reviewer_keys(args)
    # With --extract the attachments are checked while they are extracted (one pass), not decrypted first.
    opened = open_package(Path(args.package), key, trusted, verify_attachments=not args.extract)
    if args.json:
        data = jsonutil.dumps(opened.document, pretty=True)
        if args.json == "-":
            sys.stdout.write(data.decode() + "\n")
        else:
            files.write_atomic(Path(args.json), data)   # the decrypted record: 0600 (issue 13, S11)
            print(f"wrote the document Bundle to {args.json}", file=sys.stderr)
    if not args.json or args.json != "-":
        # The sender is the trusted hospital whose keys verified the package, by the name the reviewer gave
        # it; the package's own name for itself is the signer's claim (issue 13, S12). Text, never commands.
        print(terminal_safe(f"signature: valid, by the keys of the trusted hospital {opened.sender}"))
        print(render_package(opened.claims, opened.document, sender=opened.sender))
    if args.extract:
        for p in extract(opened, key, Path(args.extract)):
            print(terminal_safe(f"extracted {p}"))
    return 0


def cmd_reviewer_import_pacs(args) -> int:
    """Extract the package's images (one pass, checked against the signed manifest) and STOW-RS them into the
    reviewer's own PACS, checking by QIDO-RS that it lists every instance."""
    key, trusted = _reviewer_keys(args)
    opened = open_package(Path(args.package), key, trusted, verify_attachments=False)
    auth: dict = {"type": args.auth}
    if args.auth == "basic":
        auth.update(username=args.username, password=os.environ.get("FHIRBRIDGE_PACS_PASSWORD", ""))
    elif args.auth == "bearer":
        auth["token"] = os.environ.get("FHIRBRIDGE_PACS_TOKEN", "")
    urls.https_or_loopback(args.url, "--url")
    with tempfile.TemporaryDirectory(prefix="fhirbridge-import-") as work:
        series = extract_images(opened, key, files.private_dir(Path(work) / "images"))
        if not series:
            say("the package carries no images")
            return 0
        with DicomwebClient(args.url, auth=make_auth(auth)) as pacs:
            done = import_to_pacs(pacs, series)
    say(f"stored {done['instances']} instances of {done['series']} series in {args.url}; "
        "the PACS lists every one")
    return 0


def _follow_up_question(package: Path, ident: str) -> Path:
    """The delivered question: the path given, else followup-<ID> next to the package (where the outbox and
    https transports put it)."""
    given = Path(ident)
    if given.exists():
        return given
    base = package.parent if package.name == "package.jwe" else package
    found = base.parent / f"{QUESTION_PREFIX}{ident}"
    if not found.exists():
        raise FollowUpError(f"no follow-up question {ident}: neither a path nor {found}")
    return found


def _answer_text(path: Path) -> str:
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8")
    data = load_answer(path)
    if not isinstance(data.get("answer"), str):
        raise FollowUpError(f"{path}: a follow-up answer needs `answer = \"...\"` (or give a .txt file)")
    return data["answer"]


def cmd_reviewer_answer(args) -> int:
    key, trusted = _reviewer_keys(args)
    if args.follow_up:
        question = open_question(_follow_up_question(Path(args.package), args.follow_up), key, trusted)
        sealed, claims = seal_answer(question, _answer_text(Path(args.opinion)), key)
        write_atomic(Path(args.out), sealed)
        print(terminal_safe(f"wrote sealed answer {claims['jti']} to follow-up question {question.claims['seq']} "
                            f"to {args.out}; send it to {party(claims, 'aud').get('display')}"))
        return 0
    opened = open_package(Path(args.package), key, trusted)
    mappings = PACKAGE_MAPPINGS if not args.mappings else Path(args.mappings)
    # Sealed to the one hospital whose key verified the package (opened.hospital), never to the whole trust store.
    sealed, claims = answer(opened, Path(args.opinion), key, mappings_dir=mappings, form=args.form,
                            replaces=args.corrects)
    write_atomic(Path(args.out), sealed)
    print(terminal_safe(f"wrote sealed {'corrected ' if args.corrects else ''}opinion {claims['jti']} to {args.out}; "
                        f"send it to {party(claims, 'aud').get('display')}"))
    return 0
