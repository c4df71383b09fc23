"""A server that ADVERTISES something else: the real sekmet behind the fault proxy, its CapabilityStatement edited
on the way out (GET [base]/metadata). Only what the statement says changes; what sekmet does stays as it is (the
EHR-behaviour proxy that also refuses what the statement leaves out is another kit module).

    advertise(proxy, no_transaction, no_task_write)      # edits applied in order to the parsed statement
"""
from __future__ import annotations

import json
from collections.abc import Callable

from tests.kit.faultproxy import FaultProxy, Rule

Edit = Callable[[dict], None]


def advertise(proxy: FaultProxy, *edits: Edit) -> Rule:
    """Serve sekmet's statement with `edits` applied, on every GET metadata through `proxy`."""
    def rewrite(body: bytes) -> bytes:
        statement = json.loads(body)
        for edit in edits:
            edit(statement)
        return json.dumps(statement).encode()
    return proxy.add(method="GET", path=r"/metadata(\?|$)", action="rewrite", rewrite=rewrite)


def _server(statement: dict) -> dict:
    return next(r for r in statement["rest"] if r.get("mode") == "server")


def _resource(statement: dict, type_: str) -> dict:
    return next(r for r in _server(statement)["resource"] if r["type"] == type_)


def no_transaction(statement: dict) -> None:
    """rest.interaction without `transaction`."""
    rest = _server(statement)
    rest["interaction"] = [i for i in rest.get("interaction", []) if i.get("code") != "transaction"]


def no_update_create(statement: dict) -> None:
    """updateCreate false on DocumentReference (and Binary, were it listed)."""
    for r in _server(statement)["resource"]:
        if r["type"] in ("DocumentReference", "Binary"):
            r["updateCreate"] = False


def no_identifier_search(statement: dict) -> None:
    """DocumentReference without the `identifier` search parameter."""
    r = _resource(statement, "DocumentReference")
    r["searchParam"] = [p for p in r.get("searchParam", []) if p.get("name") != "identifier"]


def no_task_write(statement: dict) -> None:
    """Task offers read and search only."""
    r = _resource(statement, "Task")
    r["interaction"] = [i for i in r.get("interaction", []) if i.get("code") not in ("create", "update", "patch")]
