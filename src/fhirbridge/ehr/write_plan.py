"""Which way the opinion is filed on this EHR, chosen from its capabilities; every plan files exactly once.

- ATOMIC: one transaction of PUTs to derived ids + POST Provenance + PUT Task (If-Match); needs an atomic
  transaction and update-as-create.
- LEDGER: POST one resource at a time (the note with the document inline, its Provenance; then PUT the Task),
  each recorded in the store's write ledger with its business identifier before it is sent, and reconciled
  after a lost answer by searching that identifier, never by a blind re-POST.
- ONCE: POST-only with no way to find what was written (no identifier search): POST once; any uncertain
  outcome stops the Case in `needs_review` with the question for a person.
Independently, `task_write` False means the Case's status lives in fhirbridge, not in an EHR Task.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from fhirbridge.ehr.capabilities import Capabilities


class Kind(enum.Enum):
    ATOMIC = "atomic transaction"
    LEDGER = "POST with a write ledger, reconciled by identifier search"
    ONCE = "POST once; an uncertain outcome goes to a person (needs_review)"


@dataclass(frozen=True)
class WritePlan:
    kind: Kind
    task_write: bool
    capabilities: Capabilities

    @property
    def writes(self) -> tuple[tuple[str, str], ...]:
        """(resource type, interaction) pairs this plan's write-back makes: the SMART scopes follow them."""
        c = self.capabilities
        if self.kind is Kind.ATOMIC:
            # No Provenance search: only a server that turns out not to be atomic makes the retry look for the
            # Provenance it kept (loop/writeback.py); such an EHR belongs on LEDGER (transaction_atomic false).
            pairs = [("Binary", "update"), ("DocumentReference", "update"), ("Provenance", "create")]
        else:
            # No Binary: without update-as-create the document travels inline in the note (loop/post_writes.py).
            pairs = [("DocumentReference", "create"), ("Provenance", "create")]
            if c.docref_identifier_search:
                pairs.append(("DocumentReference", "search"))
            if c.provenance_target_search:
                pairs.append(("Provenance", "search"))
        pairs += [("Task", "read"), ("DocumentReference", "read")]
        if self.task_write:
            pairs.append(("Task", "update"))
        return tuple(pairs)


    @property
    def followup_writes(self) -> tuple[tuple[str, str], ...]:
        """What the follow-ups make on this plan (loop/followup.py): the Communication and the notes (addenda,
        corrections) with their Provenance; the order is read for its requester."""
        c = self.capabilities
        pairs = [("ServiceRequest", "read"), ("DocumentReference", "read")]
        if self.kind is Kind.ATOMIC:
            pairs += [("Communication", "update"), ("Binary", "update"), ("DocumentReference", "update"),
                      ("Provenance", "create")]
        else:
            pairs += [("Communication", "create"), ("DocumentReference", "create"), ("Provenance", "create")]
            if self.kind is Kind.LEDGER:
                pairs += [("Communication", "search"), ("DocumentReference", "search")]
                if c.provenance_target_search:
                    pairs.append(("Provenance", "search"))
        return tuple(pairs)


def choose(caps: Capabilities) -> WritePlan:
    if caps.transaction and caps.transaction_atomic and caps.update_create:
        kind = Kind.ATOMIC
    elif caps.docref_identifier_search:
        kind = Kind.LEDGER
    else:
        kind = Kind.ONCE
    return WritePlan(kind, caps.task_write, caps)
