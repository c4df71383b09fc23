"""Review fixes on the periphery: envelope size caps per direction, the reviewer's per-hospital trust, HTTPS
delivery (redirects, Retry-After), answer-file exit codes and `init` values. None of these needs the EHR."""
from __future__ import annotations

import json
import threading
import time
import uuid
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fhirbridge.cli import main as cli

from fhirbridge.config import loader as config

from fhirbridge.exchange import envelope
from fhirbridge.crypto import jwe, jws
from fhirbridge.crypto.keys import (
    KeyRing,
    generate_jwks,
    public_jwks,
    write_private_jwks,
    write_public_jwks,
)
from fhirbridge.exchange.transport import DeliveryError, deliver
from fhirbridge.errors import ConfigError, SealError
from fhirbridge.exchange.reviewer import write_reviewer_keys
from fhirbridge.exchange.opinion import AnswerError, load_answer
from fhirbridge.exchange.reviewer import TrustStore, answer, open_package, trust_for

MiB = 1024 * 1024

ANSWER = '''\
concordance = "concordant"
recommendation = "proceed-as-planned"
risks_benefits = "Surgery relieves leg pain faster."
urgency = "routine"
'''


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- 1. envelope caps per direction ------------------------------------------------------------------

@pytest.fixture(scope="module")
def ring() -> KeyRing:
    return KeyRing(generate_jwks())


def test_caps_depend_on_the_envelope_type():
    assert envelope.max_envelope_bytes(envelope.PACKAGE) == 256 * MiB
    assert envelope.max_plaintext_bytes(envelope.PACKAGE) == 512 * MiB
    assert envelope.max_envelope_bytes(envelope.OPINION) == 8 * MiB
    assert envelope.max_plaintext_bytes(envelope.OPINION) == 32 * MiB
    with pytest.raises(ValueError):
        envelope.max_envelope_bytes("fhirbridge-something")


def test_a_small_opinion_that_inflates_past_its_cap_is_refused_while_inflating(ring):
    # 40 MiB of one byte deflates to ~40 KB: small on disk, a bomb once opened.
    bomb = jwe.encrypt_bytes(b" " * (40 * MiB), ring.encryption_keys(), typ=f"{envelope.OPINION}+jwe",
                             cty="application/json")
    assert len(bomb) < 200 * 1024
    with pytest.raises(SealError, match=f"exceeds limit of {32 * MiB} bytes"):
        envelope.open_sealed(bomb, typ=envelope.OPINION, decrypt=ring, trusted=ring)


def test_a_package_keeps_the_large_plaintext_cap(ring):
    big = jwe.encrypt_bytes(b" " * (40 * MiB), ring.encryption_keys(), typ=f"{envelope.PACKAGE}+jwe",
                            cty="application/json")
    with pytest.raises(SealError) as info:
        envelope.open_sealed(big, typ=envelope.PACKAGE, decrypt=ring, trusted=ring)
    assert "exceeds limit" not in str(info.value)   # opened in full, refused for being no envelope at all


def test_an_oversized_opinion_file_is_refused_unopened(ring, tmp_path):
    data = b"{" + b" " * (9 * MiB)
    with pytest.raises(SealError, match=f"refusing a {len(data)} byte {envelope.OPINION} envelope"):
        envelope.open_sealed(data, typ=envelope.OPINION, decrypt=ring, trusted=ring)
    f = tmp_path / "opinion.jwe"
    f.write_bytes(data)
    for kw in ({"typ": envelope.OPINION}, {}):   # without a type: the strictest cap
        with pytest.raises(SealError, match="refusing a .* byte envelope"):
            envelope.read_limited(f, **kw)
    assert envelope.read_limited(f, envelope.PACKAGE) == data
    with pytest.raises(SealError, match="limit 100"):
        envelope.read_limited(f, limit=100)


