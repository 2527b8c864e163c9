"""A run's life as one explicit state (runs.py) and the loop thread (jobloop.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from ramp_dispatcher.jobloop import JobLoop
from ramp_dispatcher.runs import ActiveRun, RunState, TransitionError
from ramp_dispatcher.workers.base import FailureClass, RunOutcome, RunRequest


def _run(**kw) -> ActiveRun:
    request = RunRequest(1, "submission_000000001", 1, Path("k"), Path("d"), Path("s"), Path("l"), Path("p"))
    return ActiveRun("ev", 10, 1, "name", 1, request, **kw)


def test_the_usual_life_in_order() -> None:
    run = _run()
    assert run.state is RunState.STARTING
    run.started({"pid": 1})
    run.recorded()
    assert run.check_due(time.monotonic())
    run.end(RunOutcome(None, ""))
    assert not run.check_due(time.monotonic())  # ended runs are not asked again
    run.finished()
    run.closed()
    assert run.state is RunState.CLEANING  # written back; the worker frees its files
    run.cleaned()
    assert run.state is RunState.CLOSED


def test_a_transition_out_of_order_is_refused() -> None:
    run = _run()
    with pytest.raises(TransitionError, match="STARTING to FINISHED"):
        run.finished()
    run.fail_to_start("no env")
    assert run.state is RunState.ENDED and run.outcome.failure is FailureClass.INFRASTRUCTURE
    with pytest.raises(TransitionError):
        run.recorded()


@pytest.mark.parametrize(
    "status, handle, state",
    [("starting", None, RunState.STARTING), ("running", {"pid": 1}, RunState.RUNNING),
     ("finished", {"pid": 1}, RunState.RUNNING), ("running", None, RunState.STARTING)],
)  # fmt: skip
def test_reattached_runs_start_from_what_the_runs_table_says(status, handle, state) -> None:
    request = _run().request
    run = ActiveRun.reattached("ev", 10, 1, "n", 1, request, status, handle)
    assert run.state is state


def test_a_woken_job_runs_at_once_and_jobs_never_overlap() -> None:
    loop = JobLoop()
    ran: list[str] = []
    inside = threading.Lock()
    overlaps = []

    def job(name: str):
        def run() -> None:
            if not inside.acquire(blocking=False):
                overlaps.append(name)
                return
            try:
                ran.append(name)
                time.sleep(0.01)
            finally:
                inside.release()

        return run

    loop.add("a", job("a"), 3600)
    loop.add("b", job("b"), 3600)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while ran.count("a") < 1 or ran.count("b") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        loop.wake("b")
        while ran.count("b") < 2:
            assert time.monotonic() < deadline, "a woken job did not run"
            time.sleep(0.01)
    finally:
        loop.stop(timeout=5)
    assert not loop.running
    assert ran.count("a") == 1  # its hour-long interval was not cut short
    assert not overlaps
