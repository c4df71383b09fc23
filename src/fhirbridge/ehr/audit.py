"""The audit trail: one AuditEvent per disclosure and one per opinion filed (IHE BALP), follow-ups included.

- **Disclosure** (a package delivered to a reviewer): IHE Basic Audit Log Patterns "Privacy Disclosure at
  Source" (https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PrivacyDisclosure.Source):
  type DICOM 110106 "Export", subtype ISO 21089 `disclose`, action R, purposeOfEvent v3 ActReason TREAT,
  outcome 0. Agents: the hospital as source (DICOM 110153 "Source Role ID") and as custodian (SNOMED CT
  159541003, BALP's custodian slice), the reviewer organisation as recipient (DICOM 110152 "Destination
  Role ID"), both by identifier, and fhirbridge itself (DICOM 110150 "Application"). Entities: the Patient
  (type 1 Person, role 1 Patient), the ServiceRequest (role 4 Domain Resource) and the package (role 3
  Report: the document's identifier `urn:uuid:<package id>`, with the kinds and counts of records shared
  and withheld as entity details; never their content).
- **Filed** (the reviewer's opinion written back): "Privacy Disclosure at Recipient" (the reviewer
  discloses its opinion to the hospital): type DICOM 110107 "Import", subtype `disclose`, action C; the
  reviewer is the source, the hospital the recipient; entities the Patient, the ServiceRequest, the
  DocumentReference filed and the opinion's identifier.

- **The conversation after the opinion** (issue 16): a follow-up question sent to the reviewer is a
  disclosure like a package ("question": Source profile, Export; entities the Patient, the ServiceRequest,
  the Communication the question was written as, and the sealed message's identifier `urn:uuid:<follow-up
  id>`); an answer filed as an addendum ("addendum") and a corrected opinion filed as the note's new version
  ("correction") are imports like the opinion (Recipient profile; entities the DocumentReference written
  and the message's identifier). Each is recorded once per message, keyed by it.

Both profiles (BALP 1.1, Disclose.fsh) make the source and the recipient agent's `network` 1..1 and bind
the agent that records the event to the audit source by invariant `val-audit-source`
(`$this.who = %resource.source.observer`: on the source agent at the Source, on the recipient agent at the
Recipient). The hospital records both, so `source.observer` is exactly the hospital's agent `who`.

The AuditEvent names the patient by reference only (`Patient/123`): no name, no clinical text. Its id is a
UUIDv5 of the Case and the package (or opinion), so recording the same disclosure twice (a step repeated
after a lost lease) keeps one record, and writing it to the EHR is a PUT that can be repeated.

With `[audit] write_to_ehr = true` each AuditEvent is also written to the hospital's EHR. A failed write
never fails the Case, and is never dropped: the record stays in the store with `sent_to_ehr` false, the
error, the number of attempts and when to try again (backoff from RETRY_FIRST doubling to RETRY_MAX); it is
counted (`fhirbridge_audit_ehr_write_failures`, and `fhirbridge_audit_events_owed` from the store) and shown
by `fhirbridge status`, `fhirbridge doctor` and the dashboard (`owed`). Every run (and every work tick of the
service) writes the owed ones that are due again (`send_pending`).
"""
from __future__ import annotations

import logging
import socket
import time
import uuid
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

from fhirbridge import VERSION
from fhirbridge.config.model import Reviewer
from fhirbridge.ehr.context import App
from fhirbridge.errors import FhirError
from fhirbridge.fhir.validate import validate
from fhirbridge.ops import metrics
from fhirbridge.store.store import Case

log = logging.getLogger("fhirbridge.ehr.audit")

BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
DCM = "http://dicom.nema.org/resources/ontology/DCM"
LIFECYCLE = "http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
SCT = "http://snomed.info/sct"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
URI = "urn:ietf:rfc:3986"
NAMESPACE = uuid.UUID("6f1d7c8e-3f0a-5b7e-9a51-2b4c0e7d9a10")