def test_seal_refuses_what_the_receiver_would_refuse(ring, monkeypatch):
    monkeypatch.setitem(envelope._CAPS, envelope.OPINION, (8 * MiB, 2000))
    doc = {"resourceType": "Bundle", "type": "document", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Basic", "id": "x" * 60}}] * 40}
    doc = jws.sign_bundle(doc, ring, who={"display": "x"}, when="2024-01-01T00:00:00Z")
    with pytest.raises(SealError, match="accepts at most 2000"):
        envelope.seal(typ=envelope.OPINION, claims={"jti": "1"}, document=doc, signer=ring, recipient=ring)
    monkeypatch.setitem(envelope._CAPS, envelope.OPINION, (1000, 32 * MiB))
    with pytest.raises(SealError, match="sealed fhirbridge-opinion is .* accepts at most 1000"):
        envelope.seal(typ=envelope.OPINION, claims={"jti": "1"}, document=doc, signer=ring, recipient=ring)


# --- 2. the reviewer trusts each hospital on its own ------------------------------------------------

class Site:
    """A hospital's key pair on disk: private (for the test to play the hospital) and public (for trust)."""

    def __init__(self, directory: Path, name: str):
        directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        jwks = generate_jwks()
        self.private = KeyRing(jwks, source=f"{name}-private")
        self.public_file = directory / f"{name}.jwks.json"
        write_public_jwks(self.public_file, public_jwks(jwks))
        self.public = KeyRing.load(self.public_file)


@pytest.fixture
def sites(tmp_path):
    reviewer_dir = tmp_path / "reviewer"
    files = write_reviewer_keys(reviewer_dir, None)
    trusted = reviewer_dir / "trusted"
    a, b = Site(trusted, "hospital-a"), Site(trusted, "hospital-b")
    return {"a": a, "b": b, "key_file": files["private_keys"], "key": KeyRing.load(files["private_keys"]),
            "reviewer_public": KeyRing.load(files["public_keys"]), "trusted_dir": trusted, "root": tmp_path}


def make_package(where: Path, signer: KeyRing, reviewer_public: KeyRing, *, doc_signer: KeyRing | None = None,
                 name: str = "pkg-1") -> Path:
    """A package as seal.py makes one, reduced to what opening and answering need."""
    ehr = "https://ehr.example/fhir"
    doc = {"resourceType": "Bundle", "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"},
           "type": "document", "timestamp": "2024-01-01T00:00:00Z", "entry": [
               {"fullUrl": f"{ehr}/Patient/p1", "resource": {"resourceType": "Patient", "id": "p1"}},
               {"fullUrl": f"{ehr}/ServiceRequest/sr1", "resource": {
                   "resourceType": "ServiceRequest", "id": "sr1", "status": "active", "intent": "order",
                   "subject": {"reference": f"{ehr}/Patient/p1"}}}]}
    iss = {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.7.1", "display": "Hospital A"}
    doc = jws.sign_bundle(doc, doc_signer or signer, who={"identifier": iss, "display": iss["display"]},
                          when="2024-01-01T00:00:00Z")
    now = int(time.time())
    claims = {"jti": str(uuid.uuid4()), "iat": now, "exp": now + 3600, "iss": iss,
              "aud": {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.7.9", "display": "Reviewer"},
              "case_id": str(uuid.uuid4()), "package_id": name, "service_request": "ServiceRequest/sr1",
              "patient": "Patient/p1", "manifest": {"shared": [], "withheld": [], "attachments": []}}
    data = envelope.seal(typ=envelope.PACKAGE, claims=claims, document=doc, signer=signer, recipient=reviewer_public)
    d = where / name
    d.mkdir(parents=True)
    (d / envelope.ENVELOPE_FILE).write_bytes(data)
    return d


def recipient_kids(sealed: bytes) -> set[str]:
    return {r["header"]["kid"] for r in json.loads(sealed)["recipients"]}


def test_the_opinion_is_sealed_only_to_the_hospital_that_signed_the_package(sites, tmp_path):
    a, b = sites["a"], sites["b"]
    pkg = make_package(tmp_path / "in", a.private, sites["reviewer_public"])
    store = TrustStore.load(sites["trusted_dir"])
    opened = open_package(pkg, sites["key"], store)
    assert opened.hospital.source == str(a.public_file)
    answer_file = tmp_path / "answer.toml"
    answer_file.write_text(ANSWER, encoding="utf-8")
    sealed, _claims = answer(opened, answer_file, sites["key"], store, mappings_dir=config.PACKAGE_MAPPINGS)
    assert recipient_kids(sealed) == {k.kid for k in a.public.encryption_keys()}
    assert jwe.decrypt_bytes(sealed, a.private, max_plaintext=32 * MiB)
    with pytest.raises(SealError):
        jwe.decrypt_bytes(sealed, b.private, max_plaintext=32 * MiB)


def test_a_package_is_verified_with_one_hospitals_keys_only(sites, tmp_path):
    # Claims signed by A, document by B: each key is trusted, but not as the same hospital.
    a, b = sites["a"], sites["b"]
    pkg = make_package(tmp_path / "in", a.private, sites["reviewer_public"], doc_signer=b.private)
    with pytest.raises(SealError, match="not a trusted key"):
        open_package(pkg, sites["key"], TrustStore.load(sites["trusted_dir"]))


def test_a_package_from_a_hospital_not_in_the_store_is_refused(sites, tmp_path):
    stranger = Site(tmp_path / "elsewhere", "stranger")
    pkg = make_package(tmp_path / "in", stranger.private, sites["reviewer_public"])
    with pytest.raises(SealError, match="not a trusted key of any hospital"):
        open_package(pkg, sites["key"], TrustStore.load(sites["trusted_dir"]))


def test_answer_refuses_another_hospitals_keys_as_recipient(sites, tmp_path):
    pkg = make_package(tmp_path / "in", sites["a"].private, sites["reviewer_public"])
    opened = open_package(pkg, sites["key"], sites["a"].public)   # a single KeyRing still works
    answer_file = tmp_path / "answer.toml"
    answer_file.write_text(ANSWER, encoding="utf-8")
    with pytest.raises(SealError, match="sealed only to the hospital that sent the package"):
        answer(opened, answer_file, sites["key"], sites["b"].public, mappings_dir=config.PACKAGE_MAPPINGS)


def test_a_merged_trust_file_of_two_hospitals_is_refused(sites, tmp_path):
    merged = {"keys": sites["a"].public.public_jwks()["keys"] + sites["b"].public.public_jwks()["keys"]}
    path = tmp_path / "merged.jwks.json"
    write_public_jwks(path, merged)
    with pytest.raises(ConfigError, match="2 signing keys"):
        TrustStore.load(path)


def test_a_key_in_two_hospital_files_is_refused(sites):
    (sites["trusted_dir"] / "copy-of-a.jwks.json").write_bytes(sites["a"].public_file.read_bytes())
    with pytest.raises(ConfigError, match="also in"):
        TrustStore.load(sites["trusted_dir"])


def test_a_private_key_set_is_never_a_trust_file(sites, tmp_path):
    private = sites["trusted_dir"] / "oops.jwks.json"
    write_private_jwks(private, generate_jwks())
    with pytest.raises(ConfigError, match="private keys") as info:
        TrustStore.load(sites["trusted_dir"])
    assert info.value.file == str(private)
    pkg = make_package(tmp_path / "in", sites["a"].private, sites["reviewer_public"])
    with pytest.raises(ConfigError, match="private keys"):
        open_package(pkg, sites["key"], sites["a"].private)


def test_default_trust_is_the_file_or_the_directory_next_to_the_key(sites):
    store = trust_for(sites["key_file"], None)
    assert sorted(Path(r.source).name for r in store.hospitals) == ["hospital-a.jwks.json", "hospital-b.jwks.json"]
    (sites["key_file"].parent / "trusted.jwks.json").write_bytes(sites["a"].public_file.read_bytes())
    with pytest.raises(SealError, match="both"):
        trust_for(sites["key_file"], None)
    assert len(trust_for(sites["key_file"], sites["trusted_dir"] / "hospital-b.jwks.json").hospitals) == 1


def test_cli_reviewer_with_a_trust_directory(sites, tmp_path, capsys):
    a = sites["a"]
    pkg = make_package(tmp_path / "in", a.private, sites["reviewer_public"])
    code, out, err = run(capsys, "reviewer", "open", pkg, "--key", sites["key_file"])
    assert code == 0, err
    assert "signature: valid" in out and "hospital-a.jwks.json" in out
    answer_file = tmp_path / "answer.toml"
    answer_file.write_text(ANSWER, encoding="utf-8")
    out_file = tmp_path / "opinion.jwe"
    code, out, err = run(capsys, "reviewer", "answer", pkg, "--key", sites["key_file"], "--trust",
                         sites["trusted_dir"], "--opinion", answer_file, "--out", out_file)
    assert code == 0, err
    assert recipient_kids(out_file.read_bytes()) == {k.kid for k in a.public.encryption_keys()}


# --- 6. every answer-file problem is exit code 2 ----------------------------------------------------

@pytest.mark.parametrize("name, content", [
    ("answer.toml", 'concordance = "concordant\n'),
    ("answer.json", '{"concordance": "concordant",}'),
    ("answer.json", '["concordant"]'),
    ("answer.toml", None),
    ("answer.toml", b'risks_benefits = "R\xfcckenschmerzen"\n'),
])
def test_every_answer_file_problem_is_an_answer_error_with_exit_code_2(tmp_path, name, content):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content, encoding="utf-8")
    with pytest.raises(AnswerError) as info:
        load_answer(p)
    assert info.value.exit_code == 2 and str(p) in str(info.value) and len(info.value.problems) == 1


def test_cli_answer_with_bad_toml_exits_2(sites, tmp_path, capsys):
    pkg = make_package(tmp_path / "in", sites["a"].private, sites["reviewer_public"])
    answer_file = tmp_path / "answer.toml"
    answer_file.write_text('concordance = "concordant\n', encoding="utf-8")
    out_file = tmp_path / "opinion.jwe"
    code, _out, err = run(capsys, "reviewer", "answer", pkg, "--key", sites["key_file"], "--opinion", answer_file,
                         "--out", out_file)
    assert code == 2 and "not valid TOML" in err and "Traceback" not in err
    assert not out_file.exists()


# --- 3. https delivery: redirects and Retry-After ----------------------------------------------------

class Endpoint:
    """Answers every POST with `status` and `headers`; GET /login answers 200 (what a redirect leads to)."""

    def __init__(self, status: int, headers: dict[str, str]):
        self.posts, self.gets = 0, 0
        me = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *_a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                me.posts += 1
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v.replace("{port}", str(me.port)))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                me.gets += 1
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}/fhirbridge/packages"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _deliver_within(seconds: float, url: str, tmp_path: Path):
    pkg = tmp_path / "pkg"
    (pkg / "attachments").mkdir(parents=True)
    (pkg / "attachments" / "att-001.jwe").write_bytes(b"{}")
    (pkg / envelope.ENVELOPE_FILE).write_bytes(b"{}")
    reviewer = config.Reviewer(name="spine-center", display="Spine Center", identifier_system="urn:ietf:rfc:3986",
                               identifier_value="urn:oid:2.999.1.2", jwks=tmp_path / "unused.jwks.json",
                               transport=config.Transport("https", url=url))
    result: dict = {}

    def work():
        try:
            result["ok"] = deliver(reviewer, pkg, "pkg")
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            result["error"] = exc

    t = threading.Thread(target=work, daemon=True)   # daemon: a run blocked for a day must not hang pytest
    started = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"delivery still blocked after {seconds} s"
    return result, time.monotonic() - started


