"""A Case's history as a person reads it: what happened, when, by whom, and for each error what to do.

Built from the store's events (kind + detail). The sentence per kind is here, the fix per error in fixes.py;
an event kind this table does not know is shown by its name, so nothing recorded is ever hidden.
"""
from __future__ import annotations

from dataclasses import dataclass

from fhirbridge.ui.fixes import fix_for

SERVICE, REVIEWER, EHR, STAFF = "fhirbridge", "the reviewer", "the EHR", "staff"

# kind -> (what happened, who did it, tone: "" | "ok" | "warn" | "bad")
KINDS: dict[str, tuple[str, str, str]] = {
    "opened": ("Order taken in; Case opened", SERVICE, ""),
    "task.created": ("Referral Task created in the EHR", SERVICE, ""),
    "adopted": ("An existing referral Task in the EHR was adopted", SERVICE, ""),
    "collect.done": ("Records collected from the EHR", SERVICE, "ok"),
    "seal.done": ("Package sealed (signed and encrypted to the reviewer)", SERVICE, "ok"),
    "deliver.done": ("Package delivered to the reviewer", SERVICE, "ok"),
    "records.requested": ("The reviewer asked for more records", REVIEWER, "warn"),
    # Issue 16 parts 2 and 6: the physician's answer and the supplement; the packet's checklist.
    "records.answered": ("The physician answered the request for more records", STAFF, ""),
    "records.document": ("The physician's document was filed in the chart", SERVICE, "ok"),
    "supplement.done": ("Supplement package sealed and delivered (records added on request)", SERVICE, "ok"),
    "checklist.held": ("Held: records the reviewer needs are missing", SERVICE, "warn"),
    "checklist.confirmed": ("Sent without the missing records, confirmed by the physician", STAFF, "warn"),
    "opinion.received": ("Second opinion received", REVIEWER, "ok"),
    # Issue 16 parts 3 and 5: the conversation after the opinion (loop/followup.py); the texts stay in the EHR.
    "followup.asked": ("The physician asked the reviewer a follow-up question", STAFF, ""),
    "followup.sent": ("Follow-up question written to the chart (Communication) and sent to the reviewer",
                      SERVICE, "ok"),
    "followup.answered": ("The reviewer answered a follow-up question", REVIEWER, "ok"),
    "followup.filed": ("The answer was filed in the chart as an addendum to the opinion note", SERVICE, "ok"),
    "followup.needs_review": ("A person must check the chart before the follow-up is written again", SERVICE,
                              "warn"),
    "question.needs_review": ("A person must check the chart before the answer is filed again", SERVICE, "warn"),
    "question.failed": ("A follow-up question could not be written; it waits for a person", SERVICE, "bad"),
    "correction.failed": ("A corrected opinion could not be filed; it waits for a person", SERVICE, "bad"),
    "correction.received": ("The reviewer sent a corrected opinion", REVIEWER, "warn"),
    "correction.filed": ("The corrected opinion was filed in the chart as a new version of the note", SERVICE, "ok"),
    "correction.needs_review": ("A person must check the chart before the correction is filed again", SERVICE,
                                "warn"),
    "correction.not_superseded": ("The earlier version stays current in the chart (this EHR cannot update it)",
                                  SERVICE, "warn"),
    "file.done": ("Opinion filed in the chart", SERVICE, "ok"),
    "file.partial": ("Opinion partly filed; the rest follows", SERVICE, "warn"),
    "needs_review": ("A person must check the chart before filing goes on", SERVICE, "warn"),
    "resolved": ("Checked by a person; filing goes on", STAFF, ""),
    "overdue": ("The opinion is overdue (past the reviewer's turnaround target)", SERVICE, "warn"),
    "error": ("A step failed; it is retried by itself", SERVICE, "warn"),
    "failed": ("The Case failed and waits for a person", SERVICE, "bad"),
    "retry": ("Retried", STAFF, ""),
    "retry.failed": ("A retry failed", STAFF, "bad"),
    "cancelled": ("Referral cancelled", STAFF, "bad"),
    "declined": ("The reviewer declined the referral", REVIEWER, "bad"),
    "consent.denied": ("A patient Consent denies the disclosure", EHR, "bad"),
    "task.sync_failed": ("The EHR Task could not be updated (it catches up at the next step)", SERVICE, "warn"),
    "step.discarded": ("A late result was dropped (the Case had moved on)", SERVICE, ""),
    "resumed": ("Resumed after a restart", SERVICE, ""),
    "write.reconciled": ("A write was found in the chart and not repeated", SERVICE, ""),
}
# Details shown plainly; the rest stays in the raw view (`fhirbridge status CASE`).
SHOWN = ("step", "reason", "error", "records", "resources", "attachments", "document_reference", "package_id",
         "plan", "question", "write", "seconds", "service_request", "reviewer", "profile", "task", "supplement_of",
         "missing", "by", "seq", "communication", "note", "replaces")


@dataclass(frozen=True)
class Entry:
    at: float
    what: str
    who: str
    tone: str
    kind: str
    details: list[tuple[str, str]]
    error: str | None = None
    fix: str | None = None


def timeline(events: list[dict]) -> list[Entry]:
    out = []
    for e in events:
        kind, detail = e["kind"], e.get("detail") or {}
        if kind.endswith(".back"):
            what, who, tone = f"Sent back to {kind.removesuffix('.back')}: a work file was gone", SERVICE, "warn"
        else:
            what, who, tone = KINDS.get(kind, (kind, SERVICE, ""))
        who = str(detail.get("by") or who)
        error = detail.get("error") if kind in ("error", "failed", "retry.failed", "task.sync_failed") else None
        if kind == "cancelled" and not detail.get("by"):
            # A cancel without a person named came from the EHR: the order was revoked or the Task cancelled.
            who = EHR if "EHR" in str(detail.get("reason", "")) or "revoked" in str(detail.get("reason", "")) \
                else who
        details = [(k, str(v)) for k, v in detail.items() if k in SHOWN and k != "error" and v not in (None, "")]
        out.append(Entry(e["at"], what, who, tone, kind, details, str(error) if error else None,
                         fix_for(str(error)) if error else None))
    return out
