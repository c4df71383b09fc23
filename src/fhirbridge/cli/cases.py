"""Order, run, status, receive, audit, retry, resolve, cancel: the Cases of the hospitals this config serves."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from fhirbridge import jsonutil
from fhirbridge.cli.common import app_from_args, progress
from fhirbridge.config import loader as config
from fhirbridge.config.mappings import check_all
from fhirbridge.config.terminology import check_terminology
from fhirbridge.ehr import audit, data_request
from fhirbridge.ehr.audit import accounting, owed
from fhirbridge.ehr.context import App
from fhirbridge.ehr.order import place_order
from fhirbridge.errors import CaseError, FhirbridgeError, UsageError
from fhirbridge.exchange.render import terminal_safe
from fhirbridge.loop.actions import cancel, resolve, retry
from fhirbridge.loop.followup import NotAskable, OverLimit, ask, resolve_followup, run_followups
from fhirbridge.loop.receive import process_inbox, receive_file
from fhirbridge.loop.runner import run_pending
from fhirbridge.steps import ALL_STEPS
from fhirbridge.store.case_query import ListRequest
from fhirbridge.store.followups import FollowUps


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("order", help="create a second-opinion ServiceRequest in the EHR (as the EHR would)")
    s.add_argument("--patient", required=True, help="Patient id or Patient/id")
    s.add_argument("--question", required=True, help="the clinical question for the reviewer")
    s.add_argument("--reviewer", help="reviewer name from the config (default: routed by profile)")
    s.add_argument("--profile", help="collection profile (default: from the order's specialty, else default)")
    s.add_argument("--requester", required=True,
                   help="the ordering clinician, Practitioner/<id> or PractitionerRole/<id> (required: BSeR)")
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
    s.add_argument("--step", help="only Cases at this step (several: comma-separated)")
    s.add_argument("--limit", type=int, default=50,
                   help="how many of the most recently updated Cases to list (default 50, at most 200)")
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

    s = sub.add_parser("resolve", help="answer a Case that needs review: was its write filed in the chart?")
    s.add_argument("case")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--filed", metavar="TYPE/ID", help="it is in the chart as this resource (checked)")
    which.add_argument("--not-filed", action="store_true", help="it is not in the chart: file it once more")
    s.add_argument("--follow-up", metavar="ID", help="the follow-up question or correction that needs review "
                                                      "(`fhirbridge status <case>` lists them), not the Case's opinion")
    s.set_defaults(func=cmd_resolve)

    s = sub.add_parser("ask", help="ask the reviewer a follow-up question about a Case's filed opinion")
    s.add_argument("case")
    s.add_argument("--question", required=True, help="the question (the reviewer reads it; it goes in the chart)")
    s.add_argument("--as", dest="asked_by", metavar="Practitioner/<id>", help="who asks (default: the order's "
                                                                              "requester)")
    s.set_defaults(func=cmd_ask)

    s = sub.add_parser("cancel", help="cancel a Case (the EHR Task becomes cancelled)")
    s.add_argument("case")
    s.add_argument("--reason", required=True)
    s.set_defaults(func=cmd_cancel)


def cmd_order(args) -> int:
    with app_from_args(args) as app:
        sr = place_order(app, patient=args.patient, question=args.question, reviewer=args.reviewer,
                         profile=args.profile, requester=args.requester, priority=args.priority)
    print(terminal_safe(f"ServiceRequest/{sr['id']}"))
    return 0


def cmd_run(args) -> int:
    cfg = config.load(args.config)
    # A typo in a mapping stops the run before any Case is touched; a missing key file is reported and
    # only the Cases that need it wait.
    check_all(cfg.mappings_dir)
    check_terminology(cfg.mappings_dir)
    for problem in config.check_files(cfg):
        print(f"warning: {problem}", file=sys.stderr)
    if args.hospital:
        cfg.hospital_named(args.hospital)  # refused before anything runs, with the configured names
    apps = ([App(cfg, progress=_progress, hospital_name=args.hospital)] if args.hospital
            else App.per_hospital(cfg, progress=_progress))
    errors, opened, steps = [], 0, 0
    try:
        inbox = process_inbox(apps[0], apps=apps)
        for path, reason in inbox.refused:
            print(terminal_safe(f"refused {path.name}: {reason}"), file=sys.stderr)
        for path, reason in inbox.deferred:
            print(terminal_safe(f"kept {path.name} in the inbox for the next run: {reason}"), file=sys.stderr)
        for app in apps:
            if len(apps) > 1:
                print(f"== {app.hospital.name}", flush=True)
            report = run_pending(app, intake=not args.no_intake, case_id=_case_id(app, args.case),
                                 ignore_backoff=args.now)
            # Follow-up questions to send, answers and corrections to file (loop/followup.py).
            steps += run_followups(app)
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
        print(terminal_safe(f"  {e}"), file=sys.stderr)
    return 1 if errors or inbox.refused or inbox.deferred else 0


def _progress(msg: str) -> None:
    # Progress lines can carry the EHR's words (an error it sent): text, never terminal commands.
    progress(terminal_safe(msg))


def _case_id(app: App, prefix: str | None) -> str | None:
    return app.store.find_by_prefix(prefix).id if prefix else None


def _fmt(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def cmd_status(args) -> int:
    with app_from_args(args, progress=False) as app:
        if args.case:
            case = app.store.find_by_prefix(args.case)
            events = app.store.events(case.id)
            audit_rows = [{k: r[k] for k in ("id", "kind", "at", "sent_to_ehr", "ehr_error")}
                          for r in app.store.list_audit(case_id=case.id)]
            if args.json:
                print(jsonutil.dumps({"case": case.__dict__, "events": events, "audit": audit_rows},
                                     pretty=True).decode())
                return 0
            rows = [("case", case.id), ("step", case.step), ("order", case.service_request),
                    ("patient", case.patient), ("reviewer", case.reviewer), ("profile", case.profile),
                    ("task", case.task or "-"), ("package", case.package_id or "-"),
                    ("opinion", case.opinion_id or "-"), ("filed as", case.document_reference or "-"),
                    ("created", _fmt(case.created_at)), ("updated", _fmt(case.updated_at)),
                    ("attempts", str(case.attempts)), ("next attempt", _fmt(case.next_attempt_at)),
                    ("question" if case.step == "needs_review" else "last error", case.last_error or "-")]
            # Issue 16: the reviewer's open requests for more records (read from the EHR: the words live there).
            if data_request.open_refs(case):
                try:
                    for req in data_request.open_requests(app, case):
                        rows.append(("records asked", f"{req.task} ({req.authored[:16]}): {req.text}"
                                     + (f" [query {req.query}]" if req.query else "")))
                except FhirbridgeError as exc:
                    rows.append(("records asked", f"{', '.join(data_request.open_refs(case))} (EHR: {exc})"))
            for s in (case.data or {}).get("supplements", []):
                rows.append(("supplement", f"package {s['package_id'][:8]}: {len(s['sent'])} record(s) sent for "
                                           f"{s['task']}"))
            if app.config.audit.write_to_ehr:
                unsent = [r for r in audit_rows if not r["sent_to_ehr"]]
                rows.append(("audit in EHR", f"{len(audit_rows) - len(unsent)} of {len(audit_rows)} written"
                             + (f"; owed: {unsent[-1]['ehr_error'] or 'not tried yet'}" if unsent else "")))
            # The last error and the events' details can quote the EHR or a reviewer: printed as text only.
            for k, v in rows:
                print(terminal_safe(f"{k:>13}: {v}"))
            for f in FollowUps(app.store).of_case(case.id):
                what = "follow-up" if f["kind"] == "question" else "correction"
                print(terminal_safe(f"{what + ' ' + str(f['seq']):>13}: {f['state']}  {f['id']}  "
                                    f"{f['note'] or f['communication'] or ''}  {f['error'] or ''}".rstrip()))
            print("       events:")
            for e in events:
                detail = ", ".join(f"{k}={v}" for k, v in (e["detail"] or {}).items())
                print(terminal_safe(f"   {_fmt(e['at'])}  {e['kind']:<18} {detail}"))
            return 0
        # --hospital: that hospital's Cases only (without it, every hospital's). Counted per step in the
        # database and one page listed, the most recently updated first: never every Case read (at 100,000
        # Cases that took 4 s and 244 MiB).
        hospitals = (app.hospital.key,) if args.hospital else None
        try:
            asked = ListRequest.from_args({"step": args.step or "", "limit": str(args.limit)})
        except CaseError as exc:
            raise UsageError(str(exc)) from None
        page = app.store.page_cases(replace(asked.filter, hospitals=hospitals), limit=asked.limit)
        if args.json:
            print(jsonutil.dumps([c.__dict__ for c in page.cases], pretty=True).decode())
            return 0
        counts = app.store.count_by_step(hospitals)
        total = sum(counts.values())
        if not total:
            print("no cases yet")
            return 0
        print(f"{total} Case{'' if total == 1 else 's'}: "
              + ", ".join(f"{counts[s]} {s}" for s in ALL_STEPS if counts.get(s)))
        print(f"\n{'case':<8}  {'step':<13}  {'reviewer':<18}  {'updated':<19}  last error")
        for c in page.cases:
            print(terminal_safe(f"{c.id[:8]:<8}  {c.step:<13}  {c.reviewer[:18]:<18}  {_fmt(c.updated_at):<19}  "
                                f"{_note(c)}"))
        if page.next:
            print(f"(the {len(page.cases)} most recently updated shown; --limit, --step, GET /api/cases or the "
                  "dashboard list the others)")
        _print_owed(app)
        _print_open_followups(app, hospitals)
        return 0


def _print_open_followups(app: App, hospitals: tuple[str, ...] | None) -> None:
    """Follow-up questions and corrections not yet filed (loop/followup.py): a Case that is done can still
    have one waiting for the reviewer, or for a person (needs_review)."""
    rows = [r for h in (hospitals or (None,)) for r in FollowUps(app.store).open_rows(hospital=h)]
    if not rows:
        return
    print(f"\n{len(rows)} open follow-up(s):")
    print(f"{'case':<8}  {'kind':<10}  {'#':>2}  {'state':<12}  {'id':<36}  note")
    for r in rows:
        note = "NEEDS REVIEW: `fhirbridge status` of the Case has the question" if r["state"] == "needs_review" \
            else (r["error"] or "")[:60]
        print(terminal_safe(f"{r['case_id'][:8]:<8}  {r['kind']:<10}  {r['seq']:>2}  {r['state']:<12}  "
                            f"{r['id']:<36}  {note}"))


def _note(c) -> str:
    if c.step == "needs_review":
        return f"NEEDS REVIEW: a person must check the chart; `fhirbridge status {c.id[:8]}` has the question"
    if c.step == "await_opinion" and data_request.open_refs(c):
        return f"MORE RECORDS ASKED: the reviewer's request waits for the physician (`fhirbridge status {c.id[:8]}`)"
    if c.step == "await_records":
        return f"HELD: required records missing; {(c.last_error or '')[:60]}"
    return (c.last_error or "")[:80]


def _print_owed(app: App) -> None:
    """AuditEvents the EHR has not accepted yet: never a Case's error, so said here, after the Cases."""
    debt = owed(app)
    if not debt["count"]:
        return
    print(f"\n{debt['count']} AuditEvent(s) not yet in the EHR (owed since {_fmt(debt['oldest_at'])}; "
          f"next attempt {_fmt(debt['next_attempt_at'])}; `fhirbridge run --now` tries at once)")
    if debt["last_error"]:
        # The EHR's words (its OperationOutcome): text, never terminal commands.
        print(terminal_safe(f"  last refusal ({_fmt(debt['last_tried_at'])}): {debt['last_error'][:300]}"))