def test_a_redirect_is_a_permanent_error_not_a_delivery(tmp_path):
    e = Endpoint(302, {"Location": "http://127.0.0.1:{port}/login?session=abc123"})
    try:
        result, _ = _deliver_within(20, e.url, tmp_path)
    finally:
        e.close()
    err = result.get("error")
    assert isinstance(err, DeliveryError), result
    assert not err.transient
    assert "redirects (302)" in str(err) and "/login" in str(err) and "abc123" not in str(err)
    assert e.gets == 0 and e.posts == 1


@pytest.mark.parametrize("retry_after", ["86400", formatdate(time.time() + 86400, usegmt=True)])
def test_a_huge_retry_after_ends_the_attempt_at_once(tmp_path, retry_after):
    e = Endpoint(503, {"Retry-After": retry_after})
    try:
        result, elapsed = _deliver_within(20, e.url, tmp_path)
    finally:
        e.close()
    err = result.get("error")
    assert isinstance(err, DeliveryError), result
    assert err.transient and "retry after" in str(err) and "later run" in str(err)
    assert elapsed < 5 and e.posts == 1


def test_a_short_retry_after_is_honoured_and_retries_are_bounded(tmp_path):
    e = Endpoint(503, {"Retry-After": "0"})
    try:
        result, _ = _deliver_within(30, e.url, tmp_path)
    finally:
        e.close()
    err = result.get("error")
    assert isinstance(err, DeliveryError) and err.transient and "503" in str(err)
    assert e.posts == 5   # the first attempt and RETRIES more, then the Case waits for a later run


