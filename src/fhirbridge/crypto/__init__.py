"""crypto: keys (JWKS), signatures (JWS) and encryption (JWE) for sealed packages and opinions.

`keys` (KeyRing, generation and rotation, files 0600, optional passphrase), `jws` (detached and compact
JWS over RFC 8785 canonical JSON), `jwe` (JWE General JSON, and the streamed form for large attachments),
`remote_jwks` (a reviewer's published JWKS, cached), `certs` (the X.509 chain of the signing key, sent as x5c),
`files` (every file holding PHI or keys 0600, its folders 0700, whatever the umask; narrowing an older
install), `urls` (https, or plain http to loopback only, for every URL a secret or a record goes to).

Rule: the bottom of the stack: may import only the root modules (errors, jsonutil) and the JOSE libraries.
Never config, the store, FHIR, the EHR or anything above.
"""
from fhirbridge.crypto import jwe, jws, keys
from fhirbridge.crypto.keys import KeyRing, generate_jwks, public_jwks, write_private_jwks, write_public_jwks

__all__ = ["KeyRing", "generate_jwks", "jwe", "jws", "keys", "public_jwks", "write_private_jwks",
           "write_public_jwks"]