def _file_followup(app: App, received) -> int:
    """A follow-up answer or a corrected opinion received: filed at once (the worker would, on its next tick)."""
    what = "answer" if received.kind == "answer" else "corrected opinion"
    print(f"received {what} {received.opinion_id} for case {received.case.id[:8]}")
    row = FollowUps(app.store).by_answer(received.opinion_id)
    if row is not None:
        run_followups(app, followup_id=row["id"])
        row = FollowUps(app.store).get(row["id"])
    if row is not None and row["state"] == "filed":
        print(f"filed as {row['note']}")
        return 0
    print(terminal_safe(f"not filed yet ({row and row['error']}); `fhirbridge run` will retry"), file=sys.stderr)
    return 1


def cmd_receive(args) -> int:
    status = 0
    with app_from_args(args) as app:
        for f in args.files:
            try:
                received = receive_file(app, Path(f))
            except FhirbridgeError as exc:
                print(terminal_safe(f"error: {exc}"), file=sys.stderr)
                status = exc.exit_code
                continue
            if received.kind != "opinion":
                status = max(status, _file_followup(app, received))
                continue
            print(f"received opinion {received.opinion_id} for case {received.case.id[:8]}")
            run_pending(app, intake=False, case_id=received.case.id)
            case = app.store.get(received.case.id)
            if case.step == "done":
                print(f"filed as {case.document_reference}")
            else:
                print(terminal_safe(f"not filed yet ({case.last_error}); `fhirbridge run` will retry"), file=sys.stderr)
                status = 1
    return status


