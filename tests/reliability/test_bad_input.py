"""Bad-input suite: property-based tests (hypothesis) and schema fuzzing (schemathesis) of every entry point:
sealed opinion files (through `receive` and through the reviewer API), packages (the reviewer's side), the
staff and reviewer HTTP API against its OpenAPI document, subscription notifications, and config files.

Each input is tampered, truncated, oversized, sealed with the wrong key, replayed, expired, invalid FHIR or
about the wrong patient, or plain garbage. Each must get a clear refusal (an error that says why, a 4xx with a
JSON or OperationOutcome body, a non-zero exit with a message), never a crash, and never a partial write:
the last test checks that the store, the Case files and the EHR hold nothing new but the orders the API
answered 201 for. Inputs are counted per entry point (figures["bad_input"]).

tests/loop/test_rejections.py holds one hand-made example of each refusal; this suite generates them by the
hundred.
"""
from __future__ import annotations

import re
import shutil
import time
import uuid
from collections import Counter

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from fhirbridge.access.tokens import mint_reviewer_token
from fhirbridge.cli.main import main
from fhirbridge.config import loader as config
from fhirbridge.config.model import env_name
from fhirbridge.crypto.keys import KeyRing, generate_jwks
from fhirbridge.ehr import subscriptions as subscribe
from fhirbridge.errors import ConfigError, FhirbridgeError, RejectedOpinion, SealError
from fhirbridge.exchange import envelope
from fhirbridge.exchange.reviewer import open_package
from fhirbridge.fhir.client import FhirClient
from fhirbridge.loop.receive import receive_bytes, receive_file
from fhirbridge.loop.seal import package_dir
from fhirbridge.service.app import create_app
from fhirbridge.service.reviewer_api import MAX_OPINION_UPLOAD
from fhirbridge.service.scheduler import Service
from tests.kit.hospital import TestHospital, craft_opinion
from tests.reliability.relkit import FULL, size

pytestmark = pytest.mark.sekmet

ADMIN = "admin-token-" + "b" * 24
PUBLIC_URL = "http://fhirbridge.test"
AUD = f"{PUBLIC_URL}/reviewer"
SPINE = "urn:oid:2.999.9.1"
NOTIFY_TOKEN = "notify-token-" + "c" * 24
EXAMPLES = {  # hypothesis examples per property: CI form, full form
    "opinion_bytes": size(120, 400), "opinion_api": size(50, 200), "opinion_semantic": size(25, 120),
    "package": size(40, 150), "notification": size(80, 300), "config": size(80, 300), "api": size(12, 60)}
TRIED: Counter = Counter()      # inputs tried, per entry point
SETTINGS = dict(deadline=None, database=None, derandomize=not FULL,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])


# --- the world: one hospital, its pull reviewer, a Case awaiting an opinion and one already filed ---------

