"""DicomwebError: what went wrong talking to a PACS, and whether trying later may help.

A subclass of the project's FhirbridgeError carrying `transient` like FhirError, so the loop's runner treats
it the same way (fhirbridge.loop.runner.is_transient): transient leaves the Case at its step to resume,
anything else fails it with the message. `kind` names the failure for callers that withhold a study with a
reason (issue 15: "a study missing in the PACS ... is withheld with its reason in the manifest"):

- "unavailable": the PACS could not be reached, timed out, or answered 5xx/408/429 (transient)
- "unauthorized": 401/403 (transient, as for the EHR: IT fixing the credentials lets every Case resume)
- "truncated": an answer broke off before its end, or a multipart body has no closing delimiter (transient)
- "not-found": the PACS does not have the study/series (404, or an empty search)
- "not-dicom": a part that is not DICOM part-10 (no "DICM" preamble, wrong media type, unreadable header)
- "mismatch": a part of another study/series, a repeated instance, or fewer/more instances than QIDO listed
- "refused": any other 4xx, or a STOW-RS store the PACS refused
- "too-large": over the caller's byte cap

Messages name the interaction and the UIDs (study, series, instance UIDs identify images, not patients);
never a patient's name, ID or any other header value.
"""
from __future__ import annotations

from fhirbridge.errors import FhirbridgeError

TRANSIENT_KINDS = frozenset({"unavailable", "unauthorized", "truncated"})


class DicomwebError(FhirbridgeError):
    def __init__(self, message: str, *, kind: str, status: int | None = None, transient: bool | None = None):
        self.kind, self.status = kind, status
        self.transient = kind in TRANSIENT_KINDS if transient is None else transient
        super().__init__(message)