_AUDIT_LABELS = {audit.DISCLOSURE: "sent package", audit.FILED: "opinion filed", audit.QUESTION_SENT: "sent question",
                 audit.ADDENDUM_FILED: "addendum filed", audit.CORRECTION_FILED: "correction filed"}


def cmd_audit(args) -> int:
    """The accounting of disclosures for one patient: every package sent about them (when, to whom, for
    which order, what kinds and counts of records) and every opinion filed back."""
    patient = args.patient if "/" in args.patient else f"Patient/{args.patient}"
    with app_from_args(args, progress=False) as app:
        rows = accounting(app, patient)
    if args.json:
        print(jsonutil.dumps({"patient": patient, "events": rows}, pretty=True).decode())
        return 0
    if not rows:
        print(f"no disclosures recorded for {patient}")
        return 0
    print(f"accounting of disclosures for {patient}")
    for r in rows:
        what = _AUDIT_LABELS.get(r["kind"], r["kind"])
        print(terminal_safe(f"{_fmt(r['at'])}  {what:<13}  {r['recipient']} ({r['recipient_identifier']})"))
        print(f"{'':21}case {r['case'][:8]}  order {r['order']}")
        if r["kind"] == "disclosure":
            d = r["details"]
            print(f"{'':21}package {r['package']}")
            print(f"{'':21}records: {d.get('records shared', '?')} shared ({d.get('record types', '?')}), "
                  f"{d.get('records withheld', '?')} withheld, {d.get('attachment files', '0')} attachment file(s)")
        elif r["kind"] == audit.QUESTION_SENT:
            print(f"{'':21}question {r['details'].get('follow-up question', '?')}, message {r['package']}")
        else:
            print(f"{'':21}{_AUDIT_LABELS[r['kind']].split()[0]} {r['package']} filed as "
                  f"{r['document_reference'] or '-'}")
        if not r["sent_to_ehr"] and app.config.audit.write_to_ehr:
            print(terminal_safe(f"{'':21}not yet in the EHR: {r['ehr_error'] or 'pending'}"))
    return 0


