"""dicomweb: DICOMweb over HTTP (DICOM PS3.18): find, fetch and store images in a PACS.

`client` (DicomwebClient: QIDO-RS search, WADO-RS retrieve streamed to disk, STOW-RS store; one requests
Session, explicit timeouts, urllib3 Retry), `multipart` (multipart/related read and written as streams,
PS3.18 section 8.6/8.7 and RFC 2387), `auth` (none, basic, bearer, a callable token source), `errors`
(DicomwebError: transient or not). Retrieved images are PHI: their files and folders are made with
`crypto.files` (0600/0700 whatever the umask).

Rule: knows DICOM and HTTP, not fhirbridge: no Case, no store, no config model, no FHIR (auth gets a plain
dict or a callable). May import `crypto` and the root modules only. Never Flask or any layer above.
"""
from fhirbridge.dicomweb.auth import make_auth
from fhirbridge.dicomweb.client import DicomwebClient, Instance, Retrieved, StoreResult
from fhirbridge.dicomweb.errors import DicomwebError

__all__ = ["DicomwebClient", "DicomwebError", "Instance", "Retrieved", "StoreResult", "make_auth"]