class World:
    def __init__(self, root, ehr_url: str, patient: str):
        self.h = TestHospital(root, ehr_url, reviewers=("spine-center", "other-center"))
        text = re.sub(r'type = "outbox"[^\n]*\npath = "[^"]*"\n', 'type = "pull"\n', self.h.config_path.read_text())
        self.h.config_path.write_text(text + f'\n[api]\ntokens = ["{ADMIN}"]\n[service]\npublic_url = "{PUBLIC_URL}"\n')
        self.h.app.close()
        self.svc = Service(config.load(self.h.config_path))
        self.h.app = self.svc.apps[0]
        self.h.package_path = lambda case: package_dir(self.h.app, case)   # pull: the package stays with us
        self.client = create_app(svc=self.svc).test_client()
        self.case = self.h.delivered_case(patient)                         # awaits its opinion
        self.opened = self.h.open(self.case)
        good = self.h.answer(self.case)
        self.good = good.read_bytes()
        # Its message id is marked as seen: a mutation that leaves it authentic (an unprotected member added,
        # a non-canonical base64 ending) goes through every check and is then refused as a replay, instead
        # of being filed and changing the world the other inputs are tried against.
        self.h.app.store.remember_message(good.stem.removeprefix("opinion-"), self.case.id)
        filed = self.h.delivered_case(patient)
        self.filed_opinion = self.h.answer(filed).read_bytes()
        receive_bytes(self.h.app, self.filed_opinion)
        self.h.run(intake=False)
        self.filed = self.h.app.store.get(filed.id)
        assert self.filed.step == "done"
        subscribe.set_token(self.svc.store, self.h.app.hospital.key, subscribe.token_hash(NOTIFY_TOKEN))
        self.notify_path = f"/fhir/notify/{env_name(self.h.app.hospital.name)}"
        self.orders_created = 0   # 201s from POST /api/orders: the only writes bad input may cause

    def reviewer_jwt(self, reviewer: str = "spine-center") -> dict:
        """A fresh token per request: reviewer tokens are single-use."""
        r = self.h.reviewers[reviewer]
        return {"Authorization": "Bearer " + mint_reviewer_token(r.key, issuer=SPINE, audience=AUD)}

    def snapshot(self, fhir: FhirClient) -> dict:
        store = self.h.app.store
        cases = store.list_cases()
        return {"cases": sorted((c.id, c.step, c.opinion_id, c.document_reference, c.updated_at) for c in cases),
                "events": sum(len(store.events(c.id)) for c in cases),
                "audit": len(store.list_audit()),
                "task_versions": [fhir.read_ref(c.task)["meta"]["versionId"] for c in (self.case, self.filed)],
                "opinion_files": sorted(p.name for c in cases for p in self.h.app.case_dir(c.id).glob("opinion-*")),
                "consult_notes": sum(1 for d in fhir.search("DocumentReference", {"patient": self.case.patient,
                                                                                  "type": "http://loinc.org|11488-4"})
                                     if d["resourceType"] == "DocumentReference")}


@pytest.fixture(scope="module")
def world(tmp_path_factory, ehr, seeded):
    w = World(tmp_path_factory.mktemp("bad-input"), ehr.base_url, seeded["patient"])
    yield w
    w.svc.stop(wait=True)


@pytest.fixture(scope="module")
def before(world, ehr):
    with FhirClient(ehr.base_url) as fhir:
        return world.snapshot(fhir)


# --- strategies ---------------------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False)
                           | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                       max_size=4),
                           max_leaves=12)
JWE_MEMBERS = ("protected", "recipients", "iv", "ciphertext", "tag", "aad", "unprotected", "header", "encrypted_key")


def mutated(data: bytes) -> st.SearchStrategy[tuple[str, bytes]]:
    """(how, bytes): a sealed file truncated, with bytes changed, with a JWE member dropped or replaced, or
    replaced by garbage or by JSON that is not a JWE."""
    doc = orjson.loads(data)

    def flip(changes):
        b = bytearray(data)
        for at, value in changes:
            b[at] = value
        return bytes(b)

    def member(args):
        name, value = args
        d = dict(doc)
        if value is None:
            d.pop(name, None)
        else:
            d[name] = value
        return orjson.dumps(d)

    return st.one_of(
        st.integers(0, len(data) - 1).map(lambda n: ("truncated", data[:n])),
        st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=6)
        .map(flip).filter(lambda b: b != data).map(lambda b: ("tampered", b)),
        st.tuples(st.sampled_from(JWE_MEMBERS), st.none() | json_values).map(member)
        .filter(lambda b: orjson.loads(b) != doc).map(lambda b: ("member", b)),
        st.binary(max_size=4096).map(lambda b: ("garbage", b)),
        json_values.map(lambda v: ("json", orjson.dumps(v))),
    )


def assert_clear(message: str) -> None:
    assert message and len(message) < 4000 and "Traceback" not in message, message


# --- opinions: the hospital's inbox and `fhirbridge receive` -----------------------------------------------

