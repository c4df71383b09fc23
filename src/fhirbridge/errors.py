"""Error types. Every error a user can cause or meet carries a message that says what to do.

The CLI prints `str(err)` and exits with `err.exit_code`; nothing here may contain PHI (patient names,
clinical text): messages name resources by type and id, files by path, config keys by dotted name.
"""
from __future__ import annotations

# The exit codes of the `fhirbridge` command (docs/troubleshoot.md has the table; tests/cli/test_exit_codes.py
# checks that it matches). 0: done; 1: something failed (FhirbridgeError, a step's error, a refused file);
# the others below, and each error kind's `exit_code`. Kept stable: scripts and unit files test them.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_STORE_UNREACHABLE = 5   # the Case store's database cannot be reached
EXIT_PORT_IN_USE = 6         # `serve`: the address to listen on is taken, or cannot be listened on
EXIT_USAGE = 2               # a bad command line (argparse's own code; a ConfigError shares it)
EXIT_INTERRUPTED = 130       # Ctrl-C (128 + SIGINT)


class FhirbridgeError(Exception):
    exit_code = 1


class ConfigError(FhirbridgeError):
    """A bad configuration: names the file and the key."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file, self.key, self.detail = file, key, message
        where = ""
        if file and key:
            where = f"{file}: {key}: "
        elif file:
            where = f"{file}: "
        elif key:
            where = f"{key}: "
        super().__init__(f"config error: {where}{message}")


class FhirError(FhirbridgeError):
    """The FHIR server answered with an error, or could not be reached.

    `transient` says whether trying the same step later may succeed (server down, 5xx, 429, timeout);
    a step that fails transiently is retried by the next `fhirbridge run`, never abandoned.
    """

    def __init__(self, message: str, *, status: int | None = None, transient: bool = False,
                 outcome: dict | None = None):
        self.status, self.transient, self.outcome = status, transient, outcome
        super().__init__(message)


class PartialTransaction(FhirError):
    """A `transaction` answered 2xx (or an error) with some entries written and others refused: the server did
    not run it all-or-nothing (a batch in disguise, or no rollback). What was written must be found and reused
    before anything is sent again. `statuses`: each entry's response.status, in request order."""

    def __init__(self, message: str, *, statuses: list[str], status: int | None = None):
        self.statuses = statuses
        super().__init__(message, status=status, transient=True)


class InvalidResource(FhirbridgeError):
    """A resource failed FHIR R4 validation. `where` names it (type/id or file), `reasons` say why."""

    def __init__(self, where: str, reasons: list[str]):
        self.where, self.reasons = where, reasons
        super().__init__(f"invalid FHIR resource {where}: " + "; ".join(reasons))


class SealError(FhirbridgeError):
    """A package or opinion could not be opened: tampered, truncated, wrong key, bad signature."""

    exit_code = 3


class RejectedOpinion(FhirbridgeError):
    """An opinion was refused before anything was written (unknown Case, already filed, wrong sender...)."""

    exit_code = 4


class OpinionNotYet(FhirbridgeError):
    """An opinion arrived while its Case is sending the reviewer more records (step supplement): nothing is
    written and the opinion is not refused; it is taken once the supplement has gone (moments later). The inbox
    keeps the file for its next pass; the reviewer API answers 503 with Retry-After."""

    retry_after = 30


class UsageError(FhirbridgeError):
    """A command line that cannot work (an option's value makes no sense): says what to give instead."""

    exit_code = EXIT_USAGE


class PortInUse(FhirbridgeError):
    """`serve` cannot listen where it was asked to (taken, not an address of this machine, privileged)."""

    exit_code = EXIT_PORT_IN_USE


class CaseError(FhirbridgeError):
    """A Case cannot do what was asked (unknown id, wrong state)."""


class ConsentDenied(FhirbridgeError):
    """A patient's Consent forbids this disclosure, or cannot be evaluated: the Case stops before anything is
    sent (permanent: trying again changes nothing until the Consent does). `consent` is "Consent/<id>"."""

    def __init__(self, message: str, *, consent: str):
        self.consent = consent
        super().__init__(message)
