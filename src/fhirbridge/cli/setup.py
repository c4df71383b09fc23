"""Init, doctor, db, demo: set up, check, migrate, try it."""
from __future__ import annotations

import argparse
from pathlib import Path

from fhirbridge import jsonutil
from fhirbridge.cli.common import say
from fhirbridge.config import loader as config
from fhirbridge.config.starter import check_starter_args, write_starter
from fhirbridge.demo.run import run_demo
from fhirbridge.ehr import plan_view
from fhirbridge.exchange.render import terminal_safe
from fhirbridge.ops import doctor
from fhirbridge.store import migrations
from fhirbridge.store.store import Store


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("init", help="write a starter fhirbridge.toml and the hospital's keys")
    s.add_argument("dir", nargs="?", default=".")
    s.add_argument("--fhir-base-url", default="http://127.0.0.1:8090/fhir")
    s.add_argument("--hospital-name", default="General Hospital")
    s.add_argument("--force", action="store_true", help="overwrite an existing config and keys")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("doctor", help="check the EHR connection (TLS, capabilities, SMART token and scopes, "
                                      "write-back) and the reviewers; prints each failure's fix, exits 1 on any")
    s.add_argument("--json", action="store_true", help="the results as JSON (for automation)")
    s.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="connect timeout per request (default 5)")
    s.set_defaults(func=cmd_doctor)

    db = sub.add_parser("db", help="the Case store's schema (migrations)").add_subparsers(dest="db_cmd", required=True)
    s = db.add_parser("upgrade", help="migrate the store to the newest schema (also done at every start)")
    s.set_defaults(func=cmd_db)
    s = db.add_parser("current", help="show the store's schema revision, changing nothing")
    s.set_defaults(func=cmd_db)

    s = sub.add_parser("demo", help="run the whole loop against a local demo EHR (needs fhirbridge[demo])")
    s.add_argument("--dir", default="fhirbridge-demo",
                   help="where to put the demo's files (default: ./fhirbridge-demo)")
    s.add_argument("--keep-ehr", action="store_true", help="leave the demo EHR running at the end")
    s.add_argument("--keep", action="store_true",
                   help="at the end, serve the dashboard, physician app and reviewer portal against the demo EHR "
                        "until Ctrl-C (then stop all of it)")
    s.set_defaults(func=cmd_demo)


def cmd_init(args) -> int:
    # Checked here, before anything is written: a wrong URL must not leave keys and a config behind.
    check_starter_args(fhir_base_url=args.fhir_base_url, hospital_name=args.hospital_name)
    paths = write_starter(Path(args.dir), fhir_base_url=args.fhir_base_url, hospital_name=args.hospital_name,
                          force=args.force)
    say(f"wrote {paths['config']}")
    say(f"wrote {paths['private_keys']} (private: mode 0600, keep it secret and backed up)")
    say(f"wrote {paths['public_keys']} (public: give this to your reviewers)")
    say(f"next: edit {paths['config']} (EHR URL, reviewers), then `fhirbridge --config {paths['config']} run`")
    return 0


def cmd_doctor(args) -> int:
    """Check one hospital's EHR connection (and the reviewers): a pass/fail table with a fix for each failure."""
    cfg = config.load(args.config)
    hospital = cfg.hospital_named(args.hospital)
    report = doctor.run(cfg, hospital, timeout=(args.timeout, args.timeout * 3),
                        plan_for=plan_view.for_hospital(cfg, hospital))
    # The checks quote the EHR's own words (its OperationOutcome diagnostics): text, never terminal commands.
    print(jsonutil.dumps(report.as_dict(), pretty=True).decode() if args.json else terminal_safe(doctor.render(report)))
    return 0 if report.ok else 1


def cmd_db(args) -> int:
    """The store's schema: `upgrade` migrates it to this version's newest revision (every start does that
    too), `current` shows where it is without changing anything."""
    cfg = config.load(args.config)
    store = Store(cfg.store_url, create=False)
    try:
        if args.db_cmd == "upgrade":
            before, after = store.upgrade()
            say(f"store schema at {after} (head)" if before == after
                else f"store schema upgraded from {before or 'none'} to {after} (head)")
            return 0
        rev, newest = store.schema_revision(), migrations.head()
        if rev == newest:
            say(f"store schema at {rev} (head)")
        else:
            say(f"store schema at {rev or 'none (empty, or made before migrations)'}; newest is {newest}: "
                "`fhirbridge db upgrade` (or any start) migrates it")
        return 0
    finally:
        store.close()


def cmd_demo(args) -> int:
    return run_demo(Path(args.dir), keep_ehr=args.keep_ehr, keep=args.keep)
