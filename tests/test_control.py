"""Admin retry and cancel through the database, on real deployments (SQLite, PostgreSQL)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import insert, select, update

from ramp_dispatcher.cli import main
from ramp_dispatcher.database import admin, control, queries
from ramp_dispatcher.database.dispatcher_schema import runs
from ramp_dispatcher.database.ramp_schema import submission_on_cv_folds, submissions
from ramp_dispatcher.demo import EVENT, TEAM, write_submission
from ramp_dispatcher.errors import UserError

from deployment import GOOD, Deployment


def flaky(marker: Path) -> str:
    """Fails until ``marker`` exists (ramp-workflow's sanitizer forbids `open`)."""
    return f"""\
        from pathlib import Path

        from sklearn.linear_model import LogisticRegression


        def get_estimator():
            if not Path({str(marker)!r}).exists():
                raise RuntimeError("the marker file is missing")
            return LogisticRegression(max_iter=500)
        """


def cli(dep: Deployment, *args: str) -> list[str]:
    return [*args, "--config", str(dep.server_path)]


def run_rows(dep: Deployment, submission_id: int) -> list[tuple]:
    with dep.engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                select(runs.c.attempt, runs.c.status, runs.c.outcome, runs.c.failure_class)
                .where(runs.c.submission_id == submission_id)
                .order_by(runs.c.attempt)
            )
        ]


def fold_states(dep: Deployment, submission_id: int) -> set[tuple[str, str]]:
    f = submission_on_cv_folds
    with dep.engine.connect() as conn:
        return {
            (r.state, r.error_msg)
            for r in conn.execute(select(f.c.state, f.c.error_msg).where(f.c.submission_id == submission_id))
        }


# --------------------------------------------------------------------------- retry


def test_retry_a_training_error_then_the_daemon_scores_it(
    empty_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # in the data folder: the sandbox shows the run that folder (read-only)
    marker = tmp_path / "deploy" / "ramp-data" / "iris" / "marker"
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"flaky": flaky(marker), "good": GOOD})
    dep.run_until_done()
    s = dep.summaries()
    sid = s["flaky"].id
    assert s["flaky"].state == "training_error"
    assert "the marker file is missing" in s["flaky"].error_msg
    assert run_rows(dep, sid) == [(1, "collected", "training_error", "participant")]
    # a stale backoff on an old run must not delay the retry
    with dep.engine.begin() as conn:
        conn.execute(
            update(runs).where(runs.c.submission_id == sid)
            .values(retry_after=queries.utcnow() + dt.timedelta(hours=1))
        )

    assert main(cli(dep, "retry", "demo_team/flaky", "--event", EVENT)) == 0
    out = capsys.readouterr().out
    assert f"submission {sid} (demo_team/flaky" in out
    assert "training_error -> new" in out and "attempt 2" in out
    s = dep.summaries()
    assert s["flaky"].state == "new" and s["flaky"].error_msg == ""
    assert fold_states(dep, sid) == {("new", "")}
    # history kept, backoff cleared
    assert run_rows(dep, sid) == [(1, "collected", "training_error", "participant")]
    with dep.engine.connect() as conn:
        assert conn.execute(select(runs.c.retry_after).where(runs.c.submission_id == sid)).scalar() is None

    # already waiting: refused, exit 2
    assert main(cli(dep, "retry", str(sid))) == 2
    err = capsys.readouterr().err
    assert "is new" in err and "already waiting" in err
    # a scored one: refused too
    assert main(cli(dep, "retry", f"submission_{s['good'].id:09d}")) == 2
    assert "is scored" in capsys.readouterr().err

    marker.touch()
    dep.run_until_done()
    s = dep.summaries()
    assert s["flaky"].state == "scored", s["flaky"].error_msg
    assert fold_states(dep, sid) == {("scored", "")}
    assert run_rows(dep, sid) == [
        (1, "collected", "training_error", "participant"),
        (2, "collected", "scored", None),
    ]


def test_retry_refused_while_a_run_is_active(empty_db_url: str, tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"one": GOOD})
    sid = dep.summaries()["one"].id
    fake_run(dep, sid, status="running", state="training_error")
    with dep.engine.begin() as conn:
        ref = control.find_submission(conn, str(sid))
        with pytest.raises(UserError, match="has a run in progress .*cancel it first"):
            control.retry_submission(conn, ref)


