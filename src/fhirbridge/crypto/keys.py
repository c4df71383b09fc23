"""Key sets (JWKS, RFC 7517) and the KeyRing that the seal/open code asks for keys.

A party has one private JWKS (ours) and one public JWKS per peer (trusted). Key material never
appears in log lines, exception messages or reprs: keys are named by `kid` only.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from joserfc import jwe as jose_jwe
from joserfc import jwk
from joserfc.errors import JoseError

from fhirbridge.crypto import files
from fhirbridge.errors import ConfigError, SealError
from fhirbridge.jsonutil import b64url, canonical, dumps, loads

log = logging.getLogger(__name__)

SIG_ALGS = ("ES256", "ES384", "RS384", "PS256")
ENC_ALGS = ("ECDH-ES+A256KW", "RSA-OAEP-256")

# RFC 7518 §6.2.2 (EC) and §6.3.2 (RSA) private members; "k" (§6.4) is the whole secret of an oct key.
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

# RFC 7638 §3.2: the thumbprint covers only the required members of each key type.
_THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
    "oct": ("k", "kty"),
}
_EC_CURVES = ("P-256", "P-384", "P-521")
MIN_RSA_BITS = 2048  # NIST SP 800-131A: RSA below 2048 bits is disallowed
GENERATION = "generation"
ROTATED_FROM = "rotated_from"


def thumbprint(key: dict) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url) of a JWK dict (public or private)."""
    kty = key.get("kty")
    members = _THUMBPRINT_MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None or any(m not in key for m in members):
        raise ValueError("cannot compute a thumbprint: unknown kty or a required member is missing")
    # RFC 7638 §3.3 asks for lexicographic member order and no whitespace; for these all-ASCII
    # string members that is exactly the RFC 8785 canonical form.
    return b64url(hashlib.sha256(canonical({m: key[m] for m in members})).digest())


# --- generating and writing key sets ---------------------------------------------------------

def _describe(key: jwk.Key, *, use: str, alg: str) -> dict:
    data = {k: v for k, v in key.as_dict(private=True).items() if k not in ("kid", "use", "alg")}
    data.update(use=use, alg=alg)
    data["kid"] = thumbprint(data)
    return data


def generate_jwks(*, rsa_enc: bool = False) -> dict:
    """A new PRIVATE JWKS: EC P-384 signing key, EC P-256 encryption key, optionally RSA-3072 encryption."""
    keys = [
        _describe(jwk.ECKey.generate_key("P-384"), use="sig", alg="ES384"),
        _describe(jwk.ECKey.generate_key("P-256"), use="enc", alg="ECDH-ES+A256KW"),
    ]
    if rsa_enc:
        # 3072 bits: NIST SP 800-57 pt.1 ~128-bit strength, matching the P-256/A256 parts.
        keys.append(_describe(jwk.RSAKey.generate_key(3072), use="enc", alg="RSA-OAEP-256"))
    # Keys made together carry the signing key's kid as their generation (an extra JWK member, which RFC 7517
    # section 4 lets other software ignore). After a rotation a key set holds two generations; a peer then
    # seals its answer only to the encryption keys of the generation whose signing key signed the message,
    # so a file that merged two parties' keys can never make it encrypt to both.
    for k in keys:
        k[GENERATION] = keys[0]["kid"]
    return {"keys": keys}


def _key_list(jwks: Any, file: str | None = None) -> list:
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ConfigError('not a JWK Set: expected a JSON object {"keys": [...]}', file=file)
    return jwks["keys"]


def public_jwks(jwks: dict) -> dict:
    """The same key set with every private member stripped (symmetric keys dropped: they have no public part)."""
    out = []
    for key in _key_list(jwks):
        if isinstance(key, dict) and key.get("kty") != "oct":
            out.append({k: v for k, v in key.items() if k not in PRIVATE_MEMBERS})
    return {"keys": out}


def _write_key_file(path: str | os.PathLike, data: bytes, *, mode: int, overwrite: bool) -> None:
    try:
        files.write_atomic(path, data, mode=mode, overwrite=overwrite)
    except FileExistsError:
        raise ConfigError("refusing to overwrite an existing key file (pass overwrite=True to replace it)",
                          file=os.fspath(path)) from None


