"""FHIR R4 access to the hospital EHR: REST client, authentication, structural validation."""
from fhirbridge.fhir.auth import make_auth
from fhirbridge.fhir.client import FhirClient
from fhirbridge.fhir.validate import check, validate

__all__ = ["FhirClient", "make_auth", "validate", "check"]