def test_mutated_opinion_files_are_refused_with_a_reason(world, before):
    @settings(max_examples=EXAMPLES["opinion_bytes"], **SETTINGS)
    @given(mutated(world.good) | mutated(world.filed_opinion))
    def check(sample):
        how, data = sample
        TRIED["opinion file"] += 1
        with pytest.raises(FhirbridgeError) as err:   # SealError or RejectedOpinion, nothing else
            receive_bytes(world.h.app, data, source=f"fuzz-{how}")
        assert isinstance(err.value, (SealError, RejectedOpinion))
        assert_clear(str(err.value))
        if isinstance(err.value, RejectedOpinion):
            TRIED["of which still authentic, refused as a replay"] += 1

    check()


def test_replayed_opinion_is_refused_every_time(world, before, tmp_path):
    path = tmp_path / "replay.jwe"
    path.write_bytes(world.filed_opinion)
    for _ in range(size(5, 20)):
        TRIED["opinion file"] += 1
        with pytest.raises(RejectedOpinion, match="already has its opinion filed"):
            receive_file(world.h.app, path)


def test_oversized_opinion_is_refused_before_any_decryption(world, before, tmp_path, monkeypatch):
    from fhirbridge.crypto import jwe

    def no_decryption(*_a, **_k):
        raise AssertionError("decryption was attempted on an oversized envelope")

    monkeypatch.setattr(jwe, "decrypt_bytes", no_decryption)
    monkeypatch.setattr(jwe, "decrypt_json", no_decryption, raising=False)
    big = tmp_path / "big.jwe"
    big.write_bytes(world.good + b" " * envelope.MAX_OPINION_ENVELOPE_BYTES)
    TRIED["opinion file"] += 1
    with pytest.raises(SealError, match="refusing a .* byte envelope"):
        receive_file(world.h.app, big)
    TRIED["reviewer API"] += 1
    r = world.client.post("/reviewer/opinions", headers=world.reviewer_jwt(),
                          data=world.good + b" " * MAX_OPINION_UPLOAD)
    assert r.status_code == 413 and "at most" in r.get_json()["error"]["message"]


def test_wrong_keys_expiry_fhir_and_patient_are_refused(world, before):
    """Properly sealed opinions with exactly one thing wrong: any checked claim replaced, the document made
    invalid or about someone else, signed or sealed with a key that is not the expected one."""
    good_claims = {"case_id": world.case.id, "package_id": world.opened.claims["package_id"],
                   "patient": world.case.patient, "service_request": world.case.service_request,
                   "iss": world.opened.claims["aud"], "aud": world.opened.claims["iss"]}
    stranger = KeyRing(generate_jwks())
    other = world.h.reviewers["other-center"].key

    claim_change = st.tuples(st.sampled_from(sorted(good_claims) + ["jti", "iat", "exp"]), json_values)
    doc_change = st.sampled_from(["subject", "unknown element", "type", "script", "identifier", "patient entry"])
    keys_change = st.sampled_from(["signed by a stranger", "signed by the other reviewer", "sealed to a stranger"])

    @settings(max_examples=EXAMPLES["opinion_semantic"], **SETTINGS)
    @given(st.one_of(claim_change.map(lambda c: ("claim", c)), doc_change.map(lambda d: ("document", d)),
                     keys_change.map(lambda k: ("keys", k)), st.integers(2, 400).map(lambda d: ("expired", d))),
           st.text(min_size=1, max_size=30))
    def check(change, junk):
        kind, what = change
        kw = {"opened": world.opened}
        if kind == "claim":
            name, value = what
            # A number may be a good iat or exp (an old iat is fine): only those certainly wrong, a day off.
            if name in ("iat", "exp") and isinstance(value, (int, float)) and not isinstance(value, bool):
                assume(value > time.time() + 86_400 if name == "iat" else value < time.time() - 86_400)
            assume(good_claims.get(name, object()) != value)
            if name == "jti":
                kw["claims"] = lambda c: c.update(jti=str(value) if value != c["jti"] else "x")
            else:
                kw["claims"] = lambda c: c.update({name: value})
        elif kind == "expired":
            kw["claims"] = lambda c: c.update(iat=c["iat"] - 86_400 * what, exp=c["iat"] - 86_400 * (what - 1))
        elif kind == "document":
            kw["doc"] = {
                "subject": lambda d: d["entry"][0]["resource"].update(subject={"reference": f"Patient/{uuid.uuid4()}"}),
                "unknown element": lambda d: d["entry"][0]["resource"].update({"x" + junk.replace('"', ""): 1}),
                "type": lambda d: d["entry"][0]["resource"].update(type={"text": junk}),
                "script": lambda d: d["entry"][0]["resource"]["section"][0].update(
                    text={"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><script>'
                                                        f'{junk}</script></div>'}),
                "identifier": lambda d: d.update(identifier={"system": "urn:ietf:rfc:3986",
                                                             "value": f"urn:uuid:{uuid.uuid4()}"}),
                "patient entry": lambda d: [e["resource"].update(id="someone-else") for e in d["entry"]
                                            if e["resource"]["resourceType"] == "Patient"],
            }[what]
        else:
            kw.update({"signed by a stranger": {"signer": stranger}, "signed by the other reviewer": {"signer": other},
                       "sealed to a stranger": {"recipient": KeyRing(stranger.public_jwks())}}[what])
        try:
            data = craft_opinion(world.h, world.case, **kw)
        except (TypeError, ValueError, KeyError, AttributeError):
            assume(False)   # a claim value our own sealing cannot even encode: not an input anyone can send
        TRIED["opinion (sealed, one thing wrong)"] += 1
        with pytest.raises((SealError, RejectedOpinion)) as err:
            receive_bytes(world.h.app, data)
        assert_clear(str(err.value))

    check()


