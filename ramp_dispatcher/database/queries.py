"""Every statement the dispatcher runs against the database, in one place.

Functions take a Connection inside a transaction; the caller commits. Writes
are keyed by run id and guarded by the run's status, so collecting the same
run twice, or a late result from a superseded attempt, changes nothing.

The statements run for every submission are built once (``@cache``), with bind
parameters for whatever varies: building a Core statement costs the daemon more
CPU than executing it (``bench/cpu.py`` measures the daemon's CPU per run).
They are kept in small typed dataclasses named for what each statement does.
SQLAlchemy reads a parameter named like one of the table's columns as a new
value for that column, so bind parameters are named for their role instead:
``new_<column>`` for a value written by an UPDATE (:func:`_set_clause`),
``daemon`` for the owner a write is guarded by, ``for_submission`` for the
submission a statement is about, ``run_id`` and ``run_ids`` for the runs'
primary keys.

Why one file of about 1,000 lines: the daemon's statements sit together on
purpose, so that one can read them all, check each against its index, and
keep them built once.
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from functools import cache
from typing import Any, Callable, Iterable, Sequence

from sqlalchemy import (
    ColumnElement, CompoundSelect, Connection, Float, Integer, LargeBinary, Select, Update, and_,
    bindparam, exists, func, insert, literal_column, null, or_, select, type_coerce, union_all, update,
)
from sqlalchemy.sql.dml import ReturningInsert, ReturningUpdate

from ..errors import UserError
from ..results import TrainingResults
from .dispatcher_schema import (
    ACTIVE_RUN_STATUSES,
    RUN_COLLECTED,
    RUN_FINISHED,
    RUN_RUNNING,
    RUN_STARTING,
    runs,
)
from .ramp_schema import (
    NumpyBlob,
    event_score_types,
    event_teams,
    events,
    submission_on_cv_folds,
    submission_score_on_cv_folds,
    submission_scores,
    submissions,
)


# One clock for the package; re-exported (control, reports and the dispatcher
# call queries.utcnow).
from .clock import utcnow  # noqa: E402


# --------------------------------------------------------------------------- event


@dataclass(frozen=True)
class ScoreSpec:
    event_score_type_id: int
    name: str


@dataclass(frozen=True)
class EventInfo:
    id: int
    name: str
    sandbox_name: str
    n_folds: int
    scores: tuple[ScoreSpec, ...]

    @property
    def score_names(self) -> list[str]:
        return [s.name for s in self.scores]


def load_event(conn: Connection, event_name: str) -> EventInfo:
    row = conn.execute(
        select(events.c.id, events.c.ramp_sandbox_name).where(events.c.name == event_name)
    ).first()
    if row is None:
        raise UserError(
            f"event {event_name!r} is not in the database: deploy it first "
            "(ramp-database or `ramp-dispatcher admin deploy-event`)"
        )
    from .ramp_schema import cv_folds

    n_folds = conn.execute(
        select(func.count()).select_from(cv_folds).where(cv_folds.c.event_id == row.id)
    ).scalar_one()
    scores = tuple(
        ScoreSpec(r.id, r.name)
        for r in conn.execute(
            select(event_score_types.c.id, event_score_types.c.name)
            .where(event_score_types.c.event_id == row.id)
            .order_by(event_score_types.c.id)
        )
    )
    return EventInfo(row.id, event_name, row.ramp_sandbox_name, n_folds, scores)


def submission_folds(conn: Connection, submission_id: int) -> list[tuple[Any, Any]]:
    """The cv folds of a submission's event as (train_is, test_is), in the order
    ramp-test's ``fold_<i>`` map to them: the submission's fold rows sorted by
    id. All the event's folds, also those a (damaged) submission has no fold
    row for, last: writing the results reports fold rows that do not match."""
    return list(_decoded(submission_fold_blobs(conn, submission_id)))


def submission_fold_blobs(conn: Connection, submission_id: int) -> tuple[tuple[bytes, bytes], ...]:
    """:func:`submission_folds` as stored (ramp-board's compressed pickles),
    not decoded: cheap to compare with what was read before (:class:`FoldsCache`)."""
    rows = conn.execute(_fold_stmts().blobs_of_submission, {"for_submission": submission_id})
    return tuple((bytes(train), bytes(test)) for train, test in rows)


def decode_blob(value: bytes) -> Any:
    """A numpy blob column's value, as ramp-board wrote it (ramp_schema.NumpyBlob)."""
    return NumpyBlob().process_result_value(value, None)


def _decoded(blobs: Iterable[tuple[bytes, bytes]]) -> tuple[tuple[Any, Any], ...]:
    return tuple((decode_blob(train), decode_blob(test)) for train, test in blobs)


@dataclass(frozen=True)
class _FoldStatements:
    #: (train_is, test_is) blobs, undecoded, of the event folds of
    #: ``:for_submission`` in ramp-test's fold order (:func:`submission_folds`)
    blobs_of_submission: Select[tuple[bytes, bytes]]


@cache
def _fold_stmts() -> _FoldStatements:
    from .ramp_schema import cv_folds

    folds = submission_on_cv_folds
    submission = bindparam("for_submission")
    event_id = (
        select(event_teams.c.event_id)
        .join(submissions, submissions.c.event_team_id == event_teams.c.id)
        .where(submissions.c.id == submission)
        .scalar_subquery()
    )
    return _FoldStatements(
        blobs_of_submission=select(
            type_coerce(cv_folds.c.train_is, LargeBinary), type_coerce(cv_folds.c.test_is, LargeBinary)
        )
        .outerjoin(folds, and_(folds.c.cv_fold_id == cv_folds.c.id, folds.c.submission_id == submission))
        .where(cv_folds.c.event_id == event_id)
        .order_by(folds.c.id.is_(None), folds.c.id, cv_folds.c.id)
    )


class FoldsCache:
    """The event's folds, decoded again only when what is stored changed.

    Every run's re-scoring needs them; decoding ramp-board's pickles (and the
    npz the workers make of them, :class:`..workers.post_run.FoldsNpz`) cost
    the daemon about 2 ms per run. The stored blobs are still read for each
    call, so a change of the event's folds (or of a submission's fold order)
    is seen by the next run; unchanged, the same decoded object is handed out
    again. Thread-safe: the workers' threads call it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs: tuple[tuple[bytes, bytes], ...] | None = None
        self._folds: tuple[tuple[Any, Any], ...] = ()

    def folds(self, conn: Connection, submission_id: int) -> tuple[tuple[Any, Any], ...]:
        blobs = submission_fold_blobs(conn, submission_id)
        with self._lock:
            if blobs == self._blobs:
                return self._folds
        folds = _decoded(blobs)
        with self._lock:
            self._blobs, self._folds = blobs, folds
        return folds


def _event_submissions() -> ColumnElement[bool]:
    """Submissions of the event ``:event_id`` (ids of its event_teams)."""
    return submissions.c.event_team_id.in_(
        select(event_teams.c.id).where(event_teams.c.event_id == bindparam("event_id")).scalar_subquery()
    )


def _waiting(include_backoff: bool = False) -> ColumnElement[bool]:
    """The event's submissions that wait for a run; parameters from :func:`_params`."""
    # "not the sandbox" as two ranges: both backends read them from the
    # (state, name) index and so never visit the teams' sandboxes, which stay
    # ``new`` forever (migration 0005). ``name`` is NOT NULL in ramp-board.
    sandbox = bindparam("sandbox")
    not_sandbox = or_(submissions.c.name < sandbox, submissions.c.name > sandbox)
    condition = and_(submissions.c.state == "new", not_sandbox, _event_submissions())
    # A submission with a run in progress is never claimed again: one set back
    # to ``new`` behind our back (ramp-board's set-submission-state) waits
    # until that run is closed. An infrastructure failure also waits out its
    # backoff before the next attempt.
    in_progress = runs.c.status.in_(ACTIVE_RUN_STATUSES)
    held_back = in_progress if include_backoff else or_(in_progress, runs.c.retry_after > bindparam("now"))
    return and_(condition, ~exists().where(runs.c.submission_id == submissions.c.id, held_back))


def _params(event: EventInfo, **more: Any) -> dict[str, Any]:
    return {"event_id": event.id, "sandbox": event.sandbox_name, "now": utcnow(), **more}


@cache
def _count_waiting_stmt(include_backoff: bool) -> Select[tuple[int]]:
    return select(func.count()).select_from(submissions).where(_waiting(include_backoff))


def count_waiting(conn: Connection, event: EventInfo, include_backoff: bool = False) -> int:
    """Submissions waiting for a run (with those backing off after a platform failure)."""
    return conn.execute(_count_waiting_stmt(include_backoff), _params(event)).scalar_one()


# --------------------------------------------------------------------------- claim


@dataclass(frozen=True)
class Claim:
    run_id: int
    submission_id: int
    name: str  # the participant's name for it
    attempt: int


def _new_values(values: dict[str, Any]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """An UPDATE's varying SET values: (their sorted column names, which key
    the statement built for them; their ``new_<column>`` bind parameters)."""
    return tuple(sorted(values)), {f"new_{c}": v for c, v in values.items()}


def _set_clause(columns: Iterable[str]) -> dict[str, Any]:
    """``column = :new_<column>`` for each column, for ``.values()``."""
    return {c: bindparam(f"new_{c}") for c in columns}


@cache
def _set_state_stmts(
    columns: tuple[str, ...], one: bool, dialect: str, unless_new: bool = False
) -> tuple[Update, ...]:
    """The submissions' state and the other given columns, and the same state
    on all their folds (as ramp-board copies it); for ``:submission_ids`` (a
    list), or ``:for_submission`` when ``one``: an expanding IN is rendered
    anew at each execution, an ``=`` is not. ``unless_new``: leave a
    submission whose state is ``new``.

    PostgreSQL: one statement (the submissions' UPDATE in a WITH whose
    RETURNING picks the folds): a round trip less, four per run. SQLite has no
    UPDATE inside WITH, and ``unless_new`` needs the submissions' own row
    count: two statements.
    """
    folds = submission_on_cv_folds
    if one:
        sub, fold = (c == bindparam("for_submission") for c in (submissions.c.id, folds.c.submission_id))
    else:
        sub, fold = (c.in_(bindparam("submission_ids", expanding=True))
                     for c in (submissions.c.id, folds.c.submission_id))  # fmt: skip
    if unless_new:
        sub = and_(sub, submissions.c.state != "new")
    of_submissions = update(submissions).where(sub).values(**_set_clause(("state", *columns)))
    if dialect == "postgresql" and not unless_new:
        changed = of_submissions.returning(submissions.c.id).cte("changed_submissions")
        return (
            update(folds)
            .where(folds.c.submission_id.in_(select(changed.c.id)))
            .values(**_set_clause(("state",))),
        )
    return of_submissions, update(folds).where(fold).values(**_set_clause(("state",)))


def _advance_state(conn: Connection, submission_id: int, state: str, **values: Any) -> bool:
    """A running submission's next state (``training``, ``tested``), unless an
    admin set it back to ``new`` meanwhile: the admin's ``new`` stands (the
    daemon then stops the run: :func:`reset_runs`). False if it was left."""
    columns, params = _new_values(values)
    of_submissions, of_folds = _set_state_stmts(columns, True, conn.dialect.name, unless_new=True)
    which = {"for_submission": submission_id, "new_state": state}
    if conn.execute(of_submissions, {**which, **params}).rowcount != 1:
        return False
    conn.execute(of_folds, which)
    return True


def set_state(conn: Connection, submission_ids: Sequence[int], state: str, **values: Any) -> None:
    """Change submissions' state, copying it to their folds as ramp-board does."""
    if not submission_ids:
        return
    columns, params = _new_values(values)
    one = len(submission_ids) == 1
    which = {"for_submission": submission_ids[0]} if one else {"submission_ids": list(submission_ids)}
    for stmt in _set_state_stmts(columns, one, conn.dialect.name):
        conn.execute(stmt, {**which, "new_state": state, **params})


def claim(
    conn: Connection,
    event: EventInfo,
    limit: int,
    owner: str,
    worker_type: str,
    lease: dt.timedelta,
    busy: Sequence[int] = (),
) -> list[Claim]:
    """Take up to ``limit`` waiting submissions and record a run for each.

    PostgreSQL: ``FOR UPDATE SKIP LOCKED`` lets two daemons claim side by side
    without ever taking the same row. SQLite: the transaction began with
    ``BEGIN IMMEDIATE``, so only one writer is here at a time. ``busy``:
    submissions whose last run, though collected, still has its files being
    freed by this daemon: not claimed until that is done.
    """
    if limit <= 0:
        return []
    stmts = _claim_stmts(conn.dialect.name, bool(busy))
    params = _params(event, limit=limit)
    if busy:
        params["busy"] = list(busy)
    now = params["now"]
    rows = conn.execute(stmts.oldest_waiting, params).all()
    if not rows:
        return []
    ids = [r.id for r in rows]
    set_state(conn, ids, "sent_to_training", sent_to_training_timestamp=now, queue_position=-1)
    claims = []
    for r in rows:
        run_id, attempt = conn.execute(
            stmts.new_run,
            {
                "submission_id": r.id,
                "for_submission": r.id,
                "event_id": event.id,
                "worker_type": worker_type,
                "owner": owner,
                "status": RUN_STARTING,
                "created_at": now,
                "heartbeat_at": now,
                "lease_expires_at": now + lease,
            },
        ).one()
        claims.append(Claim(run_id, r.id, r.name, attempt))
    return claims


@dataclass(frozen=True)
class _ClaimStatements:
    #: up to ``:limit`` waiting submissions, oldest first, locked (PostgreSQL)
    oldest_waiting: Select[tuple[int, str]]
    #: a run's row, attempt one more than the last of ``:for_submission``;
    #: returns (id, attempt)
    new_run: ReturningInsert[tuple[int, int]]


@cache
def _claim_stmts(dialect: str, skip_busy: bool = False) -> _ClaimStatements:
    """``skip_busy``: also leave out ``:busy`` (an expanding list, rendered at
    each execution: used only while some run's files are being freed)."""
    waiting = _waiting()
    if skip_busy:
        waiting = and_(waiting, submissions.c.id.not_in(bindparam("busy", expanding=True)))
    oldest = (
        select(submissions.c.id, submissions.c.name)
        .where(waiting)
        .order_by(submissions.c.submission_timestamp, submissions.c.id)
        .limit(bindparam("limit", type_=Integer))
    )
    if dialect == "postgresql":
        oldest = oldest.with_for_update(of=submissions, skip_locked=True)
    # the submission's row is locked (PostgreSQL) or the writer alone (SQLite):
    # nobody else numbers its attempts meanwhile
    next_attempt = (
        select(func.coalesce(func.max(runs.c.attempt), 0) + 1)
        .where(runs.c.submission_id == bindparam("for_submission"))
        .scalar_subquery()
    )
    new_run = insert(runs).values(attempt=next_attempt).returning(runs.c.id, runs.c.attempt)
    return _ClaimStatements(oldest, new_run)


def update_queue_positions(conn: Connection, event: EventInfo, full: bool = False) -> None:
    """Waiting submissions get 1..k in order; others -1. At most two statements.

    Only rows whose position changes are written. ``full`` also resets stale
    positions of submissions that left the queue behind our back (an admin's
    edit, a crash); it scans the event, so it runs at start-up only. Within a
    run, submissions leave the queue through :func:`claim`, which sets -1.
    """
    stmts = _queue_position_stmts()
    params = _params(event)
    conn.execute(stmts.number_waiting, params)
    if full:
        conn.execute(stmts.reset_stale, params)


@dataclass(frozen=True)
class _QueueStatements:
    #: waiting submissions get their rank (only those whose rank changes)
    number_waiting: Update
    #: -1 for the event's submissions that left the queue behind our back
    reset_stale: Update


@cache
def _queue_position_stmts() -> _QueueStatements:
    ranked = (
        select(
            submissions.c.id.label("sid"),
            func.row_number().over(order_by=(submissions.c.submission_timestamp, submissions.c.id)).label("pos"),
        )
        .where(_waiting())
        .subquery()
    )
    positions = (
        update(submissions)
        .where(
            submissions.c.id == ranked.c.sid,
            # redundant with the ranking, but it lets PostgreSQL's planner
            # reach the rows through the state index instead of a full scan
            submissions.c.state == "new",
            submissions.c.queue_position.is_distinct_from(ranked.c.pos),
        )
        .values(queue_position=ranked.c.pos)
    )
    stale = (
        update(submissions)
        .where(_event_submissions(), submissions.c.queue_position != -1, ~_waiting())
        .values(queue_position=-1)
    )
    return _QueueStatements(positions, stale)


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunRow:
    id: int
    submission_id: int
    submission_name: str  # participant's name
    attempt: int
    status: str
    owner: str
    handle: dict[str, Any] | None
    started_at: dt.datetime | None
    #: the daemon that held it before this one took it over
    previous_owner: str = ""


def mark_running(conn: Connection, run_id: int, handle: dict[str, Any]) -> bool:
    """The worker started the run: store its handle; the submission is ``training``."""
    now = utcnow()
    params = {"run_id": run_id, "new_handle": handle, "new_started_at": now}
    if conn.dialect.name == "postgresql":
        advance = {"new_state": "training", "new_training_timestamp": now}
        stmt = _step_and_advance_stmt("record_handle", ("training_timestamp",))
        return conn.execute(stmt, {**params, **advance}).scalar() is not None
    sid = conn.execute(_run_stmts().record_handle, params).scalar()
    if sid is None:
        return False
    _advance_state(conn, sid, "training", training_timestamp=now)
    return True


@cache
def _step_and_advance_stmt(step: str, columns: tuple[str, ...]) -> Select[tuple[int]]:
    """PostgreSQL: a run's step (``record_handle`` or ``record_end`` of
    :func:`_run_stmts`, which return the submission id) and what
    :func:`_advance_state` then does (``:new_state`` and ``columns`` on the
    submission unless it is ``new``, the state on its folds) as one statement
    of data-modifying WITHs: one round trip instead of three, twice per run.
    Returns the submission id when the step was taken."""
    folds = submission_on_cv_folds
    run_step = getattr(_run_stmts(), step).cte(f"{step}_step")
    advanced = (
        update(submissions)
        .where(submissions.c.id.in_(select(run_step.c.submission_id)), submissions.c.state != "new")
        .values(**_set_clause(("state", *columns)))
        .returning(submissions.c.id)
        .cte("advanced_submission")
    )
    advanced_folds = (
        update(folds)
        .where(folds.c.submission_id.in_(select(advanced.c.id)))
        .values(**_set_clause(("state",)))
        .cte("advanced_folds")
    )
    return select(run_step.c.submission_id).add_cte(advanced, advanced_folds)


@dataclass(frozen=True)
class _RunStatements:
    """The per-run statements of ``dispatcher_runs``; ``:daemon`` is the owner
    a statement is guarded by."""

    #: starting -> running with ``:new_handle``; returns the submission id
    record_handle: ReturningUpdate[tuple[int]]
    #: the run, if ``:daemon`` holds it and it is not collected
    held_by: Select[tuple[int]]
    #: starting/running -> finished with the outcome; returns the submission id
    record_end: ReturningUpdate[tuple[int]]
    #: heartbeat and a new lease end for ``:run_ids`` that ``:daemon`` holds;
    #: returns their ids
    renew_leases: ReturningUpdate[tuple[int]]
    #: (id, owner, lease end) of the unfinished runs of ``:event_id``
    unfinished_of_event: Select[tuple[int, str, dt.datetime]]
    #: ``:new_message`` on a run ``:daemon`` holds and has not collected
    note_error: Update
    #: which of ``:run_ids`` (not collected) have their submission ``new``
    reset_by_admin: Select[tuple[int]]


@cache
def _run_stmts() -> _RunStatements:
    run = runs.c.id == bindparam("run_id")
    held = runs.c.owner == bindparam("daemon")
    ids = runs.c.id.in_(bindparam("run_ids", expanding=True))
    return _RunStatements(
        record_handle=update(runs)
        .where(run, runs.c.status == RUN_STARTING)
        .values(status=RUN_RUNNING, **_set_clause(("handle", "started_at")))
        .returning(runs.c.submission_id),
        held_by=select(runs.c.id).where(run, held, runs.c.status != RUN_COLLECTED),
        record_end=update(runs)
        # two equalities, not IN (a literal list): an IN is rendered anew at each execution
        .where(run, held, or_(runs.c.status == RUN_STARTING, runs.c.status == RUN_RUNNING))
        .values(status=RUN_FINISHED, **_set_clause(("finished_at", "failure_class", "message")))
        .returning(runs.c.submission_id),
        renew_leases=update(runs)
        .where(ids, held, runs.c.status != RUN_COLLECTED)
        .values(**_set_clause(("heartbeat_at", "lease_expires_at")))
        .returning(runs.c.id),
        unfinished_of_event=select(runs.c.id, runs.c.owner, runs.c.lease_expires_at).where(
            runs.c.event_id == bindparam("event_id"), runs.c.status.in_(ACTIVE_RUN_STATUSES)
        ),
        note_error=update(runs)
        .where(run, held, runs.c.status != RUN_COLLECTED)
        .values(**_set_clause(("message",))),
        reset_by_admin=select(runs.c.id)
        .join(submissions, submissions.c.id == runs.c.submission_id)
        .where(ids, runs.c.status != RUN_COLLECTED, submissions.c.state == "new")
        .order_by(runs.c.id),
    )


def run_is_ours(conn: Connection, run_id: int, owner: str) -> bool:
    """Whether ``owner`` still holds the run and it is not collected yet."""
    return conn.execute(_run_stmts().held_by, {"run_id": run_id, "daemon": owner}).first() is not None


def mark_finished(
    conn: Connection,
    run_id: int,
    owner: str,
    failure_class: str | None,
    message: str,
    succeeded: bool,
) -> bool:
    """The run ended; on success the submission is ``tested`` until scored."""
    params = {
        "run_id": run_id,
        "daemon": owner,
        "new_finished_at": utcnow(),
        "new_failure_class": failure_class,
        "new_message": message,
    }
    if succeeded and conn.dialect.name == "postgresql":
        stmt = _step_and_advance_stmt("record_end", ())
        return conn.execute(stmt, {**params, "new_state": "tested"}).scalar() is not None
    sid = conn.execute(_run_stmts().record_end, params).scalar()
    if sid is not None and succeeded:
        _advance_state(conn, sid, "tested")
    return sid is not None


def reset_runs(conn: Connection, run_ids: Iterable[int]) -> list[int]:
    """Of the given runs (this daemon's), those not collected whose submission
    is ``new`` again: an admin set it back while the run was in progress
    (ramp-database's ``set-submission-state``). The daemon's own requeue
    writes ``new`` in the transaction that collects the run, so its runs never
    show here. A primary-key lookup per run."""
    ids = list(run_ids)
    if not ids:
        return []
    return list(conn.execute(_run_stmts().reset_by_admin, {"run_ids": ids}).scalars())


def submission_was_reset(conn: Connection, submission_id: int) -> bool:
    """Whether the submission is ``new`` (set back by an admin while its run
    was in progress), its row locked until commit on PostgreSQL (SQLite's
    BEGIN IMMEDIATE excludes other writers): the admin's change and the
    result written next happen one after the other, so a ``new`` set after
    this look stands over the result."""
    query = _submission_state_stmt(conn.dialect.name == "postgresql")
    return conn.execute(query, {"for_submission": submission_id}).scalar() == "new"


@cache
def _submission_state_stmt(lock: bool) -> Select[tuple[str]]:
    """The state of ``:for_submission``; ``lock``: its row locked (PostgreSQL)."""
    query = select(submissions.c.state).where(submissions.c.id == bindparam("for_submission"))
    return query.with_for_update(of=submissions) if lock else query


#: ``dispatcher_runs.outcome`` of a run closed without writing its result
#: because its submission was set back to ``new`` while it was in progress
SUPERSEDED = "superseded"


def close_superseded(conn: Connection, run_id: int, owner: str, message: str) -> bool:
    """Close a run whose submission an admin set back to ``new``: only the
    run's row (``superseded``, with ``message``); the submission stays as the
    admin left it and is claimed again as a fresh attempt. False if the run
    is not ours or already collected."""
    return _close_run(conn, run_id, owner, outcome=SUPERSEDED, message=message)


def note_run_error(conn: Connection, run_id: int, owner: str, message: str) -> bool:
    """An error met while collecting the run, on its row (``message``), until
    the run is closed. False if the run is not ours or already collected."""
    params = {"run_id": run_id, "daemon": owner, "new_message": message[:2000]}
    return conn.execute(_run_stmts().note_error, params).rowcount == 1


def _close_run(conn: Connection, run_id: int, owner: str, **values: Any) -> bool:
    """Collect a run once: False if it was already collected, or is no longer
    ours (another daemon took it over): then nothing may be written."""
    columns, params = _new_values(values)
    params.update(run_id=run_id, daemon=owner, new_collected_at=utcnow())
    return conn.execute(_close_run_stmt(columns), params).rowcount == 1


@cache
def _close_run_stmt(columns: tuple[str, ...]) -> Update:
    """running/finished -> collected, with the given columns, if ``:daemon`` holds it."""
    return (
        update(runs)
        .where(runs.c.id == bindparam("run_id"), runs.c.owner == bindparam("daemon"),
               runs.c.status != RUN_COLLECTED)  # fmt: skip
        .values(status=RUN_COLLECTED, **_set_clause(("collected_at", *columns)))
    )


def heartbeat(
    conn: Connection, owner: str, run_ids: Iterable[int], lease: dt.timedelta
) -> set[int]:
    """Renew our leases; return the runs that are still ours (another daemon
    may have taken over a run whose lease lapsed during a database outage; a
    collected run is nobody's to renew)."""
    ids = list(run_ids)
    if not ids:
        return set()
    now = utcnow()
    params = {"run_ids": ids, "daemon": owner, "new_heartbeat_at": now, "new_lease_expires_at": now + lease}
    return set(conn.execute(_run_stmts().renew_leases, params).scalars())


def release(conn: Connection, owner: str) -> None:
    """Give up our leases (clean stop) so the next daemon re-attaches at once
    (for workers whose runs do not live on the daemon's host)."""
    conn.execute(
        update(runs)
        .where(runs.c.owner == owner, runs.c.status.in_(ACTIVE_RUN_STATUSES))
        .values(lease_expires_at=utcnow())
    )


def unfinished_runs(conn: Connection, event: EventInfo) -> set[tuple[int, int]]:
    """(submission id, attempt) of every run of the event not yet collected."""
    return {
        (r.submission_id, r.attempt)
        for r in conn.execute(
            select(runs.c.submission_id, runs.c.attempt).where(
                runs.c.event_id == event.id, runs.c.status.in_(ACTIVE_RUN_STATUSES)
            )
        )
    }


def adopt_orphaned_runs(
    conn: Connection,
    event: EventInfo,
    owner: str,
    lease: dt.timedelta,
    held: Iterable[int],
    owner_is_dead: Callable[[str], bool],
    foreign: Callable[[str], bool] = lambda _owner: False,
    foreign_grace: dt.timedelta = dt.timedelta(0),
) -> list[RunRow]:
    """Take over the event's unfinished runs that nobody serves any more.

    A run is orphaned when its owner's lease lapsed, or its owner is a daemon
    on this host whose process is gone (a restart after ``kill -9`` need not
    wait for the lease). A run whose owner is ``foreign`` (a daemon of
    another host, whose local runs this host cannot see) is orphaned only
    once its lease lapsed ``foreign_grace`` ago. ``held`` are the runs this
    daemon already serves.
    """
    now = utcnow()
    held = set(held)
    candidates = conn.execute(_run_stmts().unfinished_of_event, {"event_id": event.id}).all()
    adopted: dict[int, str] = {}
    for run_id, old_owner, expires in candidates:
        if run_id in held:
            continue
        if old_owner != owner and foreign(old_owner):
            if not (expires is None or expires < now - foreign_grace):
                continue
        elif not (expires is None or expires < now or old_owner == owner or owner_is_dead(old_owner)):
            continue
        # Compare-and-set on the owner makes the takeover atomic between daemons.
        taken = conn.execute(
            update(runs)
            .where(runs.c.id == run_id, runs.c.owner == old_owner)
            .values(owner=owner, heartbeat_at=now, lease_expires_at=now + lease)
        ).rowcount
        if taken:
            adopted[run_id] = old_owner
    if not adopted:
        return []
    rows = conn.execute(
        select(
            runs.c.id,
            runs.c.submission_id,
            submissions.c.name,
            runs.c.attempt,
            runs.c.status,
            runs.c.owner,
            runs.c.handle,
            runs.c.started_at,
        )
        .join(submissions, submissions.c.id == runs.c.submission_id)
        .where(runs.c.id.in_(list(adopted)))
        .order_by(runs.c.id)
    ).all()
    return [RunRow(*r, previous_owner=adopted[r.id]) for r in rows]


# --------------------------------------------------------------------------- results


def write_results(
    conn: Connection,
    event: EventInfo,
    run_id: int,
    owner: str,
    submission_id: int,
    results: TrainingResults,
    max_ram_mb: float | None,
    note: str = "",
) -> bool:
    """Store a successful run exactly where ramp-database's set_time, set_scores
    and set_bagged_scores put it; the submission becomes ``scored``. ``note``
    (e.g. that the scores were recomputed) goes to the run's message.

    Statements are per table (executemany), not per value. Returns False when
    the run was already collected.
    """
    extra = {"message": note} if note else {}
    if not _close_run(conn, run_id, owner, outcome="scored", max_ram_mb=_int(max_ram_mb), **extra):
        return False
    stmts = _result_stmts()
    fold_ids: list[int] = []
    score_ids: dict[int, int] = {}
    for is_score, row_id, score_type in conn.execute(stmts.row_ids, {"submission_id": submission_id}):
        if is_score:
            score_ids[score_type] = row_id
        else:
            fold_ids.append(row_id)
    if len(fold_ids) != len(results.folds):
        raise ValueError(
            f"submission {submission_id} has {len(fold_ids)} fold rows, "
            f"the output has {len(results.folds)} folds"
        )
    conn.execute(
        stmts.fold_times,
        [
            {"fid": fid, "tr": f.train_time, "va": f.valid_time, "te": f.test_time}
            for fid, f in zip(fold_ids, results.folds)
        ],
    )
    fold_scores = [
        {
            "fid": fid,
            "sid": score_ids[spec.event_score_type_id],
            # the parser guarantees every step of every score name
            "tr": float(f.scores[spec.name]["train"]),
            "va": float(f.scores[spec.name]["valid"]),
            "te": float(f.scores[spec.name]["test"]),
        }
        for fid, f in zip(fold_ids, results.folds)
        for spec in event.scores
        if spec.event_score_type_id in score_ids
    ]
    if fold_scores:
        conn.execute(stmts.fold_scores, fold_scores)
    bagged = []
    for spec in event.scores:
        if spec.event_score_type_id not in score_ids:
            continue
        row: dict[str, Any] = {"sid": score_ids[spec.event_score_type_id]}
        for step in ("valid", "test"):
            # A step missing from bagged_scores.csv keeps the worst score that
            # ramp-board wrote when it created the row (the kit's score type
            # knows "worst"; the score_types table holds placeholders).
            row[f"{step}_bag"] = results.bagged.last.get(spec.name, {}).get(step)
            bags = results.bagged.all_bags.get(spec.name, {}).get(step)
            row[f"{step}_bags"] = None if bags is None else [float(b) for b in bags]
        bagged.append(row)
    if bagged:
        conn.execute(stmts.bagged, bagged)
    stats = results.time_stats()
    values: dict[str, Any] = {"error_msg": ""}
    for step, (mean, std) in stats.items():
        values[f"{step}_time_cv_mean"] = float(mean)
        values[f"{step}_time_cv_std"] = float(std)
    if max_ram_mb is not None:
        values["max_ram"] = float(max_ram_mb)
    set_state(conn, [submission_id], "scored", **values)
    return True


@dataclass(frozen=True)
class _ResultStatements:
    """What ramp-database's set_time, set_scores and set_bagged_scores write,
    and the failure message on the folds. ``fid``/``sid`` are a fold row's and
    a score row's ids; ``tr``/``va``/``te`` the train/valid/test values."""

    #: the submission's fold rows in ramp-test's fold order, as (0, fold row
    #: id, NULL), then its score rows, as (1, score row id, event score
    #: type): one round trip for both
    row_ids: CompoundSelect
    #: a fold's times, state scored (executemany)
    fold_times: Update
    #: a fold's train/valid/test score of one score type (executemany)
    fold_scores: Update
    #: a score row's bagged scores (executemany)
    bagged: Update
    #: the error message on all folds of ``:for_submission``
    fold_errors: Update


@cache
def _result_stmts() -> _ResultStatements:
    folds, ssf, scores = submission_on_cv_folds, submission_score_on_cv_folds, submission_scores
    submission = bindparam("submission_id")
    row_ids = union_all(
        select(literal_column("0").label("is_score"), folds.c.id.label("row_id"),
               null().cast(Integer).label("score_type")).where(folds.c.submission_id == submission),
        select(literal_column("1"), scores.c.id, scores.c.event_score_type_id)
        .where(scores.c.submission_id == submission),
    )  # fmt: skip
    return _ResultStatements(
        row_ids=row_ids.order_by(row_ids.selected_columns.is_score, row_ids.selected_columns.row_id),
        fold_times=update(folds)
        .where(folds.c.id == bindparam("fid"))
        .values(
            train_time=bindparam("tr"),
            valid_time=bindparam("va"),
            test_time=bindparam("te"),
            state="scored",
            error_msg="",
        ),
        fold_scores=update(ssf)
        .where(ssf.c.submission_on_cv_fold_id == bindparam("fid"), ssf.c.submission_score_id == bindparam("sid"))
        .values(train_score=bindparam("tr"), valid_score=bindparam("va"), test_score=bindparam("te")),
        bagged=update(scores)
        .where(scores.c.id == bindparam("sid"))
        .values(
            valid_score_cv_bag=func.coalesce(bindparam("valid_bag", type_=Float), scores.c.valid_score_cv_bag),
            test_score_cv_bag=func.coalesce(bindparam("test_bag", type_=Float), scores.c.test_score_cv_bag),
            valid_score_cv_bags=bindparam("valid_bags", type_=scores.c.valid_score_cv_bags.type),
            test_score_cv_bags=bindparam("test_bags", type_=scores.c.test_score_cv_bags.type),
        ),
        fold_errors=update(folds)
        .where(folds.c.submission_id == bindparam("for_submission"))
        .values(**_set_clause(("error_msg",))),
    )


def write_failure(
    conn: Connection,
    run_id: int,
    owner: str,
    submission_id: int,
    state: str,
    error_msg: str,
    failure_class: str,
    max_ram_mb: float | None,
) -> bool:
    """A final failure: ``training_error`` or ``checking_error`` with its message."""
    if not _close_run(
        conn, run_id, owner, outcome=state, failure_class=failure_class,
        max_ram_mb=_int(max_ram_mb),
    ):
        return False
    values: dict[str, Any] = {"error_msg": error_msg}
    if max_ram_mb is not None:
        values["max_ram"] = float(max_ram_mb)
    set_state(conn, [submission_id], state, **values)
    conn.execute(_result_stmts().fold_errors, {"for_submission": submission_id, "new_error_msg": error_msg})
    return True


#: ``dispatcher_runs.outcome`` of a run requeued with an attempt used
RETRY = "retry"
#: ``dispatcher_runs.outcome`` of a run requeued while the circuit breaker held
#: the queue: the platform failed, so no attempt of the submission is used
HELD = "held"


def requeue(
    conn: Connection,
    run_id: int,
    owner: str,
    submission_id: int,
    failure_class: str,
    message: str,
    retry_after: dt.datetime,
    outcome: str = RETRY,
) -> bool:
    """An infrastructure failure with attempts left (``retry``), or met while
    the platform is failing (``held``): back to ``new``, after ``retry_after``."""
    if not _close_run(
        conn, run_id, owner, outcome=outcome, failure_class=failure_class, message=message,
        retry_after=retry_after,
    ):
        return False
    set_state(conn, [submission_id], "new")
    return True


def _int(value: float | None) -> int | None:
    return None if value is None else int(round(value))


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class SubmissionSummary:
    id: int
    name: str
    team: str
    state: str
    queue_position: int | None
    scores: dict[str, tuple[float | None, float | None]]  # name -> (valid bag, test bag)
    train_time: float | None
    valid_time: float | None
    test_time: float | None
    max_ram: float | None
    error_msg: str


def submission_summaries(conn: Connection, event: EventInfo) -> list[SubmissionSummary]:
    """Every submission of the event with its bagged scores, in submission order."""
    from .ramp_schema import teams

    rows = conn.execute(
        select(
            submissions.c.id, submissions.c.name, teams.c.name.label("team"), submissions.c.state, submissions.c.queue_position,
            submissions.c.train_time_cv_mean, submissions.c.valid_time_cv_mean, submissions.c.test_time_cv_mean,
            submissions.c.max_ram, submissions.c.error_msg,
        )
        .join(event_teams, event_teams.c.id == submissions.c.event_team_id)
        .join(teams, teams.c.id == event_teams.c.team_id)
        .where(event_teams.c.event_id == event.id)
        .order_by(submissions.c.submission_timestamp, submissions.c.id)
    ).all()
    names = {s.event_score_type_id: s.name for s in event.scores}
    scores: dict[int, dict[str, tuple[float | None, float | None]]] = {}
    for r in conn.execute(
        select(
            submission_scores.c.submission_id,
            submission_scores.c.event_score_type_id,
            submission_scores.c.valid_score_cv_bag,
            submission_scores.c.test_score_cv_bag,
        ).where(submission_scores.c.submission_id.in_([r.id for r in rows]))
    ):
        scores.setdefault(r.submission_id, {})[names.get(r.event_score_type_id, "?")] = (
            r.valid_score_cv_bag,
            r.test_score_cv_bag,
        )
    return [
        SubmissionSummary(
            r.id, r.name, r.team, r.state, r.queue_position, scores.get(r.id, {}),
            r.train_time_cv_mean, r.valid_time_cv_mean, r.test_time_cv_mean,
            r.max_ram, r.error_msg or "",
        )
        for r in rows
    ]
