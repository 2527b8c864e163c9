"""Drop-in check: a database ramp-board built, processed by our daemon, read
back through ramp-database 0.10.1's own functions."""

from __future__ import annotations

import csv
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.exc import SAWarning
from sqlalchemy.orm import Session

from ramp_dispatcher.config import load_event_config, load_server_config
from ramp_dispatcher.database import migrate
from ramp_dispatcher.database.engine import make_engine, normalise_url
from ramp_dispatcher.database.ramp_schema import submissions
from ramp_dispatcher.dispatcher import Dispatcher

from deployment import sqlalchemy_section
from rampboard import build_rampboard_db


def _write_configs(tmp_path: Path, board: dict) -> tuple[Path, Path]:
    server = tmp_path / "config.yml"
    server.write_text(f"sqlalchemy:\n  {sqlalchemy_section(board['url'])}\n")
    event = tmp_path / "events" / board["event"] / "config.yml"
    event.parent.mkdir(parents=True, exist_ok=True)
    event.write_text(
        f"""ramp:
  problem_name: {board['problem']}
  event_name: {board['event']}
  event_title: Iris test event
  event_is_public: true
  kit_dir: {board['kit_dir']}
  data_dir: {board['data_dir']}
  submissions_dir: {board['submissions_dir']}
  sandbox_dir: {board['sandbox']}
worker:
  worker_type: conda
  conda_env: {sys.prefix}
dispatcher:
  n_workers: 2
  hunger_policy: exit
  poll_interval: 1
"""
    )
    return server, event


def _read_back(url: str, submission_id: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, str]:
    from ramp_database.tools.submission import (
        get_bagged_scores,
        get_scores,
        get_submission_state,
        get_time,
    )

    engine = create_engine(normalise_url(url))
    try:
        with Session(engine) as session:
            return (
                get_scores(session, submission_id),
                get_time(session, submission_id),
                get_bagged_scores(session, submission_id),
                get_submission_state(session, submission_id),
            )
    finally:
        engine.dispose()


def test_rampboard_database_processed_and_read_back(empty_db_url: str, tmp_path: Path) -> None:
    board = build_rampboard_db(empty_db_url, tmp_path)
    ids = board["submissions"]
    engine = make_engine(empty_db_url)
    with engine.connect() as conn:
        sandbox_before = conn.execute(
            select(submissions).where(submissions.c.name == board["sandbox"]).order_by(submissions.c.id)
        ).all()
    migrate.upgrade(engine)  # adopt

    server_path, event_path = _write_configs(tmp_path, board)
    server = load_server_config(server_path)
    config = load_event_config(event_path, server)
    d = Dispatcher.for_event(engine, config)
    d.start()
    try:
        assert d.stopped.wait(180), "the daemon did not finish"
    finally:
        d.stop()

    good_id = ids[("alice", "logreg")]
    scores, times, bagged, state = _read_back(empty_db_url, good_id)
    assert state == "scored"
    out = config.ramp.predictions_dir / f"submission_{good_id:09d}"
    for fold in range(2):
        with open(out / f"fold_{fold}" / "scores.csv") as f:
            rows = {r["step"]: r for r in csv.DictReader(f)}
        for step in ("train", "valid", "test"):
            for name in ("acc", "nll"):
                assert scores.loc[(fold, step), name] == pytest.approx(float(rows[step][name]))
            t = float((out / f"fold_{fold}" / f"{step}_time").read_text())
            assert times.loc[fold, step] == pytest.approx(t)
    with open(out / "bagged_scores.csv") as f:
        bag_rows = list(csv.DictReader(f))
    for r in bag_rows:
        assert bagged.loc[(r["step"], int(r["n_bag"])), "acc"] == pytest.approx(float(r["acc"]))

    # ramp-database's own writers on the same output give the very same numbers.
    # (On PostgreSQL they fail with numpy 2 -- `schema "np" does not exist`,
    # the ramp-engine bug we fix by writing plain floats -- so SQLite only.)
    if engine.dialect.name == "sqlite":
        from ramp_database.tools.submission import set_bagged_scores, set_scores, set_time

        raw = create_engine(normalise_url(empty_db_url))
        with warnings.catch_warnings(), Session(raw) as session:
            warnings.filterwarnings("ignore", category=SAWarning)
            set_time(session, good_id, str(out))
            set_scores(session, good_id, str(out))
            set_bagged_scores(session, good_id, str(out))
        raw.dispose()
        scores2, times2, bagged2, _ = _read_back(empty_db_url, good_id)
        pd.testing.assert_frame_equal(scores, scores2)
        pd.testing.assert_frame_equal(times, times2)
        pd.testing.assert_frame_equal(bagged, bagged2)

    # (ramp-database's get_bagged_scores cannot read a failed submission's
    # bags -- a pickled None -- so only its state is read back here)
    from ramp_database.tools.submission import get_submission_error_msg, get_submission_state

    broken_id = ids[("bob", "broken")]
    raw = create_engine(normalise_url(empty_db_url))
    with Session(raw) as session:
        assert get_submission_state(session, broken_id) == "training_error"
        assert "ValueError" in get_submission_error_msg(session, broken_id)
    raw.dispose()

    # the sandboxes are never trained and not touched
    with engine.connect() as conn:
        sandbox_after = conn.execute(
            select(submissions).where(submissions.c.name == board["sandbox"]).order_by(submissions.c.id)
        ).all()
    assert sandbox_after == sandbox_before

    # ramp-board's leaderboards read our results
    from ramp_database.tools.leaderboard import get_leaderboard, update_leaderboards

    raw = create_engine(normalise_url(empty_db_url))
    with warnings.catch_warnings(), Session(raw) as session:
        warnings.filterwarnings("ignore", category=SAWarning)
        update_leaderboards(session, board["event"])
        html = get_leaderboard(session, "public", board["event"])
        failed = get_leaderboard(session, "failed", board["event"])
    raw.dispose()
    assert "logreg" in html
    assert "broken" in failed
    engine.dispose()
