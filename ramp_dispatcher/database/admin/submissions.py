"""Submissions: add one from a folder, resubmit it, copy its files."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import Connection, func, insert, select, update

from .. import ramp_schema as rs
from ..clock import utcnow
from .kit import _extension_id, _score_types, load_problem_module
from ...leaderboards.update import update_new_leaderboards
from .lookup import (
    MAX_NAME_LENGTH,
    AdminError,
    _event_row,
    _event_team_id,
    _known,
    _team_row,
)


@dataclass(frozen=True)
class _ElementFile:
    element_id: int
    element_name: str
    type_name: str  # the file's stem on disk (ramp-database's SubmissionFile.type)
    extension: str
    type_extension_id: int

    @property
    def f_name(self) -> str:
        return f"{self.type_name}.{self.extension}"


def _match_files(
    conn: Connection, problem_id: int, source_dir: Path, what: str
) -> list[_ElementFile]:
    """The file of ``source_dir`` for each workflow element of the problem.

    Like ramp-database, a file matches an element when its name before the
    first dot is the element name; its extension must be registered. Where
    ramp-database takes the first registered extension in directory order and
    then fails if it does not fit the element's file type, we take the first
    (in sorted order) that fits.
    """
    if not source_dir.is_dir():
        raise AdminError(f"submission folder {source_dir} of {what} does not exist")
    on_disk = [
        tuple(f.split(".", 1)) for f in sorted(os.listdir(source_dir)) if len(f.split(".")) > 1
    ]
    we, wet, fte, ext = (
        rs.workflow_elements,
        rs.workflow_element_types,
        rs.submission_file_type_extensions,
        rs.extensions,
    )
    elements = conn.execute(
        select(we.c.id, we.c.name, wet.c.name.label("type_name"), wet.c.type_id)
        .join(wet, wet.c.id == we.c.workflow_element_type_id)
        .join(rs.problems, rs.problems.c.workflow_id == we.c.workflow_id)
        .where(rs.problems.c.id == problem_id)
        .order_by(we.c.id)
    ).all()
    matched = []
    for element in elements:
        extensions = [e for stem, e in on_disk if stem == element.name]
        if not extensions:
            raise AdminError(
                f"{source_dir}: no file for the workflow element {element.name!r} of {what} "
                f"(expected e.g. {element.name}.py)"
            )
        known = [e for e in extensions if _extension_id(conn, e) is not None]
        if not known:
            raise AdminError(
                f"{source_dir}: unknown extension(s) {', '.join(extensions)} for the workflow "
                f"element {element.name!r} of {what} ({_known(conn, ext.c.name)})"
            )
        fitting = conn.execute(
            select(fte.c.id, ext.c.name)
            .join(ext, ext.c.id == fte.c.extension_id)
            .where(fte.c.type_id == element.type_id, ext.c.name.in_(known))
        ).all()
        by_extension = {row.name: row.id for row in fitting}
        choice = next((e for e in known if e in by_extension), None)
        if choice is None:
            raise AdminError(
                f"{source_dir}: extension(s) {', '.join(known)} do not fit the file type of "
                f"the workflow element {element.name!r} of {what}"
            )
        matched.append(
            _ElementFile(element.id, element.name, element.type_name, choice, by_extension[choice])
        )
    return matched


def _worst_scores(conn: Connection, event: Any) -> list[tuple[int, float]]:
    """(event_score_type id, worst value) in id order.

    The worst value comes from the kit's score types, as ramp-database's
    ``EventScoreType.worst`` does (the ``score_types`` rows are placeholders).
    """
    kit_dir = conn.execute(
        select(rs.problems.c.path_ramp_kit).where(rs.problems.c.id == event.problem_id)
    ).scalar_one()
    by_name = {st.name: st for st in _score_types(load_problem_module(kit_dir))}
    est = rs.event_score_types
    result = []
    for row in conn.execute(
        select(est.c.id, est.c.name).where(est.c.event_id == event.id).order_by(est.c.id)
    ):
        if row.name not in by_name:
            raise AdminError(
                f"score type {row.name!r} of event {event.name!r} is not in the kit's "
                "problem.py any more"
            )
        result.append((row.id, float(by_name[row.name].worst)))
    return result


def _reset_fold_scores(conn: Connection, fold_row_id: int, worst: dict[int, float]) -> None:
    sscf = rs.submission_score_on_cv_folds
    for score in conn.execute(
        select(sscf.c.id, rs.submission_scores.c.event_score_type_id)
        .join(rs.submission_scores, rs.submission_scores.c.id == sscf.c.submission_score_id)
        .where(sscf.c.submission_on_cv_fold_id == fold_row_id)
        .order_by(sscf.c.id)
    ).all():
        value = worst[score.event_score_type_id]
        conn.execute(
            update(sscf)
            .where(sscf.c.id == score.id)
            .values(train_score=value, valid_score=value, test_score=value)
        )


def add_submission(
    conn: Connection,
    event_name: str,
    team_name: str,
    submission_name: str,
    source_dir: Path,
    user_name: str | None = None,
    *,
    ignore_wait: bool = True,
) -> int:
    """Add (or resubmit) a submission from a folder; return its id.

    The files, one per workflow element, are copied to
    ``<path_ramp_submissions>/submission_%09d``. A name already used by the
    team may be resubmitted only while it is ``new`` or failed (ramp-database's
    rule; the sandbox never). ``ignore_wait=False`` applies ramp-database's
    ``min_duration_between_submissions`` to teams whose admin is not a RAMP
    admin; admin commands skip it by default.
    """
    event = _event_row(conn, event_name)
    team = _team_row(conn, team_name)
    event_team_id = _event_team_id(conn, event.id, team.id)
    if event_team_id is None:
        raise AdminError(f"team {team_name!r} is not signed up to event {event_name!r}")
    if not submission_name:
        raise AdminError("the submission name is empty")
    if len(submission_name) > MAX_NAME_LENGTH:
        raise AdminError(
            f"submission name {submission_name!r} is longer than {MAX_NAME_LENGTH} characters"
        )
    if user_name is not None:
        if conn.execute(select(rs.users.c.id).where(rs.users.c.name == user_name)).first() is None:
            raise AdminError(f"unknown user {user_name!r}")
    s = rs.submissions
    existing = conn.execute(
        select(s.c.id, s.c.state).where(
            s.c.event_team_id == event_team_id, s.c.name == submission_name
        )
    ).one_or_none()
    if existing is not None:
        is_sandbox = submission_name == event.ramp_sandbox_name
        if is_sandbox or not (existing.state == "new" or "error" in existing.state):
            raise AdminError(
                f"submission {submission_name!r} of team {team_name!r} at event {event_name!r} "
                f"exists already (state {existing.state!r}); only a new or failed submission "
                "can be resubmitted"
            )
    # Check everything before writing anything.
    files = _match_files(
        conn, event.problem_id, Path(source_dir), f"submission {submission_name!r}"
    )
    worst = _worst_scores(conn, event)
    worst_by_id = dict(worst)
    now = utcnow()

    if existing is not None:
        submission_id = existing.id
        _resubmit(conn, submission_id, now, worst_by_id)
    else:
        if not ignore_wait:
            _check_wait(conn, event, team, event_team_id, now)
        submission_id = _insert_submission(
            conn, event, team, event_team_id, submission_name, user_name, now, worst
        )
    # Resubmission keeps its file rows (ramp-database adds only missing ones).
    sf = rs.submission_files
    have = set(
        conn.execute(select(sf.c.workflow_element_id).where(sf.c.submission_id == submission_id))
        .scalars()
    )
    added_files = False
    for f in files:
        if f.element_id not in have:
            conn.execute(
                insert(sf).values(
                    submission_id=submission_id,
                    workflow_element_id=f.element_id,
                    submission_file_type_extension_id=f.type_extension_id,
                )
            )
            added_files = True
    if added_files:
        _set_n_submissions(conn, event.id)
    _copy_files(Path(event.path_ramp_submissions), submission_id, Path(source_dir), files)
    et = rs.event_teams
    # ramp-board shows this name in the team's sandbox view.
    conn.execute(
        update(et).where(et.c.id == event_team_id).values(last_submission_name=submission_name)
    )
    update_new_leaderboards(conn, event.id, team.id)
    return submission_id


def _check_wait(
    conn: Connection, event: Any, team: Any, event_team_id: int, now: dt.datetime
) -> None:
    admin_level = conn.execute(
        select(rs.users.c.access_level).where(rs.users.c.id == team.admin_id)
    ).scalar()
    if admin_level == "admin":
        return
    s = rs.submissions
    last = conn.execute(
        select(s.c.name, s.c.submission_timestamp)
        .where(s.c.event_team_id == event_team_id)
        .order_by(s.c.submission_timestamp.desc(), s.c.id.desc())
        .limit(1)
    ).first()
    if last is None or last.name == event.ramp_sandbox_name:
        return
    minimum = dt.timedelta(seconds=event.min_duration_between_submissions or 0)
    awaiting = int((minimum - (now - last.submission_timestamp)).total_seconds())
    if awaiting > 0:
        raise AdminError(
            f"team {team.name!r} must wait {awaiting} more seconds before its next submission "
            f"to event {event.name!r}"
        )


def submission_hash(event_name: str, team_name: str, submission_name: str) -> str:
    """ramp-database's ``hash_``: sha1 over event, team and submission names."""
    hasher = hashlib.sha1()
    for part in (event_name, team_name, submission_name):
        hasher.update(part.encode("utf-8"))
    return hasher.hexdigest()