# A private key set can be kept encrypted under a passphrase: the file is then a compact JWE (RFC 7516
# section 7.1) with PBES2-HS512+A256KW (RFC 7518 section 4.8) and A256GCM around the JWKS JSON. 210,000
# PBKDF2-HMAC-SHA512 iterations: the OWASP Password Storage figure (joserfc caps p2c below 300,000).
PASSPHRASE_ENV = "FHIRBRIDGE_KEY_PASSPHRASE"
_PBES2 = "PBES2-HS512+A256KW"
_P2C = 210_000
_JWE_REGISTRY = None


def _pbes2_registry():
    global _JWE_REGISTRY
    if _JWE_REGISTRY is None:
        _JWE_REGISTRY = jose_jwe.JWERegistry(algorithms=[_PBES2, "A256GCM"])
    return _JWE_REGISTRY


def _passphrase_key(passphrase: str) -> jwk.OctKey:
    if not isinstance(passphrase, str) or len(passphrase) < 12:
        raise ConfigError(f"a key passphrase must be at least 12 characters (set {PASSPHRASE_ENV})")
    with warnings.catch_warnings():  # joserfc warns about short "keys"; a passphrase is stretched by PBES2
        warnings.simplefilter("ignore")
        return jwk.OctKey.import_key(passphrase.encode())


def encrypt_jwks_bytes(jwks: dict, passphrase: str) -> bytes:
    header = {"alg": _PBES2, "enc": "A256GCM", "p2c": _P2C, "cty": "jwk-set+json"}
    return jose_jwe.encrypt_compact(header, dumps(jwks), _passphrase_key(passphrase),
                                    registry=_pbes2_registry()).encode() + b"\n"


def is_encrypted_jwks(raw: bytes) -> bool:
    """True for a passphrase-encrypted key file (a compact JWE: five base64url parts, no JSON)."""
    text = raw.strip()
    return text.startswith(b"eyJ") and text.count(b".") == 4


def decrypt_jwks_bytes(raw: bytes, passphrase: str | None, *, file: str) -> Any:
    if not passphrase:
        raise ConfigError(f"the key file is encrypted: set {PASSPHRASE_ENV} to its passphrase", file=file)
    try:
        plaintext = jose_jwe.decrypt_compact(raw.strip(), _passphrase_key(passphrase),
                                             registry=_pbes2_registry()).plaintext
    except JoseError:
        raise ConfigError(f"cannot decrypt the key file: wrong passphrase ({PASSPHRASE_ENV}) or a damaged file",
                          file=file) from None
    try:
        return loads(plaintext or b"")
    except orjson.JSONDecodeError:
        raise ConfigError("the decrypted key file is not JSON", file=file) from None


def write_private_jwks(path: str | os.PathLike, jwks: dict, *, overwrite: bool = False,
                       passphrase: str | None = None) -> None:
    """Write a private JWKS, mode 0600 from creation; refuses to replace an existing file unless overwrite=True.
    With a passphrase the file is encrypted (PBES2, see above) and needs it to be read again."""
    _key_list(jwks)
    data = encrypt_jwks_bytes(jwks, passphrase) if passphrase else dumps(jwks, pretty=True) + b"\n"
    _write_key_file(path, data, mode=files.PRIVATE_FILE, overwrite=overwrite)


def read_jwks(path: str | os.PathLike, passphrase: str | None = None) -> dict:
    """The JWKS in a key file, decrypting it when it is passphrase-protected (passphrase, else the
    FHIRBRIDGE_KEY_PASSPHRASE environment variable)."""
    file = os.fspath(path)
    raw = files.read_config_file(file, "key file")
    if is_encrypted_jwks(raw):
        return decrypt_jwks_bytes(raw, passphrase or os.environ.get(PASSPHRASE_ENV), file=file)
    try:
        return loads(raw)
    except orjson.JSONDecodeError as err:
        # `from None`: the decode error carries the whole document (key material) as .doc.
        raise ConfigError(f"not valid JSON (line {err.lineno}, column {err.colno})", file=file) from None


