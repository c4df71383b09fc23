"""The fast RFC 8785 canonical form must equal the reference implementation's, byte for byte: a signature
made over one and checked over the other would fail (or, worse, two forms of one document would exist)."""
from __future__ import annotations

import json
import random

import pytest
import rfc8785

from fhirbridge.jsonutil import canonical

ALPHABET = ["a", "Z", "0", " ", "\"", "\\", "\x00", "\x01", "\x1f", "\b", "\t", "\n", "\f", "\r", "\x7f", "é",
            "\u2028", "\u2029", "€", "😀", "\ud7ff", "/", "<"]


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-(2 ** 53) + 1, 2 ** 53 - 1)
    if kind == 2:
        return rng.choice([0.0, -0.0, 1.0, 0.1, 1e21, 1e-7, 1e-6, 123.456, 5e-324, 1.7976931348623157e308,
                           rng.uniform(-1e6, 1e6), rng.random() * 10 ** rng.randint(-30, 30)])
    if kind in (3, 4, 5):
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(12)))
    if kind in (6, 7):
        keys = ["".join(rng.choice("abcXYZ_1é") for _ in range(rng.randrange(1, 6))) for _ in range(rng.randrange(6))]
        return {k: _random_value(rng, depth + 1) for k in keys}
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(6))]


def test_random_values_match_the_reference():
    rng = random.Random(8785)
    for _ in range(3000):
        value = _random_value(rng)
        assert canonical(value) == rfc8785.dumps(value), value


@pytest.mark.parametrize("value", [2 ** 60, float("nan"), float("inf")])
def test_what_the_reference_refuses_is_refused(value):
    with pytest.raises(rfc8785.CanonicalizationError):
        canonical({"v": value})


def test_every_shared_example_matches_the_reference(testdata_dir):
    files = sorted((testdata_dir / "hl7-r4-examples").rglob("*.json"))[:400] + \
        sorted((testdata_dir / "synthea-r4").glob("*.json"))[:6]
    assert files
    for path in files:
        value = json.loads(path.read_text(encoding="utf-8"))
        assert canonical(value) == rfc8785.dumps(value), path.name
