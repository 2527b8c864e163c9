"""Problems and events: add, replace (deleting all under them), deploy."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

from sqlalchemy import Connection, delete, inspect, insert, or_, select

from ...config import RampConfig
from .. import dispatcher_schema as ds
from .. import ramp_schema as rs
from .kit import (
    _add_workflow,
    _compute_folds,
    _kit_attr,
    _score_types,
    ensure_file_types,
    load_problem_module,
)
from .lookup import AdminError, _problem_row

# ramp-database's Event model defaults (Python-side; the DDL has none).
EVENT_DEFAULTS: dict[str, Any] = {
    "max_members_per_team": 1,
    "max_n_ensemble": 80,
    "is_controled_signup": True,
    "is_competitive": False,
    "min_duration_between_submissions": 15 * 60,
    "opening_timestamp": dt.datetime(2000, 1, 1),
    "public_opening_timestamp": dt.datetime(2100, 1, 1),
    "closing_timestamp": dt.datetime(2100, 1, 1),
    "combined_combined_valid_score": None,
    "combined_combined_test_score": None,
    "combined_foldwise_valid_score": None,
    "combined_foldwise_test_score": None,
    "n_submissions": 0,
    "public_leaderboard_html_no_links": None,
    "public_leaderboard_html_with_links": None,
    "private_leaderboard_html": None,
    "failed_leaderboard_html": None,
    "new_leaderboard_html": None,
    "public_competition_leaderboard_html": None,
    "private_competition_leaderboard_html": None,
}


def _abspath(path: str | os.PathLike[str]) -> str:
    # The frontend and the workers run from other folders than the admin's
    # shell: a relative path in the database would point elsewhere for them.
    return os.path.abspath(os.fspath(path))


# --------------------------------------------------------------------------- deletes


def _delete_events(conn: Connection, event_ids: Sequence[int]) -> None:
    """Delete events with everything ramp-database's ORM cascades delete.

    ``score_types`` rows stay (ramp-database leaves them orphaned too);
    submission folders on disk stay, as with ramp-database. Our own run
    history of those events goes too: its foreign keys would block the delete.
    """
    if not event_ids:
        return
    et = select(rs.event_teams.c.id).where(rs.event_teams.c.event_id.in_(event_ids))
    subs = select(rs.submissions.c.id).where(rs.submissions.c.event_team_id.in_(et))
    folds = select(rs.cv_folds.c.id).where(rs.cv_folds.c.event_id.in_(event_ids))
    ests = select(rs.event_score_types.c.id).where(
        rs.event_score_types.c.event_id.in_(event_ids)
    )
    socs = select(rs.submission_on_cv_folds.c.id).where(
        or_(
            rs.submission_on_cv_folds.c.submission_id.in_(subs),
            rs.submission_on_cv_folds.c.cv_fold_id.in_(folds),
        )
    )
    scores = select(rs.submission_scores.c.id).where(
        or_(
            rs.submission_scores.c.submission_id.in_(subs),
            rs.submission_scores.c.event_score_type_id.in_(ests),
        )
    )
    files = select(rs.submission_files.c.id).where(rs.submission_files.c.submission_id.in_(subs))
    ui = rs.user_interactions
    sim = rs.submission_similaritys
    sscf = rs.submission_score_on_cv_folds
    if inspect(conn).has_table(ds.runs.name):
        conn.execute(
            delete(ds.runs).where(
                or_(ds.runs.c.event_id.in_(event_ids), ds.runs.c.submission_id.in_(subs))
            )
        )
    # Children first, so that no foreign key points at a deleted row.
    for stmt in (
        delete(ui).where(
            or_(
                ui.c.event_team_id.in_(et),
                ui.c.submission_id.in_(subs),
                ui.c.submission_file_id.in_(files),
            )
        ),
        delete(sim).where(
            or_(sim.c.source_submission_id.in_(subs), sim.c.target_submission_id.in_(subs))
        ),
        delete(rs.historical_contributivity).where(
            rs.historical_contributivity.c.submission_id.in_(subs)
        ),
        delete(sscf).where(
            or_(sscf.c.submission_on_cv_fold_id.in_(socs), sscf.c.submission_score_id.in_(scores))
        ),
        delete(rs.submission_on_cv_folds).where(rs.submission_on_cv_folds.c.id.in_(socs)),
        delete(rs.submission_scores).where(rs.submission_scores.c.id.in_(scores)),
        delete(rs.submission_files).where(rs.submission_files.c.id.in_(files)),
        delete(rs.submissions).where(rs.submissions.c.id.in_(subs)),
        delete(rs.event_teams).where(rs.event_teams.c.event_id.in_(event_ids)),
        delete(rs.cv_folds).where(rs.cv_folds.c.event_id.in_(event_ids)),
        delete(rs.event_score_types).where(rs.event_score_types.c.event_id.in_(event_ids)),
        delete(rs.event_admins).where(rs.event_admins.c.event_id.in_(event_ids)),
        delete(rs.events).where(rs.events.c.id.in_(event_ids)),
    ):
        conn.execute(stmt)


def _delete_problem(conn: Connection, problem_id: int) -> None:
    event_ids = list(
        conn.execute(select(rs.events.c.id).where(rs.events.c.problem_id == problem_id)).scalars()
    )
    _delete_events(conn, event_ids)
    ui, pk = rs.user_interactions, rs.problem_keywords
    conn.execute(delete(ui).where(ui.c.problem_id == problem_id))
    conn.execute(delete(pk).where(pk.c.problem_id == problem_id))
    conn.execute(delete(rs.problems).where(rs.problems.c.id == problem_id))


# --------------------------------------------------------------------------- problem, event


def add_problem(
    conn: Connection, name: str, kit_dir: Path, data_dir: Path, force: bool = False
) -> int:
    """Add a problem (and its workflow) from a ramp kit; return its id.

    With ``force``, an existing problem of that name is deleted first, with its
    events and everything under them, like ramp-database does.
    """
    if not name:
        raise AdminError("the problem name is empty")
    if not Path(data_dir).is_dir():
        raise AdminError(f"data folder {data_dir} of problem {name!r} does not exist")
    module = load_problem_module(kit_dir)
    workflow_object = _kit_attr(module, "workflow")
    p = rs.problems
    existing = conn.execute(select(p.c.id).where(p.c.name == name)).scalar()
    if existing is not None:
        if not force:
            raise AdminError(
                f"problem {name!r} exists already; force it to replace the problem "
                "and delete all its events"
            )
        _delete_problem(conn, existing)
    ensure_file_types(conn)
    workflow_id = _add_workflow(conn, workflow_object)
    return conn.execute(
        insert(p).values(
            name=name,
            workflow_id=workflow_id,
            path_ramp_kit=_abspath(kit_dir),
            path_ramp_data=_abspath(data_dir),
        )
    ).inserted_primary_key[0]


def add_event(
    conn: Connection,
    problem_name: str,
    event_name: str,
    event_title: str,
    sandbox_name: str,
    submissions_dir: Path,
    is_public: bool = False,
    force: bool = False,
) -> int:
    """Add an event of a problem, with its cv folds and score types; return its id.

    The folds are ``get_cv(*get_train_data(path=<problem's data folder>))`` in
    the order ``get_cv`` yields them (fold ids follow that order).
    """
    problem = _problem_row(conn, problem_name)
    e = rs.events
    existing = conn.execute(select(e.c.id).where(e.c.name == event_name)).scalar()
    if existing is not None and not force:
        raise AdminError(f"event {event_name!r} exists already; force it to replace the event")
    # ramp-database's rule (the frontend derives the problem from the name).
    if not event_name.startswith(problem_name + "_"):
        raise AdminError(
            f"the event name {event_name!r} must start with the problem name and an "
            f"underscore: {problem_name + '_'!r}"
        )
    if not sandbox_name:
        raise AdminError("the sandbox submission name is empty")
    module = load_problem_module(problem.path_ramp_kit)
    score_types = _score_types(module)
    folds = _compute_folds(module, problem.path_ramp_data)
    if existing is not None:
        _delete_events(conn, [existing])

    event_id = conn.execute(
        insert(e).values(
            name=event_name,
            title=event_title,
            problem_id=problem.id,
            is_send_trained_mails=False,
            is_send_submitted_mails=False,
            is_public=bool(is_public),
            official_score_name=score_types[0].name,
            ramp_sandbox_name=sandbox_name,
            path_ramp_submissions=_abspath(submissions_dir),
            **EVENT_DEFAULTS,
        )
    ).inserted_primary_key[0]
    # One statement per row: ids must follow the kit's order, which a
    # multi-row insert does not promise on every backend.
    for train_is, test_is in folds:
        conn.execute(
            insert(rs.cv_folds).values(
                type="live", train_is=train_is, test_is=test_is, event_id=event_id
            )
        )
    for score_type in score_types:
        # ramp-database stores a placeholder score type per event score type
        # (uuid name, True, 0, 1); the real bounds are read from problem.py.
        score_type_id = conn.execute(
            insert(rs.score_types).values(
                name=str(uuid.uuid4()), is_lower_the_better=True, minimum=0.0, maximum=1.0
            )
        ).inserted_primary_key[0]
        conn.execute(
            insert(rs.event_score_types).values(
                name=score_type.name,
                event_id=event_id,
                score_type_id=score_type_id,
                precision=score_type.precision,
            )
        )
    return event_id


def deploy_event(conn: Connection, ramp: RampConfig, force: bool = False) -> int:
    """The database part of ramp-utils' ``deploy_ramp_event``; return the event id.

    Adds the problem if absent (an existing one with other kit/data folders
    needs ``force``, which replaces it and its events), creates the
    submissions folder, adds the event. Cloning kits and the kit archive for
    the frontend's download are not done here.
    """
    ensure_file_types(conn)
    p = rs.problems
    problem = conn.execute(select(p).where(p.c.name == ramp.problem_name)).one_or_none()
    kit_dir, data_dir = _abspath(ramp.kit_dir), _abspath(ramp.data_dir)
    if problem is None:
        add_problem(conn, ramp.problem_name, Path(kit_dir), Path(data_dir))
    else:
        if (kit_dir, data_dir) != (problem.path_ramp_kit, problem.path_ramp_data) and not force:
            raise AdminError(
                f"problem {ramp.problem_name!r} exists with kit {problem.path_ramp_kit} and "
                f"data {problem.path_ramp_data}, not {kit_dir} and {data_dir}; force it to "
                "replace the problem and its events"
            )
        if force:
            add_problem(conn, ramp.problem_name, Path(kit_dir), Path(data_dir), force=True)
    try:
        Path(ramp.submissions_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AdminError(f"cannot create {ramp.submissions_dir}: {exc.strerror}") from None
    return add_event(
        conn,
        ramp.problem_name,
        ramp.event_name,
        ramp.event_title,
        ramp.sandbox_name,
        Path(ramp.submissions_dir),
        is_public=ramp.event_is_public,
        force=force,
    )