def _insert_submission(
    conn: Connection,
    event: Any,
    team: Any,
    event_team_id: int,
    name: str,
    user_name: str | None,
    now: dt.datetime,
    worst: list[tuple[int, float]],
) -> int:
    s = rs.submissions
    hash_ = submission_hash(event.name, team.name, name)
    if conn.execute(select(s.c.id).where(s.c.hash_ == hash_)).first() is not None:
        raise AdminError(
            f"submission {name!r} of team {team.name!r} at event {event.name!r} has the same "
            "hash as an existing submission; choose another name"
        )
    submission_id = conn.execute(
        insert(s).values(
            event_team_id=event_team_id,
            name=name,
            hash_=hash_,
            submission_timestamp=now,
            sent_to_training_timestamp=None,
            training_timestamp=None,
            user_name=user_name,
            **rs.SUBMISSION_DEFAULTS,
        )
    ).inserted_primary_key[0]
    # Row order (hence ids) as ramp-database: scores by event score type,
    # then per fold its row and its scores, fold-major.
    score_ids = []
    for est_id, value in worst:
        score_ids.append(
            (
                conn.execute(
                    insert(rs.submission_scores).values(
                        submission_id=submission_id,
                        event_score_type_id=est_id,
                        valid_score_cv_bag=value,
                        test_score_cv_bag=value,
                        valid_score_cv_bags=None,
                        test_score_cv_bags=None,
                    )
                ).inserted_primary_key[0],
                value,
            )
        )
    cv = rs.cv_folds
    fold_ids = (
        conn.execute(select(cv.c.id).where(cv.c.event_id == event.id).order_by(cv.c.id))
        .scalars()
        .all()
    )
    for fold_id in fold_ids:
        soc_id = conn.execute(
            insert(rs.submission_on_cv_folds).values(
                submission_id=submission_id, cv_fold_id=fold_id, **rs.SUBMISSION_ON_CV_FOLD_DEFAULTS
            )
        ).inserted_primary_key[0]
        for score_id, value in score_ids:
            conn.execute(
                insert(rs.submission_score_on_cv_folds).values(
                    submission_on_cv_fold_id=soc_id,
                    submission_score_id=score_id,
                    train_score=value,
                    valid_score=value,
                    test_score=value,
                )
            )
    return submission_id


