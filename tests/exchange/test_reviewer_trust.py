"""The reviewer trusts each hospital on its own: a package is verified with one hospital's keys only and the
opinion is sealed only to the hospital that signed the package; trust files and directories, and the CLI with a
trust directory. None of this needs the EHR."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhirbridge.cli import main as cli
from fhirbridge.config import loader as config
from fhirbridge.crypto import jwe
from fhirbridge.crypto.keys import generate_jwks, write_private_jwks, write_public_jwks
from fhirbridge.errors import ConfigError, SealError
from fhirbridge.exchange.reviewer import TrustStore, answer, open_package, trust_for
from tests.kit.packages import Site, make_package

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
    # The sender is the trust entry that verified it, by the reviewer's name for it (its file, hospital-a).
    assert "signature: valid, by the keys of the trusted hospital hospital-a\n" in out
    answer_file = tmp_path / "answer.toml"
    answer_file.write_text(ANSWER, encoding="utf-8")
    out_file = tmp_path / "opinion.jwe"
    code, out, err = run(capsys, "reviewer", "answer", pkg, "--key", sites["key_file"], "--trust",
                         sites["trusted_dir"], "--opinion", answer_file, "--out", out_file)
    assert code == 0, err
    assert recipient_kids(out_file.read_bytes()) == {k.kid for k in a.public.encryption_keys()}


def test_the_sender_is_the_trusted_entry_that_verified_the_package_not_its_own_claim(sites, tmp_path, capsys):
    """S12 (issue 13): hospital A signs a package that calls its sender "Hospital B" (another hospital the
    reviewer trusts). The reviewer is shown the trust entry whose keys verified it, hospital-a; the claimed
    name appears only marked as unverified."""
    pkg = make_package(tmp_path / "in", sites["a"].private, sites["reviewer_public"], sender="Hospital B")
    opened = open_package(pkg, sites["key"], TrustStore.load(sites["trusted_dir"]))
    assert opened.sender == 'hospital-a (calls itself "Hospital B": not verified)'
    code, out, err = run(capsys, "reviewer", "open", pkg, "--key", sites["key_file"])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == 'signature: valid, by the keys of the trusted hospital hospital-a (calls itself "Hospital B": ' \
                       'not verified)'
    sender_line = next(line for line in lines if line.startswith("From: "))
    assert sender_line.startswith('From: hospital-a (calls itself "Hospital B": not verified)')
    assert all("Hospital B" not in line or "not verified" in line for line in lines)
    # A package that names itself as the reviewer named it shows that name alone.
    honest = make_package(tmp_path / "in", sites["a"].private, sites["reviewer_public"], name="pkg-2",
                          sender="Hospital A")
    assert open_package(honest, sites["key"], TrustStore.load(sites["trusted_dir"])).sender == "hospital-a"
