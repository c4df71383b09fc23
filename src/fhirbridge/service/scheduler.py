"""The long-running service: one scheduler per process ticking intake, work, inbox, overdue and outcomes checks.

APScheduler 3.x BackgroundScheduler, in-memory job store, `coalesce` and `max_instances=1`: a tick that
overruns its interval is not run twice at once, and missed ticks collapse into one. Every replica and
every gunicorn worker runs the same ticks; the database decides who does what (claimed steps, a claimed
polling cursor per hospital), so adding replicas needs no coordination beyond the shared store.

Shutdown (SIGTERM from gunicorn or the orchestrator): `stop()` sets a flag that ends each work loop after
the step in hand, then waits for running ticks. A step that cannot finish in time is abandoned with its
lease, and another replica takes it over when the lease lapses.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler

from fhirbridge.config.model import Config
from fhirbridge.crypto import files
from fhirbridge.ehr.context import App
from fhirbridge.errors import ConfigError
from fhirbridge.loop.accepted_orders import place, place_due
from fhirbridge.loop.actions import flag_overdue
from fhirbridge.loop.followup import run_followups
from fhirbridge.loop.intake import poll
from fhirbridge.loop.outcomes import follow_outcomes
from fhirbridge.loop.receive import process_inbox
from fhirbridge.loop.runner import lease_seconds, run_pending
from fhirbridge.ops import metrics
from fhirbridge.store.followups import FollowUps
from fhirbridge.store.order_requests import OrderRequests
from fhirbridge.store.store import new_id, worker_id

log = logging.getLogger("fhirbridge.service.scheduler")
STEPS_PER_TICK = 20
ORDER_THREADS = 4      # accepted orders placed at once by one process (each a few EHR round trips)
# Below gunicorn's default graceful_timeout (60 s, FHIRBRIDGE_GRACEFUL_TIMEOUT): time is left to release claims.
STOP_DEADLINE = float(os.environ.get("FHIRBRIDGE_STOP_DEADLINE", "45"))


MARKER = ".fhirbridge-data-dir"


def check_shared_data_dir(config: Config, store) -> None:
    """Every replica must work on ONE data_dir (a shared volume): a Case collected on one replica is sealed,
    delivered or filed by whichever claims its next step, from files in data_dir. The store remembers the
    id of the data_dir it belongs to; a replica whose data_dir lacks that id (another volume, a local disk)
    refuses to start instead of stranding Cases half-way."""
    files.private_dir(config.data_dir)
    marker = config.data_dir / MARKER

    def on_disk() -> str | None:
        try:
            return marker.read_text().strip() or None
        except FileNotFoundError:
            return None

    # The marker file is made before the store records it, and exclusively: written whole to a temp file,
    # then hard-linked into place (link fails if the marker exists), so no worker ever reads it half-written
    # (an O_EXCL create was visible empty for a moment, and a worker reading then recorded an empty id).
    # Workers starting together on a fresh volume all end up with the one id that won, and the store never
    # names an id whose file is not on disk yet.
    for _attempt in range(50):
        in_store = store.get_cursor("*", "data-dir-id")
        if in_store is not None:
            break
        if on_disk() is None:
            tmp = config.data_dir / f".{MARKER}.{os.getpid()}.{new_id()}"
            with files.open_private(tmp, exclusive=True) as f:
                f.write((new_id() + "\n").encode())
            try:
                os.link(tmp, marker)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        ident = on_disk()
        if ident is None:
            time.sleep(0.1)
            continue
        claimed, _ = store.claim_cursor("*", "data-dir-id", worker="setup", lease_seconds=30)
        if claimed:
            store.save_cursor("*", "data-dir-id", worker="setup", value=ident)
        else:
            time.sleep(0.1)  # another worker is recording it right now
    if on_disk() != store.get_cursor("*", "data-dir-id"):
        raise ConfigError(f"{config.data_dir} is not the data_dir the other replicas of this store use: all "
                          "replicas must share one data_dir (mount the same volume)", file=str(config.file),
                          key="fhirbridge.data_dir")


class Service:
    def __init__(self, config: Config, *, progress: Callable[[str], None] | None = None):
        self.config = config
        kw = {"progress": progress} if progress else {}
        self.apps = App.per_hospital(config, **kw)
        self.store = self.apps[0].store
        check_shared_data_dir(config, self.store)
        self.worker = worker_id()
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.scheduler: BackgroundScheduler | None = None
        self._catch_up: dict[str, bool] = {}  # hospital key -> asked again while its catch-up poll ran
        self._catch_up_lock = threading.Lock()
        self._orders: ThreadPoolExecutor | None = None
        self._orders_lock = threading.Lock()

    def app_for(self, hospital: str | None) -> App:
        if hospital is None and len(self.apps) == 1:
            return self.apps[0]
        wanted = self.config.hospital_named(hospital)
        return next(a for a in self.apps if a.hospital.key == wanted.key)

    def app_for_key(self, key: str) -> App | None:
        return next((a for a in self.apps if a.hospital.key == key), None)

    # --- ticks: each safe to run in any replica at any time ------------------------------------------

    def tick_poll(self) -> None:
        for app in self.apps:
            self._guard("poll", app, lambda a: poll(a, worker=self.worker, lease_seconds=lease_seconds(a)))

    def place_soon(self, app: App, request_id: str) -> None:
        """Place an order the API just accepted, off the request's thread (loop/accepted_orders.py). Not
        placed here (stopping, or another worker claimed it first): the work tick places it."""
        if self.stopping.is_set():
            return
        with self._orders_lock:
            if self._orders is None:
                self._orders = ThreadPoolExecutor(max_workers=ORDER_THREADS, thread_name_prefix="place-order")
            pool = self._orders
        pool.submit(self._guard, "place order", app,
                    lambda a: place(a, worker=self.worker, request_id=request_id))

    def tick_work(self) -> None:
        # A bounded number of steps per hospital per tick, so one hospital's backlog cannot starve the others.
        for app in self.apps:
            if self.stopping.is_set():
                return
            # Accepted orders first: a pending one a stopped worker left, or one whose EHR was down.
            self._guard("place orders", app, lambda a: place_due(a, worker=self.worker, limit=STEPS_PER_TICK))
            self._guard("work", app, lambda a: run_pending(a, intake=False, stop=self.stopping,
                                                           max_steps=STEPS_PER_TICK))
            # Follow-up questions to send, answers and corrections to file (loop/followup.py).
            self._guard("follow-ups", app, lambda a: run_followups(a, worker=self.worker, limit=STEPS_PER_TICK))

    def tick_inbox(self) -> None:
        self._guard("inbox", self.apps[0], lambda a: process_inbox(a, apps=self.apps))

    def tick_overdue(self) -> None:
        for app in self.apps:
            self._guard("overdue", app, flag_overdue)

    def tick_outcomes(self) -> None:
        for app in self.apps:
            if self.stopping.is_set():
                return
            self._guard("outcomes", app, follow_outcomes)

    def catch_up(self, app: App) -> None:
        """Poll one hospital now, off the caller's thread: a subscription notification showed missed events
        (service/notify.py) and the EHR is waiting for our answer. One catch-up per hospital at a time in this
        process; asked again meanwhile, it polls once more afterwards, so nothing changed during the first
        poll is missed. Another replica holding the poll claim makes this a no-op: the next tick polls."""
        key = app.hospital.key
        with self._catch_up_lock:
            if key in self._catch_up:
                self._catch_up[key] = True
                return
            self._catch_up[key] = False
        thread = threading.Thread(target=self._catch_up_loop, args=(app,), daemon=True, name="catch-up-poll")
        self._threads.append(thread)
        thread.start()

    def _catch_up_loop(self, app: App) -> None:
        key = app.hospital.key
        while True:
            if not self.stopping.is_set():
                self._guard("catch-up poll", app,
                            lambda a: poll(a, worker=self.worker, lease_seconds=lease_seconds(a)))
            with self._catch_up_lock:
                if not self._catch_up.get(key) or self.stopping.is_set():
                    self._catch_up.pop(key, None)
                    return
                self._catch_up[key] = False

    def _guard(self, what: str, app: App, fn: Callable[[App], object]) -> None:
        """A tick never dies: an EHR that is down now is polled again at the next tick. `fn` is given `app`
        (not a closure over the caller's loop variable)."""
        started = time.monotonic()
        try:
            fn(app)
        except Exception as exc:  # noqa: BLE001 - logged without clinical content; next tick retries
            metrics.tick_failed(what)
            log.warning("%s tick for %s failed: %s", what, app.hospital.name, exc)
            return
        # DEBUG: a tick that did work says so through the lines of what it did (a Case's transition is INFO).
        log.debug("%s tick for %s ran in %.3f s", what, app.hospital.name, time.monotonic() - started)

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.scheduler is not None:
            return
        times = self.config.service
        sched = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
        now = datetime.now()
        for name, fn, seconds in (("poll", self.tick_poll, times.poll_seconds),
                                  ("work", self.tick_work, times.work_seconds),
                                  ("inbox", self.tick_inbox, times.inbox_seconds),
                                  ("overdue", self.tick_overdue, times.overdue_seconds),
                                  ("outcomes", self.tick_outcomes, times.outcomes_seconds)):
            sched.add_job(fn, "interval", seconds=seconds, id=name, name=name, next_run_time=now)
        sched.start()
        self.scheduler = sched
        log.info("service %s started: %d hospital(s)", self.worker, len(self.apps))

    def stop(self, wait: bool = True, deadline: float | None = None) -> None:
        """Stop taking work, let the step in hand finish for up to `deadline` seconds, then release every
        claim this worker still holds (Cases and polling cursors): another replica resumes them at once
        instead of waiting out the lease. A step still running then has its result discarded
        (compare-and-set), so nothing is done twice."""
        deadline = STOP_DEADLINE if deadline is None else deadline
        self.stopping.set()
        ends = time.monotonic() + deadline
        if self.scheduler is not None:
            closer = threading.Thread(target=self.scheduler.shutdown, kwargs={"wait": wait}, daemon=True)
            closer.start()
            closer.join(max(0.0, ends - time.monotonic()))
            self.scheduler = None
        for thread in self._threads:
            thread.join(max(0.0, ends - time.monotonic()))
        with self._orders_lock:
            pool, self._orders = self._orders, None
        if pool is not None:
            closer = threading.Thread(target=pool.shutdown, kwargs={"wait": True, "cancel_futures": True}, daemon=True)
            closer.start()
            closer.join(max(0.0, ends - time.monotonic()))
        try:
            released = (self.store.release_worker(self.worker) + OrderRequests(self.store).release_worker(self.worker)
                        + FollowUps(self.store).release_worker(self.worker))
            if released:
                log.info("service %s released %d claim(s) on stopping", self.worker, released)
        except Exception as exc:  # noqa: BLE001 - the leases lapse anyway
            log.warning("could not release claims on stopping: %s", exc)
        for app in self.apps:
            app.close()
        self.store.close()
        log.info("service %s stopped", self.worker)