DISCLOSURE, FILED = "disclosure", "filed"
QUESTION_SENT, ADDENDUM_FILED, CORRECTION_FILED = "question", "addendum", "correction"
# BALP Disclose.fsh: `agent[custodian].type = SCT#159541003 // "Record keeping/library clerk"` (the slice a
# v3-ParticipationType#CST agent does not fall into).
CUSTODIAN = ("159541003", "Record keeping/library clerk")
# AuditEvent.agent.network.type (R4, http://hl7.org/fhir/network-type): 1 machine name, 5 URI.
MACHINE_NAME, URI_ADDRESS = "1", "5"
# A write the EHR refused is tried again after RETRY_FIRST seconds, doubling to RETRY_MAX.
RETRY_FIRST, RETRY_MAX = 30.0, 3600.0


def _coding(system: str, code: str, display: str) -> dict:
    return {"system": system, "code": code, "display": display}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def audit_id(case: Case, kind: str, key: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{case.id}/{kind}/{key}"))


def _org_agent(ref: dict, code: str, display: str, network: dict, *, system: str = DCM) -> dict:
    agent: dict = {"type": {"coding": [_coding(system, code, display)]}, "who": ref, "requestor": False}
    if network:
        agent["network"] = network
    return agent


def _address(url: str) -> str:
    """A URL as an agent's network address: no credentials, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def our_network(app: App) -> dict:
    """Where fhirbridge, acting for the hospital, sends and receives: its public URL when it has one, else
    the machine's name."""
    if app.config.public_url:
        return {"address": _address(app.config.public_url), "type": URI_ADDRESS}
    return {"address": socket.gethostname() or "localhost", "type": MACHINE_NAME}


def reviewer_network(app: App, reviewer: Reviewer) -> dict:
    """Where the reviewer is reached: its HTTPS endpoint, our reviewer API (pull), or the outbox folder."""
    transport = reviewer.transport
    if transport.type == "https" and transport.url:
        return {"address": _address(transport.url), "type": URI_ADDRESS}
    if transport.type == "pull" and app.config.public_url:
        return {"address": _address(app.config.public_url) + "/reviewer", "type": URI_ADDRESS}
    if transport.type == "outbox" and transport.path:
        return {"address": transport.path.absolute().as_uri(), "type": URI_ADDRESS}
    return our_network(app)


def _application_agent(app: App) -> dict:
    # BALP's agent slicing is open: "may have user, app, organization agent(s)". fhirbridge, the software
    # that made the disclosure, is named here.
    return _org_agent({"display": f"fhirbridge {VERSION}"}, "110150", "Application", our_network(app))


def _entity(what: dict, type_code: str, type_display: str, role_code: str, role_display: str,
            details: dict[str, str] | None = None) -> dict:
    ent: dict[str, object] = {"what": what, "type": _coding(ENTITY_TYPE, type_code, type_display),
                              "role": _coding(OBJECT_ROLE, role_code, role_display)}
    if details:
        ent["detail"] = [{"type": k, "valueString": v} for k, v in details.items()]
    return ent


def _disclosed_agents(app: App, reviewer: Reviewer) -> list[dict]:
    """Privacy Disclosure at Source: the hospital as source and custodian, the reviewer as recipient."""
    return [
        _org_agent(app.hospital.organization_ref(), "110153", "Source Role ID", our_network(app)),
        _org_agent(app.hospital.organization_ref(), *CUSTODIAN, {}, system=SCT),
        _org_agent(reviewer.organization_ref(), "110152", "Destination Role ID", reviewer_network(app, reviewer)),
        _application_agent(app),
    ]


def _imported_agents(app: App, reviewer: Reviewer) -> list[dict]:
    """Privacy Disclosure at Recipient: the reviewer as source, the hospital as recipient."""
    return [
        _org_agent(reviewer.organization_ref(), "110153", "Source Role ID", reviewer_network(app, reviewer)),
        _org_agent(app.hospital.organization_ref(), "110152", "Destination Role ID", our_network(app)),
        _application_agent(app),
    ]


def _base(app: App, case: Case, *, aid: str, profile: str, type_: dict, action: str, when: float) -> dict:
    return {
        "resourceType": "AuditEvent",
        "id": aid,
        "meta": {"profile": [BALP + profile]},
        "type": type_,
        "subtype": [_coding(LIFECYCLE, "disclose", "Disclose Record Lifecycle Event")],
        "action": action,
        "recorded": _iso(when),
        "outcome": "0",
        "purposeOfEvent": [{"coding": [_coding(ACT_REASON, "TREAT", "treatment")]}],
        # val-audit-source (BALP): the observer is the very Reference of the hospital's agent (FHIRPath `=`
        # on a Reference compares every child: identifier and display alike).
        "source": {"site": app.hospital.name, "observer": app.hospital.organization_ref(),
                   "type": [_coding(SOURCE_TYPE, "4", "Application Server")]},
    }


def _patient_entity(case: Case) -> dict:
    return _entity({"reference": case.patient}, "1", "Person", "1", "Patient")


def _order_entity(case: Case) -> dict:
    return _entity({"reference": case.service_request}, "2", "System Object", "4", "Domain Resource")


def _counts(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items())) or "none"


