"""Deliver: the sealed package to the Case's reviewer (outbox or HTTPS, exchange.transport), once per package.

Before it goes: the order still stands, and the patient's Consents are read again (one search): a Consent
recorded since collect still stops the disclosure, or sends the Case back to collect when it now keeps
records back. The disclosure is accounted for (BALP AuditEvent) before the step is recorded.
"""
from __future__ import annotations

from fhirbridge.ehr import audit
from fhirbridge.ehr.context import App
from fhirbridge.exchange.transport import deliver
from fhirbridge.loop import guards
from fhirbridge.loop.collect import has_collected, load_collected
from fhirbridge.loop.result import StepResult, sent_back
from fhirbridge.loop.seal import package_dir
from fhirbridge.steps import Step
from fhirbridge.store.store import Case


def deliver_step(app: App, case: Case) -> StepResult:
    sr = guards.check_order(app, case)
    guards.show_step_on_task(app, case)
    reviewer = app.config.reviewer(case.reviewer)
    if not (package_dir(app, case) / "package.jwe").exists():
        return sent_back(Step.SEAL, "sealed package missing from data_dir; sealing again")
    # The collected records are only opened when the patient has a Consent that concerns this reviewer.
    consents = guards.check_consent(app, case, sr)
    if consents.rules and (not has_collected(app, case)
                           or consents.denies_any(load_collected(app, case).resources)):
        return sent_back(Step.COLLECT, "a patient Consent now keeps back records in the package; collecting again",
                         consents=consents.refs)
    detail = deliver(reviewer, package_dir(app, case), str(case.package_id))
    # The accounting of this disclosure (BALP), recorded before the step is: once per package, even when
    # the step is repeated; written to the EHR too when [audit] write_to_ehr (a failure there is retried).
    audit.record_disclosure(app, case, detail)
    # The Case's due_at was set at seal, from the same value the package carries (config Reviewer.due_at).
    return StepResult(detail)
