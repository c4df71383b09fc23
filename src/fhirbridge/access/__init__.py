"""access: who is calling fhirbridge's own HTTP API and pages.

Staff credentials (admin tokens, scoped API keys, OAuth2 access tokens from the hospital's identity
provider) and reviewers' short-lived signed JWTs, checked against the configuration and the keys.

Rule: pure checks over config and keys; may import `config`, `crypto`, `exchange` (to read a JWS header)
and the root modules. Never Flask (the service hands it the bearer token), never the store beyond what it
is given, never the EHR.
"""
