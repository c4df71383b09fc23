"""What every command group needs: the hospital context from the arguments, and lines for the terminal."""
from __future__ import annotations

import argparse
import sys

from fhirbridge.config import loader as config
from fhirbridge.ehr.context import App
from fhirbridge.exchange.render import terminal_safe


def say(msg: str, *, err: bool = False) -> None:
    """A line for the operator's terminal, on stdout (stderr with err=True), at once. Errors, key listings
    and what an EHR or a peer said carry text from outside: its escape sequences and controls are dropped
    (newline and tab kept) so that it can never retitle, clear or rewrite the terminal (issue 13, S13)."""
    print(terminal_safe(msg), file=sys.stderr if err else sys.stdout, flush=True)


def progress(msg: str) -> None:
    """A line of progress on stdout, at once (a long run shows where it is)."""
    say(msg)


def app_from_args(args: argparse.Namespace, *, progress: bool = True) -> App:
    """The App of the hospital named by --hospital (or the only one), from --config. A name no hospital has
    is refused here, with the names there are, even by a command that never reads the hospital (status)."""
    cfg = config.load(args.config)
    name = getattr(args, "hospital", None)
    if name is not None:
        cfg.hospital_named(name)  # ConfigError: no hospital named 'Nowhere' (configured: ...)
    return App(cfg, progress=say if progress else _quiet, hospital_name=name)


def _quiet(_msg: str) -> None:
    pass
