"""dicomweb: DICOMweb over HTTP (DICOM PS3.18): find, fetch and store images in a PACS.

`client` (DicomwebClient: QIDO-RS search, WADO-RS retrieve streamed to disk, STOW-RS store; one requests
Session, explicit timeouts, urllib3 Retry), `multipart` (multipart/related read and written as streams,
PS3.18 section 8.6/8.7 and RFC 2387), `auth` (none, basic, bearer, a callable token source), `files`
(private files and folders: 0600/0700), `errors` (DicomwebError: transient or not).

Rule: knows DICOM and HTTP, not fhirbridge: no Case, no store, no config model, no FHIR (auth gets a plain
dict or a callable). May import `crypto` and the root modules only. Never Flask or any layer above.
"""
from fhirbridge.dicomweb.auth import make_auth
from fhirbridge.dicomweb.client import DicomwebClient, Instance, Retrieved, StoreResult
from fhirbridge.dicomweb.errors import DicomwebError

__all__ = ["DicomwebClient", "DicomwebError", "Instance", "Retrieved", "StoreResult", "make_auth"]