def _resubmit(
    conn: Connection, submission_id: int, now: dt.datetime, worst: dict[int, float]
) -> None:
    """ramp-database's resubmission: state back to new, folds reset.

    Exactly as ramp-database: the submission's own scores, error message and
    contributivity are left as they were (the next run overwrites them).
    """
    s, soc = rs.submissions, rs.submission_on_cv_folds
    conn.execute(
        update(s).where(s.c.id == submission_id).values(state="new", submission_timestamp=now)
    )
    fold_rows = conn.execute(
        select(soc.c.id).where(soc.c.submission_id == submission_id).order_by(soc.c.id)
    ).scalars().all()
    for fold_row_id in fold_rows:
        conn.execute(
            update(soc).where(soc.c.id == fold_row_id).values(**rs.SUBMISSION_ON_CV_FOLD_DEFAULTS)
        )
        _reset_fold_scores(conn, fold_row_id, worst)


def _set_n_submissions(conn: Connection, event_id: int) -> None:
    # ramp-database's Event.set_n_submissions: per team, its submissions minus
    # its sandbox.
    et, s = rs.event_teams, rs.submissions
    n_subs = conn.execute(
        select(func.count(s.c.id))
        .join(et, et.c.id == s.c.event_team_id)
        .where(et.c.event_id == event_id)
    ).scalar_one()
    n_teams = conn.execute(
        select(func.count(et.c.id)).where(et.c.event_id == event_id)
    ).scalar_one()
    e = rs.events
    conn.execute(update(e).where(e.c.id == event_id).values(n_submissions=n_subs - n_teams))


def _copy_files(
    submissions_dir: Path, submission_id: int, source_dir: Path, files: Iterable[_ElementFile]
) -> None:
    dest = submissions_dir / f"submission_{submission_id:09d}"
    if dest.exists() and dest.resolve() == source_dir.resolve():
        return  # resubmitted from its own deployed folder: the files are there
    try:
        # A stale folder (e.g. from a rolled-back transaction) is replaced.
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for f in files:
            shutil.copy2(source_dir / f.f_name, dest / f.f_name)
    except OSError as exc:
        raise AdminError(f"cannot copy the submission files to {dest}: {exc}") from None
