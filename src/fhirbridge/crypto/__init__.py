"""Keys (JWKS), signatures (JWS) and encryption (JWE) for sealed packages and opinions."""
from . import jwe, jws, keys
from .keys import KeyRing, generate_jwks, public_jwks, write_private_jwks, write_public_jwks

__all__ = ["KeyRing", "generate_jwks", "jwe", "jws", "keys", "public_jwks", "write_private_jwks",
           "write_public_jwks"]
