"""Bad packages and opinions get a clear error, and nothing is lost or written.

Each opinion rejection asserts three things: the error says why, the Case is still awaiting its opinion,
and the EHR got nothing (no DocumentReference for the opinion, Task unchanged).
"""
from __future__ import annotations

import shutil
import uuid

import pytest

from fhirbridge.crypto.keys import KeyRing, generate_jwks
from fhirbridge.errors import RejectedOpinion, SealError
from fhirbridge.exchange.reviewer import open_package
from fhirbridge.loop.receive import process_inbox, receive_bytes, receive_file
from tests.kit.hospital import SAMPLE_ANSWER, craft_opinion

pytestmark = pytest.mark.sekmet


@pytest.fixture
def hospital(two_reviewers):
    return two_reviewers


@pytest.fixture
def case(hospital, seeded):
    return hospital.delivered_case(seeded["patient"])


def _flip(data: bytes, at: int) -> bytes:
    """Change one base64url character (to another valid one) at `at`."""
    b = bytearray(data)
    b[at] = ord("A") if b[at] != ord("A") else ord("B")
    return bytes(b)


def _ciphertext_offset(data: bytes) -> int:
    return data.index(b'"ciphertext":"') + len(b'"ciphertext":"') + 10


def assert_nothing_written(hospital, case, fhir, task_version):
    fresh = hospital.app.store.get(case.id)
    assert fresh.step == "await_opinion" and fresh.opinion_id is None
    assert fhir.read_ref(case.task)["meta"]["versionId"] == task_version
    assert not (hospital.app.case_dir(case.id) / "opinion.jwe").exists()


@pytest.fixture
def task_version(case, fhir):
    return fhir.read_ref(case.task)["meta"]["versionId"]


# --- packages (the reviewer's side) -------------------------------------------------------------

