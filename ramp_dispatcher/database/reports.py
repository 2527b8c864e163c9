"""Read-only queries for ``ramp-dispatcher status``: what waits, runs and ended.

Each report is a handful of statements whose cost does not grow with the
number of rows shown but at most with the event's size, and stays small there:

* counts by state: one GROUP BY over the event's submissions;
* waiting: ``submissions.state = 'new'`` (``ix_dispatcher_submissions_state_name``),
  first ``limit`` in queue order;
* running: ``dispatcher_runs`` by (event_id, status)
  (``ix_dispatcher_runs_event_status``);
* last finished: the same index, newest ``limit`` collected runs;
* daemons: ``dispatcher_daemons`` of the event (a row per daemon, a handful).

Nothing here writes: the admin's command must never get in the daemon's way.
On SQLite the connection skips ``BEGIN IMMEDIATE`` (no write lock taken).
"""

from __future__ import annotations

import datetime as dt
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from sqlalchemy import Connection, Engine, and_, func, or_, select

from ..breaker import BreakerSnapshot
from ..errors import UserError
from ..owner import Owner, owner_is_dead
from .dispatcher_schema import ACTIVE_RUN_STATUSES, RUN_COLLECTED, daemons, runs
from .queries import utcnow
from .ramp_schema import event_teams, events, submissions, teams

__all__ = [
    "DaemonReport",
    "EventReport",
    "FinishedRun",
    "RunningRun",
    "StateCounts",
    "WaitingSubmission",
    "event_names",
    "event_report",
    "read_only",
    "read_report",
    "state_counts",
]

S = submissions

#: collected runs (newest by id) among which "last finished" are picked
FINISHED_WINDOW = 500

#: submission states by what they mean to an admin
RUNNING_STATES = ("sent_to_training", "training", "trained", "validated", "tested", "checked")
FAILED_STATES = ("checking_error", "training_error", "validating_error", "testing_error")


@dataclass(frozen=True)
class StateCounts:
    """Submissions of the event by state (the sandbox excluded: it is never run)."""

    by_state: dict[str, int]

    @property
    def waiting(self) -> int:
        return self.by_state.get("new", 0)

    @property
    def running(self) -> int:
        return sum(self.by_state.get(s, 0) for s in RUNNING_STATES)

    @property
    def done(self) -> int:
        return self.by_state.get("scored", 0)

    @property
    def failed(self) -> int:
        return sum(self.by_state.get(s, 0) for s in FAILED_STATES)

    @property
    def total(self) -> int:
        return sum(self.by_state.values())

    def summary(self) -> str:
        """One line, e.g. for sd_notify's STATUS: ``waiting 3, running 2, done 10, failed 1``."""
        return (
            f"waiting {self.waiting}, running {self.running}, "
            f"done {self.done}, failed {self.failed}"
        )


@dataclass(frozen=True)
class WaitingSubmission:
    id: int
    name: str
    team: str
    queue_position: int | None  # as the daemon last numbered it (-1/None: not yet)
    submitted_at: dt.datetime
    age_s: float
    retry_after: dt.datetime | None  # an infrastructure retry's backoff, if pending


@dataclass(frozen=True)
class RunningRun:
    run_id: int
    submission_id: int
    name: str
    team: str
    worker_type: str
    attempt: int
    status: str  # starting | running | finished (being collected)
    owner: str
    started_at: dt.datetime | None
    elapsed_s: float
    pid: int | None  # local runs (conda): the supervisor's pid
    instance_id: str | None  # aws runs: the EC2 instance
    cancel_requested: bool


@dataclass(frozen=True)
class FinishedRun:
    run_id: int
    submission_id: int
    name: str
    team: str
    worker_type: str
    attempt: int
    outcome: str | None  # scored, training_error, checking_error, retry
    failure_class: str | None  # participant, timeout, memory, infrastructure, cancelled
    finished_at: dt.datetime | None
    duration_s: float | None
    message: str  # first line


@dataclass(frozen=True)
class DaemonReport:
    """A daemon serving the event, as its ``dispatcher_daemons`` row says."""

    owner: str  # host:pid:start:random, as on its runs
    host: str
    pid: int | None
    worker_type: str
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    stale_after: dt.datetime
    #: it stopped without removing its row: no heartbeat since ``stale_after``,
    #: or (a daemon of this host) its process is gone
    stale: bool
    breaker: BreakerSnapshot  # as of its last heartbeat or change


@dataclass(frozen=True)
class EventReport:
    event: str
    generated_at: dt.datetime  # naive UTC, like ramp-board's timestamps
    counts: StateCounts
    n_waiting: int
    waiting: list[WaitingSubmission] = field(default_factory=list)
    running: list[RunningRun] = field(default_factory=list)
    finished: list[FinishedRun] = field(default_factory=list)
    daemons: list[DaemonReport] = field(default_factory=list)


