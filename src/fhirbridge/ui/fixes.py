"""What to do about an error a Case shows: the fix docs/troubleshoot.md gives for it, matched on the words of
the message (the messages are ours, or the EHR's quoted after ours). Many messages already end with what to
do; the fix then repeats nothing and only points at the section."""
from __future__ import annotations

import re

# (pattern on the message, what to do). First match wins; keep in step with docs/troubleshoot.md.
FIXES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p, re.I), fix) for p, fix in (
    (r"connection refused|nothing listens", "The EHR is stopped or the port is wrong. It retries by itself; run "
     "`fhirbridge doctor` if it lasts."),
    (r"DNS: the name", "A typo in the host name, or this machine's DNS: check `fhir_base_url` and "
     "`getent hosts HOST`."),
    (r"plain HTTP, not TLS", "An https:// URL names a plain-http port: give the https port."),
    (r"certificate .* not trusted", "A hospital CA: set REQUESTS_CA_BUNDLE=/path/ca.pem for the service."),
    (r"timed out|did not answer .* in time", "The EHR is down, overloaded or behind a firewall. It retries by "
     "itself; `[hospital.http] timeout_read` if it is only slow."),
    (r"could not reach", "The EHR or the network is down. It retries by itself; run `fhirbridge doctor` if it lasts."),
    (r"SMART token|refused our SMART token|invalid_client", "Check the client registration and scopes in the EHR "
     "(`fhirbridge doctor` shows which scope is missing)."),
    (r"larger than|max_attachment_bytes|too large", "An attachment is over `[limits] max_attachment_bytes`: raise "
     "the limit or leave the document out, then Retry."),
    (r"does not exist in the EHR", "The order names a resource the EHR does not have: correct the order in the "
     "EHR, then Retry."),
    (r"key|JWKS|signature|decrypt", "A key file is missing or wrong: restore it (docs/troubleshoot.md, doctor "
     "checks `keys`), then Retry."),
    (r"EHR answered 4\d\d", "The EHR refused the request; its own words follow. Fix what it says (often a "
     "permission or a profile it enforces), then Retry."),
    (r"unknown reviewer|no reviewer|unknown profile", "Configure the reviewer or profile the order names, then "
     "Retry."),
    (r"Consent", "A patient Consent denies the disclosure: nothing may be sent. Cancel the referral or record "
     "the patient's consent in the EHR, then Retry."),
    (r"^the reviewer needs .* not in the package", "Add the missing record to the chart, then Retry (the chart is "
     "read again); or the referring physician confirms sending without it on the physician page (or POST "
     "/api/cases/<id>/held)."),
    (r"a person must check|may be in the chart", "Check the chart for the note, then `fhirbridge resolve` "
     "(docs/troubleshoot.md, write plans)."),
))
DEFAULT = "See docs/troubleshoot.md for this message; Retry once the cause is fixed."


def fix_for(message: str | None) -> str | None:
    """What to do about `message` (None when there is no message)."""
    if not message:
        return None
    for pattern, fix in FIXES:
        if pattern.search(message):
            return fix
    return DEFAULT
