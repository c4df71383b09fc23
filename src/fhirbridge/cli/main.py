"""The `fhirbridge` command: the parser and the dispatch. Each command group lives in its own module
(cases, reviewer, keys, service, setup) with `add_parsers(sub)`; a command returns its exit code."""
from __future__ import annotations

import argparse
import sys

from fhirbridge import VERSION
from fhirbridge.cli import cases, keys, reviewer, service, setup
from fhirbridge.errors import FhirbridgeError
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A long-running worker says what it does; a one-off command only what goes wrong (unless -v).
    logs.setup(level="INFO" if args.verbose or args.command == "worker" else "WARNING")
    try:
        return args.func(args)
    except FhirbridgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every Case resumes where it stopped at the next `fhirbridge run`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