def package_summary(app: App, case: Case) -> dict:
    """What the package held, from the event log (counts only): the seal.done of this package and the
    collect.done before it."""
    events = app.store.events(case.id)
    seal_at = next((i for i in range(len(events) - 1, -1, -1) if events[i]["kind"] == "seal.done"
                    and (events[i]["detail"] or {}).get("package_id") == case.package_id), None)
    if seal_at is None:
        return {}
    sealed = events[seal_at]["detail"] or {}
    collected = next((e["detail"] or {} for e in reversed(events[:seal_at]) if e["kind"] == "collect.done"), {})
    return {"types": collected.get("counts") or {}, "shared": sealed.get("shared"),
            "withheld": sealed.get("withheld"), "attachment_files": sealed.get("attachment_files"),
            "inline_attachments": sealed.get("inline_attachments")}


def disclosure_event(app: App, case: Case, *, when: float, transport: str | None = None) -> dict:
    reviewer = app.config.reviewer(case.reviewer)
    summary = package_summary(app, case)
    details = {"records shared": str(summary.get("shared", "unknown")),
               "record types": _counts(summary.get("types") or {}),
               "records withheld": str(summary.get("withheld", "unknown")),
               "attachment files": str(summary.get("attachment_files", 0))}
    if transport:
        details["transport"] = transport
    ev = _base(app, case, aid=audit_id(case, DISCLOSURE, str(case.package_id)),
               profile="PrivacyDisclosure.Source", type_=_coding(DCM, "110106", "Export"), action="R", when=when)
    ev["agent"] = _disclosed_agents(app, reviewer)
    ev["entity"] = [
        _patient_entity(case),
        _order_entity(case),
        _entity({"identifier": {"system": URI, "value": f"urn:uuid:{case.package_id}"},
                 "display": "Sealed referral package (FHIR document)"},
                "2", "System Object", "3", "Report", details),
    ]
    return ev


def filed_event(app: App, case: Case, *, document_reference: str | None, when: float) -> dict:
    reviewer = app.config.reviewer(case.reviewer)
    ev = _base(app, case, aid=audit_id(case, FILED, str(case.opinion_id)),
               profile="PrivacyDisclosure.Recipient", type_=_coding(DCM, "110107", "Import"), action="C", when=when)
    ev["agent"] = _imported_agents(app, reviewer)
    entities = [_patient_entity(case), _order_entity(case)]
    if document_reference:
        entities.append(_entity({"reference": document_reference}, "2", "System Object", "3", "Report"))
    entities.append(_entity({"identifier": {"system": URI, "value": f"urn:uuid:{case.opinion_id}"},
                             "display": "Second opinion (sealed FHIR document)"}, "2", "System Object", "3",
                            "Report", {"answers package": f"urn:uuid:{case.package_id}"}))
    ev["entity"] = entities
    return ev


def followup_sent_event(app: App, case: Case, *, followup_id: str, seq: int, communication: str | None,
                        when: float, transport: str | None = None) -> dict:
    """A follow-up question disclosed to the reviewer (Privacy Disclosure at Source, as a package)."""
    reviewer = app.config.reviewer(case.reviewer)
    ev = _base(app, case, aid=audit_id(case, QUESTION_SENT, followup_id), profile="PrivacyDisclosure.Source",
               type_=_coding(DCM, "110106", "Export"), action="R", when=when)
    ev["agent"] = _disclosed_agents(app, reviewer)
    entities = [_patient_entity(case), _order_entity(case)]
    if communication:
        entities.append(_entity({"reference": communication}, "2", "System Object", "4", "Domain Resource"))
    details = {"follow-up question": str(seq), "about opinion": f"urn:uuid:{case.opinion_id}"}
    if transport:
        details["transport"] = transport
    entities.append(_entity({"identifier": {"system": URI, "value": f"urn:uuid:{followup_id}"},
                             "display": "Follow-up question (sealed message)"}, "2", "System Object", "3",
                            "Report", details))
    ev["entity"] = entities
    return ev