# --------------------------------------------------------------------------- cancel


def test_cancel_a_waiting_submission(
    empty_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"keep": GOOD, "drop": GOOD})
    sid = dep.summaries()["drop"].id

    assert main(cli(dep, "cancel", f"submission_{sid:09d}")) == 0
    assert "cancelled while waiting; it is now checking_error" in capsys.readouterr().out
    s = dep.summaries()["drop"]
    assert (s.state, s.error_msg, s.queue_position) == (
        "checking_error", control.CANCEL_MESSAGE, -1
    )
    assert fold_states(dep, sid) == {("checking_error", control.CANCEL_MESSAGE)}

    assert main(cli(dep, "cancel", str(sid))) == 2
    assert "already checking_error: nothing to cancel" in capsys.readouterr().err

    dep.run_until_done()
    s = dep.summaries()
    assert s["keep"].state == "scored"
    assert s["drop"].state == "checking_error"
    assert run_rows(dep, sid) == []  # never started

    # an admin may change their mind: a cancelled submission can be retried
    assert main(cli(dep, "retry", "drop", "--event", EVENT)) == 0
    assert "checking_error -> new; requeued as attempt 1" in capsys.readouterr().out
    dep.run_until_done()
    assert dep.summaries()["drop"].state == "scored"


def fake_run(
    dep: Deployment, submission_id: int, status: str = "running", state: str = "training",
    lease: dt.timedelta = dt.timedelta(minutes=1), attempt: int = 1,
) -> int:
    """A run row as the daemon writes one for a started run (the DB side only)."""
    now = queries.utcnow()
    with dep.engine.begin() as conn:
        run_id = conn.execute(
            insert(runs).values(
                submission_id=submission_id, event_id=1, attempt=attempt, worker_type="conda",
                owner="host:1:abc", status=status, handle={"pid": 4242}, created_at=now,
                started_at=now, heartbeat_at=now, lease_expires_at=now + lease,
            ).returning(runs.c.id)
        ).scalar_one()
        queries.set_state(conn, [submission_id], state, queue_position=-1)
    return run_id


def test_cancel_a_running_submission_database_side(
    empty_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"busy": GOOD, "idle": GOOD})
    s = dep.summaries()
    sid = s["busy"].id
    run_id = fake_run(dep, sid)
    with dep.engine.connect() as conn:
        assert control.pending_cancels(conn, [run_id]) == []
        assert control.pending_cancels(conn, []) == []

    assert main(cli(dep, "cancel", "busy", "--event", EVENT)) == 0
    out = capsys.readouterr().out
    assert "cancel requested for attempt 1 (running)" in out
    assert "the daemon stops the run within a few seconds" in out
    assert "lease expired" not in out
    with dep.engine.connect() as conn:
        requested = conn.execute(select(runs.c.cancel_requested_at).where(runs.c.id == run_id)).scalar()
        assert requested is not None
        assert abs((queries.utcnow() - requested).total_seconds()) < 60
        # the daemon's view: only its runs that were asked to stop
        assert control.pending_cancels(conn, [run_id, run_id + 100]) == [run_id]
    # the submission itself is untouched until the daemon has stopped the run
    assert dep.summaries()["busy"].state == "training"

    assert main(cli(dep, "cancel", str(sid))) == 0
    assert "cancel already requested" in capsys.readouterr().out

    with dep.engine.begin() as conn:
        assert control.write_cancelled(conn, run_id, sid) is True
    with dep.engine.begin() as conn:
        assert control.write_cancelled(conn, run_id, sid) is False  # idempotent
        assert control.pending_cancels(conn, [run_id]) == []
    b = dep.summaries()["busy"]
    assert (b.state, b.error_msg, b.queue_position) == ("checking_error", control.CANCEL_MESSAGE, -1)
    assert fold_states(dep, sid) == {("checking_error", control.CANCEL_MESSAGE)}
    assert run_rows(dep, sid) == [(1, "collected", "checking_error", "cancelled")]
    with dep.engine.connect() as conn:
        row = conn.execute(select(runs).where(runs.c.id == run_id)).one()
    assert row.collected_at is not None and row.finished_at is not None
    assert dep.summaries()["idle"].state == "new"  # nothing else touched

    assert main(cli(dep, "cancel", str(sid))) == 2
    assert "already checking_error" in capsys.readouterr().err


