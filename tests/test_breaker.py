"""The circuit breaker (breaker.py): a broken platform holds the queue (issue 11, item 4)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
import time
from pathlib import Path

from sqlalchemy import select

from ramp_dispatcher.breaker import BreakerState, CircuitBreaker
from ramp_dispatcher.database.dispatcher_schema import runs
from ramp_dispatcher.database.ramp_schema import submissions
from ramp_dispatcher.status import status_text

from deployment import GOOD, Deployment, run_in_thread
from faults import edit_event_config, wait_for


def test_the_breaker_opens_on_different_submissions_and_probes_with_backoff() -> None:
    b = CircuitBreaker(threshold=3, first_probe_s=10, max_probe_s=25)
    assert not b.failed(1, "env missing", now=0) and not b.failed(1, "again", now=0)  # one submission: no
    assert not b.failed(2, "env missing", now=0)
    assert b.failed(3, "env missing", now=1)
    assert b.holding and b.allowed_claims(2, now=5) == 0
    assert not b.succeeded(started_at=0.5) and b.holding  # a run from before it opened proves nothing
    assert b.allowed_claims(2, now=11) == 1 and b.state is BreakerState.HALF_OPEN
    assert b.allowed_claims(2, now=11) == 0  # one probe at a time
    b.failed(4, "still missing", now=12)  # the probe failed: twice the delay
    assert b.state is BreakerState.OPEN and b.allowed_claims(2, now=31) == 0 and b.allowed_claims(2, now=32) == 1
    b.failed(5, "still missing", now=32)
    assert b.probe_delay_s == 25  # capped
    assert b.succeeded(started_at=32, now=33) and b.allowed_claims(2, now=33) == 2
    assert not b.failed(6, "once", now=40)  # a new streak starts from nothing


def test_a_probe_that_finds_no_submission_is_tried_again() -> None:
    """Half-open with nothing claimed (the queue was empty at probe time) would
    never claim again: the breaker stays open and the next cycle probes."""
    b = CircuitBreaker(threshold=1, first_probe_s=10)
    b.failed(1, "env missing", now=0)
    assert b.allowed_claims(2, now=10) == 1
    b.probe_not_claimed()
    assert b.state is BreakerState.OPEN and b.allowed_claims(2, now=11) == 1
    assert b.state is BreakerState.HALF_OPEN and b.allowed_claims(2, now=12) == 0


def test_the_snapshot_is_in_wall_clock_time() -> None:
    wall = dt.datetime(2026, 12, 1, 12, 0, 0)
    b = CircuitBreaker(threshold=2, first_probe_s=30)
    closed = b.snapshot(now=100, wall_now=wall)
    assert (closed.state, closed.since, closed.cause, closed.failures, closed.next_probe_at) == (
        "closed", None, None, None, None)  # fmt: skip
    b.failed(1, "no ramp-test", now=100)
    b.failed(2, "no ramp-test in env", now=110)
    s = b.snapshot(now=120, wall_now=wall)
    assert s.state == "open" and s.cause == "no ramp-test in env" and s.failures == 2
    assert s.since == wall - dt.timedelta(seconds=10)
    assert s.next_probe_at == wall + dt.timedelta(seconds=20)
    assert b.allowed_claims(1, now=140) == 1
    s = b.snapshot(now=140, wall_now=wall)
    assert s.state == "half-open" and s.next_probe_at is None and s.since == wall - dt.timedelta(seconds=30)
    assert b.succeeded(started_at=140, now=150)
    s = b.snapshot(now=160, wall_now=wall)
    assert (s.state, s.since, s.cause, s.failures) == ("closed", wall - dt.timedelta(seconds=10), None, None)


def when(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso)


def test_environment_removed_mid_queue_then_restored(empty_db_url: str, tmp_path: Path) -> None:
    """Remove the environment with the queue half done, restore it once the
    breaker holds the queue: nothing ends in checking_error, all is scored,
    and the failures while it held used no attempt."""
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    os.symlink(Path(sys.prefix) / "bin" / "ramp-test", env / "bin" / "ramp-test")
    names = [f"sub{i}" for i in range(6)]
    dep = Deployment(tmp_path / "deploy", empty_db_url, {n: GOOD for n in names},
                     dispatcher_extra="max_attempts: 3\nretry_delay: 1")  # fmt: skip
    edit_event_config(dep.event_path, "worker", conda_env=str(env))
    d = dep.dispatcher()
    d.breaker.first_probe_s = 3.0  # a shorter wait than in production, same logic

    def states() -> dict[str, str]:
        return {n: s.state for n, s in dep.summaries().items() if n in names}

    def daemon_in_status() -> dict:
        """What ``ramp-dispatcher status --json`` says of the one daemon."""
        [daemon] = json.loads(status_text(dep.engine, as_json=True))["daemons"]
        assert daemon["owner"] == d.owner and daemon["pid"] == os.getpid()
        assert daemon["stale"] is False
        return daemon

    run_in_thread(d)
    try:
        wait_for(lambda: "scored" in states().values(), 120, "a first submission scored")
        # the platform breaks: the environment loses its ramp-test (the runs
        # already going keep the program they started with)
        (env / "bin" / "ramp-test").unlink()
        wait_for(lambda: d.breaker.holding, 120, "the breaker to open")
        # status, from the database alone, says the queue is held and why
        held = wait_for(
            lambda: (b := daemon_in_status()["breaker"])["state"] != "closed" and b, 30,
            "status to show the breaker open",
        )
        assert held["state"] in ("open", "half-open") and held["failures"] == 3, held
        assert "ramp-test" in held["cause"] and held["since"].endswith("+00:00"), held
        if held["state"] == "open":
            assert when(held["next_probe_at"]) > when(held["since"]), held
        text = status_text(dep.engine)
        assert "queue held, 3 infrastructure failures in a row" in text, text
        assert re.search(r"(open|half-open) \d+s \(since ", text), text
        time.sleep(5)  # a probe comes and fails meanwhile
        assert "checking_error" not in states().values()
        os.symlink(Path(sys.prefix) / "bin" / "ramp-test", env / "bin" / "ramp-test")  # it is back
        assert d.stopped.wait(240), "the queue did not drain after the environment came back"
        # closed again, and status says so (a commit at most after the run that closed it)
        closed = wait_for(
            lambda: (b := daemon_in_status()["breaker"])["state"] == "closed" and b, 30,
            "status to show the breaker closed",
        )
        assert closed["cause"] is None and when(closed["since"]) > when(held["since"]), closed
        assert "serving  closed" in status_text(dep.engine)
    finally:
        d.stop()
    assert json.loads(status_text(dep.engine, as_json=True))["daemons"] == []  # a clean stop
    final = states()
    assert set(final.values()) == {"scored"}, final
    assert d.breaker.state is BreakerState.CLOSED
    with dep.engine.connect() as conn:
        rows = conn.execute(
            select(submissions.c.name, runs.c.attempt, runs.c.outcome)
            .join(submissions, submissions.c.id == runs.c.submission_id)
            .order_by(runs.c.id)
        ).all()
    assert any(r.outcome == "held" for r in rows), rows
    for name in names:
        retries = [r for r in rows if r.name == name and r.outcome == "retry"]
        assert len(retries) < 3, (name, rows)
