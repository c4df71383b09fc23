"""config: the configuration model, its loader, the declarative mappings, the starter files, the reference.

`model` (frozen dataclasses: Config, Hospital, Reviewer, ...), `loader` (one TOML file plus
FHIRBRIDGE_<SECTION>__<KEY> overrides; every error one ConfigError naming file and key), `mappings`
(mappings/*.toml: order codes, collection profiles, opinion forms, EHR write profiles), `starter` (`fhirbridge init`),
`reference` (docs/configure.md, generated from the loader).

Rule: reads files and the environment, nothing else; may import `crypto` (to check key files) and the root
modules. Never the store, the EHR, the loop or any web framework.
"""
