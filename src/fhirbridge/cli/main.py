"""The `fhirbridge` command: the parser and the dispatch. Each command group lives in its own module
(cases, reviewer, keys, service, setup) with `add_parsers(sub)`; a command returns its exit code."""
from __future__ import annotations

import argparse
import os
import sys

import sqlalchemy.exc

from fhirbridge import VERSION
from fhirbridge.cli import cases, keys, reviewer, service, setup
from fhirbridge.cli.common import say
from fhirbridge.errors import EXIT_INTERRUPTED, EXIT_STORE_UNREACHABLE, EXIT_USAGE, FhirbridgeError
from fhirbridge.ops import logs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fhirbridge", description="Second-opinion referrals over HL7 FHIR R4.")
    p.add_argument("--config", help="configuration file (default: $FHIRBRIDGE_CONFIG or ./fhirbridge.toml)")
    p.add_argument("--hospital", help="which configured hospital (when the config has several [[hospitals]])")
    p.add_argument("-v", "--verbose", action="store_true", help="log more (never clinical content)")
    p.add_argument("--version", action="version", version=f"fhirbridge {VERSION}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (setup, cases, keys, reviewer, service):
        group.add_parsers(sub)
    return p


# Commands that work on every configured hospital at once, or on none: `--hospital` would be ignored.
_ALL_HOSPITALS = ("init", "db", "demo", "reviewer", "serve", "worker")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "hospital", None) is not None and args.command in _ALL_HOSPITALS:
        say(f"error: --hospital does not apply to `{args.command}`, which works on every hospital the "
            "configuration names (or none); leave it out", err=True)
        return EXIT_USAGE
    # A long-running worker says what it does; a one-off command only what goes wrong (unless -v).
    logs.setup(level="INFO" if args.verbose or args.command == "worker" else "WARNING")
    try:
        return args.func(args)
    except FhirbridgeError as exc:
        # An error may quote the EHR, a reviewer or a file (an OperationOutcome's diagnostics): printed as
        # text, never as terminal commands (issue 13, S13).
        say(f"error: {exc}", err=True)
        return exc.exit_code
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
        # The database is down or refuses us: one line, not the driver's traceback. The driver's first line
        # names host and port (never the password: psycopg leaves it out of its messages).
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        say(f"error: cannot reach the Case store ([fhirbridge] store_url): {reason}. Is the database running "
            "and is store_url right? `fhirbridge doctor` checks it", err=True)
        return EXIT_STORE_UNREACHABLE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        say(f"error: {where}{exc.strerror or exc}", err=True)
        return 1
    except KeyboardInterrupt:
        say("interrupted; every Case resumes where it stopped at the next `fhirbridge run`", err=True)
        return EXIT_INTERRUPTED


def console() -> None:
    """The installed `fhirbridge` command and `python -m fhirbridge`: umask 0077 first, so that anything a
    command or a library writes without setting a mode of its own (SQLite's files, a log, a copy) is
    owner-only; the files fhirbridge writes set their modes themselves, whatever the umask (issue 13, S11)."""
    os.umask(0o077)
    sys.exit(main())


if __name__ == "__main__":
    console()