# --------------------------------------------------------------------------- queries


def event_names(conn: Connection) -> list[str]:
    return list(conn.execute(select(events.c.name).order_by(events.c.name)).scalars())


def _event_row(conn: Connection, event_name: str) -> Any:
    row = conn.execute(
        select(events.c.id, events.c.ramp_sandbox_name).where(events.c.name == event_name)
    ).first()
    if row is None:
        known = event_names(conn)
        raise UserError(
            f"event {event_name!r} is not in the database"
            + (f" (events: {', '.join(known)})" if known else " (it has no event)")
        )
    return row


def _of_event(event_id: int, sandbox: str):
    """The event's submissions, sandbox excluded (a join, not a scan of all events)."""
    return and_(
        S.c.event_team_id.in_(
            select(event_teams.c.id).where(event_teams.c.event_id == event_id).scalar_subquery()
        ),
        # two ranges, read from the (state, name) index (see queries._waiting)
        or_(S.c.name < sandbox, S.c.name > sandbox),
    )


def state_counts(conn: Connection, event_id: int, sandbox_name: str) -> StateCounts:
    in_event = select(event_teams.c.id).where(event_teams.c.event_id == event_id)
    rows = conn.execute(
        select(S.c.state, func.count())
        .where(
            # "+ 0": without table statistics SQLite would fetch the rows one by
            # one through the (event_team_id, name) index, 5x slower than
            # walking ix_dispatcher_submissions_state_name in GROUP BY order.
            # PostgreSQL reads the whole event either way.
            (S.c.event_team_id + 0).in_(in_event.scalar_subquery()),
            S.c.name != sandbox_name,
        )
        .group_by(S.c.state)
    ).all()
    return StateCounts({(state or "?"): int(n) for state, n in rows})


def _seconds(later: dt.datetime, earlier: dt.datetime | None) -> float | None:
    return None if earlier is None else max((later - earlier).total_seconds(), 0.0)


def _first_line(text: str | None) -> str:
    return next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "")


def _waiting(
    conn: Connection, event_id: int, sandbox: str, limit: int, now: dt.datetime
) -> list[WaitingSubmission]:
    # The first ``limit`` in claim order (oldest first) from submissions alone,
    # then the joins for those rows only: the planner cannot turn it into a
    # join of every waiting submission (it did, without table statistics).
    first = (
        select(S.c.id, S.c.event_team_id, S.c.name, S.c.queue_position, S.c.submission_timestamp)
        .where(S.c.state == "new", _of_event(event_id, sandbox))
        .order_by(S.c.submission_timestamp, S.c.id)
        .limit(limit)
        .subquery()
    )
    rows = conn.execute(
        select(
            first.c.id, first.c.name, teams.c.name.label("team"), first.c.queue_position,
            first.c.submission_timestamp,
        )
        .join(event_teams, event_teams.c.id == first.c.event_team_id)
        .join(teams, teams.c.id == event_teams.c.team_id)
        .order_by(first.c.submission_timestamp, first.c.id)
    ).all()
    if not rows:
        return []
    # only for the rows shown: a backoff keeps a waiting submission from being claimed
    backoff = dict(
        conn.execute(
            select(runs.c.submission_id, func.max(runs.c.retry_after))
            .where(runs.c.submission_id.in_([r.id for r in rows]), runs.c.retry_after > now)
            .group_by(runs.c.submission_id)
        ).all()
    )
    return [
        WaitingSubmission(
            r.id, r.name, r.team, r.queue_position, r.submission_timestamp,
            _seconds(now, r.submission_timestamp) or 0.0, backoff.get(r.id),
        )
        for r in rows
    ]


def _handle_ids(handle: Any) -> tuple[int | None, str | None]:
    if not isinstance(handle, dict):
        return None, None
    pid = handle.get("pid")
    instance = handle.get("instance_id")
    return (
        pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        None if instance is None else str(instance),
    )


