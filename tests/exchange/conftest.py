"""Fixtures of the exchange tests: a reviewer with two trusted hospitals (tests/kit/packages.py)."""
from __future__ import annotations

import pytest

from fhirbridge.crypto.keys import KeyRing
from fhirbridge.exchange.reviewer import write_reviewer_keys
from tests.kit.packages import Site


@pytest.fixture
def sites(tmp_path):
    reviewer_dir = tmp_path / "reviewer"
    files = write_reviewer_keys(reviewer_dir, None)
    trusted = reviewer_dir / "trusted"
    a, b = Site(trusted, "hospital-a"), Site(trusted, "hospital-b")
    return {"a": a, "b": b, "key_file": files["private_keys"], "key": KeyRing.load(files["private_keys"]),
            "reviewer_public": KeyRing.load(files["public_keys"]), "trusted_dir": trusted, "root": tmp_path}
