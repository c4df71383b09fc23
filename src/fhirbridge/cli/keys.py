"""`fhirbridge keys ...`: make, rotate and retire key sets; print the public keys; make scoped API keys.

Works on the hospital's key file from the configuration, or on any private JWKS named with `--file` (a
reviewer rotates its own keys the same way). A passphrase-protected file stays protected: the passphrase
comes from FHIRBRIDGE_KEY_PASSPHRASE, never from the command line (it would land in the shell history and
the process list).
"""
from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from fhirbridge import jsonutil
from fhirbridge.cli.common import say
from fhirbridge.config import loader as config
from fhirbridge.config.model import STAFF_SCOPES
from fhirbridge.crypto import files, keys
from fhirbridge.errors import ConfigError


def _private_file(args) -> Path:
    if getattr(args, "file", None):
        return Path(args.file)
    cfg = config.load(args.config)
    return cfg.hospital_named(getattr(args, "hospital", None)).keys


def _passphrase(args) -> str | None:
    return os.environ.get(keys.PASSPHRASE_ENV) or None


def _write_both(path: Path, jwks: dict, passphrase: str | None, *, overwrite: bool) -> Path:
    keys.write_private_jwks(path, jwks, overwrite=overwrite, passphrase=passphrase)
    public = keys.public_path_for(path)
    keys.write_public_jwks(public, keys.public_jwks(jwks))
    return public


def cmd_generate(args) -> int:
    path = _private_file(args)
    if path.exists() and not args.force:
        raise ConfigError("a key set exists already: `fhirbridge keys rotate` adds new keys and keeps the old "
                          "ones (opinions sealed to them still open); --force replaces it and loses them",
                          file=str(path))
    files.private_dir(path.parent)
    passphrase = _passphrase(args)
    jwks = keys.generate_jwks(rsa_enc=args.rsa)
    public = _write_both(path, jwks, passphrase, overwrite=args.force)
    say(f"wrote {path} (private, mode 0600{', encrypted with the passphrase' if passphrase else ''})")
    say(f"wrote {public} (public: give it to your peers)")
    return 0


def cmd_rotate(args) -> int:
    path = _private_file(args)
    passphrase = _passphrase(args)
    old = keys.read_jwks(path, passphrase)
    keys.KeyRing(old, source=str(path))   # refuse to rotate a broken set
    new, kids = keys.rotate_jwks(old)
    public = _write_both(path, new, passphrase, overwrite=True)
    say(f"new keys {', '.join(kids)} now sign and receive; the previous keys stay for opinions and packages "
        "sealed to them")
    say(f"wrote {path} and {public}: give the new public key set to your peers (or publish it); retire the "
        "old keys with `fhirbridge keys retire KID` once no peer uses them")
    return 0


def cmd_retire(args) -> int:
    path = _private_file(args)
    passphrase = _passphrase(args)
    new = keys.retire_key(keys.read_jwks(path, passphrase), args.kid)
    public = _write_both(path, new, passphrase, overwrite=True)
    say(f"retired {args.kid}: removed from {path} and {public}")
    return 0


def cmd_jwks(args) -> int:
    path = _private_file(args)
    say(jsonutil.dumps(keys.KeyRing.load(path).public_jwks(), pretty=True).decode())
    return 0


def cmd_api_key(args) -> int:
    """A new staff API key: printed once, with the [[api.keys]] block (holding only its SHA-256) to add."""
    bad = [s for s in args.scopes if s not in STAFF_SCOPES]
    if bad:
        raise ConfigError(f"{bad[0]!r} is not a scope; use some of {', '.join(STAFF_SCOPES)}")
    key = "fbk_" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    say(f"API key (shown once; give it to the client, it cannot be recovered): {key}")
    say("")
    say("add to fhirbridge.toml:")
    say("[[api.keys]]")
    say(f"name = {jsonutil.dumps(args.name).decode()}")
    say(f'sha256 = "{digest}"')
    say(f"scopes = {jsonutil.dumps(list(dict.fromkeys(args.scopes))).decode()}")
    if args.hospitals:
        say(f"hospitals = {jsonutil.dumps(args.hospitals).decode()}")
    return 0


def add_parsers(sub) -> None:
    keys_p = sub.add_parser("keys", help="key sets: generate, rotate, retire, print the public keys; API keys")
    ks = keys_p.add_subparsers(dest="keys_cmd", required=True)
    file_help = "a private JWKS file (default: the hospital's keys from the configuration)"

    s = ks.add_parser("generate", help="make a new key set (signing + encryption), private 0600 and public")
    s.add_argument("--file", help=file_help)
    s.add_argument("--rsa", action="store_true", help="also an RSA-3072 encryption key (RSA-OAEP-256)")
    s.add_argument("--force", action="store_true", help="replace an existing key set (its keys are lost)")
    s.set_defaults(func=cmd_generate)

    s = ks.add_parser("rotate", help="add new keys that take over; keep the old ones until retired")
    s.add_argument("--file", help=file_help)
    s.set_defaults(func=cmd_rotate)

    s = ks.add_parser("retire", help="remove an old key (never the active signing key)")
    s.add_argument("kid")
    s.add_argument("--file", help=file_help)
    s.set_defaults(func=cmd_retire)

    s = ks.add_parser("jwks", help="print the public JWKS (for reviewers; also served at /.well-known/jwks.json)")
    s.add_argument("--file", help=file_help)
    s.set_defaults(func=cmd_jwks)

    s = ks.add_parser("api-key", help="make a scoped staff API key (prints it once, and the config block)")
    s.add_argument("name")
    s.add_argument("--scopes", nargs="+", required=True, metavar="SCOPE",
                   help=f"some of {', '.join(STAFF_SCOPES)}")
    s.add_argument("--hospitals", nargs="*", default=[], help="limit it to these hospitals (default: all)")
    s.set_defaults(func=cmd_api_key)
