"""One command for the reliability suites and their figures.

    .venv/bin/python -m tests.reliability.run --full          # the full form; figures to reliability-figures.json
    .venv/bin/python -m tests.reliability.run                 # the CI form (what `pytest` runs anyway)

It runs pytest on tests/reliability with FHIRBRIDGE_RELIABILITY=full (or not), writes the figures as JSON
(FHIRBRIDGE_RELIABILITY_OUT, default reliability-figures.json) and uses the local PostgreSQL for the load
suite's store unless FHIRBRIDGE_TEST_POSTGRES_URL says otherwise. Extra arguments go to pytest (e.g. -k crash).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.run", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full form (figures of docs/reliability.md)")
    parser.add_argument("--out", default="reliability-figures.json", help="where to write the figures (JSON)")
    args, rest = parser.parse_known_args(argv)
    os.environ["FHIRBRIDGE_RELIABILITY"] = "full" if args.full else "ci"
    os.environ["FHIRBRIDGE_RELIABILITY_OUT"] = str(Path(args.out).resolve())
    os.environ.setdefault("FHIRBRIDGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    os.chdir(ROOT)
    # The full load suite runs for many minutes: the per-test timeout of pyproject.toml is for the CI form.
    return pytest.main(["-q", "-p", "no:cacheprovider", "--timeout", "7200" if args.full else "600",
                        "tests/reliability", *rest])


if __name__ == "__main__":
    sys.exit(main())