def cmd_retry(args) -> int:
    with app_from_args(args) as app:
        before = app.store.find_by_prefix(args.case)
        case = retry(app, before)
    if before.step == "failed" and case.step == "failed":   # routing still fails: say why, not "continues"
        print(terminal_safe(f"case {case.id[:8]} is still failed: {case.last_error}"), file=sys.stderr)
        return 1
    if before.step == "failed":
        print(f"case {case.id[:8]} is back at {case.step}; `fhirbridge run` will continue it")
    else:
        print(f"case {case.id[:8]} had not failed (it is at {case.step}); its wait before the next attempt is "
              "cleared, so the next `fhirbridge run` continues it")
    return 0


def cmd_resolve(args) -> int:
    with app_from_args(args) as app:
        if args.follow_up:
            row = resolve_followup(app, app.store.find_by_prefix(args.case), args.follow_up, filed=args.filed)
            print(f"follow-up {row['seq']} of case {row['case_id'][:8]} is back at {row['state']}; "
                  "`fhirbridge run` will continue it")
            return 0
        case = resolve(app, app.store.find_by_prefix(args.case), filed=args.filed)
    print(f"case {case.id[:8]} is back at {case.step}; `fhirbridge run` will continue it")
    return 0


def cmd_ask(args) -> int:
    """Recorded here, sent by the next run (a Communication in the EHR and a sealed message to the reviewer)."""
    with app_from_args(args) as app:
        case = app.store.find_by_prefix(args.case)
        try:
            row = ask(app, case, args.question, asked_by=args.asked_by)
        except (OverLimit, NotAskable) as exc:
            print(terminal_safe(f"error: {exc}"), file=sys.stderr)
            return 2
        run_followups(app, followup_id=row["id"])
        row = FollowUps(app.store).get(row["id"]) or row
    print(f"follow-up question {row['seq']} of case {case.id[:8]}: {row['state']}"
          + (f" ({row['communication']})" if row["communication"] else "; `fhirbridge run` sends it"))
    return 0


def cmd_cancel(args) -> int:
    with app_from_args(args) as app:
        case = cancel(app, app.store.find_by_prefix(args.case), args.reason)
    print(f"case {case.id[:8]} cancelled")
    return 0
