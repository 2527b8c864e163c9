"""Every statement the dispatcher runs against the database, in one place.

Functions take a Connection inside a transaction; the caller commits. Writes
are keyed by run id and guarded by the run's status, so collecting the same
run twice, or a late result from a superseded attempt, changes nothing.

The statements run for every submission are built once (``@cache``), with bind
parameters for whatever varies: building a Core statement costs the daemon more
CPU than executing it (``bench/batch.py`` measures the daemon's CPU per run).
SQLAlchemy reserves a column's own name for the SET clause of an UPDATE, so
bind parameters of new values are named ``v_<column>`` and those of WHERE
clauses ``p_<column>`` where they would collide.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import cache
from typing import Any, Callable, Iterable, Sequence

from sqlalchemy import (
    Connection, Float, Integer, and_, bindparam, exists, func, insert, or_, select, update,
)

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
    event_score_types,
    event_teams,
    events,
    submission_on_cv_folds,
    submission_score_on_cv_folds,
    submission_scores,
    submissions,
)

S = submissions


def utcnow() -> dt.datetime:
    """ramp-board stores naive UTC timestamps."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


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


def _event_submissions():
    """Submissions of the event ``:event_id`` (ids of its event_teams)."""
    return S.c.event_team_id.in_(
        select(event_teams.c.id).where(event_teams.c.event_id == bindparam("event_id")).scalar_subquery()
    )


def _waiting(include_backoff: bool = False):
    """The event's submissions that wait for a run; parameters from :func:`_params`."""
    # "not the sandbox" as two ranges: both backends read them from the
    # (state, name) index and so never visit the teams' sandboxes, which stay
    # ``new`` forever (migration 0005). ``name`` is NOT NULL in ramp-board.
    sandbox = bindparam("sandbox")
    not_sandbox = or_(S.c.name < sandbox, S.c.name > sandbox)
    condition = and_(S.c.state == "new", not_sandbox, _event_submissions())
    if include_backoff:
        return condition
    # an infrastructure failure waits out its backoff before the next attempt
    return and_(condition, ~exists().where(runs.c.submission_id == S.c.id, runs.c.retry_after > bindparam("now")))


def _params(event: EventInfo, **more: Any) -> dict[str, Any]:
    return {"event_id": event.id, "sandbox": event.sandbox_name, "now": utcnow(), **more}


@cache
def _count_waiting_stmt(include_backoff: bool):
    return select(func.count()).select_from(S).where(_waiting(include_backoff))


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
    the statement built for them; their ``v_`` bind parameters)."""
    return tuple(sorted(values)), {f"v_{c}": v for c, v in values.items()}


def _set_clause(columns: tuple[str, ...]) -> dict[str, Any]:
    return {c: bindparam(f"v_{c}") for c in columns}


@cache
def _set_state_stmts(columns: tuple[str, ...]):
    ids = bindparam("ids", expanding=True)
    subs = update(S).where(S.c.id.in_(ids)).values(state=bindparam("v_state"), **_set_clause(columns))
    folds = (
        update(submission_on_cv_folds)
        .where(submission_on_cv_folds.c.submission_id.in_(bindparam("ids", expanding=True)))
        .values(state=bindparam("v_state"))
    )
    return subs, folds


def set_state(conn: Connection, submission_ids: Sequence[int], state: str, **values: Any) -> None:
    """Change submissions' state, copying it to their folds as ramp-board does."""
    if not submission_ids:
        return
    columns, params = _new_values(values)
    subs, folds = _set_state_stmts(columns)
    ids = list(submission_ids)
    conn.execute(subs, {"ids": ids, "v_state": state, **params})
    conn.execute(folds, {"ids": ids, "v_state": state})


def claim(
    conn: Connection,
    event: EventInfo,
    limit: int,
    owner: str,
    worker_type: str,
    lease: dt.timedelta,
) -> list[Claim]:
    """Take up to ``limit`` waiting submissions and record a run for each.

    PostgreSQL: ``FOR UPDATE SKIP LOCKED`` lets two daemons claim side by side
    without ever taking the same row. SQLite: the transaction began with
    ``BEGIN IMMEDIATE``, so only one writer is here at a time.
    """
    if limit <= 0:
        return []
    oldest, last_attempts, new_run = _claim_stmts(conn.dialect.name)
    params = _params(event, limit=limit)
    now = params["now"]
    rows = conn.execute(oldest, params).all()
    if not rows:
        return []
    ids = [r.id for r in rows]
    last_attempt = dict(conn.execute(last_attempts, {"ids": ids}).all())
    set_state(conn, ids, "sent_to_training", sent_to_training_timestamp=now, queue_position=-1)
    claims = []
    for r in rows:
        attempt = last_attempt.get(r.id, 0) + 1
        run_id = conn.execute(
            new_run,
            {
                "submission_id": r.id,
                "event_id": event.id,
                "attempt": attempt,
                "worker_type": worker_type,
                "owner": owner,
                "status": RUN_STARTING,
                "created_at": now,
                "heartbeat_at": now,
                "lease_expires_at": now + lease,
            },
        ).scalar_one()
        claims.append(Claim(run_id, r.id, r.name, attempt))
    return claims


