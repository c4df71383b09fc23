"""Key management: generate, rotate, retire, passphrase-protected files, the published JWKS, and reviewer keys
fetched from a URL — each through the real loop against the real EHR where it matters."""
from __future__ import annotations

import http.server
import json
import stat
import threading

import pytest

from fhirbridge.cli import main as cli
from fhirbridge.config import loader as config
from fhirbridge.crypto.keys import GENERATION, PASSPHRASE_ENV, PRIVATE_MEMBERS, KeyRing, public_path_for, read_jwks
from fhirbridge.errors import ConfigError, SealError
from fhirbridge.exchange.reviewer import TrustStore
from fhirbridge.loop.receive import receive_file
from fhirbridge.service.app import create_app
from fhirbridge.service.scheduler import Service

PASSPHRASE = "correct horse battery staple"


def keys_cmd(*argv: str) -> int:
    return cli.main(["keys", *argv])


def recipient_kids(sealed: bytes) -> set[str]:
    return {r["header"]["kid"] for r in json.loads(sealed)["recipients"]}


# --- files -------------------------------------------------------------------------------------------

def test_generate_rotate_retire_on_a_key_file(tmp_path, capsys):
    path = tmp_path / "site.private.jwks.json"
    assert keys_cmd("generate", "--file", str(path)) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = KeyRing.load(path)
    active = first.signing_key().kid
    assert keys_cmd("generate", "--file", str(path)) == 2              # never overwrites silently
    assert "keys rotate" in capsys.readouterr().err

    assert keys_cmd("rotate", "--file", str(path)) == 0
    rotated = KeyRing.load(path)
    assert set(first.kids) < set(rotated.kids) and len(rotated.kids) == 2 * len(first.kids)
    assert rotated.signing_key().kid not in first.kids                 # the new key signs from now on
    assert rotated.current().kids == [k for k in rotated.kids if k not in first.kids]
    public = KeyRing.load(public_path_for(path))
    assert not public.has_private and sorted(public.kids) == sorted(rotated.kids)
    TrustStore.of(public)                                              # a peer may trust both generations

    new_active = rotated.signing_key().kid
    assert keys_cmd("retire", new_active, "--file", str(path)) == 2
    assert "active signing key" in capsys.readouterr().err
    assert keys_cmd("retire", active, "--file", str(path)) == 0
    assert active not in KeyRing.load(path).kids and active not in KeyRing.load(public_path_for(path)).kids


def test_passphrase_protected_key_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "site.private.jwks.json"
    monkeypatch.setenv(PASSPHRASE_ENV, PASSPHRASE)
    assert keys_cmd("generate", "--file", str(path)) == 0
    raw = path.read_bytes()
    assert raw.startswith(b"eyJ") and b'"d"' not in raw                # no key material in the clear
    ring = KeyRing.load(path)
    assert ring.has_private
    assert keys_cmd("rotate", "--file", str(path)) == 0                 # stays encrypted after a rotation
    assert path.read_bytes().startswith(b"eyJ") and len(KeyRing.load(path).kids) == 4

    monkeypatch.delenv(PASSPHRASE_ENV)
    with pytest.raises(ConfigError, match=f"encrypted: set {PASSPHRASE_ENV}"):
        KeyRing.load(path)
    with pytest.raises(ConfigError, match="wrong passphrase") as info:
        read_jwks(path, "not the passphrase at all")
    assert "not the passphrase" not in str(info.value)
    with pytest.raises(ConfigError, match="at least 12"):
        read_jwks(path, "short")


# --- rotation through the loop -----------------------------------------------------------------------

def test_after_rotation_opinions_sealed_to_the_old_key_still_open(hospital, seeded, monkeypatch):
    h = hospital
    reviewer = h.reviewers["spine-center"]
    old_public = KeyRing.load(public_path_for(h.app.hospital.keys))
    case = h.delivered_case(seeded["patient"])
    in_flight = h.answer(case)                                        # sealed to the pre-rotation keys
    assert recipient_kids(in_flight.read_bytes()) <= set(old_public.kids)

    assert cli.main(["--config", str(h.config_path), "keys", "rotate"]) == 0
    h.app.close()
    h.app = h.new_app()
    receive_file(h.app, in_flight)
    h.run(intake=False)
    assert h.app.store.get(case.id).step == "done"

    # A new package is signed with the new key: a reviewer still trusting only the old keys refuses it ...
    case2 = h.delivered_case(seeded["patient"], question="And the second level?")
    with pytest.raises(SealError, match="not a trusted key"):
        h.open(case2)
    # ... one given the published set (both generations) opens it, and answers only to the new generation.
    reviewer.trust(public_path_for(h.app.hospital.keys))
    opened = h.open(case2)
    new_gen = {k for k in reviewer.trusted.kids if k not in old_public.kids}
    assert set(opened.hospital.kids) == new_gen
    sealed = h.answer(case2)
    assert recipient_kids(sealed.read_bytes()) <= new_gen
    receive_file(h.app, sealed)
    h.run(intake=False)
    assert h.app.store.get(case2.id).step == "done"