# --- the reviewer API ---------------------------------------------------------------------------------------

def test_mutated_opinions_through_the_reviewer_api_get_a_4xx_with_the_reason(world, before):
    @settings(max_examples=EXAMPLES["opinion_api"], **SETTINGS)
    @given(mutated(world.good), st.sampled_from(["application/jose+json", "application/json", "text/plain", ""]))
    def check(sample, content_type):
        _how, data = sample
        TRIED["reviewer API"] += 1
        r = world.client.post("/reviewer/opinions", headers={**world.reviewer_jwt(), "Content-Type": content_type},
                              data=data)
        assert r.status_code in (400, 409, 413), (r.status_code, r.data[:300])
        assert_clear(r.get_json()["error"]["message"])

    check()


def test_every_api_operation_against_its_openapi_document(world, before):
    """Schemathesis: valid and invalid requests for every operation of /openapi.json (loaded from the app),
    with valid staff and reviewer credentials, straight into the WSGI app. No 5xx, every answer as documented.
    (Driven through hypothesis here: schemathesis' pytest plugin does not run under pytest 9.)"""
    schema = schemathesis.openapi.from_wsgi("/openapi.json", world.client.application)
    schema.config.generation.update(with_security_parameters=False)   # our own valid credentials go with each
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]
    for operation in operations:
        security = operation.definition.raw.get("security") or [{}]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES["api"], **SETTINGS)
            @given(operation.as_strategy(generation_mode=mode))
            def check(case):
                # check() runs (and is done) within this iteration: the loop variables it reads are current.
                headers = {"Authorization": f"Bearer {ADMIN}"} if "staff" in security[0] else \
                    world.reviewer_jwt() if "reviewer" in security[0] else {}  # noqa: B023
                TRIED["staff and reviewer API (schemathesis)"] += 1
                response = case.call_and_validate(headers=headers, checks=checks)
                if operation.path == "/api/orders" and response.status_code == 201:  # noqa: B023
                    world.orders_created += 1
                if response.status_code < 300:
                    TRIED["API requests answered 2xx (valid)"] += 1

            try:
                check()
            except Unsatisfiable:
                assert mode == GenerationMode.NEGATIVE   # nothing to make invalid: no parameters, no body


# --- subscription notifications -----------------------------------------------------------------------------

