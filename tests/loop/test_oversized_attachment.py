"""An attachment over `max_attachment_bytes` (docs/configure.md says what happens, and this is it): the Case
fails at seal with an error naming the Binary and the limit, nothing is sent, and after the limit is raised
`fhirbridge retry` sends it. Against the real EHR: the seeded patient's procedure note is a ~300 KB PDF."""
from __future__ import annotations

import re

import pytest

from fhirbridge.loop.actions import retry

pytestmark = pytest.mark.sekmet


def test_an_oversized_attachment_fails_the_case_at_seal_until_the_limit_is_raised(hospital, seeded):
    h = hospital
    text = h.config_path.read_text()
    h.config_path.write_text(re.sub(r"max_attachment_bytes = \d+", "max_attachment_bytes = 1000", text))
    h.app.close()
    h.app = h.new_app()
    sr = h.order(seeded["patient"])
    h.run()
    case = h.case_for(sr)
    assert case.step == "failed" and case.data["failed_step"] == "seal"
    assert re.search(r"Binary/\S+.*larger than the limit of 1000 bytes", case.last_error), case.last_error
    outbox = h.root / "outbox" / "spine-center"
    assert not outbox.exists() or not any(outbox.iterdir())
    h.config_path.write_text(text)
    h.app.close()
    h.app = h.new_app()
    retry(h.app, case)
    h.run(intake=False)
    assert h.app.store.get(case.id).step == "await_opinion"
