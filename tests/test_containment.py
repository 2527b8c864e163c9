"""One run's failure stays that run's (issue 11, item 1).

Each test breaks the collection of one of two runs in flight, in a way that
raises inside the daemon (not a participant's error, not a malformed output):
the broken run is logged with its label, the error is noted on its
``dispatcher_runs`` row, and after a bounded number of tries the run is closed
as an infrastructure failure; the other run is scored and the daemon goes on
to the end of the queue.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from sqlalchemy import delete, select

from ramp_dispatcher.database.dispatcher_schema import runs
from ramp_dispatcher.database.ramp_schema import (
    cv_folds,
    submission_on_cv_folds,
    submission_score_on_cv_folds,
    submissions,
)
from ramp_dispatcher.dispatcher import MAX_RUN_ERRORS

from faults import edit_event_config
from helpers import free_port
from deployment import GOOD, Deployment

LABEL = "submission {sid} ('broken') attempt 1"


def _deploy(tmp_path: Path, url: str) -> tuple[Deployment, int]:
    # max_attempts 1: the infrastructure failure is final at once (no wait for a retry)
    dep = Deployment(tmp_path / "deploy", url, {"broken": GOOD, "fine": GOOD},
                     dispatcher_extra="max_attempts: 1")  # fmt: skip
    with dep.engine.connect() as conn:
        sid = conn.execute(select(submissions.c.id).where(submissions.c.name == "broken")).scalar_one()
    return dep, sid


def _run_row(dep: Deployment, sid: int):
    with dep.engine.connect() as conn:
        return conn.execute(select(runs).where(runs.c.submission_id == sid)).one()


def _assert_contained(dep: Deployment, sid: int, caplog, cause: str, other_scored: bool = True) -> None:
    s = dep.summaries()
    if other_scored:
        assert s["fine"].state == "scored", s["fine"]
    assert s["broken"].state == "checking_error", s["broken"]
    assert "platform" in s["broken"].error_msg and cause in s["broken"].error_msg, s["broken"].error_msg
    row = _run_row(dep, sid)
    assert row.status == "collected" and row.failure_class == "infrastructure"
    assert cause in (row.message or ""), row.message
    tries = [r for r in caplog.records if LABEL.format(sid=sid) in r.getMessage() and "error while" in r.getMessage()]
    assert len(tries) == MAX_RUN_ERRORS, [r.getMessage() for r in tries]


def test_a_file_where_the_predictions_folder_should_be(empty_db_url: str, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ramp_dispatcher")
    dep, sid = _deploy(tmp_path, empty_db_url)
    predictions = dep.event_config().ramp.predictions_dir
    predictions.mkdir(parents=True, exist_ok=True)
    (predictions / f"submission_{sid:09d}").write_text("not a folder\n")
    dep.run_until_done(timeout=240)
    _assert_contained(dep, sid, caplog, "Not a directory")


def test_fold_rows_not_matching_the_events_folds(empty_db_url: str, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ramp_dispatcher")
    dep, sid = _deploy(tmp_path, empty_db_url)
    with dep.engine.begin() as conn:
        last = conn.execute(
            select(submission_on_cv_folds.c.id)
            .where(submission_on_cv_folds.c.submission_id == sid)
            .order_by(submission_on_cv_folds.c.id.desc())
            .limit(1)
        ).scalar_one()
        conn.execute(delete(submission_score_on_cv_folds)
                     .where(submission_score_on_cv_folds.c.submission_on_cv_fold_id == last))  # fmt: skip
        conn.execute(delete(submission_on_cv_folds).where(submission_on_cv_folds.c.id == last))
    dep.run_until_done(timeout=240)
    _assert_contained(dep, sid, caplog, "fold rows")


def test_an_event_without_folds(empty_db_url: str, tmp_path: Path, caplog) -> None:
    """Nothing of this event can be scored: both runs are closed as the
    platform's failures, neither stays in flight, and the daemon reaches
    the end of its queue (hunger_policy exit)."""
    caplog.set_level(logging.INFO, logger="ramp_dispatcher")
    dep, sid = _deploy(tmp_path, empty_db_url)
    # Scores read from the run's files: the trusted re-scoring (verify_scores)
    # would refuse the fold count before the parser's error this test is about.
    edit_event_config(dep.event_path, "worker", verify_scores=False)
    with dep.engine.begin() as conn:
        conn.execute(delete(submission_score_on_cv_folds))
        conn.execute(delete(submission_on_cv_folds))
        conn.execute(delete(cv_folds))
    dep.run_until_done(timeout=240)
    _assert_contained(dep, sid, caplog, "n_folds", other_scored=False)
    assert dep.summaries()["fine"].state == "checking_error"


def test_a_database_error_that_is_a_bug_is_not_an_outage(empty_db_url: str, tmp_path: Path, caplog) -> None:
    """A write of one run rejected by the database (here a trigger's error: an
    integrity/programming class error, not a connection failure) is logged as a
    bug with its statement, never as "database unavailable"; the loop goes on."""
    caplog.set_level(logging.INFO, logger="ramp_dispatcher")
    dep, sid = _deploy(tmp_path, empty_db_url)
    when = f"NEW.state = 'scored' AND NEW.id = {sid}"
    with dep.engine.begin() as conn:
        if dep.engine.dialect.name == "postgresql":
            conn.exec_driver_sql("""CREATE FUNCTION refuse_fn() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN RAISE EXCEPTION 'refused by a trigger of the test'; END $$""")
            conn.exec_driver_sql(f"CREATE TRIGGER refuse BEFORE UPDATE ON submissions FOR EACH ROW "
                                 f"WHEN ({when}) EXECUTE FUNCTION refuse_fn()")  # fmt: skip
        else:
            conn.exec_driver_sql(f"CREATE TRIGGER refuse BEFORE UPDATE ON submissions WHEN {when} "
                                 "BEGIN SELECT RAISE(ABORT, 'refused by a trigger of the test'); END")  # fmt: skip
    dep.run_until_done(timeout=240)
    _assert_contained(dep, sid, caplog, "refused by a trigger")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("database unavailable" in m for m in messages), messages
    # on PostgreSQL the submissions' UPDATE sits in a WITH that also sets their folds
    assert any(re.search(r"statement: (WITH \w+ AS \()?UPDATE submissions", m) for m in messages), messages


def test_outages_and_bugs_are_told_apart(tmp_path: Path) -> None:
    """Real errors from real drivers: a refused connection is an outage; a
    missing table and a broken constraint are bugs."""

    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError

    from ramp_dispatcher.database.engine import make_engine
    from ramp_dispatcher.database.failures import is_unavailable

    port = free_port()  # nothing listens there
    refused = create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{port}/x")
    with pytest.raises(DBAPIError) as outage:
        refused.connect()
    assert is_unavailable(outage.value)

    engine = make_engine(f"sqlite:///{tmp_path / 'x.sqlite'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (a INTEGER PRIMARY KEY)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
    for bad in ("INSERT INTO t VALUES (1)", "SELECT * FROM no_such_table"):
        with pytest.raises(DBAPIError) as bug, engine.begin() as conn:
            conn.execute(text(bad))
        assert not is_unavailable(bug.value), bug.value
    engine.dispose()