def followup_filed_event(app: App, case: Case, *, kind: str, message_id: str, seq: int,
                         document_reference: str | None, when: float) -> dict:
    """An answer filed as an addendum, or a corrected opinion filed as the note's new version (Privacy
    Disclosure at Recipient, as the opinion)."""
    reviewer = app.config.reviewer(case.reviewer)
    ev = _base(app, case, aid=audit_id(case, kind, message_id), profile="PrivacyDisclosure.Recipient",
               type_=_coding(DCM, "110107", "Import"), action="C", when=when)
    ev["agent"] = _imported_agents(app, reviewer)
    entities = [_patient_entity(case), _order_entity(case)]
    if document_reference:
        entities.append(_entity({"reference": document_reference}, "2", "System Object", "3", "Report"))
    display, detail = ((f"Answer to follow-up question {seq} (sealed message)", "answers follow-up question")
                       if kind == ADDENDUM_FILED else
                       (f"Corrected second opinion, version {seq + 1} (sealed FHIR document)", "version"))
    entities.append(_entity({"identifier": {"system": URI, "value": f"urn:uuid:{message_id}"}, "display": display},
                            "2", "System Object", "3", "Report",
                            {detail: str(seq if kind == ADDENDUM_FILED else seq + 1),
                             "about opinion": f"urn:uuid:{case.opinion_id}"}))
    ev["entity"] = entities
    return ev


def _record(app: App, case: Case, kind: str, event: dict, recipient: dict, when: float) -> bool:
    problems = validate(event)
    if problems:  # a bug of ours: the record is kept all the same, it is the accounting of a disclosure
        log.error("AuditEvent %s is not valid FHIR: %s", event["id"], "; ".join(problems))
    ident = recipient["identifier"]
    added = app.store.add_audit(id=event["id"], hospital=app.hospital.key, patient=case.patient, case_id=case.id,
                                kind=kind, recipient=f"{ident['system']}|{ident['value']}", resource=event, at=when)
    if added and app.config.audit.write_to_ehr:
        send_one(app, event)
    return added


def record_disclosure(app: App, case: Case, detail: dict | None = None) -> bool:
    """After a package was delivered: record the disclosure (once per package). True if newly recorded."""
    when = time.time()
    event = disclosure_event(app, case, when=when, transport=(detail or {}).get("transport"))
    return _record(app, case, DISCLOSURE, event, app.config.reviewer(case.reviewer).organization_ref(), when)


def record_filed(app: App, case: Case, document_reference: str | None) -> bool:
    """After the opinion was filed: record the write-back (once per opinion). True if newly recorded."""
    when = time.time()
    event = filed_event(app, case, document_reference=document_reference, when=when)
    return _record(app, case, FILED, event, app.hospital.organization_ref(), when)


def record_followup_sent(app: App, case: Case, *, followup_id: str, seq: int, communication: str | None,
                         transport: str | None = None) -> bool:
    """After a follow-up question was delivered: record the disclosure (once per question)."""
    when = time.time()
    event = followup_sent_event(app, case, followup_id=followup_id, seq=seq, communication=communication,
                                when=when, transport=transport)
    return _record(app, case, QUESTION_SENT, event, app.config.reviewer(case.reviewer).organization_ref(), when)


def record_followup_filed(app: App, case: Case, *, kind: str, message_id: str, seq: int,
                          document_reference: str | None) -> bool:
    """After an addendum (`kind` ADDENDUM_FILED) or a correction (CORRECTION_FILED) was filed: record the
    write-back (once per message)."""
    when = time.time()
    event = followup_filed_event(app, case, kind=kind, message_id=message_id, seq=seq,
                                 document_reference=document_reference, when=when)
    return _record(app, case, kind, event, app.hospital.organization_ref(), when)


