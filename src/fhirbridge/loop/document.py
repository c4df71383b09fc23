"""Build the referral document: a FHIR document Bundle (FHIR R4 documents.html) for one reviewer.

Entry 0 is a Composition (LOINC 57133-1 "Referral note") with one section per kind of record and the
clinical question; every resource a section points at follows. Resources keep their EHR ids and their
fullUrl is their absolute EHR URL, so relative references inside them ("Patient/123") resolve within the
document (documents.html#content: references resolve against the fullUrl of the referencing entry).
What was withheld is both in the signed manifest (machine-readable) and in a narrative section, so a
reviewer reading the Bundle with any FHIR tool knows the record is partial.
"""
from __future__ import annotations

import html
import uuid
from collections.abc import Sequence

from fhirbridge.fhir.elements import question_of, summary_line
from fhirbridge.loop.collect import Collected

LOINC = "http://loinc.org"
REFERRAL_NOTE = {"system": LOINC, "code": "57133-1", "display": "Referral note"}
EMPTY_REASON = "http://terminology.hl7.org/CodeSystem/list-empty-reason"
POLICY_NOTE = ("Records that the hospital's disclosure policy does not allow to be shared are neither included "
               "nor listed.")

# (section title, LOINC section code, resource types it lists)
SECTIONS = (
    ("Reason for referral", ("42349-1", "Reason for referral (narrative)"), ("ServiceRequest",)),
    ("Problems", ("11450-4", "Problem list - Reported"), ("Condition",)),
    ("Diagnostic reports", ("30954-2", "Relevant diagnostic tests/laboratory data note"), ("DiagnosticReport",)),
    ("Imaging studies", ("18748-4", "Diagnostic imaging study"), ("ImagingStudy",)),
    ("Procedures", ("47519-4", "History of Procedures Document"), ("Procedure",)),
    ("Medications", ("10160-0", "History of Medication use Narrative"),
     ("MedicationStatement", "MedicationRequest")),
    ("Clinical notes", ("34109-9", "Note"), ("DocumentReference",)),
)


def full_url(base: str, resource: dict) -> str:
    return f"{base.rstrip('/')}/{resource['resourceType']}/{resource['id']}"


def build_document(collected: Collected, *, package_id: str, base_url: str, hospital_org: dict,
                   timestamp: str, inline_binaries: Sequence[dict] = ()) -> dict:
    """The unsigned document Bundle. `hospital_org` is an Organization resource (with id) for the author."""
    sr, patient = collected.service_request, collected.patient
    by_type: dict[str, list[dict]] = {}
    for r in collected.resources:
        by_type.setdefault(r["resourceType"], []).append(r)
    org_url = f"urn:uuid:{hospital_org['id']}"
    withheld_shown = collected.disclosable_withheld()
    sections = []
    for title, (code, display), types in SECTIONS:
        if types == ("ServiceRequest",):
            question = question_of(sr) or "(no question text on the order)"
            sections.append(_section(title, code, display, [full_url(base_url, sr)],
                                     f"<p>{_esc(question)}</p>"))
            continue
        items = [r for t in types for r in by_type.get(t, [])]
        withheld = sum(1 for w in withheld_shown if w["reference"].split("/")[0] in types)
        if items:
            rows = "".join(f"<li>{_esc(summary_line(r))}</li>" for r in items)
            sections.append(_section(title, code, display, [full_url(base_url, r) for r in items],
                                     f"<ul>{rows}</ul>"))
        else:
            reason = "withheld" if withheld else "nilknown"
            text = "All such records were withheld." if withheld else "None found in the period collected."
            s = _section(title, code, display, [], f"<p>{text}</p>")
            s["emptyReason"] = {"coding": [{"system": EMPTY_REASON, "code": reason}]}
            sections.append(s)
    reasons: dict[str, int] = {}
    for w in withheld_shown:
        reasons[w["reason"]] = reasons.get(w["reason"], 0) + 1
    rows = "".join(f"<li>{n} record(s): {_esc(r)}</li>" for r, n in sorted(reasons.items()))
    listed = f"<p>This record is partial. Withheld:</p><ul>{rows}</ul>" if rows else ""
    # The same sentence in every package, whether or not anything was withheld by policy, so that its
    # presence tells the reviewer nothing about this patient.
    sections.append({"title": "Records withheld",
                     "text": _narrative(f"{listed}<p>{POLICY_NOTE}</p>")})

    composition_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:uuid:{package_id}#composition"))
    composition = {
        "resourceType": "Composition",
        "id": composition_id,
        "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{composition_id}"},
        "status": "final",
        "type": {"coding": [REFERRAL_NOTE]},
        # Absolute: the Composition's own fullUrl is a urn:uuid, against which a relative reference cannot
        # be resolved (R4 bundle.html#references).
        "subject": {"reference": full_url(base_url, patient)},
        "date": timestamp,
        "author": [{"reference": org_url}],
        "title": "Second opinion referral",
        # R4 Composition.attester: the hospital, an Organization, vouches for the packet as consistent with
        # its disclosure policy: mode `official` ("the organization authenticated the content as consistent
        # with their policies and procedures"); `legal`/`professional` are a person's attestations, and no
        # person reviews the packet before it is sealed. Its Bundle.signature is that attestation, signed.
        "attester": [{"mode": "official", "time": timestamp, "party": {"reference": org_url}}],
        "custodian": {"reference": org_url},
        "text": _narrative(f"<p>Second opinion referral. Question: {_esc(question_of(sr))}</p>"),
        "section": sections,
    }
    entries = [{"fullUrl": f"urn:uuid:{composition_id}", "resource": composition},
               {"fullUrl": full_url(base_url, patient), "resource": patient},
               {"fullUrl": full_url(base_url, sr), "resource": sr},
               {"fullUrl": org_url, "resource": hospital_org}]
    entries += [{"fullUrl": full_url(base_url, r), "resource": r} for r in collected.resources]
    entries += [{"fullUrl": full_url(base_url, b), "resource": b} for b in inline_binaries]
    return {"resourceType": "Bundle",
            "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{package_id}"},
            "type": "document", "timestamp": timestamp, "entry": entries}


