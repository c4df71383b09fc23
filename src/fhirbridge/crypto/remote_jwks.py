"""A peer's public keys published at a URL (a reviewer's `jwks_url`), cached in memory and on disk.

The key set is fetched on first use and kept for `ttl` seconds. A message signed with a `kid` we do not
hold triggers one refresh (the peer may just have rotated its keys), at most once per `min_refresh`
seconds, so a stream of forged kids cannot make us hammer the peer's server. The last good copy is kept in
`cache_file`: a restart while the peer's server is down still has its keys. A fetched set must be public
(no private members) and hold at least one signing and one encryption key; a bad answer never replaces
a good cached copy.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import requests

from fhirbridge.crypto.keys import KeyRing, write_public_jwks
from fhirbridge.errors import ConfigError, SealError
from fhirbridge.jsonutil import dumps, loads

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 256 * 1024
_SOURCES: dict[tuple[str, str], RemoteJwks] = {}
_SOURCES_LOCK = threading.Lock()


class RemoteJwks:
    def __init__(self, url: str, cache_file: Path | None, *, ttl: float = 3600.0, min_refresh: float = 60.0,
                 timeout: tuple[float, float] = (5.0, 10.0), clock=time.monotonic, needs_encryption: bool = True):
        self.url = url
        self.needs_encryption = needs_encryption   # a peer's set must; an identity provider's only signs
        self.cache_file = cache_file
        self.ttl, self.min_refresh, self.timeout = ttl, min_refresh, timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._ring: KeyRing | None = None
        self._fetched_at = -1e18
        self._tried_at = -1e18
        self._kid_refresh_at = -1e18
        self.fetches = 0  # how many times the URL was read (tests, metrics)

    @classmethod
    def shared(cls, url: str, cache_file: Path | None, *, needs_encryption: bool = True) -> RemoteJwks:
        """One source per URL and cache file in a process, so every App and thread shares its cache."""
        key = (url, str(cache_file))
        with _SOURCES_LOCK:
            if key not in _SOURCES:
                _SOURCES[key] = cls(url, cache_file, needs_encryption=needs_encryption)
            return _SOURCES[key]

    def keys(self, kid: object = None) -> KeyRing:
        """The current key set; refreshed when stale, or when `kid` is given and not in it."""
        with self._lock:
            now = self._clock()
            if self._ring is None and self.cache_file is not None and self.cache_file.exists():
                self._ring = self._from_cache()
            stale = self._ring is None or now - self._fetched_at > self.ttl
            unknown = kid is not None and self._ring is not None and not self._ring.has_kid(kid)
            # A stale copy is fetched again at most once per min_refresh (the peer may be down); so is a copy
            # lacking a kid, counted separately: the first new kid after a fetch is a rotation, a stream of
            # them a forger, who gets one fetch a minute.
            due = (stale and now - self._tried_at >= self.min_refresh) or \
                  (unknown and now - self._kid_refresh_at >= self.min_refresh)
            if due:
                self._tried_at = now
                if unknown:
                    self._kid_refresh_at = now
                try:
                    self._ring = self._fetch()
                    self._fetched_at = now
                except (ConfigError, SealError) as exc:
                    if self._ring is None:
                        raise
                    log.warning("keeping the cached keys of %s: %s", self.url, exc)
            if self._ring is None:
                raise SealError(f"no keys from {self.url} yet (the last attempt failed; retried in "
                                f"{self.min_refresh:.0f} s)")
            return self._ring

    def _from_cache(self) -> KeyRing | None:
        if self.cache_file is None:
            return None
        try:
            return KeyRing.load(self.cache_file)
        except ConfigError as exc:
            log.warning("ignoring the cached key set %s: %s", self.cache_file, exc.detail)
            return None

    def _fetch(self) -> KeyRing:
        try:
            resp = requests.get(self.url, timeout=self.timeout, allow_redirects=False, stream=True,
                                headers={"Accept": "application/jwk-set+json, application/json"})
            body = resp.raw.read(MAX_JWKS_BYTES + 1, decode_content=True)
            resp.close()
        except requests.RequestException as exc:
            raise SealError(f"could not read the key set at {self.url} ({type(exc).__name__})") from None
        self.fetches += 1
        if resp.status_code != 200:
            raise SealError(f"the key set at {self.url} answered HTTP {resp.status_code}")
        if len(body) > MAX_JWKS_BYTES:
            raise SealError(f"the key set at {self.url} is larger than {MAX_JWKS_BYTES} bytes")
        try:
            data = loads(body)
        except Exception:  # noqa: BLE001 - orjson's error carries the document
            raise SealError(f"the key set at {self.url} is not JSON") from None
        ring = KeyRing(data, source=self.url)
        if ring.has_private:
            raise SealError(f"the key set at {self.url} holds private keys: refused (a peer publishes only public "
                            "keys; tell them their private key is exposed)")
        if not any(ring.verification_key(k) for k in ring.kids):
            raise SealError(f"the key set at {self.url} has no signature verification key")
        if self.needs_encryption and not ring.encryption_keys():
            raise SealError(f"the key set at {self.url} has no encryption key")
        if self.cache_file is not None:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_public_jwks(self.cache_file, loads(dumps(ring.public_jwks())))
        return ring
