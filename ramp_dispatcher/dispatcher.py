"""The daemon: claim waiting submissions, start runs, collect them, write results.

This module orchestrates only. Statements live in ``database.queries``, output
parsing in ``results``, messages in ``messages``, retry rules in ``retry``, and
everything a run does in its worker; a run's life is the state machine of
``runs``, and who a daemon is, ``owner``. Two jobs share one thread
(``jobloop``), so they never run at once and need no locks:

- ``collect`` (every ``time_between_collection`` s) moves each run one step
  along its life: record its handle, ask the worker whether it ended, record
  its end, write it back; workers wake it the moment a run ends;
- ``claim`` (every ``poll_interval`` s) renews leases, claims as many waiting
  submissions as there are free slots, starts them, and refreshes queue
  positions; PostgreSQL's NOTIFY and freed slots wake it at once.

Between jobs the daemon sleeps: no busy loop.

Why one file of about 1000 lines: the ``Dispatcher`` is the loop's one object,
and its methods are the run transitions' writes and what each tells (log,
metrics, leaderboards, breaker); split, one run's life would be read across
files. What is not the loop lives elsewhere (``service``: the ``run`` process).
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from .breaker import BreakerSnapshot, CircuitBreaker
from .config import EventConfig
from .database import control, daemons, queries, reports
from .database.failures import is_unavailable, statement_of
from .failure_message import final_failure
from .jobloop import JobLoop
from .leaderboards.refresher import LeaderboardService
from .messages import first_line
from .metrics import Metrics
from .owner import Owner, is_local, new_owner_id, owner_is_dead
from .results import ResultsError
from .trusted_scores import read_results
from .retry import RetryPolicy
from .runs import ActiveRun, RunState
from .sdnotify import SystemdNotifier
from .workers import make_worker
from .workers.base import FailureClass, Handle, RunOutcome, RunRequest, TryLater, Worker, WorkerError

log = logging.getLogger(__name__)

#: how long a daemon's claim on its runs lasts without a heartbeat (at least)
MIN_LEASE = dt.timedelta(seconds=60)
#: how often unfinished runs' external resources are checked for orphans
REAP_INTERVAL_S = 300.0
#: how often a run whose worker reports its end (``Worker.reports_end``) is
#: checked anyway, in case a wake-up was lost
WAKE_SAFETY_NET_S = 30.0
#: how often the one-line summary is sent to systemd (STATUS=)
STATUS_INTERVAL_S = 30.0
#: every error the database driver raises; ``failures.is_unavailable`` tells
#: an outage from a bug
DB_ERRORS = (DBAPIError,)
#: tries of one run's step (record, check, write back) that raise before the
#: run is closed as an infrastructure failure (retried per the retry policy)
MAX_RUN_ERRORS = 3
#: on the run's row when its submission was set back to ``new`` while it ran
RESET_MESSAGE = "its submission was set back to new while the run was in progress; result not written"
#: the longest one run's slow call (its start, the move of its output, its
#: cleanup: see ``runs``) is waited for; past it the run goes on without the
#: call's result, so that a hung call does not hold a slot for ever. Well
#: above the slowest expected: ``conda info`` (60 s) behind another lookup.
SLOW_CALL_LIMIT_S = 300.0
#: threads for the slow calls: a hung one must leave the others room
SLOW_THREADS = 8


class Dispatcher:
    def __init__(
        self,
        engine: Engine,
        config: EventConfig,
        worker: Worker,
        owner: str | None = None,
        notifier: SystemdNotifier | None = None,
    ):
        self.engine = engine
        self.config = config
        self.worker = worker
        self.owner = owner or new_owner_id()
        self.policy = RetryPolicy(
            max_attempts=config.dispatcher.max_attempts,
            base_delay_s=config.dispatcher.retry_delay,
        )
        self.notifier = notifier or SystemdNotifier(env={})
        self.metrics = Metrics(config.ramp.event_name)
        # ramp-board's cached leaderboards, refreshed off the loop
        self.leaderboard = LeaderboardService.for_event(engine, config)
        self.active: dict[int, ActiveRun] = {}
        self.breaker = CircuitBreaker()
        #: the breaker as our ``dispatcher_daemons`` row last said it
        self._breaker_shown: tuple | None = None
        self._started_at: dt.datetime | None = None
        #: slow calls (a run's start, the move of its output, its cleanup or
        #: stop), so that the loop keeps its period meanwhile
        self._slow = ThreadPoolExecutor(max_workers=SLOW_THREADS, thread_name_prefix="dispatcher-slow")
        self.stopped = threading.Event()
        self._last_reap = -REAP_INTERVAL_S  # the first claim cycle reaps
        self._last_status = -STATUS_INTERVAL_S
        self._last_housekeeping = -float("inf")  # the first claim cycle does it
        self._loop: JobLoop | None = None
        self._listener = None
        self._event: queries.EventInfo | None = None
        self._db_down_since: float | None = None

    @classmethod
    def for_event(
        cls, engine: Engine, config: EventConfig, notifier: SystemdNotifier | None = None
    ) -> Dispatcher:
        """A dispatcher with its worker; the owner id also names the worker's resources."""
        owner = new_owner_id()
        folds = queries.FoldsCache()

        def cv_folds(submission_id: int) -> Sequence[tuple[Any, Any]]:
            try:
                with engine.connect().execution_options(sqlite_readonly=True) as conn:
                    return folds.folds(conn, submission_id)
            except DB_ERRORS as exc:
                if is_unavailable(exc):
                    raise TryLater(f"the database is unavailable ({first_line(exc)})") from exc
                raise

        worker = make_worker(
            config.worker_type, config.worker, event_name=config.ramp.event_name, daemon_id=owner,
            database=engine.url.render_as_string(hide_password=True), cv_folds=cv_folds,
        )
        return cls(engine, config, worker, owner=owner, notifier=notifier)

    # ------------------------------------------------------------------ lifecycle

    @property
    def lease(self) -> dt.timedelta:
        return max(MIN_LEASE, dt.timedelta(seconds=3 * self.config.dispatcher.poll_interval))

    @property
    def event(self) -> queries.EventInfo:
        assert self._event is not None, "start() first"
        return self._event

    def start(self) -> None:
        self._started_at = queries.utcnow()
        with self.engine.begin() as conn:
            self._event = queries.load_event(conn, self.config.ramp.event_name)
            queries.update_queue_positions(conn, self.event, full=True)
            gone = daemons.register(conn, self._presence(), self.lease, self._breaker_now(), owner_is_dead)
        self._breaker_shown = self.breaker.key()
        for owner in gone:
            log.info("daemon %s stopped without saying so: its row in dispatcher_daemons removed", owner)
        log.info(
            "dispatcher %s serving event %r: %d worker(s) of type %s",
            self.owner,
            self.event.name,
            self.config.dispatcher.n_workers,
            self.config.worker_type,
        )
        tbc = self.config.dispatcher.time_between_collection
        poll = self.config.dispatcher.poll_interval
        loop = JobLoop()
        loop.add("claim", self._guard(self.claim_cycle), poll)
        loop.add("collect", self._guard(self.collect_cycle), tbc)
        watchdog = self.notifier.watchdog_interval()
        if watchdog:
            # On the loop's own thread: the pings stop if the loop is stuck.
            loop.add("watchdog", self._systemd_ping, watchdog)
        self._loop = loop
        if self.config.dispatcher.metrics_port:
            self.metrics.serve(self.config.dispatcher.metrics_port)
        loop.start()
        if self.engine.dialect.name == "postgresql":
            from .listen import NotifyListener

            self._listener = NotifyListener(self.engine, self.event.id, lambda: self.wake("claim"))
            self._listener.start()
        self.leaderboard.start()  # everything once, beside the first claim
        self.notifier.ready(status=f"serving event {self.event.name}")

    def stop(self) -> None:
        """Stop claiming; leave runs going for the next start to re-attach."""
        self.stopped.set()
        if self._listener is not None:
            self._listener.stop()
        if self._loop is not None:
            self._loop.stop()
        # Slow calls in flight finish (each is bounded: a conda lookup by its
        # timeout); what they leave is the next daemon's: a cancel or reset to
        # write, a run to re-attach or to find. Those not begun are dropped.
        self._slow.shutdown(wait=True, cancel_futures=True)
        self._release_leases()
        self.worker.close()
        self.leaderboard.close()  # finishes a pending refresh, bounded
        self.metrics.close()
        if self.active:
            log.info("left %d run(s) running for the next start to re-attach", len(self.active))

    def _release_leases(self) -> None:
        """At a clean stop, let the next daemon take the runs over at once,
        except runs that live on this host: a restart here re-attaches them
        anyway (their owner's process is gone: ``owner_is_dead``), and a daemon
        of another host must wait the full lease and its grace (it would call
        them lost while they still run here). Our ``dispatcher_daemons`` row goes."""
        keep = self.worker.runs_on_this_host()
        if keep and self.active:
            log.info("leases kept until they lapse (within %s): the runs live on this host, "
                     "another host waits that long plus a grace", self.lease)  # fmt: skip
        try:
            with self.engine.begin() as conn:
                if not keep:
                    queries.release(conn, self.owner)
                daemons.unregister(conn, self.owner)
        except DB_ERRORS as exc:
            log.warning("could not release leases or unregister (%s); they expire in %s",
                        first_line(exc), self.lease)  # fmt: skip

    def reload(self, config: EventConfig) -> None:
        """Apply a re-read event config (SIGHUP) without dropping runs.

        n_workers, limits, intervals and retry settings take effect for what
        starts from now on; the event and the worker type need a restart.
        """
        if (config.ramp.event_name, config.worker_type) != (
            self.config.ramp.event_name,
            self.config.worker_type,
        ):
            log.error("reload refused: changing the event or worker_type needs a restart")
            return
        self.config = config
        self.policy = RetryPolicy(
            max_attempts=config.dispatcher.max_attempts,
            base_delay_s=config.dispatcher.retry_delay,
        )
        self.worker.reconfigure(config.worker)
        self.leaderboard.command = list(config.dispatcher.leaderboard_command or []) or None
        self.leaderboard.interval = config.dispatcher.leaderboard_interval
        if self._loop is not None:
            self._loop.reschedule("claim", config.dispatcher.poll_interval)
            self._loop.reschedule("collect", config.dispatcher.time_between_collection)
        log.info(
            "event config reloaded: %d worker(s), poll every %g s",
            config.dispatcher.n_workers, config.dispatcher.poll_interval,
        )
        self.wake("claim")

    def wake(self, job_id: str) -> None:
        """Run a job now (thread-safe); called by workers and the listener."""
        loop = self._loop
        if loop is None or self.stopped.is_set():
            return
        loop.wake(job_id)

    def _guard(self, job):
        """A job never dies: database outages are logged once and retried."""

        def run() -> None:
            if self.stopped.is_set():
                return
            try:
                job()
                self.metrics.loop_ok()
                if self._db_down_since is not None:
                    log.warning(
                        "database reachable again after %.0f s",
                        time.monotonic() - self._db_down_since,
                    )
                    self._db_down_since = None
            except Exception as exc:
                if is_unavailable(exc):
                    if self._db_down_since is None:
                        self._db_down_since = time.monotonic()
                        log.error("database unavailable (%s); runs are kept, retrying", first_line(exc))
                elif isinstance(exc, DBAPIError):
                    log.exception(
                        "database error in %s, a bug and not an outage (statement: %s); continuing",
                        job.__name__, statement_of(exc) or "?",
                    )
                else:
                    log.exception("unexpected error in %s; continuing", job.__name__)

        run.__name__ = job.__name__
        return run

    # ------------------------------------------------------------------ claim

    def claim_cycle(self) -> None:
        """Housekeeping (about once per poll interval), then claim and launch.

        A cycle woken by news (a freed slot, NOTIFY) only claims; leases are
        renewed, orphans adopted and cancels looked up on the poll's rhythm,
        which keeps each well inside the lease and a cancel within a poll.
        """
        now = time.monotonic()
        if now - self._last_housekeeping < 0.9 * self.config.dispatcher.poll_interval:
            with self.engine.begin() as conn:
                claims = self._claim(conn)
        else:
            self._last_housekeeping = now
            claims = self._housekeeping_and_claim()
        self._close_stopped()
        for claim in claims:
            self._launch(claim)
        # claims, launches and queue positions change the "new" tables (the
        # refresher writes only those that changed)
        self.leaderboard.request([c.submission_id for c in claims], new_only=True)
        self.metrics.set_running(len(self.active))
        self._reap()
        if not self.active and not claims:
            self._on_hunger()

    def _housekeeping_and_claim(self) -> list[queries.Claim]:
        """Renew leases, cancel what an admin cancelled, drop what another daemon
        took over, adopt orphans; then claim."""
        claims: list[queries.Claim] = []
        # runs whose row is collected (their files being freed) are nobody's to renew
        serving = [i for i, r in self.active.items() if r.state is not RunState.CLEANING]
        with self.engine.begin() as conn:
            ours = queries.heartbeat(conn, self.owner, serving, self.lease)
            self._heartbeat(conn)
            adopted = queries.adopt_orphaned_runs(
                conn, self.event, self.owner, self.lease, self.active, owner_is_dead,
                foreign=self._foreign, foreign_grace=self.lease,
            )
            cancels = control.pending_cancels(conn, serving)
            resets = queries.reset_runs(conn, serving)
            # The usual cycle has nothing to stop, drop or take over: it claims
            # in the same transaction, one commit less.
            settled = not adopted and not cancels and not resets and ours == set(serving)
            if settled:
                claims = self._claim(conn)
        if not settled:
            for run_id in cancels:
                if run_id in self.active:
                    self._stop(self.active[run_id], "cancel")
            for run_id in resets:
                if run_id in self.active and run_id not in cancels:
                    self._stop(self.active[run_id], "reset")
            for run_id in set(serving) - ours:
                # Our lease lapsed (a long database outage) and another daemon
                # took the run over: it is theirs to collect now.
                self._drop(self.active[run_id])
            for row in adopted:
                self._reattach(row)
            with self.engine.begin() as conn:
                claims = self._claim(conn)
        return claims

    def _claim(self, conn: Connection) -> list[queries.Claim]:
        """Claim as many waiting submissions as there are free slots; refresh the queue."""
        free = self.config.dispatcher.n_workers - len(self.active)
        claims = []
        if free > 0:
            allowed = self.breaker.allowed_claims(free, time.monotonic())
            if allowed:
                # a submission whose last run's files are being freed waits for that
                busy = [r.submission_id for r in self.active.values() if r.state is RunState.CLEANING]
                claims = queries.claim(
                    conn, self.event, allowed, self.owner, self.config.worker_type, self.lease, busy
                )
                if not claims:
                    self.breaker.probe_not_claimed()  # an empty queue: probe next cycle
            if claims and self.breaker.holding:
                log.warning("circuit breaker: one run claimed as a probe of the platform")
            self._show_breaker(conn)
        queries.update_queue_positions(conn, self.event)
        if self.metrics.serving:
            self.metrics.set_queue_depth(queries.count_waiting(conn, self.event))
        return claims

    def _stop(self, run: ActiveRun, reason: str) -> None:
        """Stop a run an admin cancelled (``ramp-dispatcher cancel``), or whose
        submission an admin set back to ``new`` (``reset``: the admin's
        ``new`` wins over the run's result, and a fresh attempt follows).
        The worker stops it on a slow-call thread (it may wait seconds for
        the run's tree to exit); :meth:`_close_stopped` closes it once stopped."""
        if run.stopping is not None:
            return
        if reason == "cancel":
            log.info("%s: cancelled by an administrator; stopping the run", run.label())
        else:
            log.warning("%s: its submission was set back to new by an administrator while "
                        "the run was in progress; stopping the run, whose result will not be "
                        "written; the submission is then claimed again as a fresh attempt",
                        run.label())  # fmt: skip
        run.stop_reason = reason
        run.stopping = self._slow.submit(self._stop_run, run.request, run.handle, run.slow)
        run.stopping.add_done_callback(lambda _f: self.wake("claim"))

    def _stop_run(self, request: RunRequest, handle: Handle | None, start: Future | None) -> None:
        """On a slow-call thread: a start still in flight is waited for
        (bounded), so that what it started is stopped too."""
        if start is not None and handle is None:
            try:
                handle = start.result(timeout=SLOW_CALL_LIMIT_S)
            except Exception:  # it did not start, or not in time: stop what can be found
                handle = None
        self.worker.cleanup(request, handle or {})

    def _close_stopped(self) -> None:
        """Close the stopped runs (cancelled, or reset by an admin)."""
        for run in [r for r in self.active.values() if r.stopping is not None and r.stopping.done()]:
            self._close_stopped_run(run)

    def _close_stopped_run(self, run: ActiveRun) -> None:
        """A cancelled run is stopped: close it and make its submission final.
        A reset one: close its row only; its submission stays ``new``."""
        assert run.stopping is not None
        if run.stopping.exception() is not None:
            log.error("%s: stopping the run failed", run.label(), exc_info=run.stopping.exception())
        with self.engine.begin() as conn:
            if run.stop_reason == "cancel":
                done = control.write_cancelled(conn, run.run_id, run.submission_id)
            else:
                done = queries.close_superseded(conn, run.run_id, self.owner, RESET_MESSAGE)
        if done and run.stop_reason == "cancel":
            log.info("%s: checking_error (cancelled by an administrator)", run.label())
            self.metrics.outcome("cancelled")
        elif done:
            log.info("%s: stopped and closed without its result (%s)", run.label(), RESET_MESSAGE)
        if done:
            self.leaderboard.request([run.submission_id])
        run.drop()
        del self.active[run.run_id]
        self.wake("claim")

    def _drop(self, run: ActiveRun) -> None:
        """Another daemon holds the run now: forget it, write nothing, and
        tell the worker to stop watching it (it stops nothing of it)."""
        log.warning("%s: taken over by another daemon; dropped", run.label())
        run.drop()
        self.active.pop(run.run_id, None)
        try:
            self.worker.forget(run.request, run.handle or {})
        except Exception:
            log.exception("%s: the worker could not forget the run", run.label())

    def _foreign(self, owner: str) -> bool:
        """A daemon of another host, whose local runs this host cannot reach."""
        return self.worker.runs_on_this_host() and not is_local(owner)

    def _systemd_ping(self) -> None:
        """WATCHDOG=1 while the loop turns, and now and then a STATUS= summary."""
        self.notifier.watchdog()
        if time.monotonic() - self._last_status < STATUS_INTERVAL_S:
            return
        self._last_status = time.monotonic()
        if self._db_down_since is not None:
            self.notifier.status(
                f"database unavailable for {time.monotonic() - self._db_down_since:.0f} s; "
                f"{len(self.active)} run(s) kept"
            )
            return
        if self.breaker.holding:
            self.notifier.status(self.breaker.describe(time.monotonic()))
            return
        try:
            with self.engine.connect().execution_options(sqlite_readonly=True) as conn:
                summary = reports.state_counts(conn, self.event.id, self.event.sandbox_name).summary()
            self.notifier.status(summary)
        except DB_ERRORS as exc:
            log.debug("status summary skipped: %s", first_line(exc))

    def _presence(self) -> daemons.Presence:
        return daemons.Presence(
            self.owner, self.event.id, self.config.worker_type, self._started_at or queries.utcnow()
        )

    def _breaker_now(self) -> BreakerSnapshot:
        return self.breaker.snapshot(time.monotonic(), queries.utcnow())

    def _heartbeat(self, conn: Connection) -> None:
        """Our ``dispatcher_daemons`` row, refreshed with the leases."""
        daemons.heartbeat(conn, self._presence(), self.lease, self._breaker_now())
        self._breaker_shown = self.breaker.key()

    def _show_breaker(self, conn: Connection) -> None:
        """The breaker on our row when it changed, in the caller's transaction
        (a rolled-back one is made good by the next heartbeat)."""
        if self.breaker.key() != self._breaker_shown:
            daemons.show_breaker(conn, self.owner, self._breaker_now())
            self._breaker_shown = self.breaker.key()

    def _reap(self) -> None:
        """Let the worker free resources of runs nobody owns (e.g. instances)."""
        if time.monotonic() - self._last_reap < REAP_INTERVAL_S:
            return
        with self.engine.connect() as conn:
            unfinished = queries.unfinished_runs(conn, self.event)
        self._last_reap = time.monotonic()
        try:
            self.worker.reap(unfinished)
        except Exception:
            log.exception("worker reaper failed; continuing")

    def _request(self, submission_id: int, attempt: int) -> RunRequest:
        ramp = self.config.ramp
        return RunRequest(
            submission_id=submission_id,
            submission_name=f"submission_{submission_id:09d}",
            attempt=attempt,
            kit_dir=ramp.kit_dir,
            data_dir=ramp.data_dir,
            submissions_dir=ramp.submissions_dir,
            logs_dir=ramp.logs_dir,
            predictions_dir=ramp.predictions_dir,
            n_threads=self.config.dispatcher.n_threads,
        )

    def _launch(self, claim: queries.Claim) -> None:
        """A claimed run: the worker starts it on a slow-call thread (a conda
        environment lookup may take a minute); collect takes it on from there
        (:meth:`_started`)."""
        request = self._request(claim.submission_id, claim.attempt)
        run = ActiveRun(
            self.event.name, claim.run_id, claim.submission_id, claim.name, claim.attempt, request
        )
        self.active[run.run_id] = run
        log.info("%s: sent_to_training", run.label())
        self._offload(run, self._start_run, run)

    def _offload(self, run: ActiveRun, call: Callable[..., object], *args: object) -> None:
        """Make the run's current step's slow call on a slow-call thread;
        collect takes the run on when it is over (or overdue)."""
        run.offload(self._slow.submit(call, *args), SLOW_CALL_LIMIT_S)
        assert run.slow is not None
        run.slow.add_done_callback(lambda _f: self.wake("collect"))

    def _start_run(self, run: ActiveRun) -> Handle:
        """On a slow-call thread: the worker's start."""
        request = run.request
        submission_dir = request.submissions_dir / request.submission_name
        if not submission_dir.is_dir():
            raise WorkerError(f"the submission's folder {submission_dir} does not exist")
        return self.worker.start(request, self._waker(run))

    def _take_slow(self, run: ActiveRun) -> bool:
        """Whether the run may take its next step: no slow call in flight, or
        the one in flight is over (its result applied here) or overdue."""
        future = run.slow
        if future is None:
            return True
        overdue = not future.done()
        if overdue and time.monotonic() < run.slow_deadline:
            return False
        run.slow = None
        if run.state is RunState.STARTING:
            self._started(run, future, overdue)
        elif run.state is RunState.FINISHED:
            self._moved(run, future, overdue)
        elif run.state is RunState.CLEANING:
            self._cleaned(run, future, overdue)
        return True

    def _started(self, run: ActiveRun, future: Future, overdue: bool) -> None:
        """STARTING -> STARTED (the handle is recorded next), or ENDED as an
        infrastructure failure if it could not start, or not in time."""
        if overdue:
            log.error("%s: the worker did not start it within %g s; giving up on it",
                      run.label(), SLOW_CALL_LIMIT_S)  # fmt: skip
            run.fail_to_start(f"starting the run took more than {SLOW_CALL_LIMIT_S:g} s")
            # what a late start still starts must not run unwatched
            future.add_done_callback(lambda f: self._stop_late_start(run, f))
            return
        exc = future.exception()
        if exc is None:
            run.started(future.result())
            log.info("%s: training", run.label())
        elif isinstance(exc, WorkerError):
            run.fail_to_start(str(exc))
        else:  # a worker bug must not cost other runs
            log.error("%s: worker failed to start the run", run.label(), exc_info=exc)
            run.fail_to_start(f"worker error: {exc}")

    def _stop_late_start(self, run: ActiveRun, future: Future) -> None:
        """A start given up on finished after all (on its own thread): stop it."""
        if future.cancelled() or future.exception() is not None:
            return
        log.warning("%s: its start finished after it was given up on; stopping it", run.label())
        try:
            self.worker.cleanup(run.request, future.result() or {})
        except Exception:
            log.exception("%s: stopping the late start failed", run.label())

    def _record_handle(self, run: ActiveRun) -> None:
        """STARTED -> RUNNING: store the handle so a restarted daemon can find
        the run. A database outage must not abort the other launches: the run
        stays STARTED and collect tries again."""
        try:
            with self.engine.begin() as conn:
                queries.mark_running(conn, run.run_id, run.handle or {})
        except Exception as exc:
            if not is_unavailable(exc):
                raise  # the run's own error: contained by the caller
            log.warning("%s: handle not recorded yet (%s); will retry", run.label(), first_line(exc))
            return
        run.recorded()

    def _reattach(self, row: queries.RunRow) -> None:
        request = self._request(row.submission_id, row.attempt)
        run = ActiveRun.reattached(
            self.event.name, row.id, row.submission_id, row.submission_name, row.attempt, request,
            row.status, row.handle,
        )  # fmt: skip
        if self._foreign(row.previous_owner):
            # Its host stopped serving it long ago (lease lapsed + grace): what
            # it left there is out of reach. Requeued; its files are not touched.
            run.keep_files = True
            host = Owner.parse(row.previous_owner).host
            run.end(RunOutcome(FailureClass.INFRASTRUCTURE, f"the host running it ({host}) stopped serving it"))
        elif run.state is RunState.STARTING:
            # The daemon died between starting the run and recording its
            # handle: the worker may find it; otherwise it never started.
            handle = self.worker.recover(request)
            if handle is None:
                run.fail_to_start("the dispatcher stopped while starting this run")
            else:
                run.started(handle)  # collect records it
        log.info("%s: re-attached (was %s)", run.label(), row.status)
        self.active[run.run_id] = run

    def _on_hunger(self) -> None:
        if self.config.dispatcher.hunger_policy != "exit":
            return  # None and "sleep": wait for news; polling never spins
        with self.engine.connect() as conn:
            # backing-off retries count as waiting: they will come back
            waiting = queries.count_waiting(conn, self.event, include_backoff=True)
        if waiting == 0:
            log.info("no submission left to run: exiting (hunger_policy: exit)")
            self.stopped.set()

    # ------------------------------------------------------------------ collect

    def _waker(self, run: ActiveRun) -> Callable[[], None]:
        """The callback a worker calls (from its own thread) when the run changed."""

        def wake() -> None:
            run.wake()
            self.wake("collect")

        return wake

    def collect_cycle(self) -> None:
        """Each run one step further along its life (see ``runs``).

        One run's error stays that run's (:meth:`_contain`); only a database
        outage stops the cycle, keeping every run for the next one.
        """
        tbc = self.config.dispatcher.time_between_collection
        freed = False
        for run in list(self.active.values()):
            if run.stopping is not None:
                continue  # cancelled: closed by the claim cycle once stopped
            try:
                self._advance(run, tbc)
            except Exception as exc:
                if is_unavailable(exc):
                    raise
                self._contain(run, exc)
            if run.state is RunState.CLOSED:
                self.active.pop(run.run_id, None)
                freed = True
        if freed:
            self.metrics.set_running(len(self.active))
            self.wake("claim")

    def _advance(self, run: ActiveRun, tbc: float) -> None:
        if not self._take_slow(run):
            return  # its slow call goes on
        if run.state is RunState.STARTED:
            self._record_handle(run)
        now = time.monotonic()
        if run.check_due(now):
            self._check(run, now, tbc)
        if run.state in (RunState.ENDED, RunState.FINISHED, RunState.CLEANING):
            self._finish(run)
        if run.slow is None:  # a step handed to a slow call has not succeeded yet
            run.errors = 0

    def _contain(self, run: ActiveRun, exc: BaseException) -> None:
        """One run's step raised: log it with the run's label, note it on the
        run's row, and after MAX_RUN_ERRORS tries in a row close the run as an
        infrastructure failure (requeued or final per the retry policy)."""
        run.errors += 1
        what = {
            RunState.STARTED: "recording its handle",
            RunState.ENDED: "recording its end",
            RunState.FINISHED: "writing it back",
        }.get(run.state, "checking it")
        where = f" (statement: {statement_of(exc)})" if isinstance(exc, DBAPIError) else ""
        log.error(
            "%s: error while %s, try %d of %d: %s%s",
            run.label(), what, run.errors, MAX_RUN_ERRORS, first_line(exc), where,
            exc_info=run.errors in (1, MAX_RUN_ERRORS),
        )
        self._note_run_error(run, f"error while {what} (try {run.errors}): {first_line(exc)}")
        if run.errors < MAX_RUN_ERRORS or run.giving_up:
            return
        run.giving_up = True
        failed = RunOutcome(
            FailureClass.INFRASTRUCTURE,
            f"the platform could not collect this run: {first_line(exc)}",
            exit_code=run.outcome.exit_code if run.outcome else None,
            max_ram_mb=run.outcome.max_ram_mb if run.outcome else None,
            log_path=run.outcome.log_path if run.outcome else None,
        )
        if run.state in (RunState.ENDED, RunState.FINISHED):
            run.replace_outcome(failed)
        else:
            run.end(failed)
        log.error("%s: closing it as an infrastructure failure", run.label())
        self.wake("collect")

    def _note_run_error(self, run: ActiveRun, message: str) -> None:
        """The error on the run's row (``message``), for ``status`` and the admin."""
        try:
            with self.engine.begin() as conn:
                queries.note_run_error(conn, run.run_id, self.owner, message)
        except Exception as exc:  # the note is a courtesy; the log has it
            log.debug("%s: could not note the error on the run's row: %s", run.label(), first_line(exc))

    def _check(self, run: ActiveRun, now: float, interval: float) -> None:
        """STARTED/RUNNING -> ENDED when the worker reports an outcome. Writes nothing.

        A run whose worker wakes the loop when it ends is checked then, and on
        the timer only as a safety net. The next check is set before this one:
        a wake-up from now on asks for another; one that came earlier found
        the run ended already.
        """
        try:
            if self.worker.reports_end(run.request):
                interval = max(interval, WAKE_SAFETY_NET_S)
            run.checked(now, interval)
            outcome = self.worker.check(run.request, run.handle or {})
        except Exception as exc:
            log.exception("%s: status check failed", run.label())
            outcome = RunOutcome(FailureClass.INFRASTRUCTURE, f"status check failed: {exc}")
        if outcome is not None:
            run.end(outcome)

    def _finish(self, run: ActiveRun) -> None:
        """ENDED -> FINISHED -> CLEANING -> CLOSED, one commit each; then free
        what the run held.

        The end is committed before the results are written, so that a crash or
        a failing write in between leaves the run ``finished`` with its outcome's
        class. Raises on database errors, keeping the run in its state for the
        next cycle: every step is safe to repeat. A run another daemon took
        over, or already collected, is dropped without touching anything on
        disk: its files may already belong to a newer attempt. The move of a
        successful output and the worker's cleanup are slow calls: this
        returns while one is in flight, and collect calls it again after.
        """
        if run.state is RunState.ENDED:
            with self.engine.begin() as conn:
                held = self._record_end(conn, run)
            if not held:
                self._drop(run)
                return
            run.finished()
        if run.state is RunState.FINISHED:
            if not self._output_kept(run):
                return  # being moved
            with self.engine.begin() as conn:
                written = self._close(conn, run)
                self._show_breaker(conn)
            if not written:
                self._drop(run)
                return
            # After the commit: a refresh that started before it would miss the result.
            self.leaderboard.request([run.submission_id])
            run.closed()
            if run.keep_files:
                run.cleaned()
            else:
                self._offload(run, self.worker.cleanup, run.request, run.handle or {})

    def _cleaned(self, run: ActiveRun, future: Future, overdue: bool) -> None:
        """CLEANING -> CLOSED once the worker freed what the run held, or the
        bound passed: the slot is not held for ever."""
        if overdue:
            log.error("%s: the worker did not free what the run held within %g s; "
                      "its slot is freed all the same", run.label(), SLOW_CALL_LIMIT_S)  # fmt: skip
        elif future.exception() is not None:
            log.error("%s: cleanup failed", run.label(), exc_info=future.exception())
        run.cleaned()

    def _output_kept(self, run: ActiveRun) -> bool:
        """FINISHED with success: read the output where the run left it, then
        move it to ``<predictions_dir>/submission_%09d`` on a slow-call thread
        (it may copy across devices). True once it is there, or for a failure.
        Output that cannot be read is an infrastructure failure (ramp-test
        said it succeeded; the circuit breaker does not count it)."""
        outcome = run.outcome
        assert outcome is not None
        if outcome.failure is not None or run.moved:
            return True
        request = run.request
        kept = request.predictions_dir / request.submission_name
        # A previous try may have moved the output already and then lost the database.
        source = outcome.output_dir if outcome.output_dir and outcome.output_dir.is_dir() else kept
        if run.results is None:
            try:
                if not source.is_dir():
                    raise ResultsError(f"no training_output folder at {outcome.output_dir}")
                # The scores recomputed outside the sandbox when the worker has them.
                run.results = read_results(
                    source, self.event.n_folds, self.event.score_names, outcome.trusted_scores
                )
            except ResultsError as exc:
                run.replace_outcome(RunOutcome(
                    FailureClass.INFRASTRUCTURE, f"unusable output: {exc}",
                    exit_code=outcome.exit_code, max_ram_mb=outcome.max_ram_mb,
                    log_path=outcome.log_path,
                ))  # fmt: skip
                run.output_unusable = True
                return True
        if source == kept:
            run.moved = True
            return True
        self._offload(run, _replace_dir, source, kept)
        return False

    def _moved(self, run: ActiveRun, future: Future, overdue: bool) -> None:
        """The output's move ended: FINISHED goes on to be written back. A move
        that failed raises (the run's containment tries again, then gives up);
        one that did not end in time is given up on at once."""
        if overdue:
            message = f"moving its output took more than {SLOW_CALL_LIMIT_S:g} s"
            log.error("%s: %s; closing it as an infrastructure failure", run.label(), message)
            outcome = run.outcome
            assert outcome is not None
            run.replace_outcome(RunOutcome(
                FailureClass.INFRASTRUCTURE, message, exit_code=outcome.exit_code,
                max_ram_mb=outcome.max_ram_mb, log_path=outcome.log_path,
            ))  # fmt: skip
            return
        future.result()  # raises the move's error
        run.moved = True

    def _record_end(self, conn: Connection, run: ActiveRun) -> bool:
        """ENDED -> FINISHED: the run's row says ``finished``, with the outcome's
        class and message (the submission ``tested`` on success). False if the
        run is not ours any more. A row already finished (a re-attached run)
        is ours to go on with."""
        outcome = run.outcome
        assert outcome is not None
        marked = queries.mark_finished(
            conn,
            run.run_id,
            self.owner,
            None if outcome.failure is None else outcome.failure.value,
            outcome.message,
            succeeded=outcome.failure is None,
        )
        if not (marked or queries.run_is_ours(conn, run.run_id, self.owner)):
            return False
        if outcome.duration_s is not None:
            self.metrics.observe_duration(outcome.duration_s)
        return True

    def _close(self, conn: Connection, run: ActiveRun) -> bool:
        """FINISHED -> CLOSED: write the results (``scored``), the final failure,
        or the requeue of an infrastructure failure, and close the run's row
        (``collected``). False if it was not ours to write. What is said about
        the outcome (log line, metrics) is said just before the commit: a failed
        commit says it again at the next try."""
        outcome = run.outcome
        assert outcome is not None
        if queries.submission_was_reset(conn, run.submission_id):
            return self._supersede(conn, run)
        if outcome.failure is not None:
            # ramp-test exited 0 with an unusable output: the submission's
            # output is at fault, not the platform (the breaker does not count it)
            return self._store_failure(conn, run, outcome, platform_ran=run.output_unusable)
        return self._store_results(conn, run, outcome)

    def _supersede(self, conn: Connection, run: ActiveRun) -> bool:
        """The submission was set back to ``new`` behind our back (an admin,
        ramp-database's ``set-submission-state``) before the run was written
        back: the admin's ``new`` stands. Only the run's row is closed, and
        the submission is claimed again as a fresh attempt."""
        done = queries.close_superseded(conn, run.run_id, self.owner, RESET_MESSAGE)
        if done:
            log.warning("%s: closed without writing its result: %s; the submission is "
                        "claimed again as a fresh attempt", run.label(), RESET_MESSAGE)  # fmt: skip
        return done

    def _store_results(self, conn: Connection, run: ActiveRun, outcome: RunOutcome) -> bool:
        results, note = run.results
        if note:
            log.warning("%s: %s", run.label(), note)
        written = queries.write_results(
            conn, self.event, run.run_id, self.owner, run.submission_id, results,
            outcome.max_ram_mb, note=note,
        )
        if written:
            log.info("%s: scored", run.label())
            self.metrics.outcome("scored")
            self._platform_worked(run)
        return written

    def _platform_worked(self, run: ActiveRun) -> None:
        """A run the platform did not fail: the breaker closes if it was open
        (and the run was taken up since it opened)."""
        if self.breaker.succeeded(run.taken_at):
            log.warning("circuit breaker closed: a run went through; claiming again")
            self.metrics.set_breaker_open(False)
            self.wake("claim")

    def _hold(self, conn: Connection, run: ActiveRun, outcome: RunOutcome) -> bool:
        """An infrastructure failure while the breaker is open: back to the queue
        at once, without using up an attempt (the platform is at fault)."""
        assert outcome.failure is not None
        done = queries.requeue(
            conn, run.run_id, self.owner, run.submission_id, outcome.failure.value,
            outcome.message, queries.utcnow(), outcome=queries.HELD,
        )
        if done:
            log.warning("%s: infrastructure failure (%s) while the platform is failing; "
                        "requeued, no attempt used", run.label(), outcome.message)  # fmt: skip
            self.metrics.outcome(outcome.failure.value)
        return done

    def _store_failure(
        self, conn: Connection, run: ActiveRun, outcome: RunOutcome, platform_ran: bool = False
    ) -> bool:
        failure = outcome.failure
        assert failure is not None
        if failure is FailureClass.INFRASTRUCTURE and not platform_ran:
            if self.breaker.failed(run.submission_id, outcome.message, time.monotonic()):
                log.error("%s", self.breaker.describe(time.monotonic()))
                self.metrics.set_breaker_open(True)
            if self.breaker.holding:
                return self._hold(conn, run, outcome)
        else:
            self._platform_worked(run)
        if failure is FailureClass.INFRASTRUCTURE:
            # the only class retried; an admin retry starts a fresh budget
            run.budget_attempt = control.attempt_in_budget(conn, run.submission_id, run.attempt)
        if self.policy.should_retry(failure, run.budget_attempt):
            delay = self.policy.delay_s(run.budget_attempt)
            retry_after = queries.utcnow() + dt.timedelta(seconds=delay)
            done = queries.requeue(
                conn, run.run_id, self.owner, run.submission_id, failure.value,
                outcome.message, retry_after,
            )
            if done:
                log.warning(
                    "%s: infrastructure failure (%s); retry in %.0f s",
                    run.label(), outcome.message, delay,
                )
                self.metrics.outcome(failure.value)
                self.wake("claim")
            return done
        state, error_msg = final_failure(outcome, run.request, run.budget_attempt, self.policy.max_attempts)
        done = queries.write_failure(
            conn, run.run_id, self.owner, run.submission_id, state, error_msg,
            failure.value, outcome.max_ram_mb,
        )
        if done:
            log.info("%s: %s (%s: %s)", run.label(), state, failure.value, outcome.message)
            self.metrics.outcome(failure.value)
        return done


def _replace_dir(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.move(str(source), str(dest))
