"""Reading a CapabilityStatement as plain facts: sekmet's real one, and what a statement leaves out."""
from __future__ import annotations

import pytest

from fhirbridge.fhir.capability_statement import parse

pytestmark = pytest.mark.sekmet


def test_sekmets_statement_is_read_as_it_says(fhir):
    s = parse(fhir.capabilities())
    assert s.fhir_version.startswith("4.0")
    assert {"transaction", "batch"} <= s.interactions
    docref = s.resource("DocumentReference")
    assert docref is not None and docref.update_create and docref.conditional_create
    assert {"create", "update", "read", "search-type"} <= docref.interactions
    assert "identifier" in docref.search_params
    assert s.resource("Task").versioning == "versioned-update"
    assert "target" in s.resource("Provenance").search_params
    assert s.offers("Task", "create") is True


def test_a_type_the_statement_leaves_out_is_not_stated_rather_than_refused(fhir):
    s = parse(fhir.capabilities())
    assert s.resource("Binary") is None          # sekmet serves Binary without listing it
    assert s.offers("Binary", "update") is None


def test_absent_elements_are_not_offered_and_a_non_statement_is_refused():
    s = parse({"resourceType": "CapabilityStatement", "rest": [
        {"mode": "client", "interaction": [{"code": "transaction"}]},
        {"mode": "server", "resource": [{"type": "DocumentReference", "interaction": [{"code": "create"}]}]}]})
    assert s.interactions == frozenset()           # the client part says nothing about the server
    docref = s.resource("DocumentReference")
    assert docref.interactions == {"create"} and not docref.update_create and not docref.conditional_create
    assert docref.versioning == "" and docref.search_params == frozenset()
    with pytest.raises(ValueError):
        parse({"resourceType": "OperationOutcome"})