def send_one(app: App, event: dict) -> bool:
    """Write one AuditEvent to the EHR (PUT with its own id: repeatable). Never raises: a refusal is
    recorded on the row (error, attempts, when to try again) and counted, and the AuditEvent stays owed."""
    return _send(app, event) is None


def _send(app: App, event: dict) -> Exception | None:
    """None when written, else what went wrong (recorded and counted)."""
    try:
        app.ehr.update(event)
    except Exception as exc:  # noqa: BLE001 - the audit copy in the EHR must never fail a Case
        message = str(exc) or exc.__class__.__name__
        status = exc.status if isinstance(exc, FhirError) else None
        metrics.audit_write_failed(app.hospital.name, str(status) if status else "error")
        attempts = app.store.audit_refused(event["id"], error=message[:500], now=time.time(), backoff=retry_delay)
        log.warning("AuditEvent %s not written to the EHR (attempt %d, kept to try again): %s",
                    event["id"], attempts, message)
        return exc
    app.store.mark_audit(event["id"], sent=True)
    return None


def retry_delay(attempts: int) -> float:
    """Seconds to wait after the `attempts`-th refused write: RETRY_FIRST, doubling, at most RETRY_MAX."""
    return min(RETRY_MAX, RETRY_FIRST * 2 ** max(0, attempts - 1))


def send_pending(app: App, *, ignore_backoff: bool = False) -> int:
    """Write every AuditEvent of this hospital owed to the EHR whose retry time has come (all of them with
    `ignore_backoff`, as `fhirbridge run --now` asks); returns how many were written. Called at each run
    and work tick. An EHR that is down or refuses our credentials (a transient error) ends the round; one
    refusing a single AuditEvent (422 and the like) does not hold up the others."""
    if not app.config.audit.write_to_ehr:
        return 0
    sent = 0
    for row in app.store.audit_due(hospital=app.hospital.key, now=None if ignore_backoff else time.time()):
        problem = _send(app, row["resource"])
        if problem is None:
            sent += 1
        elif not isinstance(problem, FhirError) or problem.transient:
            break  # the EHR is failing: try the rest at the next run
    return sent


def owed(app: App) -> dict:
    """The AuditEvents of this hospital not yet in the EHR (only when `[audit] write_to_ehr`): how many,
    the oldest, the last error and when the next attempt is due. What status, doctor and the dashboard show."""
    if not app.config.audit.write_to_ehr:
        return {"count": 0, "rows": []}
    return app.store.audit_owed(hospital=app.hospital.key)


def accounting(app: App, patient: str) -> list[dict]:
    """The accounting of disclosures for one patient (`Patient/<id>`), oldest first: when, to whom, which
    order and package, what kinds and counts of records."""
    out = []
    # Patient ids belong to one EHR: only this hospital's records (the store may serve several).
    for row in app.store.list_audit(patient=patient, hospital=app.hospital.key):
        ev = row["resource"]
        package: dict = next((e for e in ev.get("entity", []) if e.get("what", {}).get("identifier")), {})
        details = {d["type"]: d.get("valueString") for d in package.get("detail", [])}
        recipient: dict = next((a["who"] for a in ev.get("agent", [])
                          if a["type"]["coding"][0]["code"] == "110152"), {})
        doc = next((e["what"]["reference"] for e in ev.get("entity", [])
                    if e.get("what", {}).get("reference", "").startswith("DocumentReference/")), None)
        out.append({"id": row["id"], "at": row["at"], "recorded": ev.get("recorded"), "kind": row["kind"],
                    "case": row["case_id"], "patient": row["patient"],
                    "recipient": recipient.get("display") or row["recipient"],
                    "recipient_identifier": row["recipient"],
                    "order": next((e["what"]["reference"] for e in ev.get("entity", [])
                                   if e.get("what", {}).get("reference", "").startswith("ServiceRequest/")), None),
                    "package": package.get("what", {}).get("identifier", {}).get("value"),
                    "document_reference": doc, "details": details,
                    "sent_to_ehr": bool(row["sent_to_ehr"]), "ehr_error": row["ehr_error"]})
    return out
