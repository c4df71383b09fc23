"""ops: what hospital IT runs it with: logs, metrics, `doctor`, and the crash points the reliability suite uses.

`logs` (JSON or text lines, Case ids, secrets masked), `metrics` (Prometheus figures: what this process did
and what the store says now; the /metrics endpoint itself is in `service`), `doctor` (checks of the EHR
connection, keys, reviewers and store, each with its fix), `crashpoints` (inert unless the crash suite
sets its variable), `outcome_figures` (the outcome figures from the store, and their gauges) and
`measure_report` (those figures as a FHIR R4 MeasureReport).

Rule: may import `config`, `store`, `fhir`, `crypto`, `steps` and the root modules. Never the loop, the
EHR context, Flask, the service, the pages or the CLI: the loop reports to it, not the other way round.
"""
