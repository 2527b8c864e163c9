"""What the trusted re-scoring tests compare: the scores a run got in the
database against those the test computes itself, with rampwf, from the
predictions the run saved and the event's folds (its ``cv_folds`` rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Engine

from ramp_dispatcher.database import queries
from ramp_dispatcher.database.dispatcher_schema import runs
from ramp_dispatcher.database.ramp_schema import (
    cv_folds,
    event_score_types,
    submission_on_cv_folds,
    submission_score_on_cv_folds,
    submission_scores,
)


def folds_reader(engine: Engine) -> Callable[[int], list[tuple[Any, Any]]]:
    """The daemon's ``cv_folds`` reader, for a worker a test builds itself."""

    def read(submission_id: int) -> list[tuple[Any, Any]]:
        with engine.connect() as conn:
            return queries.submission_folds(conn, submission_id)

    return read


def failing_once(folds: list[tuple[Any, Any]]) -> tuple[Callable[[int], list[tuple[Any, Any]]], list[int]]:
    """A ``cv_folds`` reader that finds the database away on its first call
    (``TryLater``), then hands over ``folds``; and the list of its calls."""
    from ramp_dispatcher.workers.base import TryLater

    calls: list[int] = []

    def read(submission_id: int) -> list[tuple[Any, Any]]:
        calls.append(submission_id)
        if len(calls) == 1:
            raise TryLater("the database is unavailable (test)")
        return folds

    return read, calls


def expected_valid_scores(
    engine: Engine, kit_dir: Path, data_dir: Path, predictions: Path, name: str
) -> list[float]:
    """Score ``name`` of each fold's valid rows (the event's), computed here
    from ``<predictions>/fold_<i>/y_pred_train.npz``."""
    from rampwf.utils.testing import assert_read_problem

    with engine.connect() as conn:
        rows = conn.execute(select(cv_folds.c.test_is).order_by(cv_folds.c.id)).all()
    problem = assert_read_problem(str(kit_dir))
    _, y_train = problem.get_train_data(path=str(data_dir))
    score = next(st for st in problem.score_types if st.name == name)
    out = []
    for i, row in enumerate(rows):
        with np.load(predictions / f"fold_{i}" / "y_pred_train.npz") as f:
            y_pred = f["y_pred"]
        out.append(score.score_function(
            problem.Predictions(y_true=y_train, fold_is=row.test_is),
            problem.Predictions(y_pred=y_pred, fold_is=row.test_is),
        ))  # fmt: skip
    return out


def stored_valid_scores(engine: Engine, submission_id: int, name: str) -> list[float]:
    """Score ``name`` of each fold's valid rows as the database has it."""
    folds, scores = submission_on_cv_folds, submission_scores
    sscf, est = submission_score_on_cv_folds, event_score_types
    with engine.connect() as conn:
        return list(conn.execute(
            select(sscf.c.valid_score)
            .join(folds, folds.c.id == sscf.c.submission_on_cv_fold_id)
            .join(scores, scores.c.id == sscf.c.submission_score_id)
            .join(est, est.c.id == scores.c.event_score_type_id)
            .where(folds.c.submission_id == submission_id, est.c.name == name)
            .order_by(folds.c.id)
        ).scalars())  # fmt: skip


def run_message(engine: Engine, submission_id: int) -> str:
    """The message of the submission's last run (the dispatcher_runs row)."""
    with engine.connect() as conn:
        messages = conn.execute(
            select(runs.c.message).where(runs.c.submission_id == submission_id).order_by(runs.c.attempt)
        ).scalars().all()  # fmt: skip
    return (messages[-1] if messages else None) or ""
