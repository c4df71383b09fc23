"""fhirbridge: second-opinion referrals over HL7 FHIR R4.

The layers, top to bottom (docs/architecture.md has the tree and each folder's rule; `lint-imports`
enforces them): cli · demo · service · ui · loop · ehr · access, exchange, ops · config, store, fhir ·
crypto · and at the root what every layer shares: `steps` (the Case's steps), `errors`, `jsonutil`.
"""

VERSION = "0.1.0"
__version__ = VERSION