def test_cancel_of_a_run_no_daemon_holds_says_so(empty_db_url: str, tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"orphan": GOOD})
    sid = dep.summaries()["orphan"].id
    fake_run(dep, sid, status="starting", state="sent_to_training", lease=-dt.timedelta(minutes=5))
    with dep.engine.begin() as conn:
        message = control.cancel_submission(conn, control.find_submission(conn, str(sid)))
    assert "cancel requested for attempt 1 (starting)" in message
    assert "no daemon holds this run right now" in message


def test_cancel_refusals(empty_db_url: str, tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"legacy": GOOD})
    sid = dep.summaries()["legacy"].id
    # "training" with no run of ours: another dispatcher (ramp-engine) has it
    with dep.engine.begin() as conn:
        queries.set_state(conn, [sid], "training")
    with dep.engine.begin() as conn:
        with pytest.raises(UserError, match="no ramp-dispatcher run of it is in progress"):
            control.cancel_submission(conn, control.find_submission(conn, str(sid)))
        sandbox = control.find_submission(conn, "starting_kit", EVENT)
        assert sandbox.is_sandbox
        with pytest.raises(UserError, match="sandbox"):
            control.cancel_submission(conn, sandbox)
        with pytest.raises(UserError, match="sandbox"):
            control.retry_submission(conn, sandbox)


# --------------------------------------------------------------------------- finding


def test_find_submission_forms_and_errors(
    empty_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"twin": GOOD, "solo": GOOD})
    with dep.engine.begin() as conn:
        admin.add_user(conn, name="rival", password="pw", email="rival@localhost")
        admin.sign_up_team(conn, EVENT, "rival")
        rival_twin = admin.add_submission(
            conn, EVENT, "rival", "twin", write_submission(tmp_path / "rival_twin", GOOD)
        )
    s = dep.summaries()
    with dep.engine.connect() as conn:
        by_id = control.find_submission(conn, str(s["solo"].id))
        assert (by_id.name, by_id.team, by_id.event_name, by_id.state) == ("solo", TEAM, EVENT, "new")
        assert control.find_submission(conn, f"submission_{s['solo'].id:09d}") == by_id
        assert control.find_submission(conn, f" {s['solo'].id} ", EVENT) == by_id
        assert control.find_submission(conn, "solo", EVENT) == by_id
        assert control.find_submission(conn, "rival/twin", EVENT).id == rival_twin
        assert not by_id.is_sandbox

        with pytest.raises(UserError, match=r"2 submissions are named 'twin'.*demo_team/twin.*rival/twin"):
            control.find_submission(conn, "twin", EVENT)
        with pytest.raises(UserError, match="no submission with id 99999"):
            control.find_submission(conn, "99999")
        with pytest.raises(UserError, match="no submission with id 99999"):
            control.find_submission(conn, "submission_000099999")
        with pytest.raises(UserError, match="also give the event with --event"):
            control.find_submission(conn, "rival/twin")
        with pytest.raises(UserError, match="team 'rival' has no submission 'solo'"):
            control.find_submission(conn, "rival/solo", EVENT)
        with pytest.raises(UserError, match="no submission named 'nope'"):
            control.find_submission(conn, "nope", EVENT)
        with pytest.raises(UserError, match="event 'other' is not in the database"):
            control.find_submission(conn, "1", "other")

    assert main(cli(dep, "cancel", "twin", "--event", EVENT)) == 2
    assert "give TEAM/NAME or the id" in capsys.readouterr().err
    assert main(cli(dep, "retry", "424242")) == 2
    assert "no submission with id 424242" in capsys.readouterr().err


# --------------------------------------------------------------------------- budget


