"""Prometheus metrics, served at /metrics.

Two kinds of figures, kept apart on purpose:

* **What this process did** (counters and histograms, recorded as it happens): step durations by outcome,
  EHR requests by resource type, method and status with their latency and urllib3 retries, packages sent and
  opinions filed per reviewer, failed scheduler ticks, AuditEvent copies the EHR refused. Under gunicorn
  every worker records into prometheus_client's multiprocess directory (PROMETHEUS_MULTIPROC_DIR, set up by
  service/gunicorn_conf.py), so a scrape of any worker shows the whole pod. Sum them across replicas.
* **What the store says now** (gauges, computed from the Case store when /metrics is scraped): Cases by
  hospital and step, the work queue (due, running, backing off), the age of the oldest pending step, Cases
  overdue, AuditEvents owed to the EHR (with `[audit] write_to_ehr`), and the outcome figures of filed opinions
  (ops/outcome_figures.py). They are the same on every replica of
  one store: take `max` across replicas, never `sum`. Computing them at scrape time means no worker has to
  own them, a restart loses nothing, and they cannot drift from `fhirbridge status`.

No label carries clinical content: hospitals and reviewers by their configured names, FHIR resource types,
HTTP methods and status codes, step names.
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import urlsplit

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import and_, func, or_, select

from fhirbridge import VERSION
from fhirbridge.ops.outcome_figures import OutcomeCollector
from fhirbridge.steps import ALL_STEPS, WORK_STEPS, Step
from fhirbridge.store.tables import audit_events, cases, cds_cards, events

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

STEP_SECONDS = Histogram(
    "fhirbridge_step_duration_seconds", "How long one run of a Case step took, by outcome "
    "(done, retry: a transient error, failed, cancelled, back: a work file was missing, other)",
    ["hospital", "step", "outcome"], buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900))
EHR_REQUESTS = Counter(
    "fhirbridge_ehr_requests", "Requests to the EHR's FHIR endpoint by resource type, method and final HTTP "
    "status (\"error\": no answer: connection failure or timeout)", ["hospital", "resource_type", "method", "status"])
EHR_SECONDS = Histogram(
    "fhirbridge_ehr_request_duration_seconds", "EHR request latency, retries included",
    ["hospital", "resource_type", "method"], buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
EHR_RETRIES = Counter(
    "fhirbridge_ehr_retries", "EHR requests repeated after a 429/502/503/504 or a connection failure",
    ["hospital", "resource_type", "method"])
PACKAGES_SENT = Counter("fhirbridge_packages_sent", "Sealed packages delivered, per reviewer", ["hospital", "reviewer"])
OPINIONS_FILED = Counter("fhirbridge_opinions_filed", "Opinions filed in the EHR, per reviewer",
                         ["hospital", "reviewer"])
AUDIT_WRITE_FAILURES = Counter(
    "fhirbridge_audit_ehr_write_failures", "Writes of an AuditEvent to the EHR that failed, by HTTP status "
    "(\"error\": no answer); the AuditEvent stays owed and is tried again (fhirbridge_audit_events_owed)",
    ["hospital", "status"])
CDS_SECONDS = Histogram(
    "fhirbridge_cds_hook_duration_seconds", "How long a CDS Hooks call took to answer, by service and whether it "
    "had to read from the EHR (prefetch incomplete)", ["service", "fetched"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
TICK_FAILURES = Counter("fhirbridge_tick_failures", "Scheduler ticks that failed (the next tick tries again)",
                        ["tick"])

_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
# Events that put a Case into the step it is at now (store events; see loop/runner.py and loop/intake.py).
_ENTERED_STEP = ("opened", "retry", "opinion.received", "adopted")


# --- recording -----------------------------------------------------------------------------------------

# How one run of a step ended (the runner knows; it says so): the label values of STEP_SECONDS.
OUTCOMES = ("done", "retry", "failed", "cancelled", "back", "needs_review", "other")


def step_finished(hospital: str, reviewer: str, step: str, outcome: str, seconds: float) -> None:
    """One step run (loop.runner): its duration by outcome; a delivery or a filing counts too."""
    STEP_SECONDS.labels(hospital, step, outcome).observe(seconds)
    if outcome == "done" and step == Step.DELIVER:
        PACKAGES_SENT.labels(hospital, reviewer).inc()
    elif outcome == "done" and step == Step.FILE:
        OPINIONS_FILED.labels(hospital, reviewer).inc()


def audit_write_failed(hospital: str, status: str) -> None:
    """The EHR refused (or never answered) the write of an AuditEvent (ehr.audit)."""
    AUDIT_WRITE_FAILURES.labels(hospital, status).inc()


def cds_answered(service: str, fetched: bool, seconds: float) -> None:
    CDS_SECONDS.labels(service, "yes" if fetched else "no").observe(seconds)


def tick_failed(tick: str) -> None:
    TICK_FAILURES.labels(tick).inc()


def ehr_observer(hospital: str, base_url: str) -> Callable[..., None]:
    """What fhir.client.FhirClient calls after every request to one hospital's EHR."""
    base_path = urlsplit(base_url).path.rstrip("/")

    def observe(method: str, url: str, status: int | None, seconds: float, retries: int) -> None:
        rtype = resource_type_of(base_path, url)
        EHR_REQUESTS.labels(hospital, rtype, method, str(status) if status else "error").inc()
        EHR_SECONDS.labels(hospital, rtype, method).observe(seconds)
        if retries:
            EHR_RETRIES.labels(hospital, rtype, method).inc(retries)
    return observe