URGENT_PRIORITIES = ("stat", "asap", "urgent")   # R4 request-priority, most urgent first; `routine` is the rest


def referring_physician(collected: Collected) -> dict:
    """Who asked, for the manifest: the ServiceRequest's requester (required when ordering, ehr/order.py) as
    {reference, name, telecom, organization}, from the Practitioner / PractitionerRole (and the Practitioner
    and Organization a role points at) that collect followed from the order. Only what was collected is named:
    a requester the disclosure rules withheld is given by its reference's `display` alone, if any."""
    sr = collected.service_request
    ref = (sr.get("requester") or {}).get("reference") or ""
    found = {f"{r['resourceType']}/{r.get('id')}": r for r in collected.resources}

    def local(reference: str | None) -> dict:
        # "Type/id" or an absolute URL ending in it: the last two segments are the key (a scan of every
        # collected resource per lookup was 0.05 s of sealing a 10,000-resource record).
        return found.get("/".join((reference or "").split("/")[-2:]), {})

    who = local(ref)
    practitioner = who if who.get("resourceType") == "Practitioner" else local(
        (who.get("practitioner") or {}).get("reference"))
    organization = local((who.get("organization") or {}).get("reference"))
    # PractitionerRole.telecom is the contact in that role (R4 practitionerrole.html); the person's own follows.
    sources = [who] if practitioner is who else [who, practitioner]
    telecom = [t for r in sources for t in r.get("telecom", []) if isinstance(t, dict) and t.get("value")]
    seen: set[tuple] = set()
    contacts = []
    for t in telecom:
        key = (t.get("system"), t.get("value"))
        if key not in seen:
            seen.add(key)
            contacts.append({k: t[k] for k in ("system", "value", "use") if isinstance(t.get(k), str)})
    return {"reference": ref, "name": person_name(practitioner) or (sr.get("requester") or {}).get("display") or "",
            "telecom": contacts, "organization": organization.get("name") or
            (who.get("organization") or {}).get("display") or ""}


def person_name(r: dict) -> str:
    """A HumanName as one line: its text, else prefix, given and family names."""
    names = r.get("name") or []
    name = next((n for n in names if n.get("use") == "official"), names[0] if names else {})
    return (name.get("text") or " ".join([*name.get("prefix", []), *name.get("given", []),
                                           name.get("family", "")])).strip()


def hospital_organization(name: str, system: str, value: str) -> dict:
    oid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{system}|{value}"))
    return {"resourceType": "Organization", "id": oid, "identifier": [{"system": system, "value": value}],
            "name": name, "active": True}


def _section(title: str, code: str, display: str, refs: list[str], body: str) -> dict:
    s: dict[str, object] = {"title": title,
                            "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
                            "text": _narrative(body)}
    if refs:
        s["entry"] = [{"reference": r} for r in refs]
    return s


def _narrative(body: str) -> dict:
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'}


def _esc(text: str) -> str:
    return html.escape(text or "", quote=False)

