"""`hospital.certificate_chain` (the x5c of the signing key, Da Vinci CDex): read from the file, and checked
by `check_files` to belong to the hospital's signing key."""
from __future__ import annotations

from fhirbridge.config import loader as config
from fhirbridge.config.starter import write_starter
from fhirbridge.crypto import keys
from fhirbridge.crypto.keys import KeyRing
from tests.kit.certs import make_ca, make_leaf, write_pem


def _site(tmp_path, chain_name: str):
    paths = write_starter(tmp_path)
    text = paths["config"].read_text().replace(
        "# certificate_chain = \"keys/hospital-signing-chain.pem\"", f'certificate_chain = "{chain_name}"')
    paths["config"].write_text(text)
    return paths


def test_a_chain_for_the_signing_key_loads_and_checks_clean(tmp_path):
    paths = _site(tmp_path, "keys/chain.pem")
    ca = make_ca()
    signing = KeyRing.load(paths["private_keys"]).signing_key()
    write_pem(tmp_path / "keys" / "chain.pem", make_leaf(ca, signing.public_key), ca[1])
    cfg = config.load(paths["config"], environ={})
    assert cfg.hospital.certificate_chain == tmp_path / "keys" / "chain.pem"
    assert config.check_files(cfg) == []


def test_a_chain_for_another_key_is_a_configuration_problem(tmp_path):
    paths = _site(tmp_path, "keys/chain.pem")
    ca = make_ca()
    other = KeyRing(keys.generate_jwks()).signing_key()
    write_pem(tmp_path / "keys" / "chain.pem", make_leaf(ca, other.public_key), ca[1])
    problems = config.check_files(config.load(paths["config"], environ={}))
    assert len(problems) == 1 and "hospital.certificate_chain" in problems[0]
    assert "does not hold the signing key" in problems[0]
