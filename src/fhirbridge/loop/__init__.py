"""loop: the second-opinion loop, step by step, and the runner that works it.

In the order a Case meets them: `intake` (an order becomes exactly one Case; `routing` picks reviewer and
profile), `collect` (the records, per mappings/collect/), `consent` (the patient's Consents, at collect and
before delivery), `document` (the referral FHIR document), `seal` (sign and encrypt the package),
`deliver`, `receive` (the reviewer's opinion, checked), `filing` (the file step: the write plan chosen for
the EHR), `writeback` (plan ATOMIC: one transaction) and `post_writes` (plans LEDGER and ONCE: POSTs
through the write ledger): the opinion filed in the chart, exactly once. `guards` (before each outbound
step: the order still stands, the Task shows the step), `actions` (cancel, decline, retry, resolve,
overdue), `table` (each work step's function, bound to `steps.FLOW`), `runner` (claim, run, record; leases, backoff).
After filing, `outcomes` follows the planned treatment the opinion was about (docs/outcomes.md).

Rule: may import `ehr`, `exchange`, `access`, `ops`, `config`, `store`, `fhir`, `crypto`, `steps` and the
root modules. Never Flask, werkzeug or gunicorn, never the service, the pages, the CLI or the demo: the
same steps run under `fhirbridge run`, a worker, the service and the tests.
"""