@cache
def _claim_stmts(dialect: str):
    """(the oldest waiting submissions, their last attempts, a new run)."""
    oldest = (
        select(S.c.id, S.c.name)
        .where(_waiting())
        .order_by(S.c.submission_timestamp, S.c.id)
        .limit(bindparam("limit", type_=Integer))
    )
    if dialect == "postgresql":
        oldest = oldest.with_for_update(of=S, skip_locked=True)
    last_attempt = (
        select(runs.c.submission_id, func.max(runs.c.attempt))
        .where(runs.c.submission_id.in_(bindparam("ids", expanding=True)))
        .group_by(runs.c.submission_id)
    )
    return oldest, last_attempt, insert(runs).returning(runs.c.id)


def update_queue_positions(conn: Connection, event: EventInfo, full: bool = False) -> None:
    """Waiting submissions get 1..k in order; others -1. At most two statements.

    Only rows whose position changes are written. ``full`` also resets stale
    positions of submissions that left the queue behind our back (an admin's
    edit, a crash); it scans the event, so it runs at start-up only. Within a
    run, submissions leave the queue through :func:`claim`, which sets -1.
    """
    ranked, stale = _queue_position_stmts()
    params = _params(event)
    conn.execute(ranked, params)
    if full:
        conn.execute(stale, params)


@cache
def _queue_position_stmts():
    ranked = (
        select(
            S.c.id.label("sid"),
            func.row_number().over(order_by=(S.c.submission_timestamp, S.c.id)).label("pos"),
        )
        .where(_waiting())
        .subquery()
    )
    positions = (
        update(S)
        .where(
            S.c.id == ranked.c.sid,
            # redundant with the ranking, but it lets PostgreSQL's planner
            # reach the rows through the state index instead of a full scan
            S.c.state == "new",
            S.c.queue_position.is_distinct_from(ranked.c.pos),
        )
        .values(queue_position=ranked.c.pos)
    )
    stale = (
        update(S)
        .where(_event_submissions(), S.c.queue_position != -1, ~_waiting())
        .values(queue_position=-1)
    )
    return positions, stale


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


def mark_running(conn: Connection, run_id: int, handle: dict[str, Any]) -> bool:
    """The worker started the run: store its handle; the submission is ``training``."""
    now = utcnow()
    sid = conn.execute(
        _run_stmts().running, {"run_id": run_id, "v_handle": handle, "v_started_at": now}
    ).scalar()
    if sid is None:
        return False
    set_state(conn, [sid], "training", training_timestamp=now)
    return True


@dataclass(frozen=True)
class _RunStatements:
    running: Any
    is_ours: Any
    finished: Any
    renew: Any
    still_ours: Any
    active_of_event: Any


@cache
def _run_stmts() -> _RunStatements:
    run = runs.c.id == bindparam("run_id")
    ours = runs.c.owner == bindparam("p_owner")
    ids = runs.c.id.in_(bindparam("ids", expanding=True))
    return _RunStatements(
        running=update(runs)
        .where(run, runs.c.status == RUN_STARTING)
        .values(status=RUN_RUNNING, handle=bindparam("v_handle"), started_at=bindparam("v_started_at"))
        .returning(runs.c.submission_id),
        is_ours=select(runs.c.id).where(run, ours, runs.c.status != RUN_COLLECTED),
        finished=update(runs)
        .where(run, ours, runs.c.status.in_((RUN_STARTING, RUN_RUNNING)))
        .values(
            status=RUN_FINISHED,
            finished_at=bindparam("v_finished_at"),
            failure_class=bindparam("v_failure_class"),
            message=bindparam("v_message"),
        )
        .returning(runs.c.submission_id),
        renew=update(runs)
        .where(ids, ours, runs.c.status != RUN_COLLECTED)
        .values(heartbeat_at=bindparam("v_now"), lease_expires_at=bindparam("v_expires")),
        still_ours=select(runs.c.id).where(ids, ours),
        active_of_event=select(runs.c.id, runs.c.owner, runs.c.lease_expires_at).where(
            runs.c.event_id == bindparam("event_id"), runs.c.status.in_(ACTIVE_RUN_STATUSES)
        ),
    )


def run_is_ours(conn: Connection, run_id: int, owner: str) -> bool:
    """Whether ``owner`` still holds the run and it is not collected yet."""
    return conn.execute(_run_stmts().is_ours, {"run_id": run_id, "p_owner": owner}).first() is not None


def mark_finished(
    conn: Connection,
    run_id: int,
    owner: str,
    failure_class: str | None,
    message: str,
    succeeded: bool,
) -> bool:
    """The run ended; on success the submission is ``tested`` until scored."""
    sid = conn.execute(
        _run_stmts().finished,
        {
            "run_id": run_id,
            "p_owner": owner,
            "v_finished_at": utcnow(),
            "v_failure_class": failure_class,
            "v_message": message,
        },
    ).scalar()
    if sid is not None and succeeded:
        set_state(conn, [sid], "tested")
    return sid is not None