def test_the_service_publishes_the_hospital_public_keys(hospital):
    h = hospital
    assert cli.main(["--config", str(h.config_path), "keys", "rotate"]) == 0
    svc = Service(config.load(h.config_path))
    try:
        r = create_app(svc=svc).test_client().get("/.well-known/jwks.json")
    finally:
        svc.stop(wait=True)
    assert r.status_code == 200 and r.content_type == "application/jwk-set+json"
    keys = r.get_json()["keys"]
    assert sorted(k["kid"] for k in keys) == sorted(KeyRing.load(h.app.hospital.keys).kids)
    assert not any(PRIVATE_MEMBERS & set(k) for k in keys)
    assert len({k[GENERATION] for k in keys}) == 2


# --- reviewer keys from a URL ------------------------------------------------------------------------

class _JwksServer:
    """The reviewer's web server publishing its public JWKS (loopback only)."""

    def __init__(self, path):
        self.path, self.hits = path, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                body = outer.path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/jwk-set+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_reviewer_keys_from_a_url_are_cached_and_refreshed_on_a_new_kid(hospital, seeded):
    h = hospital
    reviewer = h.reviewers["spine-center"]
    server = _JwksServer(reviewer.files["public_keys"])
    try:
        text = h.config_path.read_text().replace(f'jwks = "{reviewer.files["public_keys"]}"',
                                                 f'jwks_url = "{server.url}"')
        assert "jwks_url" in text
        h.config_path.write_text(text)
        h.app.close()
        h.app = h.new_app()
        assert config.check_files(h.app.config) == []
        case = h.delivered_case(seeded["patient"])
        assert server.hits == 1                                     # fetched once, for sealing
        h.open(case)

        # The reviewer rotates; its answer is signed by a key the hospital has not seen yet.
        assert keys_cmd("rotate", "--file", str(reviewer.files["private_keys"])) == 0
        reviewer.key = KeyRing.load(reviewer.files["private_keys"])
        receive_file(h.app, h.answer(case))
        assert server.hits == 2                                     # one refresh, for the unknown kid
        h.run(intake=False)
        assert h.app.store.get(case.id).step == "done"
        cache = h.app.config.data_dir / "jwks-cache" / "reviewer-spine_center.jwks.json"
        assert sorted(KeyRing.load(cache).kids) == sorted(reviewer.key.kids)
        assert not KeyRing.load(cache).has_private
        # A forged kid soon after does not make us fetch again (refreshes are rate-limited).
        h.app.reviewer_keys("spine-center", kid="forged-kid-0000")
        assert server.hits == 2
    finally:
        server.close()


def test_a_reviewer_url_serving_private_keys_is_refused(tmp_path):
    from fhirbridge.crypto.keys import generate_jwks, write_private_jwks
    from fhirbridge.crypto.remote_jwks import RemoteJwks
    private = tmp_path / "oops.jwks.json"
    write_private_jwks(private, generate_jwks())
    server = _JwksServer(private)
    try:
        with pytest.raises(SealError, match="holds private keys"):
            RemoteJwks(server.url, tmp_path / "cache.json").keys()
        assert not (tmp_path / "cache.json").exists()
    finally:
        server.close()


def test_config_needs_exactly_one_of_jwks_and_jwks_url(hospital):
    text = hospital.config_path.read_text()
    bad = text.replace('display = "Spine Center"', 'display = "Spine Center"\njwks_url = "https://keys.test/j"', 1)
    hospital.config_path.write_text(bad)
    with pytest.raises(ConfigError, match="exactly one of jwks") as info:
        config.load(hospital.config_path)
    assert info.value.key.startswith("reviewers[0]")
    bad = text.replace('display = "Spine Center"', 'display = "Spine Center"\njwks_url = "http://keys.test/j"', 1)
    hospital.config_path.write_text(bad.replace(f'jwks = "{hospital.reviewers["spine-center"].files["public_keys"]}"',
                                                "", 1))
    with pytest.raises(ConfigError, match="https://"):
        config.load(hospital.config_path)