def _notification(kind: str, count, events) -> dict:
    params = [{"name": "subscription", "valueReference": {"reference": "Subscription/x"}},
              {"name": "status", "valueCode": "active"}, {"name": "type", "valueCode": kind},
              {"name": "events-since-subscription-start", "valueString": count}]
    for number, focus in events:
        params.append({"name": "notification-event",
                       "part": [{"name": "event-number", "valueString": number},
                                {"name": "focus", "valueReference": {"reference": focus}}]})
    return {"resourceType": "Bundle", "type": "history",
            "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": {"resourceType": "Parameters",
                                                                           "parameter": params}}]}


def test_notifications_with_bad_bodies_get_an_operation_outcome_and_open_nothing(world, before):
    texts = st.text(max_size=40)
    notification = st.builds(_notification, st.sampled_from(["event-notification", "heartbeat", "handshake"]) | texts,
                             st.integers(-5, 10**12).map(str) | texts,
                             st.lists(st.tuples(st.integers(-3, 10**9).map(str) | texts,
                                                st.sampled_from(["ServiceRequest/", "Patient/", "", "../"])
                                                .flatmap(lambda p: texts.map(lambda t: p + t))), max_size=25))
    body = st.one_of(notification.map(orjson.dumps), json_values.map(orjson.dumps), st.binary(max_size=2048))

    @settings(max_examples=EXAMPLES["notification"], **SETTINGS)
    @given(body, st.sampled_from([NOTIFY_TOKEN, NOTIFY_TOKEN + "x", None]),
           st.sampled_from(["application/fhir+json", "application/json", "text/plain"]))
    def check(data, token, content_type):
        TRIED["subscription notification"] += 1
        headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
        r = world.client.post(world.notify_path, headers=headers, data=data)
        assert r.status_code in (200, 400, 401, 413, 415), (r.status_code, r.data[:300])
        outcome = r.get_json()
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"], outcome
        if token != NOTIFY_TOKEN:
            assert r.status_code == 401

    check()


# --- config files -------------------------------------------------------------------------------------------

def test_mutated_config_files_load_or_fail_with_one_clear_message(world, before, tmp_path_factory):
    good = world.h.config_path.read_text()
    lines = good.splitlines()
    scalars = st.one_of(st.integers(), st.booleans(), st.text(max_size=20).map(lambda t: orjson.dumps(t).decode()),
                        st.just("[1, 2]"), st.just("{ a = 1 }"), st.just('"/nonexistent/file"'))
    value_line = st.sampled_from([i for i, line in enumerate(lines) if "=" in line and not line.startswith("#")])
    edit = st.one_of(
        st.integers(0, len(lines) - 1).map(lambda i: ("line dropped", "\n".join(lines[:i] + lines[i + 1:]))),
        st.integers(0, len(lines) - 1).map(lambda i: ("line doubled", "\n".join(lines[:i + 1] + lines[i:]))),
        st.tuples(value_line, scalars).map(lambda a: ("value changed", "\n".join(
            lines[:a[0]] + [lines[a[0]].split("=")[0] + "= " + str(a[1]).lower()] + lines[a[0] + 1:]))),
        st.tuples(st.integers(0, len(lines)), st.from_regex(r"[a-z_]{1,12}", fullmatch=True), scalars).map(
            lambda a: ("key added", "\n".join(lines[:a[0]] + [f"{a[1]} = {str(a[2]).lower()}"] + lines[a[0]:]))),
        st.integers(0, len(good)).map(lambda n: ("truncated", good[:n])),
        st.binary(max_size=512).map(lambda b: ("garbage", b.decode("latin-1"))))
    directory = tmp_path_factory.mktemp("configs")
    refused = Counter()

    @settings(max_examples=EXAMPLES["config"], **SETTINGS)
    @given(edit)
    def check(sample):
        how, text = sample
        path = directory / "fhirbridge.toml"
        path.write_text(text, encoding="latin-1" if how == "garbage" else "utf-8")
        TRIED["config file"] += 1
        try:
            config.load(path, environ={})
            TRIED["of which config edits that still load (harmless)"] += 1
        except ConfigError as exc:
            refused[how] += 1
            assert_clear(str(exc))
            assert str(path) in str(exc) or "fhirbridge.toml" in str(exc), str(exc)

    check()
    assert sum(refused.values()) >= EXAMPLES["config"] // 4, refused   # most edits are caught, not ignored


