"""What every command group needs: the hospital context from the arguments, and progress lines."""
from __future__ import annotations

import argparse

from fhirbridge.config import loader as config
from fhirbridge.ehr.context import App


def progress(msg: str) -> None:
    """A line of progress on stdout, at once (a long run shows where it is)."""
    _say(msg)


def app_from_args(args: argparse.Namespace, *, progress: bool = True) -> App:
    """The App of the hospital named by --hospital (or the only one), from --config."""
    return App(config.load(args.config), progress=_say if progress else _quiet,
               hospital_name=getattr(args, "hospital", None))


def _say(msg: str) -> None:
    print(msg, flush=True)


def _quiet(_msg: str) -> None:
    pass