def test_attempt_in_budget_restarts_after_a_final_outcome(empty_db_url: str, tmp_path: Path) -> None:
    """Infrastructure retries count from the last final outcome (an admin retry
    follows one), so an admin retry gives a fresh budget."""
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"unlucky": GOOD})
    sid = dep.summaries()["unlucky"].id
    now = queries.utcnow()
    history = [(1, "retry"), (2, "retry"), (3, "checking_error"), (4, "retry")]
    with dep.engine.begin() as conn:
        for attempt, outcome in history:
            conn.execute(
                insert(runs).values(
                    submission_id=sid, event_id=1, attempt=attempt, worker_type="conda",
                    owner="o", status="collected", outcome=outcome,
                    failure_class="infrastructure", created_at=now,
                )
            )
        conn.execute(
            insert(runs).values(
                submission_id=sid, event_id=1, attempt=5, worker_type="conda", owner="o",
                status="finished", created_at=now,
            )
        )
    with dep.engine.connect() as conn:
        ranks = [control.attempt_in_budget(conn, sid, a) for a in (1, 2, 3, 4, 5)]
    assert ranks == [1, 2, 3, 1, 2]


def test_submissions_table_untouched_by_a_refused_action(empty_db_url: str, tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"fresh": GOOD})
    with dep.engine.connect() as conn:
        before = conn.execute(select(submissions).order_by(submissions.c.id)).all()
    assert main(cli(dep, "retry", "fresh", "--event", EVENT)) == 2
    with dep.engine.connect() as conn:
        assert conn.execute(select(submissions).order_by(submissions.c.id)).all() == before


def test_a_submission_set_back_to_new_while_its_run_is_in_progress_database_side(
    empty_db_url: str, tmp_path: Path
) -> None:
    """The statements behind "the admin's new wins": the daemon finds the run
    (reset_runs), its own writes of training/tested leave the admin's new
    alone, closing it as superseded touches only the run's row (and only
    once, and only by its owner), and the next claim is a fresh attempt."""
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"busy": GOOD, "other": GOOD})
    owner, lease = "host:1:1:daemon", dt.timedelta(seconds=60)
    with dep.engine.begin() as conn:
        event = queries.load_event(conn, EVENT)
        claims = {c.name: c for c in queries.claim(conn, event, 2, owner, "conda", lease)}
        queries.mark_running(conn, claims["other"].run_id, {"pid": 2})
    busy, sid = claims["busy"], claims["busy"].submission_id
    with dep.engine.begin() as conn:
        assert queries.reset_runs(conn, [busy.run_id, claims["other"].run_id]) == []
        queries.set_state(conn, [sid], "new")  # what ramp-database's set_submission_state writes
    with dep.engine.begin() as conn:
        assert queries.reset_runs(conn, [busy.run_id, claims["other"].run_id]) == [busy.run_id]
        assert queries.mark_running(conn, busy.run_id, {"pid": 1}) is True  # the handle is kept...
        assert queries.mark_finished(conn, busy.run_id, owner, None, "", succeeded=True) is True
        assert queries.submission_was_reset(conn, sid) is True
        assert queries.submission_was_reset(conn, claims["other"].submission_id) is False
    assert dep.summaries()["busy"].state == "new"  # ...but the admin's new stands
    assert fold_states(dep, sid) == {("new", "")}
    with dep.engine.begin() as conn:
        assert queries.close_superseded(conn, busy.run_id, "host:2:2:another", "m") is False
        assert queries.close_superseded(conn, busy.run_id, owner, "set back to new") is True
        assert queries.close_superseded(conn, busy.run_id, owner, "set back to new") is False
        assert queries.reset_runs(conn, [busy.run_id]) == []
    assert run_rows(dep, sid) == [(1, "collected", queries.SUPERSEDED, None)]
    assert dep.summaries()["busy"].state == "new"
    with dep.engine.begin() as conn:
        [again] = queries.claim(conn, event, 1, owner, "conda", lease)
        assert (again.submission_id, again.attempt) == (sid, 2)
        # a superseded run ends the streak of retries: a fresh budget
        assert control.attempt_in_budget(conn, sid, 2) == 1
        # while a daemon still frees a run's files, its submission is not claimed
        queries.requeue(conn, again.run_id, owner, sid, "infrastructure", "x", queries.utcnow())
        assert queries.claim(conn, event, 1, owner, "conda", lease, busy=[sid]) == []
        assert [c.attempt for c in queries.claim(conn, event, 1, owner, "conda", lease)] == [3]
