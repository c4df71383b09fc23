"""ehr: one hospital and what fhirbridge keeps in its EHR.

`context` (App: one hospital's config, the Case store, its EHR client, keys and mappings, made lazily),
`task` (the referral Task: BSeR fulfil Task, its status per step), `order` (a second-opinion
ServiceRequest, for EHRs that cannot write one), `data_request` (a reviewer's request for more records, a
CDex Task), `audit` (BALP AuditEvents: the accounting of disclosures), `subscriptions` (FHIR
Subscriptions Backport: asking the EHR to notify us), `capabilities` (what the EHR can do for the write-back:
its CapabilityStatement, the vendor profile, the pins), `write_plan` (the way the opinion is filed, chosen from
them), `plan_view` (the plan as `doctor` shows it), `treatment` (the planned treatment an order names and what
the chart shows became of it: reads only), `cds` (CDS Hooks: draft orders to second-opinion cards, and the
order of an accepted suggestion).

Rule: may import `config`, `store`, `fhir`, `crypto`, `ops`, `steps` and the root modules. Never the
loop (the loop drives these, not the other way round), never Flask, the service, the pages or the CLI.
"""
