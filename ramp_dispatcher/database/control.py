"""Admin actions on submissions, made through the database.

``ramp-dispatcher retry`` and ``cancel`` may run on another host than the
daemon, and the daemon may be stopped: so they never touch a process. They
change rows, and a running daemon picks the change up:

* retry: a failed submission goes back to ``new`` (the PostgreSQL trigger wakes
  the daemon; SQLite's daemon sees it at its next poll); its runs stay as
  history and the next run gets the next attempt number;
* cancel of a waiting submission: final at once (``checking_error``);
* cancel of a running one: ``cancel_requested_at`` on its run; the daemon that
  holds the run sees it through :func:`pending_cancels`, stops the run (its
  worker's cleanup: process tree or instance gone) and closes it with
  :func:`write_cancelled`.

Functions take a Connection inside a transaction; the caller commits. The
submission's row is locked first (``FOR UPDATE`` on PostgreSQL; SQLite
transactions are ``BEGIN IMMEDIATE``), so an admin action and a daemon's claim
of the same submission happen one after the other, never interleaved.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from functools import cache
from typing import Sequence

from sqlalchemy import Connection, Select, bindparam, func, select, update

from ..errors import UserError
from .dispatcher_schema import ACTIVE_RUN_STATUSES, RUN_COLLECTED, RUN_FINISHED, runs
from .queries import HELD, RETRY, set_state, utcnow
from .ramp_schema import event_teams, events, submission_on_cv_folds, submissions, teams

__all__ = [
    "CANCEL_MESSAGE",
    "ERROR_STATES",
    "SubmissionRef",
    "attempt_in_budget",
    "cancel_submission",
    "find_submission",
    "pending_cancels",
    "retry_submission",
    "write_cancelled",
]


#: the participant's error page shows this for a cancelled submission
CANCEL_MESSAGE = "Cancelled by the event's administrators."
#: ``dispatcher_runs.failure_class`` of a cancelled run (not a FailureClass:
#: nobody failed, and it is never retried)
CANCELLED = "cancelled"
#: the final state of a cancelled submission: ramp-board has no "cancelled"
#: state, and checking_error is the one that does not blame the participant's code
CANCELLED_STATE = "checking_error"

#: states a retry accepts: every ``*_error`` of ramp-board's submission_states
ERROR_STATES = ("checking_error", "training_error", "validating_error", "testing_error")
FINAL_STATES = ("scored", *ERROR_STATES)

_ON_DISK = re.compile(r"^submission_(\d+)$")


@dataclass(frozen=True)
class SubmissionRef:
    id: int
    name: str  # the participant's name for it
    team: str
    event_id: int
    event_name: str
    state: str
    is_sandbox: bool

    def label(self) -> str:
        return f"submission {self.id} ({self.team}/{self.name}, event {self.event_name!r})"


def _ref_query():
    return (
        select(
            submissions.c.id,
            submissions.c.name,
            teams.c.name.label("team"),
            events.c.id.label("event_id"),
            events.c.name.label("event_name"),
            submissions.c.state,
            events.c.ramp_sandbox_name,
        )
        .join(event_teams, event_teams.c.id == submissions.c.event_team_id)
        .join(teams, teams.c.id == event_teams.c.team_id)
        .join(events, events.c.id == event_teams.c.event_id)
    )


def _to_ref(row) -> SubmissionRef:
    return SubmissionRef(
        row.id, row.name, row.team, row.event_id, row.event_name, row.state,
        is_sandbox=row.name == row.ramp_sandbox_name,
    )


def find_submission(conn: Connection, ref: str, event_name: str | None = None) -> SubmissionRef:
    """A submission by id (``42``), on-disk name (``submission_000000042``),
    ``team/name``, or bare ``name`` when unique; the last two need the event.

    Raises :class:`UserError` saying what was not found, or what is ambiguous.
    """
    ref = ref.strip()
    if event_name is not None:
        if conn.execute(select(events.c.id).where(events.c.name == event_name)).first() is None:
            raise UserError(f"event {event_name!r} is not in the database")
    number = ref if ref.isdigit() else (m.group(1) if (m := _ON_DISK.match(ref)) else None)
    if number is not None:
        row = conn.execute(_ref_query().where(submissions.c.id == int(number))).first()
        if row is None:
            raise UserError(f"no submission with id {int(number)} in the database")
        if event_name is not None and row.event_name != event_name:
            raise UserError(
                f"submission {row.id} belongs to event {row.event_name!r}, not {event_name!r}"
            )
        return _to_ref(row)
    if event_name is None:
        raise UserError(
            f"{ref!r} is not a submission id (42) or on-disk name (submission_000000042); "
            "to name it TEAM/NAME or NAME, also give the event with --event"
        )
    query = _ref_query().where(events.c.name == event_name)
    if "/" in ref:
        team, name = ref.split("/", 1)
        rows = conn.execute(query.where(teams.c.name == team, submissions.c.name == name)).all()
        if not rows:
            raise UserError(f"team {team!r} has no submission {name!r} in event {event_name!r}")
        return _to_ref(rows[0])  # (event_team, name) is unique in ramp-board
    rows = conn.execute(query.where(submissions.c.name == ref).order_by(submissions.c.id)).all()
    if not rows:
        raise UserError(f"no submission named {ref!r} in event {event_name!r}")
    if len(rows) > 1:
        shown = ", ".join(f"{r.team}/{r.name} (id {r.id})" for r in rows[:10])
        raise UserError(
            f"{len(rows)} submissions are named {ref!r} in event {event_name!r}: {shown}; "
            "give TEAM/NAME or the id"
        )
    return _to_ref(rows[0])


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _RunState:
    id: int
    attempt: int
    status: str
    cancel_requested_at: dt.datetime | None
    lease_expires_at: dt.datetime | None


def _lock_state(conn: Connection, submission_id: int) -> str:
    """The submission's current state, its row locked until commit (PostgreSQL;
    SQLite's BEGIN IMMEDIATE already excludes other writers)."""
    query = select(submissions.c.state).where(submissions.c.id == submission_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(of=submissions)
    state = conn.execute(query).scalar_one_or_none()
    if state is None:
        raise UserError(f"submission {submission_id} is no longer in the database")
    return state


def _latest_run(conn: Connection, submission_id: int) -> _RunState | None:
    row = conn.execute(
        select(
            runs.c.id, runs.c.attempt, runs.c.status, runs.c.cancel_requested_at,
            runs.c.lease_expires_at,
        )
        .where(runs.c.submission_id == submission_id)
        .order_by(runs.c.attempt.desc())
        .limit(1)
    ).first()
    return None if row is None else _RunState(*row)


def _refuse_sandbox(sub: SubmissionRef, action: str) -> None:
    if sub.is_sandbox:
        raise UserError(
            f"{sub.label()} is the event's sandbox (starting kit): it is never run, "
            f"so there is nothing to {action}"
        )


def _set_fold_error_msg(conn: Connection, submission_id: int, error_msg: str) -> None:
    conn.execute(
        update(submission_on_cv_folds)
        .where(submission_on_cv_folds.c.submission_id == submission_id)
        .values(error_msg=error_msg)
    )


# --------------------------------------------------------------------------- retry


def retry_submission(conn: Connection, sub: SubmissionRef) -> str:
    """Requeue a failed submission; returns what was done, for the admin.

    Its runs stay (history); the next claim gives attempt max + 1. A pending
    backoff (``retry_after`` in the future) is cleared so it is claimed at once.
    """
    _refuse_sandbox(sub, "retry")
    state = _lock_state(conn, sub.id)
    run = _latest_run(conn, sub.id)
    if run is not None and run.status in ACTIVE_RUN_STATUSES:
        raise UserError(
            f"{sub.label()} has a run in progress (attempt {run.attempt}, {run.status}): "
            "wait for it, or cancel it first"
        )
    if state not in ERROR_STATES:
        why = {
            "new": "it is already waiting to be run",
            "scored": "it was scored",
        }.get(state, "it is not in an error state")
        raise UserError(
            f"{sub.label()} is {state}: only a failed submission "
            f"({', '.join(ERROR_STATES)}) can be retried; {why}"
        )
    set_state(conn, [sub.id], "new", error_msg="")
    _set_fold_error_msg(conn, sub.id, "")
    # queue_position: the daemon numbers the queue at its next claim cycle
    now = utcnow()
    conn.execute(
        update(runs)
        .where(runs.c.submission_id == sub.id, runs.c.retry_after > now)
        .values(retry_after=None)
    )
    next_attempt = (run.attempt if run is not None else 0) + 1
    history = f"{run.attempt} earlier run(s) kept" if run is not None else "no earlier run"
    return (
        f"{sub.label()}: {state} -> new; requeued as attempt {next_attempt} ({history})"
    )


def attempt_in_budget(conn: Connection, submission_id: int, attempt: int) -> int:
    """The attempt's rank in its streak of infrastructure retries: 1 for the first
    run after the submission was new or was requeued by an admin.

    A streak ends at a run collected with a final outcome (anything but
    ``retry`` or ``held``); an admin retry follows such a run, so it starts a
    new budget. Runs ``held`` by the circuit breaker (the platform was
    failing) use no attempt. The retry policy compares this, not the raw
    attempt, with max_attempts.
    """
    params = {"submission_id": submission_id, "attempt": attempt}
    return conn.execute(_budget_stmt(), params).scalar_one() + 1


@cache
def _budget_stmt() -> Select[tuple[int]]:
    """The retries of ``:submission_id`` before ``:attempt`` since its last
    final outcome: built once, as the daemon's other statements."""
    submission_id, attempt = bindparam("submission_id"), bindparam("attempt")
    last_final = (
        select(func.coalesce(func.max(runs.c.attempt), 0))
        .where(
            runs.c.submission_id == submission_id,
            runs.c.attempt < attempt,
            runs.c.status == RUN_COLLECTED,
            func.coalesce(runs.c.outcome, "").not_in((RETRY, HELD)),
        )
        .scalar_subquery()
    )
    return select(func.count()).select_from(runs).where(
        runs.c.submission_id == submission_id,
        runs.c.attempt > last_final,
        runs.c.attempt < attempt,
        runs.c.outcome == RETRY,
    )


# --------------------------------------------------------------------------- cancel


def cancel_submission(conn: Connection, sub: SubmissionRef) -> str:
    """Cancel a waiting submission at once, or ask the daemon to stop a running one."""
    _refuse_sandbox(sub, "cancel")
    state = _lock_state(conn, sub.id)
    run = _latest_run(conn, sub.id)
    if run is not None and run.status in ACTIVE_RUN_STATUSES:
        if run.cancel_requested_at is not None:
            return (
                f"{sub.label()}: cancel already requested at "
                f"{run.cancel_requested_at:%Y-%m-%d %H:%M:%S} UTC (attempt {run.attempt}, "
                f"{run.status}); the daemon holding the run stops it"
            )
        now = utcnow()
        conn.execute(
            update(runs)
            .where(runs.c.id == run.id, runs.c.status.in_(ACTIVE_RUN_STATUSES))
            .values(cancel_requested_at=now)
        )
        message = (
            f"{sub.label()}: cancel requested for attempt {run.attempt} ({run.status}); "
            "the daemon stops the run within a few seconds"
        )
        if run.status == RUN_FINISHED:
            message += " (the run has just ended: if its result is written first, it stands)"
        if run.lease_expires_at is not None and run.lease_expires_at < now:
            message += (
                "; note: no daemon holds this run right now (its lease expired at "
                f"{run.lease_expires_at:%Y-%m-%d %H:%M:%S} UTC): the next daemon started "
                "on this event stops it"
            )
        return message
    if state == "new":
        set_state(conn, [sub.id], CANCELLED_STATE, error_msg=CANCEL_MESSAGE, queue_position=-1)
        _set_fold_error_msg(conn, sub.id, CANCEL_MESSAGE)
        return f"{sub.label()}: cancelled while waiting; it is now {CANCELLED_STATE}"
    if state in FINAL_STATES:
        raise UserError(f"{sub.label()} is already {state}: nothing to cancel")
    raise UserError(
        f"{sub.label()} is {state} but no ramp-dispatcher run of it is in progress "
        "(another dispatcher, such as ramp-engine's, may be running it): nothing to cancel here"
    )


def pending_cancels(conn: Connection, run_ids: Sequence[int]) -> list[int]:
    """Of the given runs (the daemon's own), those an admin asked to cancel
    and that are not collected yet. A primary-key lookup: cheap every cycle."""
    ids = list(run_ids)
    if not ids:
        return []
    return list(conn.execute(_pending_cancels_stmt(), {"run_ids": ids}).scalars())


@cache
def _pending_cancels_stmt() -> Select[tuple[int]]:
    """Which of ``:run_ids`` an admin asked to cancel. Built once: the daemon
    asks every claim cycle."""
    return (
        select(runs.c.id)
        .where(
            runs.c.id.in_(bindparam("run_ids", expanding=True)),
            runs.c.cancel_requested_at.is_not(None),
            runs.c.status != RUN_COLLECTED,
        )
        .order_by(runs.c.id)
    )


def write_cancelled(conn: Connection, run_id: int, submission_id: int) -> bool:
    """Close a cancelled run (after the worker stopped it) and make the
    submission final. False, changing nothing, if the run was already collected
    (a result or a second call got there first)."""
    now = utcnow()
    closed = conn.execute(
        update(runs)
        .where(runs.c.id == run_id, runs.c.status != RUN_COLLECTED)
        .values(
            status=RUN_COLLECTED,
            collected_at=now,
            finished_at=func.coalesce(runs.c.finished_at, now),
            outcome=CANCELLED_STATE,
            failure_class=CANCELLED,
            message="cancelled by an administrator",
        )
    ).rowcount
    if closed != 1:
        return False
    set_state(conn, [submission_id], CANCELLED_STATE, error_msg=CANCEL_MESSAGE, queue_position=-1)
    _set_fold_error_msg(conn, submission_id, CANCEL_MESSAGE)
    return True
