"""The `fhirbridge` command."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fhirbridge import __version__, jsonutil

from fhirbridge.config import loader as config
from fhirbridge.ehr.context import App
from fhirbridge.errors import FhirbridgeError


def _progress(msg: str) -> None:
    print(msg, flush=True)


def _app(args, *, progress: bool = True) -> App:
    return App(config.load(args.config), progress=_progress if progress else (lambda _m: None),
               hospital_name=getattr(args, "hospital", None))


# --- commands ------------------------------------------------------------------------------------

def cmd_init(args) -> int:
    from fhirbridge.config.starter import check_starter_args, write_starter
    # Checked here, before anything is written: a wrong URL must not leave keys and a config behind.
    check_starter_args(fhir_base_url=args.fhir_base_url, hospital_name=args.hospital_name)
    paths = write_starter(Path(args.dir), fhir_base_url=args.fhir_base_url, hospital_name=args.hospital_name,
                          force=args.force)
    print(f"wrote {paths['config']}")
    print(f"wrote {paths['private_keys']} (private: mode 0600, keep it secret and backed up)")
    print(f"wrote {paths['public_keys']} (public: give this to your reviewers)")
    print(f"next: edit {paths['config']} (EHR URL, reviewers), then `fhirbridge --config {paths['config']} run`")
    return 0


def cmd_order(args) -> int:
    from fhirbridge.ehr.order import place_order
    with _app(args) as app:
        sr = place_order(app, patient=args.patient, question=args.question, reviewer=args.reviewer,
                         profile=args.profile, requester=args.requester, priority=args.priority)
    print(f"ServiceRequest/{sr['id']}")
    return 0


def cmd_run(args) -> int:
    from fhirbridge.config.mappings import check_all
    from fhirbridge.loop.receive import process_inbox
    from fhirbridge.loop.runner import run_pending
    cfg = config.load(args.config)
    # A typo in a mapping stops the run before any Case is touched; a missing key file is reported and
    # only the Cases that need it wait.
    check_all(cfg.mappings_dir)
    for problem in config.check_files(cfg):
        print(f"warning: {problem}", file=sys.stderr)
    apps = ([App(cfg, progress=_progress, hospital_name=args.hospital)] if args.hospital
            else App.per_hospital(cfg, progress=_progress))
    errors, opened, steps = [], 0, 0
    try:
        inbox = process_inbox(apps[0], apps=apps)
        for path, reason in inbox.refused:
            print(f"refused {path.name}: {reason}", file=sys.stderr)
        for path, reason in inbox.deferred:
            print(f"kept {path.name} in the inbox for the next run: {reason}", file=sys.stderr)
        for app in apps:
            if len(apps) > 1:
                print(f"== {app.hospital.name}", flush=True)
            report = run_pending(app, intake=not args.no_intake, case_id=_case_id(app, args.case),
                                 ignore_backoff=args.now)
            errors += report.errors
            opened += report.opened
            steps += report.steps_done
    finally:
        for app in apps:
            app.close()
        if apps and apps[0].shared_store is not None:
            apps[0].shared_store.close()
    print(f"done: {opened} case(s) opened, {len(inbox.accepted)} opinion(s) received, "
          f"{steps} step(s) completed, {len(errors)} error(s)")
    for e in errors:
        print(f"  {e}", file=sys.stderr)
    return 1 if errors or inbox.refused or inbox.deferred else 0


def _case_id(app: App, prefix: str | None) -> str | None:
    return app.store.find_by_prefix(prefix).id if prefix else None


def _fmt(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def cmd_status(args) -> int:
    with _app(args, progress=False) as app:
        if args.case:
            case = app.store.find_by_prefix(args.case)
            events = app.store.events(case.id)
            if args.json:
                print(jsonutil.dumps({"case": case.__dict__, "events": events}, pretty=True).decode())
                return 0
            rows = [("case", case.id), ("step", case.step), ("order", case.service_request),
                    ("patient", case.patient), ("reviewer", case.reviewer), ("profile", case.profile),
                    ("task", case.task or "-"), ("package", case.package_id or "-"),
                    ("opinion", case.opinion_id or "-"), ("filed as", case.document_reference or "-"),
                    ("created", _fmt(case.created_at)), ("updated", _fmt(case.updated_at)),
                    ("attempts", str(case.attempts)), ("next attempt", _fmt(case.next_attempt_at)),
                    ("last error", case.last_error or "-")]
            for k, v in rows:
                print(f"{k:>13}: {v}")
            print("       events:")
            for e in events:
                detail = ", ".join(f"{k}={v}" for k, v in (e["detail"] or {}).items())
                print(f"   {_fmt(e['at'])}  {e['kind']:<18} {detail}")
            return 0
        cases = app.store.list()
        if args.json:
            print(jsonutil.dumps([c.__dict__ for c in cases], pretty=True).decode())
            return 0
        if not cases:
            print("no cases yet")
            return 0
        print(f"{'case':<8}  {'step':<13}  {'reviewer':<18}  {'updated':<19}  last error")
        for c in cases:
            print(f"{c.id[:8]:<8}  {c.step:<13}  {c.reviewer[:18]:<18}  {_fmt(c.updated_at):<19}  "
                  f"{(c.last_error or '')[:80]}")
        return 0


def cmd_receive(args) -> int:
    from fhirbridge.loop.receive import receive_file
    from fhirbridge.loop.runner import run_pending
    status = 0
    with _app(args) as app:
        for f in args.files:
            try:
                received = receive_file(app, Path(f))
            except FhirbridgeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                status = exc.exit_code
                continue
            print(f"received opinion {received.opinion_id} for case {received.case.id[:8]}")
            run_pending(app, intake=False, case_id=received.case.id)
            case = app.store.get(received.case.id)
            if case.step == "done":
                print(f"filed as {case.document_reference}")
            else:
                print(f"not filed yet ({case.last_error}); `fhirbridge run` will retry", file=sys.stderr)
                status = 1
    return status


def cmd_audit(args) -> int:
    """The accounting of disclosures for one patient: every package sent about them (when, to whom, for
    which order, what kinds and counts of records) and every opinion filed back."""
    from fhirbridge.ehr.audit import accounting
    patient = args.patient if "/" in args.patient else f"Patient/{args.patient}"
    with _app(args, progress=False) as app:
        rows = accounting(app, patient)
    if args.json:
        print(jsonutil.dumps({"patient": patient, "events": rows}, pretty=True).decode())
        return 0
    if not rows:
        print(f"no disclosures recorded for {patient}")
        return 0
    print(f"accounting of disclosures for {patient}")
    for r in rows:
        what = "sent package" if r["kind"] == "disclosure" else "opinion filed"
        print(f"{_fmt(r['at'])}  {what:<13}  {r['recipient']} ({r['recipient_identifier']})")
        print(f"{'':21}case {r['case'][:8]}  order {r['order']}")
        if r["kind"] == "disclosure":
            d = r["details"]
            print(f"{'':21}package {r['package']}")
            print(f"{'':21}records: {d.get('records shared', '?')} shared ({d.get('record types', '?')}), "
                  f"{d.get('records withheld', '?')} withheld, {d.get('attachment files', '0')} attachment file(s)")
        else:
            print(f"{'':21}opinion {r['package']} filed as {r['document_reference'] or '-'}")
        if not r["sent_to_ehr"] and app.config.audit.write_to_ehr:
            print(f"{'':21}not yet in the EHR: {r['ehr_error'] or 'pending'}")
    return 0


def cmd_retry(args) -> int:
    from fhirbridge.loop.runner import retry
    with _app(args) as app:
        case = retry(app, app.store.find_by_prefix(args.case))
    print(f"case {case.id[:8]} is back at {case.step}; `fhirbridge run` will continue it")
    return 0


def cmd_cancel(args) -> int:
    from fhirbridge.loop.runner import cancel
    with _app(args) as app:
        case = cancel(app, app.store.find_by_prefix(args.case), args.reason)
    print(f"case {case.id[:8]} cancelled")
    return 0


def cmd_reviewer_keys(args) -> int:
    from fhirbridge.config.starter import write_reviewer_keys
    out = write_reviewer_keys(Path(args.dir), Path(args.trust) if args.trust else None)
    for k, p in out.items():
        print(f"wrote {p} ({k.replace('_', ' ')})")
    return 0


def cmd_reviewer_serve(args) -> int:
    """The portal for the reviewer's staff; it holds the private key, so it listens on loopback by default
    (put it behind the site's TLS proxy to reach it from elsewhere)."""
    from werkzeug.serving import make_server

    from fhirbridge.exchange.reviewer import TRUST_DIR, TRUST_FILE
    from fhirbridge.ui.reviewer_portal import PortalSettings, create_portal
    key = Path(args.key)
    trust = Path(args.trust) if args.trust else (key.parent / TRUST_DIR if (key.parent / TRUST_DIR).is_dir()
                                                 else key.parent / TRUST_FILE)
    settings = PortalSettings(key=key, trust=trust, work_dir=Path(args.work),
                              mappings_dir=Path(args.mappings) if args.mappings else config.PACKAGE_MAPPINGS,
                              packages_dir=Path(args.packages) if args.packages else None,
                              answers_dir=Path(args.answers) if args.answers else None,
                              pull=args.pull, issuer=args.issuer, form=args.form)
    host, _, port = args.bind.rpartition(":")
    server = make_server(host or "127.0.0.1", int(port), create_portal(settings), threaded=True)
    print(f"reviewer portal on http://{args.bind}/ (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def cmd_reviewer_token(args) -> int:
    """One token per request: the hospital refuses a token it has seen before."""
    from fhirbridge.access.tokens import mint_reviewer_token
    from fhirbridge.crypto.keys import KeyRing
    print(mint_reviewer_token(KeyRing.load(Path(args.key)), issuer=args.issuer, audience=args.audience,
                              lifetime=args.lifetime))
    return 0


def _reviewer_keys(args):
    from fhirbridge.crypto.keys import KeyRing
    from fhirbridge.exchange.reviewer import trust_for
    key = KeyRing.load(Path(args.key))
    return key, trust_for(Path(args.key), Path(args.trust) if args.trust else None)


def cmd_reviewer_open(args) -> int:
    from fhirbridge.exchange.render import render_package
    from fhirbridge.exchange.reviewer import extract_attachments, open_package
    key, trusted = _reviewer_keys(args)
    opened = open_package(Path(args.package), key, trusted)
    if args.json:
        data = jsonutil.dumps(opened.document, pretty=True)
        if args.json == "-":
            sys.stdout.write(data.decode() + "\n")
        else:
            Path(args.json).write_bytes(data)
            print(f"wrote the document Bundle to {args.json}", file=sys.stderr)
    if not args.json or args.json != "-":
        print(f"signature: valid, by hospital key {opened.document['signature'].get('who', {}).get('display', '')}"
              f" (trusted keys: {opened.hospital.source if opened.hospital else '-'})")
        print(render_package(opened.claims, opened.document))
    if args.extract:
        for p in extract_attachments(opened, key, Path(args.extract)):
            print(f"extracted {p}")
    return 0


def cmd_reviewer_answer(args) -> int:
    from fhirbridge.exchange.envelope import write_atomic
    from fhirbridge.exchange.reviewer import answer, open_package
    key, trusted = _reviewer_keys(args)
    opened = open_package(Path(args.package), key, trusted)
    mappings = config.PACKAGE_MAPPINGS if not args.mappings else Path(args.mappings)
    # Sealed to the one hospital whose key verified the package (opened.hospital), never to the whole trust store.
    sealed, claims = answer(opened, Path(args.opinion), key, mappings_dir=mappings, form=args.form)
    write_atomic(Path(args.out), sealed)
    print(f"wrote sealed opinion {claims['jti']} to {args.out}; send it to {claims['aud'].get('display')}")
    return 0


def cmd_serve(args) -> int:
    """Exec gunicorn with the project's config: the HTTP API plus, in each worker, the scheduler."""
    import os
    import shutil
    cfg_path = config.find_config_file(args.config).resolve()
    config.load(cfg_path)  # a bad config fails here with its clear message, not in every worker
    env = dict(os.environ, FHIRBRIDGE_CONFIG=str(cfg_path))
    if args.bind:
        env["FHIRBRIDGE_BIND"] = args.bind
    if args.workers:
        env["FHIRBRIDGE_WORKERS"] = str(args.workers)
    if args.no_scheduler:
        env["FHIRBRIDGE_SCHEDULER"] = "off"
    exe = Path(sys.executable).with_name("gunicorn")
    gunicorn = str(exe) if exe.exists() else shutil.which("gunicorn")
    if not gunicorn:
        raise FhirbridgeError("gunicorn is not installed next to this Python; reinstall fhirbridge")
    conf = Path(__file__).resolve().parent.parent / "service" / "gunicorn_conf.py"
    os.execve(gunicorn, [gunicorn, "-c", str(conf), "fhirbridge.service.app:create_app()"], env)
    return 0  # not reached


def cmd_worker(args) -> int:
    """The scheduler without HTTP: for worker-only replicas. Stops cleanly on SIGTERM/SIGINT."""
    import signal
    import threading
    from fhirbridge.service.scheduler import Service
    svc = Service(config.load(args.config))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_a: done.set())
    svc.start()
    print(f"fhirbridge worker {svc.worker} running ({len(svc.apps)} hospital(s)); SIGTERM stops it", flush=True)
    done.wait()
    print("stopping: finishing the step in hand, taking nothing new", flush=True)
    svc.stop(wait=True)
    return 0


def cmd_subscribe(args) -> int:
    """Register (or bring up to date) each hospital's Subscriptions Backport subscription on its EHR."""
    from fhirbridge.ehr.subscriptions import subscribe
    cfg = config.load(args.config)
    apps = ([App(cfg, hospital_name=args.hospital)] if args.hospital else App.per_hospital(cfg))
    status = 0
    try:
        for app in apps:
            result = subscribe(app, payload=args.payload, heartbeat=args.heartbeat, topic=args.topic)
            for warning in result.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            for off in result.turned_off:
                print(f"{off}: turned off (replaced by this one)")
            beat = f"heartbeat {result.heartbeat} s" if result.heartbeat else "no heartbeat"
            print(f"{result.subscription}: {result.status} ({result.action}; {app.hospital.name}; topic "
                  f"{result.topic}; {result.payload}; {beat}; notifies {result.endpoint})")
            if result.status == "error":
                print(f"error: the EHR put {result.subscription} in error: {result.error or 'no reason given'}. "
                      f"Is fhirbridge serving {result.endpoint} (`fhirbridge serve`) and can the EHR reach it? "
                      "Then run `fhirbridge subscribe` again", file=sys.stderr)
                status = 1
            elif result.status == "requested":
                print(f"note: the EHR has not confirmed the handshake yet; check {result.subscription} later",
                      file=sys.stderr)
    finally:
        for app in apps:
            app.close()
        if apps and apps[0].shared_store is not None:
            apps[0].shared_store.close()
    return status


def cmd_doctor(args) -> int:
    """Check one hospital's EHR connection (and the reviewers): a pass/fail table with a fix for each failure."""
    from fhirbridge.ops.doctor import render, run
    cfg = config.load(args.config)
    report = run(cfg, cfg.hospital_named(args.hospital), timeout=(args.timeout, args.timeout * 3))
    print(jsonutil.dumps(report.as_dict(), pretty=True).decode() if args.json else render(report))
    return 0 if report.ok else 1


def cmd_db(args) -> int:
    """The store's schema: `upgrade` migrates it to this version's newest revision (every start does that
    too), `current` shows where it is without changing anything."""
    from fhirbridge.store import migrations
    from fhirbridge.store.store import Store
    cfg = config.load(args.config)
    store = Store(cfg.store_url, create=False)
    try:
        if args.db_cmd == "upgrade":
            before, after = store.upgrade()
            print(f"store schema at {after} (head)" if before == after
                  else f"store schema upgraded from {before or 'none'} to {after} (head)")
            return 0
        rev, newest = store.schema_revision(), migrations.head()
        if rev == newest:
            print(f"store schema at {rev} (head)")
        else:
            print(f"store schema at {rev or 'none (empty, or made before migrations)'}; newest is {newest}: "
                  "`fhirbridge db upgrade` (or any start) migrates it")
        return 0
    finally:
        store.close()


def cmd_demo(args) -> int:
    from fhirbridge.demo.run import run_demo
    return run_demo(Path(args.dir), keep_ehr=args.keep_ehr)


# --- parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fhirbridge", description="Second-opinion referrals over HL7 FHIR R4.")
    p.add_argument("--config", help="configuration file (default: $FHIRBRIDGE_CONFIG or ./fhirbridge.toml)")
    p.add_argument("--hospital", help="which configured hospital (when the config has several [[hospitals]])")
    p.add_argument("-v", "--verbose", action="store_true", help="log more (never clinical content)")
    p.add_argument("--version", action="version", version=f"fhirbridge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="write a starter fhirbridge.toml and the hospital's keys")
    s.add_argument("dir", nargs="?", default=".")
    s.add_argument("--fhir-base-url", default="http://127.0.0.1:8090/fhir")
    s.add_argument("--hospital-name", default="General Hospital")
    s.add_argument("--force", action="store_true", help="overwrite an existing config and keys")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("order", help="create a second-opinion ServiceRequest in the EHR (as the EHR would)")
    s.add_argument("--patient", required=True, help="Patient id or Patient/id")
    s.add_argument("--question", required=True, help="the clinical question for the reviewer")
    s.add_argument("--reviewer", help="reviewer name from the config (default: routed by profile)")
    s.add_argument("--profile", help="collection profile (default: from the order's specialty, else default)")
    s.add_argument("--requester", help="ordering Practitioner reference, e.g. Practitioner/123")
    s.add_argument("--priority", default="routine", choices=["routine", "urgent", "asap", "stat"])
    s.set_defaults(func=cmd_order)

    s = sub.add_parser("run", help="receive dropped opinions, take in new orders, and do all pending work once")
    s.add_argument("--case", help="only this Case (id or prefix)")
    s.add_argument("--no-intake", action="store_true", help="don't look for new orders")
    s.add_argument("--now", action="store_true", help="retry Cases waiting out a backoff now")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="show Cases, or one Case with its event history")
    s.add_argument("case", nargs="?", help="Case id or prefix")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("receive", help="receive sealed opinion file(s) and file them in the EHR")
    s.add_argument("files", nargs="+")
    s.set_defaults(func=cmd_receive)

    s = sub.add_parser("audit", help="the accounting of disclosures for one patient (what was sent, to whom)")
    s.add_argument("--patient", required=True, help="Patient id or Patient/id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_audit)

    s = sub.add_parser("retry", help="resume a failed Case at the step that failed")
    s.add_argument("case")
    s.set_defaults(func=cmd_retry)

    s = sub.add_parser("cancel", help="cancel a Case (the EHR Task becomes cancelled)")
    s.add_argument("case")
    s.add_argument("--reason", required=True)
    s.set_defaults(func=cmd_cancel)

    from fhirbridge.cli.keys import add_parsers as add_keys_parsers
    add_keys_parsers(sub)

    rev = sub.add_parser("reviewer", help="the reviewer's side: open a package, answer it").add_subparsers(
        dest="reviewer_cmd", required=True)
    s = rev.add_parser("keys", help="make a reviewer key pair in DIR")
    s.add_argument("dir")
    s.add_argument("--trust", help="the hospital's public JWKS to trust (copied to DIR/trusted.jwks.json; to trust "
                                   "several hospitals, use a DIR/trusted/ directory with one <hospital>.jwks.json "
                                   "file each instead)")
    s.set_defaults(func=cmd_reviewer_keys)
    s = rev.add_parser("serve", help="the reviewer portal: read packages and answer them in a browser")
    s.add_argument("--key", required=True, help="the reviewer's private JWKS")
    s.add_argument("--trust", help="trusted hospitals' public JWKS (file or directory; default next to --key)")
    s.add_argument("--packages", help="directory where packages are delivered to you (outbox / https transport)")
    s.add_argument("--answers", help="directory for sealed opinions of delivered packages (the hospital's inbox)")
    s.add_argument("--pull", action="append", default=[], metavar="URL",
                   help="a hospital's reviewer API (<its public URL>/reviewer); repeatable")
    s.add_argument("--issuer", help="your organisation identifier value, as the hospitals have it (for --pull)")
    s.add_argument("--work", default="reviewer-portal", help="working directory (pulled packages, answers sent)")
    s.add_argument("--form", default="default", help="opinion form in mappings/opinion/")
    s.add_argument("--mappings", help="mappings directory (default: the shipped one)")
    s.add_argument("--bind", default="127.0.0.1:8090", help="host:port (default 127.0.0.1:8090)")
    s.set_defaults(func=cmd_reviewer_serve)
    s = rev.add_parser("token", help="print a short-lived signed token for the hospital's reviewer API")
    s.add_argument("--key", required=True, help="the reviewer's private JWKS")
    s.add_argument("--issuer", required=True, help="your organisation identifier value, as the hospital has it")
    s.add_argument("--audience", required=True, help="the hospital's reviewer API: <its public URL>/reviewer")
    s.add_argument("--lifetime", type=int, default=120, help="seconds (at most 300)")
    s.set_defaults(func=cmd_reviewer_token)
    for name, helptext in (("open", "verify, decrypt and summarise a package"),
                           ("answer", "turn a structured answer into a sealed opinion")):
        s = rev.add_parser(name, help=helptext)
        s.add_argument("package", help="the package directory (or its package.jwe)")
        s.add_argument("--key", required=True, help="the reviewer's private JWKS")
        s.add_argument("--trust", help="the trusted hospitals: one hospital's public JWKS file, or a directory of "
                                       "*.jwks.json files, one per hospital (default: trusted.jwks.json or "
                                       "trusted/ next to --key); the opinion is sealed only to the hospital "
                                       "that signed the package")
        if name == "open":
            s.add_argument("--json", metavar="FILE", help="write the full document Bundle as JSON ('-': stdout)")
            s.add_argument("--extract", metavar="DIR", help="decrypt the separate attachments into DIR")
            s.set_defaults(func=cmd_reviewer_open)
        else:
            s.add_argument("--opinion", required=True, help="the structured answer (TOML or JSON)")
            s.add_argument("--out", required=True, help="where to write the sealed opinion")
            s.add_argument("--form", default="default", help="opinion form in mappings/opinion/")
            s.add_argument("--mappings", help="mappings directory (default: the shipped one)")
            s.set_defaults(func=cmd_reviewer_answer)

    s = sub.add_parser("serve", help="run the service: HTTP API + scheduler, under gunicorn")
    s.add_argument("--bind", help="host:port (default 127.0.0.1:8080, or $FHIRBRIDGE_BIND)")
    s.add_argument("--workers", type=int, help="gunicorn worker processes (default 2)")
    s.add_argument("--no-scheduler", action="store_true", help="serve HTTP only (run `fhirbridge worker` elsewhere)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("worker", help="run the scheduler only (intake, steps, inbox, overdue), no HTTP")
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("subscribe", help="have the EHR notify this service of new and revoked orders (FHIR R4 "
                                         "Subscriptions Backport, rest-hook to [service] public_url)")
    # SUPPRESS: without the option here, the global --hospital (given before the command) stays in effect.
    s.add_argument("--hospital", default=argparse.SUPPRESS, help="only this hospital (default: every one configured)")
    s.add_argument("--payload", choices=["id-only", "full-resource"], default="id-only",
                   help="what each notification carries: the order's id (read back from the EHR) or the order "
                        "itself (default: id-only)")
    s.add_argument("--heartbeat", type=int, default=120, metavar="SECONDS",
                   help="ask the EHR for a heartbeat this often, so missed events show (0: none; default 120)")
    s.add_argument("--topic", help="the EHR's SubscriptionTopic canonical URL (default: discovered from the EHR)")
    s.set_defaults(func=cmd_subscribe)

    s = sub.add_parser("doctor", help="check the EHR connection (TLS, capabilities, SMART token and scopes, write-back) "
                                      "and the reviewers; prints each failure's fix, exits 1 on any")
    s.add_argument("--json", action="store_true", help="the results as JSON (for automation)")
    s.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="connect timeout per request (default 5)")
    s.set_defaults(func=cmd_doctor)

    db = sub.add_parser("db", help="the Case store's schema (migrations)").add_subparsers(dest="db_cmd", required=True)
    s = db.add_parser("upgrade", help="migrate the store to the newest schema (also done at every start)")
    s.set_defaults(func=cmd_db)
    s = db.add_parser("current", help="show the store's schema revision, changing nothing")
    s.set_defaults(func=cmd_db)

    s = sub.add_parser("demo", help="run the whole loop against a local demo EHR (needs fhirbridge[demo])")
    s.add_argument("--dir", default="fhirbridge-demo", help="where to put the demo's files (default: ./fhirbridge-demo)")
    s.add_argument("--keep-ehr", action="store_true", help="leave the demo EHR running at the end")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fhirbridge.ops import logs
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