# --- 5. configuration and init values ----------------------------------------------------------------

def _site(tmp_path, capsys, *extra) -> Path:
    code, _, err = run(capsys, "init", tmp_path / "site", *extra)
    assert code == 0, err
    return tmp_path / "site" / "fhirbridge.toml"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_floats_from_the_environment_are_refused(tmp_path, capsys, value):
    path = _site(tmp_path, capsys)
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={"FHIRBRIDGE_HOSPITAL__HTTP__TIMEOUT_READ": value})
    assert info.value.key == "hospital.http.timeout_read" and "finite" in str(info.value)


def test_non_finite_floats_in_the_file_are_refused(tmp_path, capsys):
    path = _site(tmp_path, capsys)
    path.write_text(path.read_text().replace("max_retry_after = 30.0", "max_retry_after = inf"))
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={})
    assert info.value.key == "hospital.http.max_retry_after"


@pytest.mark.parametrize("name", ['St "X" Hospital', "Back\\slash Clinic", "Hôpital Sainte-Anne"])
def test_init_quotes_the_hospital_name(tmp_path, capsys, name):
    path = _site(tmp_path, capsys, "--hospital-name", name)
    assert config.load(path, environ={}).hospital.name == name


@pytest.mark.parametrize("argv, key", [
    (["--fhir-base-url", "ftp://ehr.example/fhir"], "--fhir-base-url"),
    (["--fhir-base-url", "https:///fhir"], "--fhir-base-url"),
    (["--hospital-name", "Line\nbreak"], "--hospital-name"),
    (["--hospital-name", "  "], "--hospital-name"),
])
def test_init_refuses_bad_values_before_writing_anything(tmp_path, capsys, argv, key):
    code, _out, err = run(capsys, "init", tmp_path / "site", *argv)
    assert code == 2 and key in err and "Traceback" not in err
    assert not (tmp_path / "site").exists()


