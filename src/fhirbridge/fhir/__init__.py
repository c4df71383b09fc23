"""fhir: FHIR R4 over HTTP, and reading FHIR JSON.

`client` (one requests Session, explicit timeouts, urllib3 Retry, paging, transactions, streamed Binary,
validation on read), `auth` (SMART Backend Services, bearer/basic), `validate` (fhir.resources R4B
models), `elements` (public helpers over FHIR JSON: codings, dates, references, display text),
`narrative` (the R4 xhtml allow-list and its checker), `capability_statement` (what a server's
CapabilityStatement says, as plain facts), `unreachable` (why a server could not be reached, in words:
DNS, refused, plain HTTP on an https URL, untrusted certificate; used by doctor, delivery and the pages too).

Rule: knows FHIR, not fhirbridge: no Case, no store, no config model (auth gets a plain dict). May import
`crypto` (to sign the SMART client assertion) and the root modules. Never Flask or any layer above.
"""
from fhirbridge.fhir.auth import make_auth
from fhirbridge.fhir.client import FhirClient
from fhirbridge.fhir.validate import check, validate

__all__ = ["FhirClient", "make_auth", "validate", "check"]