def _close_run(conn: Connection, run_id: int, owner: str, **values: Any) -> bool:
    """Collect a run once: False if it was already collected, or is no longer
    ours (another daemon took it over): then nothing may be written."""
    columns, params = _new_values(values)
    params.update(run_id=run_id, p_owner=owner, v_collected_at=utcnow())
    return conn.execute(_close_run_stmt(columns), params).rowcount == 1


@cache
def _close_run_stmt(columns: tuple[str, ...]):
    return (
        update(runs)
        .where(runs.c.id == bindparam("run_id"), runs.c.owner == bindparam("p_owner"),
               runs.c.status != RUN_COLLECTED)  # fmt: skip
        .values(
            status=RUN_COLLECTED,
            collected_at=bindparam("v_collected_at"),
            **_set_clause(columns),
        )
    )


def heartbeat(
    conn: Connection, owner: str, run_ids: Iterable[int], lease: dt.timedelta
) -> set[int]:
    """Renew our leases; return the runs that are still ours (another daemon
    may have taken over a run whose lease lapsed during a database outage)."""
    ids = list(run_ids)
    if not ids:
        return set()
    now = utcnow()
    stmts = _run_stmts()
    conn.execute(stmts.renew, {"ids": ids, "p_owner": owner, "v_now": now, "v_expires": now + lease})
    return set(conn.execute(stmts.still_ours, {"ids": ids, "p_owner": owner}).scalars())


def release(conn: Connection, owner: str) -> None:
    """Give up our leases (clean stop) so the next daemon re-attaches at once."""
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
) -> list[RunRow]:
    """Take over the event's unfinished runs that nobody serves any more.

    A run is orphaned when its owner's lease lapsed, or its owner is a daemon
    on this host whose process is gone (a restart after ``kill -9`` need not
    wait for the lease). ``held`` are the runs this daemon already serves.
    """
    now = utcnow()
    held = set(held)
    candidates = conn.execute(_run_stmts().active_of_event, {"event_id": event.id}).all()
    adopted = []
    for run_id, old_owner, expires in candidates:
        if run_id in held:
            continue
        if not (expires is None or expires < now or old_owner == owner or owner_is_dead(old_owner)):
            continue
        # Compare-and-set on the owner makes the takeover atomic between daemons.
        taken = conn.execute(
            update(runs)
            .where(runs.c.id == run_id, runs.c.owner == old_owner)
            .values(owner=owner, heartbeat_at=now, lease_expires_at=now + lease)
        ).rowcount
        if taken:
            adopted.append(run_id)
    if not adopted:
        return []
    rows = conn.execute(
        select(
            runs.c.id,
            runs.c.submission_id,
            S.c.name,
            runs.c.attempt,
            runs.c.status,
            runs.c.owner,
            runs.c.handle,
            runs.c.started_at,
        )
        .join(S, S.c.id == runs.c.submission_id)
        .where(runs.c.id.in_(adopted))
        .order_by(runs.c.id)
    ).all()
    return [RunRow(*r) for r in rows]


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
    fold_ids = conn.execute(stmts.fold_ids, {"submission_id": submission_id}).scalars().all()
    score_ids = dict(conn.execute(stmts.score_ids, {"submission_id": submission_id}).all())
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
    fold_ids: Any
    score_ids: Any
    fold_times: Any
    fold_scores: Any
    bagged: Any
    fold_errors: Any


@cache
def _result_stmts() -> _ResultStatements:
    folds, ssf, scores = submission_on_cv_folds, submission_score_on_cv_folds, submission_scores
    return _ResultStatements(
        fold_ids=select(folds.c.id)
        .where(folds.c.submission_id == bindparam("submission_id"))
        .order_by(folds.c.id),
        score_ids=select(scores.c.event_score_type_id, scores.c.id).where(
            scores.c.submission_id == bindparam("submission_id")
        ),
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
        .where(folds.c.submission_id == bindparam("p_submission_id"))
        .values(error_msg=bindparam("v_error_msg")),
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
    conn.execute(_result_stmts().fold_errors, {"p_submission_id": submission_id, "v_error_msg": error_msg})
    return True


def requeue(
    conn: Connection,
    run_id: int,
    owner: str,
    submission_id: int,
    failure_class: str,
    message: str,
    retry_after: dt.datetime,
) -> bool:
    """An infrastructure failure with attempts left: back to ``new`` after a backoff."""
    if not _close_run(
        conn, run_id, owner, outcome="retry", failure_class=failure_class, message=message,
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
            S.c.id, S.c.name, teams.c.name.label("team"), S.c.state, S.c.queue_position,
            S.c.train_time_cv_mean, S.c.valid_time_cv_mean, S.c.test_time_cv_mean,
            S.c.max_ram, S.c.error_msg,
        )
        .join(event_teams, event_teams.c.id == S.c.event_team_id)
        .join(teams, teams.c.id == event_teams.c.team_id)
        .where(event_teams.c.event_id == event.id)
        .order_by(S.c.submission_timestamp, S.c.id)
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
