"""The circuit breaker (breaker.py): a broken platform holds the queue (issue 11, item 4)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from sqlalchemy import select

from ramp_dispatcher.breaker import BreakerState, CircuitBreaker
from ramp_dispatcher.database.dispatcher_schema import runs
from ramp_dispatcher.database.ramp_schema import submissions

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
    assert b.succeeded(started_at=32) and b.allowed_claims(2, now=33) == 2
    assert not b.failed(6, "once", now=40)  # a new streak starts from nothing


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

    run_in_thread(d)
    try:
        wait_for(lambda: "scored" in states().values(), 120, "a first submission scored")
        # the platform breaks: the environment loses its ramp-test (the runs
        # already going keep the program they started with)
        (env / "bin" / "ramp-test").unlink()
        wait_for(lambda: d.breaker.holding, 120, "the breaker to open")
        time.sleep(5)  # a probe comes and fails meanwhile
        assert "checking_error" not in states().values()
        os.symlink(Path(sys.prefix) / "bin" / "ramp-test", env / "bin" / "ramp-test")  # it is back
        assert d.stopped.wait(240), "the queue did not drain after the environment came back"
    finally:
        d.stop()
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