def resource_type_of(base_path: str, url: str) -> str:
    """The label for a request URL: its resource type, "metadata", "transaction" (the base itself), or
    "other" (kept to a small set so a strange URL cannot make a new time series per request)."""
    path = urlsplit(url).path
    rest = path[len(base_path):] if path.startswith(base_path) else path
    first = rest.strip("/").split("/", 1)[0]
    if not first:
        return "transaction"
    if first == "metadata":
        return "metadata"
    return first if _TYPE.fullmatch(first) else "other"


# --- the figures the store holds, computed at scrape time ------------------------------------------------

class StoreCollector:
    """Gauges from the Case store (see the module docstring)."""

    def __init__(self, store, hospital_names: dict[str, str], *, audit_to_ehr: bool = False):
        self.store, self.names, self.audit_to_ehr = store, hospital_names, audit_to_ehr

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("fhirbridge_store_up", "1 when the Case store answered this scrape")
        try:
            snapshot = self._snapshot()
        except Exception:  # noqa: BLE001 - a scrape must answer; the gauge says the store did not
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        by_step, queue, oldest, overdue, owed, cds = snapshot
        per_step = GaugeMetricFamily("fhirbridge_cases", "Cases by hospital and step", labels=["hospital", "step"])
        steps = ALL_STEPS
        hospitals = sorted(set(self.names.values()) | {h for h, _ in by_step})
        for h in hospitals:
            for s in sorted(set(steps) | {s for hh, s in by_step if hh == h}):
                per_step.add_metric([h, s], by_step.get((h, s), 0))
        yield per_step
        depth = GaugeMetricFamily("fhirbridge_queue_depth", "Cases with a step of ours to run (collect, seal, "
                                  f"deliver, file: {', '.join(WORK_STEPS)}) by state: due now, running (claimed), "
                                  "backoff (waiting to retry)", labels=["hospital", "state"])
        for h in hospitals:
            for state in ("due", "running", "backoff"):
                depth.add_metric([h, state], queue.get((h, state), 0))
        yield depth
        age = GaugeMetricFamily("fhirbridge_oldest_pending_step_age_seconds", "How long the Case waiting longest "
                                "at a step of ours has been at it (0: none pending)", labels=["hospital"])
        for h in hospitals:
            age.add_metric([h], oldest.get(h, 0.0))
        yield age
        late = GaugeMetricFamily("fhirbridge_cases_overdue", "Cases awaiting an opinion past the reviewer's "
                                 "turnaround target", labels=["hospital"])
        for h in hospitals:
            late.add_metric([h], overdue.get(h, 0))
        yield late
        if self.audit_to_ehr:
            debt = GaugeMetricFamily("fhirbridge_audit_events_owed", "AuditEvents recorded but not yet written "
                                     "to the EHR ([audit] write_to_ehr): each is tried again with backoff",
                                     labels=["hospital"])
            for h in hospitals:
                debt.add_metric([h], owed.get(h, 0))
            yield debt
        shown = GaugeMetricFamily("fhirbridge_cds_cards", "CDS Hooks cards shown, by rule and the clinician's "
                                  "feedback (accepted, overridden; none: no feedback yet)",
                                  labels=["hospital", "rule", "outcome"])
        for (h, rule, outcome), n in sorted(cds.items()):
            shown.add_metric([h, rule, outcome], n)
        yield shown

    def _name(self, key: str) -> str:
        return self.names.get(key, key)

    def _snapshot(self):
        now = time.time()
        c = cases.c
        entered = (select(c.id, c.hospital, func.coalesce(func.max(events.c.at), c.created_at).label("since"))
                   .select_from(cases.outerjoin(events, and_(events.c.case_id == c.id, or_(
                       events.c.kind.in_(_ENTERED_STEP), events.c.kind.like("%.done"), events.c.kind.like("%.back")))))
                   .where(c.step.in_(WORK_STEPS)).group_by(c.id, c.hospital, c.created_at).subquery())
        running = and_(c.claimed_until.is_not(None), c.claimed_until >= now)
        waiting = and_(c.next_attempt_at.is_not(None), c.next_attempt_at > now)
        with self.store.engine.connect() as conn:
            by_step = {(self._name(h), s): n for h, s, n in
                       conn.execute(select(c.hospital, c.step, func.count()).group_by(c.hospital, c.step))}
            queue: dict[tuple[str, str], int] = {}
            for h, is_running, is_waiting, n in conn.execute(
                    select(c.hospital, running, waiting, func.count()).where(c.step.in_(WORK_STEPS))
                    .group_by(c.hospital, running, waiting)):
                state = "running" if is_running else "backoff" if is_waiting else "due"
                key = (self._name(h), state)
                queue[key] = queue.get(key, 0) + n
            oldest = {self._name(h): max(0.0, now - since) for h, since in
                      conn.execute(select(entered.c.hospital, func.min(entered.c.since)).group_by(entered.c.hospital))}
            overdue = {self._name(h): n for h, n in conn.execute(
                select(c.hospital, func.count())
                .where(and_(c.step == Step.AWAIT_OPINION.value, c.overdue_at.is_not(None)))
                .group_by(c.hospital))}
            a = audit_events.c
            owed = ({self._name(h): n for h, n in conn.execute(
                select(a.hospital, func.count()).where(a.sent_to_ehr.is_(False)).group_by(a.hospital))}
                if self.audit_to_ehr else {})
            k = cds_cards.c
            cds = {(self._name(h), r, o or "none"): n for h, r, o, n in conn.execute(
                select(k.hospital, k.rule, k.outcome, func.count()).group_by(k.hospital, k.rule, k.outcome))}
        return by_step, queue, oldest, overdue, owed, cds


class _ThisProcess:
    """The counters and histograms of this process (when not under gunicorn's multiprocess directory)."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def render(store, hospital_names: dict[str, str], *, audit_to_ehr: bool = False) -> bytes:
    """The text exposition of every metric: this process's (or, under gunicorn, every worker's) and the store's."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())
    registry.register(StoreCollector(store, hospital_names, audit_to_ehr=audit_to_ehr))
    registry.register(OutcomeCollector(store, hospital_names))
    info = GaugeMetricFamily("fhirbridge_info", "fhirbridge version", labels=["version"])
    info.add_metric([VERSION], 1)
    registry.register(_Fixed([info]))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, metrics: list[Metric]):
        self.metrics = metrics

    def collect(self) -> list[Metric]:
        return self.metrics
