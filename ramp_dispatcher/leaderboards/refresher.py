"""The daemon's leaderboard thread: ramp-board's cached pages follow every result.

The dispatcher's loop only calls :meth:`LeaderboardService.request` (a set
union under a lock) with the submissions whose state changed; one thread of
our own, on an engine of its own, does the work:

- a result (scored or failed, or a cancel): the event's seven tables and the
  three tables of that submission's team;
- a claim cycle (``new_only``): the event's "new" table and every team's,
  recomputed from one read of the waiting and running submissions and written
  only where they changed (claims, launches and queue positions);
- start-up: everything, the event and every team (results may have come in
  while the daemon was down); it runs beside the first claim, not before it;
- shutdown: what is pending is finished within a bounded time.

Requests are gathered for :data:`GATHER_S` after the first before a refresh
starts, and those that arrive while a refresh runs are merged into the next
one: a result and the claim cycle that its freed slot starts at once make one
refresh, not two. It reads
in a read-only transaction and writes in a short one, so SQLite's writer (the
loop) never waits on the computation. A failing refresh is logged and retried;
it never stops the daemon. The admin's ``leaderboard_command`` runs after a
refresh that wrote results (:class:`..leaderboard.LeaderboardRefresher`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL

from ..database.engine import make_engine
from ..leaderboard import DEFAULT_INTERVAL, LeaderboardRefresher
from . import data, update

log = logging.getLogger(__name__)

#: seconds a shutdown waits for a pending refresh (systemd allows the whole stop 30 s)
SHUTDOWN_WAIT = 20.0
#: seconds before a failed refresh is tried again
RETRY_DELAY = 5.0
#: seconds a refresh waits after the first request for more to merge with (the
#: claim cycle that a result's freed slot starts follows within milliseconds;
#: each refresh costs the daemon a few ms of CPU and two transactions)
GATHER_S = 0.1


@dataclass
class Pending:
    """What the next refresh must do (merged requests)."""

    everything: bool = False  # the event and every team (start-up)
    event: bool = False  # the event's seven tables
    new_sweep: bool = False  # every "new" table, written where changed
    submissions: set[int] = field(default_factory=set)  # their teams' three tables

    def __bool__(self) -> bool:
        return self.everything or self.event or self.new_sweep or bool(self.submissions)

    def merge(self, other: Pending) -> None:
        self.everything |= other.everything
        self.event |= other.event
        self.new_sweep |= other.new_sweep
        self.submissions |= other.submissions


class LeaderboardService:
    """Keep one event's cached leaderboards current (see the module docstring)."""

    def __init__(
        self,
        url: URL | str,
        event_name: str,
        *,
        enabled: bool = True,
        command: Sequence[str] | None = None,
        interval: float = DEFAULT_INTERVAL,
        cwd: str | Path | None = None,
    ):
        self.url = url
        self.event_name = event_name
        self.enabled = enabled
        self.hook = LeaderboardRefresher(command, interval, cwd=cwd)
        #: counters, for tests and metrics
        self.refreshes = 0
        self.failures = 0
        self.last_refresh: float | None = None  # time.time() of the last good one
        self.last_duration: float | None = None
        self._cond = threading.Condition()
        self._pending = Pending()
        self._gather_until = 0.0  # monotonic: when the pending requests are taken
        self._running = False
        self._started = False  # requests before start() are covered by its full refresh
        self._closed = False
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None
        self._ctx: update.Context | None = None
        self._event_id: int | None = None

    @classmethod
    def for_event(cls, engine: Engine, config: Any) -> LeaderboardService:
        """The service of a dispatcher (an ``EventConfig``)."""
        d = config.dispatcher
        return cls(
            engine.url,
            config.ramp.event_name,
            enabled=getattr(d, "leaderboard_refresh", True),
            command=list(d.leaderboard_command or []) or None,
            interval=d.leaderboard_interval,
            cwd=config.path.parent,
        )

    # the hook's settings, changed by the dispatcher's reload
    @property
    def command(self) -> list[str] | None:
        return self.hook.command

    @command.setter
    def command(self, value: Sequence[str] | None) -> None:
        self.hook.command = list(value) if value else None

    @property
    def interval(self) -> float:
        return self.hook.interval

    @interval.setter
    def interval(self, value: float) -> None:
        self.hook.interval = max(float(value), 0.0)

    # ---------------------------------------------------------------- public

    def start(self) -> None:
        """Refresh everything once, in the background."""
        if not self.enabled:
            self.hook.request()  # results may have come in while we were down
            return
        with self._cond:
            self._started = True
        self._add(Pending(everything=True, event=True, new_sweep=True))

    def request(self, submission_ids: Iterable[int] = (), *, new_only: bool = False) -> None:
        """These submissions changed (thread-safe, never blocks on the work).

        ``new_only``: they were claimed or started, so only the "new" tables
        (and queue positions) changed; otherwise a result was written.
        """
        if not self.enabled:
            if not new_only:
                self.hook.request()
            return
        if new_only:
            self._add(Pending(new_sweep=True))
        else:
            self._add(Pending(event=True, submissions=set(submission_ids)))

    def close(self, wait: float = SHUTDOWN_WAIT) -> None:
        """Finish what is pending (at most ``wait`` seconds), then stop."""
        deadline = time.monotonic() + max(wait, 0.0)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                log.warning(
                    "leaderboard refresh not finished %.0f s after shutdown began: left unfinished",
                    wait,
                )
        self.hook.close(wait=max(deadline - time.monotonic(), 0.0))
        if self._engine is not None and (thread is None or not thread.is_alive()):
            self._engine.dispose()

    @property
    def busy(self) -> bool:
        """True while a refresh is pending or running."""
        with self._cond:
            return self._running or bool(self._pending)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is pending or running (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._running or self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    # ---------------------------------------------------------------- thread

    def _add(self, more: Pending) -> None:
        with self._cond:
            if self._closed or not self._started:
                return
            if not self._pending:
                self._gather_until = time.monotonic() + GATHER_S
            self._pending.merge(more)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="leaderboards", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:  # closed, nothing left
                    return
                while not self._closed and (left := self._gather_until - time.monotonic()) > 0:
                    self._cond.wait(left)
                work, self._pending = self._pending, Pending()
                self._running = True
            ok = False
            try:
                self._refresh(work)
                ok = True
            except Exception as exc:  # the database away, or a bug: never fatal
                log.error(
                    "leaderboard refresh failed (%s); retrying in %.0f s",
                    f"{type(exc).__name__}: {exc}".splitlines()[0], RETRY_DELAY,
                    exc_info=not _is_db_error(exc),
                )
                self.failures += 1  # after the log line: whoever sees the count finds it logged
                self._ctx = None  # read the event's facts again next time
            with self._cond:
                self._running = False
                if not ok:
                    if self._closed:  # do not hold up the shutdown with retries
                        self._cond.notify_all()
                        return
                    work.merge(self._pending)
                    self._pending = work
                    self._cond.notify_all()
                    self._cond.wait(RETRY_DELAY)
                else:
                    self._cond.notify_all()
            if ok and (work.event or work.everything):
                self.hook.request()

    def _engine_(self) -> Engine:
        if self._engine is None:
            # its own engine and pool: never takes a connection the loop needs
            self._engine = make_engine(self.url, pool_size=1, max_overflow=1) if _pooled(
                self.url
            ) else make_engine(self.url)
        return self._engine

    def _refresh(self, work: Pending) -> None:
        started = time.monotonic()
        engine = self._engine_()
        with engine.connect() as conn:
            conn = conn.execution_options(sqlite_readonly=True)
            with conn.begin():
                if self._event_id is None:
                    self._event_id = data.event_id_by_name(conn, self.event_name)
                if self._ctx is None or work.everything:
                    files = self._ctx.files if self._ctx is not None else None
                    self._ctx = update.Context.load(conn, self._event_id, files)
                ctx = self._ctx
                if work.everything:  # read everything again
                    ctx.files.clear()
                    ctx.scores.clear()
                event_subs = None
                event_values: dict[str, str | None] = {}
                if work.event or work.everything:
                    # one read of the event's submissions serves its teams' and
                    # the "new" tables too
                    event_subs = data.event_submissions(conn, ctx.event)
                    event_values = update.compute_tables(conn, ctx, event_subs, event_level=True)
                teams = _teams_to_refresh(conn, work, event_subs, self._event_id)
                grouped = update.by_team(event_subs) if event_subs is not None else {}
                team_values = {
                    et: update.team_tables(
                        conn, ctx, et, subs=grouped.get(et, []) if event_subs is not None else None
                    )
                    for et in sorted(teams)
                }
                if work.new_sweep:
                    event_new, team_new = update.new_tables_by_team(conn, ctx, event_subs)
                    stored_event, stored_teams = data.stored_new_tables(conn, self._event_id)
                    if not event_values and stored_event != event_new:
                        event_values = {"new_leaderboard_html": event_new}
                    for et, stored in stored_teams.items():
                        wanted = team_new.get(et)
                        if et not in team_values and stored != wanted:
                            team_values[et] = {"new_leaderboard_html": wanted}
        computed = time.monotonic()
        if event_values or team_values:
            with engine.begin() as conn:
                data.write_event(conn, self._event_id, event_values)
                data.write_teams(conn, team_values)
        self.refreshes += 1
        self.last_refresh = time.time()
        self.last_duration = time.monotonic() - started
        if event_values or team_values:
            log.log(
                logging.INFO if (work.event or work.everything) else logging.DEBUG,
                "leaderboards refreshed: %s%d team(s) in %.2f s (written in %.2f s)",
                "event tables, " if len(event_values) > 1 else "",
                len(team_values), self.last_duration, time.monotonic() - computed,
            )


def _teams_to_refresh(
    conn: Connection, work: Pending, event_subs: list[data.SubmissionRow] | None, event_id: int
) -> set[int]:
    """The event teams whose tables this refresh recomputes: every team at
    start-up, else the teams of the changed submissions (found among the
    event's submissions when read, else looked up: a sandbox is not among them)."""
    if work.everything:
        return set(data.event_team_ids(conn, event_id))
    if event_subs is not None:
        found = {s.id: s.event_team_id for s in event_subs if s.id in work.submissions}
        if len(found) == len(work.submissions):
            return set(found.values())
    return data.event_teams_of(conn, work.submissions)


def _pooled(url: URL | str) -> bool:
    from ..database.engine import normalise_url

    return normalise_url(url).get_backend_name() != "sqlite"


def _is_db_error(exc: BaseException) -> bool:
    from sqlalchemy.exc import DBAPIError, OperationalError

    return isinstance(exc, (DBAPIError, OperationalError))


__all__ = ["LeaderboardService", "Pending", "RETRY_DELAY", "SHUTDOWN_WAIT"]
