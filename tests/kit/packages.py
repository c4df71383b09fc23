"""Reviewer-side material made by hand, without an EHR: a hospital's key pair on disk and a sealed package as
seal.py makes one (reduced to what opening and answering need)."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

from fhirbridge.crypto import jws
from fhirbridge.crypto.keys import KeyRing, generate_jwks, public_jwks, write_public_jwks
from fhirbridge.exchange import envelope


class Site:
    """A hospital's key pair on disk: private (for the test to play the hospital) and public (for trust)."""

    def __init__(self, directory: Path, name: str):
        directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        jwks = generate_jwks()
        self.private = KeyRing(jwks, source=f"{name}-private")
        self.public_file = directory / f"{name}.jwks.json"
        write_public_jwks(self.public_file, public_jwks(jwks))
        self.public = KeyRing.load(self.public_file)


def make_package(where: Path, signer: KeyRing, reviewer_public: KeyRing, *, doc_signer: KeyRing | None = None,
                 name: str = "pkg-1", sender: str = "Hospital A") -> Path:
    """A package as seal.py makes one, reduced to what opening and answering need. `sender` is the name its
    signed claims and Bundle signature give the sending hospital (the signer's own claim)."""
    ehr = "https://ehr.example/fhir"
    doc = {"resourceType": "Bundle", "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"},
           "type": "document", "timestamp": "2024-01-01T00:00:00Z", "entry": [
               {"fullUrl": f"{ehr}/Patient/p1", "resource": {"resourceType": "Patient", "id": "p1"}},
               {"fullUrl": f"{ehr}/ServiceRequest/sr1", "resource": {
                   "resourceType": "ServiceRequest", "id": "sr1", "status": "active", "intent": "order",
                   "subject": {"reference": f"{ehr}/Patient/p1"}}}]}
    iss = {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.7.1", "display": sender}
    doc = jws.sign_bundle(doc, doc_signer or signer, who={"identifier": iss, "display": iss["display"]},
                          when="2024-01-01T00:00:00Z")
    now = int(time.time())
    claims = {"jti": str(uuid.uuid4()), "iat": now, "exp": now + 3600, "iss": iss,
              "aud": {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.999.7.9", "display": "Reviewer"},
              "case_id": str(uuid.uuid4()), "package_id": name, "service_request": "ServiceRequest/sr1",
              "patient": "Patient/p1", "manifest": {"shared": [], "withheld": [], "attachments": []}}
    data = envelope.seal(typ=envelope.PACKAGE, claims=claims, document=doc, signer=signer, recipient=reviewer_public)
    d = where / name
    d.mkdir(parents=True)
    (d / envelope.ENVELOPE_FILE).write_bytes(data)
    return d
