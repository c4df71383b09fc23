"""Two hospitals, each with its own EHR and keys, served by one deployment and one reviewer."""
from __future__ import annotations

import pytest

from fhirbridge.config import loader as config
from fhirbridge.crypto import keys
from fhirbridge.demo.localehr import LocalEhr, referring_physician, seed_patient
from fhirbridge.ehr.order import place_order
from fhirbridge.exchange import envelope
from fhirbridge.exchange.reviewer import answer, open_package, trust_for, write_reviewer_keys
from fhirbridge.fhir.client import FhirClient
from fhirbridge.loop.writeback import OPINION_ID_SYSTEM
from fhirbridge.service.scheduler import Service
from tests.kit.hospital import SAMPLE_ANSWER, unique_mappings
from tests.kit.processes import READY_SECONDS
from tests.kit.sekmet_workflows import run_in_process

pytestmark = pytest.mark.sekmet

HOSPITAL = '''
[[hospitals]]
name = "{name}"
keys = "keys/{slug}.private.jwks.json"
fhir_base_url = "{url}"
[hospitals.identifier]
system = "urn:ietf:rfc:3986"
value = "urn:oid:2.999.5.{n}"
'''


@pytest.fixture(scope="module")
def second_ehr(tmp_path_factory):
    server = LocalEhr.start(tmp_path_factory.mktemp("ehr2"), startup_timeout=READY_SECONDS)
    try:
        run_in_process(server)
        yield server
    finally:
        server.stop()


def test_two_hospitals_one_deployment(tmp_path, ehr, second_ehr, seeded):
    mappings, _code = unique_mappings(tmp_path)
    (tmp_path / "keys").mkdir()
    reviewer_dir = tmp_path / "reviewer"
    rfiles = write_reviewer_keys(reviewer_dir)
    (reviewer_dir / "trusted").mkdir()
    text = f'[fhirbridge]\ndata_dir = "var"\ninbox = "inbox"\nmappings_dir = "{mappings}"\n'
    for n, (name, slug, url) in enumerate((("North Hospital", "north", ehr.base_url),
                                           ("South Hospital", "south", second_ehr.base_url)), 1):
        jwks = keys.generate_jwks()
        keys.write_private_jwks(tmp_path / "keys" / f"{slug}.private.jwks.json", jwks)
        # The reviewer trusts each hospital through its own file (one hospital per file).
        keys.write_public_jwks(reviewer_dir / "trusted" / f"{slug}.jwks.json", keys.public_jwks(jwks))
        text += HOSPITAL.format(name=name, slug=slug, url=url, n=n)
    text += f'''
[[reviewers]]
name = "spine-center"
jwks = "{rfiles['public_keys']}"
profiles = ["spine", "default"]
[reviewers.identifier]
system = "urn:ietf:rfc:3986"
value = "urn:oid:2.999.9.1"
[reviewers.transport]
type = "outbox"
path = "outbox"
'''
    cfg_path = tmp_path / "fhirbridge.toml"
    cfg_path.write_text(text)
    cfg = config.load(cfg_path)
    assert list(cfg.hospitals) == ["North Hospital", "South Hospital"]

    with FhirClient(second_ehr.base_url) as south_client:
        south_patient = seed_patient(second_ehr, south_client, family="Southern")["patient"]
    svc = Service(cfg)
    try:
        north, south = svc.apps
        north_sr = place_order(north, patient=seeded["patient"], question="North asks", profile="spine",
                               requester=seeded["physician"])
        south_sr = place_order(south, patient=south_patient, question="South asks", profile="spine",
                               requester=referring_physician(south.ehr))
        svc.tick_poll()
        svc.tick_work()
        north_case = svc.store.find_by_order(north.hospital.key, f"ServiceRequest/{north_sr['id']}")
        south_case = svc.store.find_by_order(south.hospital.key, f"ServiceRequest/{south_sr['id']}")
        assert north_case.step == south_case.step == "await_opinion"
        # Each hospital took in only its own EHR's order.
        assert {c.hospital for c in svc.store.list_cases()} == {north.hospital.key, south.hospital.key}
        assert len(svc.store.list_cases()) == 2

        key = keys.KeyRing.load(rfiles["private_keys"])
        trust = trust_for(rfiles["private_keys"], None)       # the trusted/ directory, one file per hospital
        for case, slug in ((north_case, "north"), (south_case, "south")):
            opened = open_package(tmp_path / "outbox" / case.package_id, key, trust)
            sender = envelope.party(opened.claims, "iss")
            assert sender["value"] == svc.app_for_key(case.hospital).hospital.identifier_value
            assert opened.hospital.source.endswith(f"{slug}.jwks.json")
            answer_file = tmp_path / "answer.toml"
            answer_file.write_text(SAMPLE_ANSWER)
            sealed, claims = answer(opened, answer_file, key, mappings_dir=mappings)
            (tmp_path / "inbox").mkdir(exist_ok=True)
            (tmp_path / "inbox" / f"{slug}.jwe").write_bytes(sealed)

        svc.tick_inbox()                                      # one shared inbox; each opinion finds its hospital
        svc.tick_work()
        for case, base in ((north_case, ehr.base_url), (south_case, second_ehr.base_url)):
            case = svc.store.get(case.id)
            assert case.step == "done", case.last_error
            with FhirClient(base) as client:
                docs = [d for d in client.search("DocumentReference",
                                                 {"identifier": f"{OPINION_ID_SYSTEM}|urn:uuid:{case.opinion_id}"})
                        if d["resourceType"] == "DocumentReference"]
                assert len(docs) == 1 and docs[0]["subject"]["reference"] == case.patient
    finally:
        svc.stop()