def _running(conn: Connection, event_id: int, now: dt.datetime) -> list[RunningRun]:
    rows = conn.execute(
        select(
            runs.c.id, runs.c.submission_id, S.c.name, teams.c.name.label("team"),
            runs.c.worker_type, runs.c.attempt, runs.c.status, runs.c.owner,
            runs.c.created_at, runs.c.started_at, runs.c.handle, runs.c.cancel_requested_at,
        )
        .join(S, S.c.id == runs.c.submission_id)
        .join(event_teams, event_teams.c.id == S.c.event_team_id)
        .join(teams, teams.c.id == event_teams.c.team_id)
        .where(runs.c.event_id == event_id, runs.c.status.in_(ACTIVE_RUN_STATUSES))
        .order_by(runs.c.created_at, runs.c.id)
    ).all()
    out = []
    for r in rows:
        pid, instance = _handle_ids(r.handle)
        out.append(
            RunningRun(
                r.id, r.submission_id, r.name, r.team, r.worker_type, r.attempt, r.status,
                r.owner, r.started_at, _seconds(now, r.started_at or r.created_at) or 0.0,
                pid, instance, r.cancel_requested_at is not None,
            )
        )
    return out


def _finished(conn: Connection, event_id: int, limit: int) -> list[FinishedRun]:
    # No index orders runs by collection time, and sorting every collected run
    # of a large event costs a scan. Runs are collected roughly in the order
    # they were created (ids), so the newest collected runs by id, a window
    # well beyond ``limit`` (ix_dispatcher_runs_event_status ends in the row
    # id on SQLite; PostgreSQL walks the primary key backwards), are sorted by
    # collection time. A run is left out only if more than the window's worth
    # of later runs were collected while it ran.
    window = (
        select(runs)
        .where(runs.c.event_id == event_id, runs.c.status == RUN_COLLECTED)
        .order_by(runs.c.id.desc())
        .limit(max(limit * 10, FINISHED_WINDOW))
        .subquery()
    )
    last = (
        select(window)
        .order_by(window.c.collected_at.desc(), window.c.id.desc())
        .limit(limit)
        .subquery()
    )
    rows = conn.execute(
        select(
            last.c.id, last.c.submission_id, S.c.name, teams.c.name.label("team"),
            last.c.worker_type, last.c.attempt, last.c.outcome, last.c.failure_class,
            last.c.started_at, last.c.finished_at, last.c.collected_at, last.c.message,
        )
        .join(S, S.c.id == last.c.submission_id)
        .join(event_teams, event_teams.c.id == S.c.event_team_id)
        .join(teams, teams.c.id == event_teams.c.team_id)
        .order_by(last.c.collected_at.desc(), last.c.id.desc())
    ).all()
    return [
        FinishedRun(
            r.id, r.submission_id, r.name, r.team, r.worker_type, r.attempt, r.outcome,
            r.failure_class, r.finished_at or r.collected_at,
            None if r.finished_at is None else _seconds(r.finished_at, r.started_at),
            _first_line(r.message),
        )
        for r in rows
    ]


def _daemons(conn: Connection, event_id: int, now: dt.datetime) -> list[DaemonReport]:
    d = daemons.c
    out = []
    for r in conn.execute(select(daemons).where(d.event_id == event_id).order_by(d.started_at, d.owner)):
        who = Owner.parse(r.owner)
        breaker = BreakerSnapshot(
            r.breaker_state, r.breaker_since, r.breaker_cause, r.breaker_failures,
            r.breaker_next_probe_at,
        )
        out.append(
            DaemonReport(
                r.owner, who.host, int(who.pid) if who.pid.isdigit() else None, r.worker_type,
                r.started_at, r.heartbeat_at, r.stale_after,
                r.stale_after < now or owner_is_dead(r.owner), breaker,
            )
        )
    return out


def event_report(conn: Connection, event_name: str, limit: int = 20) -> EventReport:
    """Everything ``status`` shows, ``limit`` rows at most per list."""
    limit = max(int(limit), 0)
    ev = _event_row(conn, event_name)
    now = utcnow()
    counts = state_counts(conn, ev.id, ev.ramp_sandbox_name)
    return EventReport(
        event=event_name,
        generated_at=now,
        counts=counts,
        n_waiting=counts.waiting,
        waiting=_waiting(conn, ev.id, ev.ramp_sandbox_name, limit, now) if limit else [],
        running=_running(conn, ev.id, now),
        finished=_finished(conn, ev.id, limit) if limit else [],
        daemons=_daemons(conn, ev.id, now),
    )


@contextmanager
def read_only(engine: Engine) -> Iterator[Connection]:
    """A connection inside a read-only transaction (rolled back at the end)."""
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn = conn.execution_options(sqlite_readonly=True)  # plain BEGIN: no write lock
        else:
            # one snapshot for all statements: counts and lists agree
            conn = conn.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
        with conn.begin() as tx:
            yield conn
            tx.rollback()  # nothing to keep


def read_report(engine: Engine, event_name: str, limit: int = 20) -> EventReport:
    """:func:`event_report` in a read-only transaction of its own."""
    with read_only(engine) as conn:
        return event_report(conn, event_name, limit)