def test_tampered_package_is_refused(hospital, case, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(hospital.package_path(case), copy)
    env = copy / "package.jwe"
    env.write_bytes(_flip(env.read_bytes(), _ciphertext_offset(env.read_bytes())))
    r = hospital.reviewers["spine-center"]
    with pytest.raises(SealError, match="integrity check failed"):
        open_package(copy, r.key, r.trusted)


def test_truncated_package_is_refused(hospital, case, tmp_path):
    copy = tmp_path / "truncated"
    shutil.copytree(hospital.package_path(case), copy)
    env = copy / "package.jwe"
    env.write_bytes(env.read_bytes()[: env.stat().st_size // 2])
    r = hospital.reviewers["spine-center"]
    with pytest.raises(SealError, match="truncated"):
        open_package(copy, r.key, r.trusted)


def test_tampered_attachment_file_is_refused(hospital, case, tmp_path):
    copy = tmp_path / "att"
    shutil.copytree(hospital.package_path(case), copy)
    att = next((copy / "attachments").glob("*.jwe"))
    att.write_bytes(_flip(att.read_bytes(), _ciphertext_offset(att.read_bytes())))
    r = hospital.reviewers["spine-center"]
    with pytest.raises(SealError):
        open_package(copy, r.key, r.trusted)


def test_package_opened_with_another_reviewers_key_is_refused(hospital, case):
    other = hospital.reviewers["other-center"]
    with pytest.raises(SealError, match="none of which"):
        open_package(hospital.package_path(case), other.key, other.trusted)


def test_package_from_an_untrusted_hospital_is_refused(hospital, case):
    r = hospital.reviewers["spine-center"]
    stranger = KeyRing(generate_jwks())
    with pytest.raises(SealError, match="not a trusted key"):
        open_package(hospital.package_path(case), r.key, KeyRing(stranger.public_jwks()))


# --- opinions (the hospital's side) -------------------------------------------------------------

def test_tampered_opinion_is_refused(hospital, case, fhir, task_version):
    data = hospital.answer(case).read_bytes()
    with pytest.raises(SealError, match="integrity check failed"):
        receive_bytes(hospital.app, _flip(data, _ciphertext_offset(data)))
    assert_nothing_written(hospital, case, fhir, task_version)


def test_truncated_opinion_is_refused(hospital, case, fhir, task_version):
    data = hospital.answer(case).read_bytes()
    with pytest.raises(SealError, match="truncated"):
        receive_bytes(hospital.app, data[: len(data) - 40])
    assert_nothing_written(hospital, case, fhir, task_version)


def test_opinion_sealed_to_another_key_is_refused(hospital, case, fhir, task_version):
    elsewhere = KeyRing(KeyRing(generate_jwks()).public_jwks())
    with pytest.raises(SealError, match="none of which"):
        receive_bytes(hospital.app, craft_opinion(hospital, case, recipient=elsewhere))
    assert_nothing_written(hospital, case, fhir, task_version)


def test_opinion_signed_by_another_reviewer_is_refused(hospital, case, fhir, task_version):
    other = hospital.reviewers["other-center"]
    with pytest.raises(RejectedOpinion, match="^the opinion is not signed by the reviewer of a Case"):
        receive_bytes(hospital.app, craft_opinion(hospital, case, signer=other.key))
    assert_nothing_written(hospital, case, fhir, task_version)


def test_opinion_for_an_unknown_case_is_refused(hospital, case, fhir, task_version):
    data = craft_opinion(hospital, case, claims=lambda c: c.update(case_id=str(uuid.uuid4())))
    with pytest.raises(RejectedOpinion, match="an unknown Case"):
        receive_bytes(hospital.app, data)
    assert_nothing_written(hospital, case, fhir, task_version)


def test_an_unknown_case_and_another_reviewers_case_get_one_refusal(hospital, case, fhir, task_version):
    """S9 (issue 13): whoever uploads an opinion learns neither which Cases exist nor who holds them, nor
    where the hospital keeps its key files: an unknown Case and another reviewer's Case are refused with one
    text and one kind (one HTTP status), naming no reviewer, no Case and no file."""
    other = hospital.reviewers["other-center"]
    unknown = craft_opinion(hospital, case, signer=other.key, claims=lambda c: c.update(case_id=str(uuid.uuid4())))
    foreign = craft_opinion(hospital, case, signer=other.key)    # spine-center's Case, signed by other-center
    refusals = []
    for data in (unknown, foreign):
        with pytest.raises(RejectedOpinion) as refused:
            receive_bytes(hospital.app, data, source="uploaded opinion")
        refusals.append((type(refused.value), str(refused.value)))
    assert refusals[0] == refusals[1]
    text = refusals[0][1]
    spine = hospital.app.config.reviewer("spine-center")
    for secret in (spine.name, spine.display, spine.identifier_value, case.id[:8], str(hospital.root), "jwks",
                   "/"):
        assert secret not in text, secret
    assert_nothing_written(hospital, case, fhir, task_version)


def test_opinion_for_an_already_filed_case_is_refused(hospital, case, fhir):
    receive_file(hospital.app, hospital.answer(case))
    hospital.run(intake=False)
    assert hospital.app.store.get(case.id).step == "done"
    second = craft_opinion(hospital, case)            # a different opinion, properly sealed
    version = fhir.read_ref(case.task)["meta"]["versionId"]
    with pytest.raises(RejectedOpinion, match="already has its opinion filed"):
        receive_bytes(hospital.app, second)
    assert fhir.read_ref(case.task)["meta"]["versionId"] == version


def test_replayed_opinion_is_refused_while_filing(hospital, case):
    data = hospital.answer(case).read_bytes()
    receive_bytes(hospital.app, data)                 # accepted; the file step has not run yet
    with pytest.raises(RejectedOpinion, match="already received"):
        receive_bytes(hospital.app, data)


def test_expired_opinion_is_refused(hospital, case, fhir, task_version):
    data = craft_opinion(hospital, case, claims=lambda c: c.update(iat=c["iat"] - 90_000, exp=c["iat"] - 86_400))
    with pytest.raises(SealError, match="expired"):
        receive_bytes(hospital.app, data)
    assert_nothing_written(hospital, case, fhir, task_version)


def test_opinion_with_invalid_fhir_is_refused(hospital, case, fhir, task_version):
    def break_it(doc):
        doc["entry"][0]["resource"]["statusReason"] = "not an element of Composition"
    with pytest.raises(RejectedOpinion, match="not valid FHIR") as err:
        receive_bytes(hospital.app, craft_opinion(hospital, case, doc=break_it))
    assert "Composition" in str(err.value)
    assert_nothing_written(hospital, case, fhir, task_version)


def test_opinion_about_another_patient_is_refused(hospital, case, fhir, task_version):
    def other_patient(doc):
        doc["entry"][0]["resource"]["subject"] = {"reference": "Patient/someone-else"}
    with pytest.raises(RejectedOpinion, match="different patient"):
        receive_bytes(hospital.app, craft_opinion(hospital, case, doc=other_patient))
    assert_nothing_written(hospital, case, fhir, task_version)


def test_opinion_answering_another_package_is_refused(hospital, case, fhir, task_version):
    data = craft_opinion(hospital, case, claims=lambda c: c.update(package_id=str(uuid.uuid4())))
    with pytest.raises(RejectedOpinion, match="answers package"):
        receive_bytes(hospital.app, data)
    assert_nothing_written(hospital, case, fhir, task_version)


def test_inbox_keeps_refused_files_with_their_reason_and_files_good_ones(hospital, case, fhir):
    inbox = hospital.app.config.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    good = hospital.answer(case)
    shutil.copy(good, inbox / "good.jwe")
    (inbox / "bad.jwe").write_bytes(b'{"protected":"garbage"}')
    result = process_inbox(hospital.app)
    assert len(result.accepted) == 1 and len(result.refused) == 1 and not result.deferred
    assert (inbox / "refused" / "bad.jwe").exists()
    assert "refused" in (inbox / "refused" / "bad.jwe.reason.txt").read_text()
    assert (inbox / "accepted" / "good.jwe").exists()
    hospital.run(intake=False)
    assert hospital.app.store.get(case.id).step == "done"


def test_bad_answer_file_lists_every_problem(hospital, case, tmp_path):
    bad = SAMPLE_ANSWER.replace('concordance = "concordant"', 'concordance = "maybe"').replace(
        'urgency = "routine"\n', "")
    from fhirbridge.exchange.opinion import AnswerError
    with pytest.raises(AnswerError) as err:
        hospital.answer(case, bad)
    text = str(err.value)
    assert "concordance: 'maybe' is not one of: concordant, partially-concordant, discordant" in text
    assert "urgency: required" in text


def test_opinion_claimed_by_a_killed_worker_is_put_back_at_once(hospital, case):
    """A worker killed (SIGKILL) while receiving leaves the opinion in inbox/processing/: the next pass puts it
    back at once when the claiming process was on this host and is gone (it used to wait ten minutes), and
    leaves alone a file held by a live process or by another host until the ten minutes are up."""
    import subprocess

    from fhirbridge.loop.receive import _HOST_TAG
    dead = subprocess.Popen(["true"], start_new_session=True)
    dead.wait()
    processing = hospital.app.config.inbox / "processing"
    processing.mkdir(parents=True)
    shutil.copy(hospital.answer(case), processing / f"good.jwe.{_HOST_TAG}-{dead.pid}-abc123")
    (processing / f"live.jwe.{_HOST_TAG}-1-abc123").write_bytes(b"{}")      # pid 1 lives
    (processing / f"far.jwe.0badc0de-{dead.pid}-abc123").write_bytes(b"{}")  # another host's claim
    assert not process_inbox(hospital.app).accepted          # put back at the end of this pass...
    assert (hospital.app.config.inbox / "good.jwe").exists()
    assert len(process_inbox(hospital.app).accepted) == 1     # ...and received by the next
    assert sorted(p.name.partition(".")[0] for p in processing.iterdir()) == ["far", "live"]


@pytest.mark.parametrize("claim, value, error, words", [
    ("aud", True, RejectedOpinion, "addressed to another hospital"),
    ("iss", {"value": 7}, RejectedOpinion, "says it is from None"),
    # iss is a URI now (RFC 7519 StringOrURI); one that contradicts its own iss_org is refused.
    ("iss", "urn:oid:2.999.9.2", SealError, "iss_org names another organisation"),
    ("exp", None, SealError, "exp is not a NumericDate"),
    ("iat", False, SealError, "iat is not a NumericDate"),
])
def test_signed_claims_of_the_wrong_type_are_refused_not_a_crash(hospital, case, fhir, task_version, claim, value,
                                                                  error, words):
    """Found by the bad-input suite: a claim of the wrong JSON type crashed receive (AttributeError,
    TypeError), which kept the file in the inbox for ever, or was taken as a time (false is 1970)."""
    with pytest.raises(error, match=words):
        receive_bytes(hospital.app, craft_opinion(hospital, case, claims=lambda c: c.update({claim: value})))
    assert_nothing_written(hospital, case, fhir, task_version)
