"""exchange: what travels between the hospital and the reviewer, and the reviewer's own tools.

`envelope` (the sealed envelope: signed claims, JWE General JSON, streamed attachments), `transport`
(delivery to a reviewer: outbox directory, HTTPS POST with Idempotency-Key), `opinion` (the reviewer's
structured answer as a FHIR Consult-note document), `reviewer` (open and verify a package, answer it,
trusted hospitals), `render` (a package or an opinion as readable text), `pdf` (the opinion as a PDF
for EHR viewers), `conclusions` (an opinion's coded outcome fields, read back), `dicom_series` (a DICOM
series as one attachment: the format, seal's writer, the reviewer's extract, DICOMDIR and STOW-RS import),
`compression` (whether an attachment is worth DEFLATE).

Rule: both sides use it, so it knows nothing of one side's state: may import `config` (models and
mappings), `crypto`, `fhir` (validation and FHIR-JSON helpers), `dicomweb` (the reviewer's STOW-RS
import) and the root modules. Never the store, the
EHR client or context, the loop, Flask, the service, the pages or the CLI.
"""