def test_bad_config_through_the_command_exits_non_zero_with_one_message(world, tmp_path, capsys):
    good = world.h.config_path.read_text()
    bad = {"syntax": good.replace("[hospital]", "[hospital", 1),
           "unknown key": good.replace("[hospital]", "[hospital]\nfhir_base_ulr = \"http://x\"", 1),
           "wrong type": re.sub(r"fhir_base_url = \"[^\"]+\"", "fhir_base_url = 42", good, count=1),
           "empty": "", "binary": "\x00\x01\x02"}
    for name, text in bad.items():
        path = tmp_path / f"{name.replace(' ', '-')}.toml"
        path.write_text(text)
        TRIED["config file"] += 1
        assert main(["--config", str(path), "status"]) != 0, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") <= 3, (name, err)


# --- packages: the reviewer's side --------------------------------------------------------------------------

def test_mutated_packages_are_refused_by_the_reviewer(world, tmp_path_factory):
    r = world.h.reviewers["spine-center"]
    source = package_dir(world.h.app, world.case)
    copy = tmp_path_factory.mktemp("pkg") / "p"
    shutil.copytree(source, copy)
    files = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*.jwe"))
    originals = {name: (copy / name).read_bytes() for name in files}

    original = open_package(copy, r.key, r.trusted)

    @settings(max_examples=EXAMPLES["package"], **SETTINGS)
    @given(st.sampled_from(files).flatmap(lambda name: mutated(originals[name]).map(lambda m: (name, m))))
    def check(sample):
        """Refused with the reason, or, when the change left what is authenticated intact (another recipient's
        wrapped key, a non-canonical base64 ending), opened to exactly the same records: never to others."""
        name, (_how, data) = sample
        TRIED["package"] += 1
        (copy / name).write_bytes(data)
        try:
            opened = open_package(copy, r.key, r.trusted)
        except SealError as exc:
            assert_clear(str(exc))
        else:
            assert (opened.claims, opened.document) == (original.claims, original.document)
            TRIED["of which still authentic, same records"] += 1
        finally:
            (copy / name).write_bytes(originals[name])

    check()


# --- nothing was written ------------------------------------------------------------------------------------

def test_bad_input_wrote_nothing(world, before, ehr, figures):
    """After everything above: the same Cases at the same steps, no new event, audit record or opinion file,
    the Tasks untouched and no consult note filed; only the orders the API answered 201 for are new."""
    with FhirClient(ehr.base_url) as fhir:
        after = world.snapshot(fhir)
    new_cases = len(after["cases"]) - len(before["cases"])
    assert new_cases == world.orders_created
    known = {c[0] for c in before["cases"]}
    assert [c for c in after["cases"] if c[0] in known] == before["cases"]
    for key in ("audit", "task_versions", "opinion_files", "consult_notes"):
        assert after[key] == before[key], key
    # The only new events are those of the Cases the accepted orders opened.
    new_events = sum(len(world.h.app.store.events(c[0])) for c in after["cases"] if c[0] not in known)
    assert after["events"] - new_events == before["events"]
    valid = TRIED["API requests answered 2xx (valid)"]
    total = sum(n for k, n in TRIED.items() if not k.startswith(("API requests answered", "of which")))
    harmless = (TRIED["of which config edits that still load (harmless)"]
                + TRIED["of which still authentic, same records"])
    assert total >= size(300, 1000), TRIED
    figures["bad_input"] = {"inputs_tried": total, "by_entry_point": dict(TRIED),
                            "refused": total - valid - harmless, "harmless_edits_accepted_unchanged": harmless,
                            "valid_api_requests_answered_2xx": valid, "orders_created_by_valid_requests":
                            world.orders_created, "partial_writes": 0, "crashes_or_5xx": 0}