def public_path_for(private_path: str | os.PathLike) -> Path:
    """Where the public half of a private key file lives: `x.private.jwks.json` -> `x.public.jwks.json`."""
    p = Path(private_path)
    if ".private." in p.name:
        return p.with_name(p.name.replace(".private.", ".public.", 1))
    return p.with_name(p.name.removesuffix(".json") + ".public.json")


def rotate_jwks(jwks: dict) -> tuple[dict, list[str]]:
    """A new signing key and encryption key(s) in front of the old ones; returns (new set, new kids).

    The first private signing key signs, so the new one takes over at once; the old keys stay so that
    opinions sealed to them (a reviewer still using the previous public keys) still open and packages
    signed with them still verify. `retire_key` removes one once no reviewer uses it any more."""
    old = [dict(k) for k in _key_list(jwks)]
    ring = KeyRing({"keys": old})
    current = ring.current()
    signer = next((kid for kid in current.kids if current.verification_key(kid) is not None), None)
    if signer is None:
        raise ConfigError("this key set has no signing key to rotate from")
    previous = current.generation_of(signer) or signer
    for k in old:   # a set made before generations existed: its keys become one generation now
        if k.get("kid") in current.kids and not k.get(GENERATION):
            k[GENERATION] = previous
    rsa = any(k.get("kty") == "RSA" and "enc" in _purposes(k) for k in old)
    new = generate_jwks(rsa_enc=rsa)["keys"]
    for k in new:
        k[ROTATED_FROM] = previous   # the chain that tells a rotated set from two parties' sets merged
    return {"keys": new + old}, [k["kid"] for k in new]


def retire_key(jwks: dict, kid: str) -> dict:
    """The key set without `kid`; refuses to retire the active signing key or the last encryption key."""
    keys = _key_list(jwks)
    if not any(isinstance(k, dict) and k.get("kid") == kid for k in keys):
        raise ConfigError(f"no key {kid} in this key set")
    ring = KeyRing(jwks)
    active = next((e.kid for e in ring._entries if e.private is not None and "sig" in e.purposes), None)
    if kid == active:
        raise ConfigError(f"{kid} is the active signing key: rotate first (`fhirbridge keys rotate`), then retire "
                          "the old key")
    rest = [k for k in keys if not (isinstance(k, dict) and k.get("kid") == kid)]
    if not any("enc" in _purposes(k) for k in rest if isinstance(k, dict)):
        raise ConfigError(f"{kid} is the last encryption key: opinions could no longer be sealed to you")
    return {"keys": rest}


def write_public_jwks(path: str | os.PathLike, jwks: dict) -> None:
    """Write the public half of a JWKS (private members are stripped even if given), mode 0644, pretty JSON."""
    _write_key_file(path, dumps(public_jwks(jwks), pretty=True) + b"\n", mode=files.PUBLIC_FILE, overwrite=True)


# --- KeyRing ---------------------------------------------------------------------------------

def _purposes(key: dict) -> frozenset[str]:
    """What a key may be used for: its "use" if set (RFC 7517 §4.2), else inferred from "alg", else both."""
    use, alg, ops = key.get("use"), key.get("alg"), key.get("key_ops")
    if use is not None:
        purposes = {use} & {"sig", "enc"}
    elif alg is not None:
        is_enc = alg in ENC_ALGS or alg.startswith(("RSA-OAEP", "RSA1_5", "ECDH-", "A1", "A2", "dir"))
        purposes = {"enc"} if is_enc else {"sig"}
    else:
        purposes = {"sig", "enc"}
    if isinstance(ops, list):  # RFC 7517 §4.3 key_ops narrows further
        if not {"sign", "verify"} & set(ops):
            purposes.discard("sig")
        if not {"encrypt", "decrypt", "wrapKey", "unwrapKey", "deriveKey", "deriveBits"} & set(ops):
            purposes.discard("enc")
    return frozenset(purposes)


def _safe_reason(err: Exception, key: dict) -> str:
    """The library's reason, unless it could echo a member value (key material never goes into messages)."""
    text = f"unsupported or missing value {err}" if isinstance(err, KeyError) else str(err)[:200]
    values = [v for v in key.values() if isinstance(v, str) and len(v) >= 8]
    if not text or any(v in text or v[:16] in text for v in values):
        return type(err).__name__
    return text


