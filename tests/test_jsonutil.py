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


@pytest.mark.parametrize("value", [
    {"div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">ratio:1.5, [2e5] ,null]</div>", "v": 7.0},
    {"a": ["x\\", 1e21, "\\\"y:1.0,", -0.0, 1e-7, [0.1, {"b": 100.0}]], "s": "\\\\\":2.5}"},
    {"k": "x:1.5,", "n": 3},
    {"k": None, "f": 1.25},
    {"k": [None, "given"], "_k": [{"id": "e1"}, None]},
    1.0,
    None,
    ["\\", "\"", 12.5],
])
def test_floats_nulls_and_look_alikes_inside_strings_match_the_reference(value):
    assert canonical(value) == rfc8785.dumps(value)


def test_a_document_without_floats_or_nulls_is_not_walked(monkeypatch):
    """Issue 19 goal 2: the Python walk of a large document was most of the seal; orjson's sorted output is
    final when a C-speed scan finds no float, null or character beyond the BMP."""
    from fhirbridge import jsonutil

    def no_walk(*_a, **_k):
        raise AssertionError("the value was walked in Python")

    monkeypatch.setattr(jsonutil, "_prepare", no_walk)
    doc = {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Observation", "id": f"o{i}",
                                                             "effectiveDateTime": "2020-01-01T12:30:00.000Z",
                                                             "code": {"text": "urn:oid:2.16.840.1 \"q\""},
                                                             "valueInteger": i}} for i in range(50)]}
    assert canonical(doc) == rfc8785.dumps(doc)
    with_float = {**doc, "total": 2.5}
    assert canonical(with_float) == rfc8785.dumps(with_float)   # floats rewritten by token, still no walk


@pytest.mark.parametrize("entries", [0, 1, 255, 256, 257, 1000])
def test_canonical_and_plain_chunks_join_to_the_whole(entries):
    from fhirbridge import jsonutil

    doc = {"resourceType": "Bundle", "type": "document", "id": "d",
           "entry": [{"fullUrl": f"urn:uuid:{i}", "resource": {"resourceType": "Observation", "id": f"o{i}",
                                                               "valueQuantity": {"value": i / 4}}}
                     for i in range(entries)], "timestamp": "2025-01-01T00:00:00Z",
           "z": [], "y": {}, "x": [{"b": [1.5, {"é": None}], "a": {"text": {"div": "é" * 300}}}]}
    doc["entry"][:0] = [{"resource": {"resourceType": "Composition", "section": [
        {"title": f"s{j}", "text": {"div": "<div>" + "line 2.5,\n" * 500 + "</div>"}, "entry": [{"reference": "x"}]}
        for j in range(3)]}}]
    assert b"".join(jsonutil.canonical_chunks(doc)) == rfc8785.dumps(doc)
    assert json.loads(b"".join(jsonutil.dumps_chunks(doc))) == doc
    assert b"".join(jsonutil.canonical_chunks({})) == b"{}"
    assert b"".join(jsonutil.canonical_chunks([1.0, None])) == rfc8785.dumps([1.0, None])