def test_init_refuses_a_url_without_echoing_credentials(tmp_path, capsys):
    code, _out, err = run(capsys, "init", tmp_path / "site", "--fhir-base-url", "ftp://user:hunter2@ehr.example/")
    assert code == 2 and "hunter2" not in err and "ftp" in err


def test_check_files_reports_reviewer_key_problems(tmp_path):
    from fhirbridge.config.starter import write_starter
    good = write_reviewer_keys(tmp_path / "good", None)
    private_only = tmp_path / "leaked.private.jwks.json"
    write_private_jwks(private_only, generate_jwks())
    sig_only = tmp_path / "sig-only.jwks.json"
    jwks = public_jwks(generate_jwks())
    write_public_jwks(sig_only, {"keys": [k for k in jwks["keys"] if k["use"] == "sig"]})
    base = {"display": "R", "profiles": [], "system": "urn:ietf:rfc:3986", "outbox": "outbox/x"}
    reviewers = [{**base, "name": "good", "jwks": str(good["public_keys"]), "value": "urn:oid:1"},
                 {**base, "name": "missing", "jwks": str(tmp_path / "nope.jwks.json"), "value": "urn:oid:2"},
                 {**base, "name": "leaked", "jwks": str(private_only), "value": "urn:oid:3"},
                 {**base, "name": "sig-only", "jwks": str(sig_only), "value": "urn:oid:4"}]
    path = write_starter(tmp_path / "site", reviewers=reviewers)["config"]
    cfg = config.load(path, environ={})            # the default does not open key files
    problems = config.check_files(cfg)
    assert len(problems) == 3, problems
    assert "reviewers[1].jwks" in problems[0] and "not found" in problems[0]
    assert "reviewers[2].jwks" in problems[1] and "private keys" in problems[1]
    assert "reviewers[3].jwks" in problems[2] and "no encryption key" in problems[2]
    assert all(str(path) in p for p in problems)
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={}, check_files=True)
    assert info.value.key == "reviewers[1].jwks"


def test_check_files_is_empty_for_a_good_configuration(tmp_path):
    from fhirbridge.config.starter import write_starter
    good = write_reviewer_keys(tmp_path / "good", None)
    path = write_starter(tmp_path / "site", reviewers=[{
        "name": "good", "display": "R", "jwks": str(good["public_keys"]), "profiles": [],
        "system": "urn:ietf:rfc:3986", "value": "urn:oid:1", "outbox": "outbox/x"}])["config"]
    assert config.check_files(config.load(path, environ={}, check_files=True)) == []


def test_all_waits_of_one_delivery_share_a_budget(tmp_path, monkeypatch):
    import fhirbridge.exchange.transport as d
    monkeypatch.setattr(d, "MAX_TOTAL_WAIT", 1.5)    # e.g. Retry-After: 1 on every attempt
    e = Endpoint(503, {"Retry-After": "1"})
    try:
        result, elapsed = _deliver_within(20, e.url, tmp_path)
    finally:
        e.close()
    err = result.get("error")
    assert isinstance(err, DeliveryError) and err.transient and "later run" in str(err)
    assert e.posts == 2 and elapsed < 4                # waited once (1 s); the second wait would overdraw