@dataclass(frozen=True, repr=False)
class _Entry:
    kid: str
    kty: str
    purposes: frozenset[str]
    public: jwk.Key
    private: jwk.Key | None
    public_dict: dict

    def __repr__(self) -> str:
        return f"<key {self.kid} {self.kty} {'/'.join(sorted(self.purposes))}{' private' if self.private else ''}>"


def _import_entry(key: Any, index: int, source: str) -> _Entry | None:
    kid_hint = key.get("kid") if isinstance(key, dict) else None
    where = f"key #{index + 1}" + (f" (kid {kid_hint})" if isinstance(kid_hint, str) else "")
    if not isinstance(key, dict):
        raise ConfigError(f"{where} is not a JSON object", file=source)
    kty = key.get("kty")
    if kty == "oct":
        raise ConfigError(f"{where} is a symmetric (oct) key; key sets may hold only EC or RSA keys "
                          "(a shared secret must not be stored or published as a JWK here)", file=source)
    if kty not in ("EC", "RSA"):
        # RFC 7517 §5: keys of a type we do not understand are ignored, not fatal.
        log.warning("%s: ignoring %s of unsupported key type %r", source, where, kty)
        return None
    public_dict = {k: v for k, v in key.items() if k not in PRIVATE_MEMBERS}
    is_private = any(m in key for m in PRIVATE_MEMBERS)
    try:
        public = jwk.import_key(public_dict)
        private = jwk.import_key(key) if is_private else None
    except (JoseError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{where} is not a valid {kty} JWK: {_safe_reason(err, key)}", file=source) from None
    # import_key makes an ECKey of an EC JWK and an RSAKey of an RSA one (kty is one of the two here).
    if isinstance(public, jwk.ECKey) and public.curve_name not in _EC_CURVES:
        raise ConfigError(f"{where} uses curve {public.curve_name}; supported: {', '.join(_EC_CURVES)}",
                          file=source)
    if isinstance(public, jwk.RSAKey) and public.public_key.key_size < MIN_RSA_BITS:
        raise ConfigError(f"{where} is a {public.public_key.key_size}-bit RSA key; at least {MIN_RSA_BITS} "
                          "bits are required", file=source)
    kid = key.get("kid")
    if not isinstance(kid, str) or not kid:
        kid = thumbprint(public_dict)
        public_dict["kid"] = kid
        public = jwk.import_key(public_dict)
        if private is not None:
            private = jwk.import_key({**key, "kid": kid})
    return _Entry(kid, kty, _purposes(key), public, private, public_dict)


class KeyRing:
    """A set of keys with lookups by purpose and kid.

    Built from a JWKS dict (our private set, or a peer's public set). `source` is where it came from (the
    file path when loaded with `KeyRing.load`): configuration errors while loading name it, for the operator.
    `label` is what every other message says ("the hospital's key set", a trusted hospital's name): those
    can reach a peer or a reviewer, who must not learn the layout of our disk (issue 13, S9).
    """

    source_default, label_default = "<memory>", "the key set"

    def __init__(self, jwks: dict, *, source: str = source_default, label: str = label_default):
        self.source, self.label = source, label
        entries = [e for i, k in enumerate(_key_list(jwks, source)) if (e := _import_entry(k, i, source))]
        if not entries:
            raise ConfigError("no usable keys: the key set is empty or holds only unsupported key types",
                              file=source)
        seen: set[str] = set()
        for e in entries:
            if e.kid in seen:
                raise ConfigError(f"two keys share kid {e.kid}; every kid must be unique", file=source)
            seen.add(e.kid)
        self._entries = entries

    @classmethod
    def load(cls, path: str | os.PathLike, passphrase: str | None = None, *, label: str = label_default) -> KeyRing:
        file = os.fspath(path)
        ring = cls(read_jwks(file, passphrase), source=file, label=label)
        if ring.has_private:
            _warn_if_exposed(file)
        return ring

    def __repr__(self) -> str:
        return f"KeyRing({self.source!r}, kids={self.kids!r})"

    def labelled(self, label: str) -> KeyRing:
        """The same keys under another label (a copy: a cached ring shared by callers keeps its own)."""
        ring = copy.copy(self)
        ring.label = label
        return ring

    @property
    def kids(self) -> list[str]:
        return [e.kid for e in self._entries]

    @property
    def has_private(self) -> bool:
        return any(e.private is not None for e in self._entries)

    def public_jwks(self) -> dict:
        return {"keys": [dict(e.public_dict) for e in self._entries]}

    def has_kid(self, kid: object) -> bool:
        return isinstance(kid, str) and self._find(kid) is not None

    def generation_of(self, kid: str) -> str | None:
        e = self._find(kid)
        gen = e.public_dict.get(GENERATION) if e is not None else None
        return gen if isinstance(gen, str) and gen else None

    def rotated_from(self, kid: str) -> str | None:
        e = self._find(kid)
        prev = e.public_dict.get(ROTATED_FROM) if e is not None else None
        return prev if isinstance(prev, str) and prev else None

    def generations(self) -> dict[str | None, list[str]]:
        out: dict[str | None, list[str]] = {}
        for e in self._entries:
            out.setdefault(self.generation_of(e.kid), []).append(e.kid)
        return out

    def current(self) -> KeyRing:
        """The newest generation: the one of the first signing key (rotation puts new keys first)."""
        first = next((e.kid for e in self._entries if "sig" in e.purposes), None)
        return self.only_generation(first) if first is not None else self

    def only_generation(self, kid: str) -> KeyRing:
        """The keys made together with `kid` (its generation); the whole set when keys carry no generation."""
        gen = self.generation_of(kid)
        if gen is None:
            return self
        return KeyRing({"keys": [dict(e.public_dict) if e.private is None else e.private.as_dict(private=True)
                                 for e in self._entries if self.generation_of(e.kid) == gen]},
                       source=self.source, label=self.label)

    def signing_key(self) -> jwk.Key:
        for e in self._entries:
            if e.private is not None and "sig" in e.purposes:
                return e.private
        raise SealError(f"{self.label} has no private signing key")

    def verification_key(self, kid: str) -> jwk.Key | None:
        e = self._find(kid)
        return e.public if e is not None and "sig" in e.purposes else None

    def decryption_key(self, kid: str) -> jwk.Key | None:
        e = self._find(kid)
        return e.private if e is not None and "enc" in e.purposes else None

    def encryption_keys(self) -> list[jwk.Key]:
        return [e.public for e in self._entries if "enc" in e.purposes]

    def _find(self, kid: str) -> _Entry | None:
        return next((e for e in self._entries if e.kid == kid), None)


def mixed_generations(ring: KeyRing) -> str | None:
    """Why this public key set may not be ONE party's (None when it is fine).

    Several signing keys are fine after a rotation, when each key names its generation and each generation
    has one signing key: a message is then sealed only to the generation that signed what it answers, or to
    the newest one. Untagged signing keys most likely mean two parties' sets merged into one file, and a
    message sealed to it would go to both: refused rather than guessed apart."""
    signing = [kid for kid in ring.kids if ring.verification_key(kid) is not None]
    if len(signing) <= 1:
        return None
    gens = ring.generations()
    roots = [g for g, kids in gens.items() if not any(ring.rotated_from(k) in gens for k in kids)]
    if None in gens or len(roots) != 1 or any(sum(1 for k in kids if k in signing) != 1 for kids in gens.values()):
        return (f"holds {len(signing)} signing keys that are not generations of one key set: a key file must be "
                "ONE party's keys (after `fhirbridge keys rotate` every key names its generation and the one it "
                "replaced)")
    return None


def _warn_if_exposed(path: str) -> None:
    # A private key file open to group/others (an older version's 0644, a copy under a wide umask) is
    # narrowed to 0600 with a warning; one that is not ours is reported by files.narrow (issue 13, S11).
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077 and files.narrow(path, files.PRIVATE_FILE, warn=False):
        log.warning("%s holds private keys but was accessible to group/others (mode %03o): made it 0600, as "
                    "`chmod 600 %s` does", path, mode, path)
