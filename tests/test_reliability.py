"""Fault injection: nothing lost, nothing twice (issue 4).

Real processes throughout: the daemon is ``ramp-dispatcher run`` in a
subprocess (killed with SIGKILL, stopped with SIGSTOP, reloaded with SIGHUP),
runs are the conda worker's detached supervisors running the real
``ramp-test``, and the database is a real PostgreSQL (a private cluster when
the test restarts it) or SQLite.

Every test asserts the final states, that every scored submission has exactly
one score set (one run with outcome ``scored``; a trigger-based audit shows
each score row and the ``scored`` state written exactly once), and that no
process of the test is left (the supervisors recorded in the runs table are
gone, and no process carries the test's environment marker).

Runs that must be "in progress" use gated submissions (see ``faults.py``):
``fit`` waits for a file the test creates, so nothing depends on guessed sleeps.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from sqlalchemy import create_engine, text, update
from sqlalchemy.engine import make_url

from ramp_dispatcher.database import queries
from ramp_dispatcher.database.dispatcher_schema import runs
from ramp_dispatcher.demo import EVENT
from ramp_dispatcher.runs import ActiveRun, RunState
from ramp_dispatcher.results import parse_training_output
from ramp_dispatcher.workers.base import FailureClass, RunOutcome

from conftest import create_pg_database, drop_pg_database
from deployment import GOOD, sleeper
from faults import (
    MARKER_VAR,
    MEMORY_HOG,
    RAMP_TEST_EXE,
    Harness,
    PrivatePostgres,
    add_submission,
    assert_never_scored,
    assert_scored_once,
    dump_submission,
    edit_event_config,
    is_alive,
    make_harness,
    naive_utcnow,
    owner_pid,
    ramp_test_pids,
    require_private_postgres,
    run_rows,
    wait_for,
)

GATED = None  # a gated submission (see faults.gated_source)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """Build harnesses; whatever a test leaves running is killed afterwards."""
    made: list[Harness] = []

    def build(url: str, sources: dict[str, str | None], **kw) -> Harness:
        h = make_harness(tmp_path / f"h{len(made)}", url, sources, **kw)
        made.append(h)
        return h

    yield build
    for h in made:
        h.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


def sub_name(submission_id: int) -> str:
    return f"submission_{submission_id:09d}"


def the_run(h: Harness, name: str):
    rows = run_rows(h.dep.engine, h.sid(name))
    assert len(rows) == 1, rows
    return rows[0]


def wait_training(h: Harness, names: list[str], timeout: float = 60.0) -> None:
    h.wait_states(lambda s: all(s[n] == "training" for n in names), timeout, f"{names} training")


def inject_failing_trigger(engine, name: str, table: str, when: str) -> None:
    """Make UPDATEs of ``table`` matching ``when`` fail as in an outage of the
    database (a connection failure on PostgreSQL, a busy file on SQLite), not
    as a bug: the daemon keeps the run and tries again."""
    if engine.dialect.name == "postgresql":
        stmts = [
            f"""CREATE FUNCTION {name}_fn() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN RAISE EXCEPTION 'fault injected by the test' USING ERRCODE = 'connection_failure';
                END $$""",
            f"CREATE TRIGGER {name} BEFORE UPDATE ON {table} FOR EACH ROW "
            f"WHEN ({when}) EXECUTE FUNCTION {name}_fn()",
        ]
    else:
        stmts = [
            f"CREATE TRIGGER {name} BEFORE UPDATE ON {table} WHEN {when} "
            "BEGIN SELECT RAISE(ABORT, 'database is locked (fault injected by the test)'); END"
        ]
    with engine.begin() as conn:
        for s in stmts:
            conn.exec_driver_sql(s)


def drop_trigger(engine, name: str, table: str) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"DROP TRIGGER {name} ON {table}")
        else:
            conn.exec_driver_sql(f"DROP TRIGGER {name}")


# --------------------------------------------------------------------------- 1. kill -9 mid-run


def test_kill9_mid_run_then_restart_reattaches(empty_db_url: str, harness) -> None:
    h = harness(empty_db_url, {"slow": GATED}, n_workers=1)
    a = h.daemon("a")
    wait_training(h, ["slow"])
    sid = h.sid("slow")
    before = the_run(h, "slow")
    supervisor = before.handle["pid"]
    assert owner_pid(before.owner) == str(a.pid)
    ramp_test = wait_for(lambda: ramp_test_pids(h.marker, sub_name(sid)), 30, "ramp-test to start")

    a.kill9()
    time.sleep(0.3)
    # the run lives on without its daemon: own session, not a child that dies with it
    assert is_alive(supervisor)
    assert ramp_test_pids(h.marker, sub_name(sid)) == ramp_test
    assert h.state("slow") == "training"

    b = h.daemon("b")
    b.wait_log("re-attached (was running)", 15)
    assert h.state("slow") == "training"  # re-attached, not requeued
    h.open_gate()
    assert b.wait_exit(60) == 0

    after = the_run(h, "slow")  # ONE row: not retrained
    assert after.attempt == 1
    assert after.handle["pid"] == supervisor
    assert after.handle["pid_start_time"] == before.handle["pid_start_time"]
    assert owner_pid(after.owner) == str(b.pid)
    assert after.outcome == "scored" and after.failure_class is None
    assert h.ramp_test_count("slow") == 1  # ramp-test ran once
    assert_scored_once(h.dep.engine, sid)
    h.assert_nothing_left()


def test_kill9_and_the_run_is_gone_too(pg_url: str, harness) -> None:
    """The daemon and the run's whole session are killed: the restarted daemon
    finds the run gone and requeues it as an infrastructure failure; the
    retry is scored once."""
    h = harness(pg_url, {"slow": GATED}, n_workers=1, dispatcher_extra="retry_delay: 0")
    a = h.daemon("a")
    wait_training(h, ["slow"])
    sid = h.sid("slow")
    first = the_run(h, "slow")
    wait_for(lambda: ramp_test_pids(h.marker, sub_name(sid)), 30, "ramp-test to start")
    a.kill9()
    os.killpg(first.handle["pid"], signal.SIGKILL)  # the supervisor leads its session's group
    for pid in ramp_test_pids(h.marker, sub_name(sid)):
        os.killpg(pid, signal.SIGKILL)  # ramp-test leads its own group
    wait_for(lambda: not ramp_test_pids(h.marker, sub_name(sid)), 10, "the run to be gone")

    h.open_gate()
    b = h.daemon("b")
    assert b.wait_exit(60) == 0
    assert "supervisor process disappeared" in b.log()
    rows = run_rows(h.dep.engine, sid)
    assert [(r.attempt, r.outcome, r.failure_class) for r in rows] == [
        (1, "retry", "infrastructure"),
        (2, "scored", None),
    ]
    assert_scored_once(h.dep.engine, sid)
    h.assert_nothing_left()


# --------------------------------------------------------------------------- 2. kill -9 as it finishes


def test_kill9_as_the_run_finishes(empty_db_url: str, harness) -> None:
    h = harness(empty_db_url, {"quick": GATED}, n_workers=1)
    a = h.daemon("a")
    wait_training(h, ["quick"])
    sid = h.sid("quick")
    status_path = Path(the_run(h, "quick").handle["status_path"])
    assert status_path.name == "run-1.json"

    h.open_gate()

    # kill the daemon the moment the supervisor reports the end: the daemon
    # is woken by the supervisor's exit and collects at that very moment
    wait_for(lambda: status_has_reason(status_path), 60, "run-1.json to get a reason", interval=0.005)
    a.kill9()

    b = h.daemon("b")
    assert b.wait_exit(60) == 0
    [row] = run_rows(h.dep.engine, sid)
    assert row.attempt == 1 and row.outcome == "scored"
    assert h.ramp_test_count("quick") == 1
    assert_scored_once(h.dep.engine, sid)
    h.assert_nothing_left()


def test_kill9_during_collection(empty_db_url: str, harness) -> None:
    """The daemon dies between 'run finished' and 'results written': the final
    write is made to fail (a trigger) so the daemon is stuck exactly there, with
    the output already moved to the predictions folder; then it is killed."""
    h = harness(empty_db_url, {"quick": GATED}, n_workers=1)
    sid = h.sid("quick")
    engine = h.dep.engine
    inject_failing_trigger(engine, "fault_block_scored", "submissions", f"NEW.state = 'scored' AND NEW.id = {sid}")
    a = h.daemon("a")
    wait_training(h, ["quick"])
    h.open_gate()
    wait_for(lambda: the_run(h, "quick").status == "finished", 60, "the run to be marked finished")
    a.wait_log("database unavailable", 10)  # the write was tried and failed
    kept = h.dep.event_config().ramp.predictions_dir / sub_name(sid)
    wait_for(kept.is_dir, 10, "the output moved to predictions")
    a.kill9()
    assert h.state("quick") == "tested"
    assert_never_scored(engine, sid)

    drop_trigger(engine, "fault_block_scored", "submissions")
    b = h.daemon("b")
    b.wait_log("re-attached (was finished)", 15)
    assert b.wait_exit(60) == 0
    [row] = run_rows(engine, sid)
    assert row.outcome == "scored"
    assert h.ramp_test_count("quick") == 1
    assert_scored_once(engine, sid)
    h.assert_nothing_left()


# --------------------------------------------------------------------------- kill -9 between start and handle record


def test_kill9_before_the_handle_is_recorded(pg_url: str, harness) -> None:
    """The run's supervisor is started, but the daemon dies before the handle
    is in the runs table (the write is made to fail, then the daemon killed).
    The restarted daemon finds the run by its status file and re-attaches it:
    the same ramp-test goes on and is collected; nothing runs twice."""
    h = harness(pg_url, {"slow": GATED}, n_workers=1, dispatcher_extra="retry_delay: 0")
    engine = h.dep.engine
    inject_failing_trigger(engine, "fault_block_handle", "dispatcher_runs", "NEW.status = 'running'")
    a = h.daemon("a")
    a.wait_log("handle not recorded yet", 60)
    sid = h.sid("slow")
    wait_for(lambda: ramp_test_pids(h.marker, sub_name(sid)), 30, "the first ramp-test to run")
    first = ramp_test_pids(h.marker, sub_name(sid))
    a.kill9()
    drop_trigger(engine, "fault_block_handle", "dispatcher_runs")

    b = h.daemon("b")
    b.wait_log("re-attached (was starting)", 15)
    # the handle is recorded now, pointing at the first supervisor
    h.wait_states(lambda s: s["slow"] == "training", 30, "the run to be recorded as training")
    assert ramp_test_pids(h.marker, sub_name(sid)) == first
    h.open_gate()
    assert b.wait_exit(60) == 0
    rows = run_rows(engine, sid)
    assert [(r.attempt, r.outcome) for r in rows] == [(1, "scored")]
    assert_scored_once(engine, sid)
    h.assert_nothing_left()


# --------------------------------------------------------------------------- 3. two daemons


def test_two_daemons_on_one_event(empty_db_url: str, harness) -> None:
    names = [f"s{i}" for i in range(6)]
    h = harness(empty_db_url, {n: GATED for n in names}, n_workers=2)
    a = h.daemon("a")
    b = h.daemon("b")
    # four runs at once, two per daemon, two waiting: both daemons claimed
    h.wait_states(lambda s: sum(v == "training" for v in s.values()) == 4, 60, "4 runs training")
    rows = [r for r in run_rows(h.dep.engine) if r.status == "running"]
    by_owner: dict[str, int] = {}
    for r in rows:
        by_owner[owner_pid(r.owner)] = by_owner.get(owner_pid(r.owner), 0) + 1
    assert by_owner == {str(a.pid): 2, str(b.pid): 2}
    h.open_gate()
    assert a.wait_exit(120) == 0 and b.wait_exit(120) == 0

    rows = run_rows(h.dep.engine)
    ids = {h.sid(n) for n in names}
    assert sorted(r.submission_id for r in rows) == sorted(ids)  # one run each
    assert {owner_pid(r.owner) for r in rows} <= {str(a.pid), str(b.pid)}
    for sid in ids:
        assert_scored_once(h.dep.engine, sid)
    for n in names:
        assert h.ramp_test_count(n) == 1
    h.assert_nothing_left()


# --------------------------------------------------------------------------- 4. lease takeover


def _take_over(h: Harness, **dispatcher_keys) -> tuple:
    """Daemon A runs the submission and stops heartbeating (SIGSTOP: its pid
    stays alive, so owner_is_dead is False); its lease lapses; daemon B
    adopts the run. Returns (A, B, the run's row under A)."""
    edit_event_config(h.dep.event_path, "dispatcher", hunger_policy="sleep", **dispatcher_keys)
    a = h.daemon("a")
    wait_training(h, ["slow"])
    run = the_run(h, "slow")
    assert owner_pid(run.owner) == str(a.pid)

    a.send(signal.SIGSTOP)
    time.sleep(0.3)
    # The lease is max(60 s, 3 x poll_interval): instead of waiting that long,
    # simulate the silence by moving the lease's expiry into the past.
    with h.dep.engine.begin() as conn:
        conn.execute(
            update(runs).where(runs.c.id == run.id)
            .values(lease_expires_at=naive_utcnow() - dt.timedelta(seconds=1))
        )
    edit_event_config(h.dep.event_path, "dispatcher", hunger_policy="exit")
    b = h.daemon("b")
    b.wait_log("re-attached (was running)", 15)
    taken = the_run(h, "slow")
    assert owner_pid(taken.owner) == str(b.pid)
    assert (taken.id, taken.attempt, taken.handle) == (run.id, run.attempt, run.handle)
    return a, b, run


def _finish_takeover(h: Harness, a, sid: int, scored) -> None:
    """A, resumed, must have written nothing; it stops cleanly."""
    time.sleep(1.5)  # a few more cycles of A
    assert a.alive()
    assert ": scored" not in a.log()  # A wrote no result
    assert the_run(h, "slow") == scored  # nor touched the run's row
    assert_scored_once(h.dep.engine, sid)
    a.send(signal.SIGTERM)
    assert a.wait_exit(10) == 0
    assert h.ramp_test_count("slow") == 1
    h.assert_nothing_left()


@contextlib.contextmanager
def daemon_logs_on_failure(h: Harness) -> Iterator[None]:
    """On a failure, print every daemon's whole log (pytest shows it)."""
    try:
        yield
    except BaseException:
        for d in h.daemons:
            print(f"----- {d.log_path.name} (pid {d.pid})\n{d.log()}")
        raise


def test_lease_takeover_from_a_stopped_daemon(pg_url: str, harness) -> None:
    h = harness(pg_url, {"slow": GATED}, n_workers=1)
    sid = h.sid("slow")
    with daemon_logs_on_failure(h):
        a, b, _ = _take_over(h)
        a.send(signal.SIGCONT)  # A wakes while the run still goes
        a.wait_log("taken over by another daemon; dropped", 15)
        h.open_gate()
        assert b.wait_exit(60) == 0
        assert ": scored" in b.log()
        _finish_takeover(h, a, sid, the_run(h, "slow"))


def test_lease_takeover_daemon_resumes_after_the_run_was_collected(pg_url: str, harness) -> None:
    """As above, but the run ends and B collects it before A resumes. A must
    drop the run as taken over, not collect it a second time. (poll_interval
    is long so that A's next claim cycle, where takeovers are noticed today,
    is not due: the result must not depend on which job runs first.)"""
    h = harness(pg_url, {"slow": GATED}, n_workers=1)
    sid = h.sid("slow")
    with daemon_logs_on_failure(h):
        a, b, _ = _take_over(h, poll_interval=120)
        h.open_gate()
        assert b.wait_exit(60) == 0
        scored = the_run(h, "slow")
        assert scored.outcome == "scored"
        a.send(signal.SIGCONT)
        try:
            a.wait_log("taken over by another daemon; dropped", 3)
        finally:
            _finish_takeover(h, a, sid, scored)


# --------------------------------------------------------------------------- 5. database outages


def test_backends_terminated_mid_run(pg_url: str, harness) -> None:
    h = harness(pg_url, {"slow": GATED, "next": GOOD}, n_workers=1)
    edit_event_config(h.dep.event_path, "dispatcher", hunger_policy="sleep")
    d = h.daemon("d")
    wait_training(h, ["slow"])
    database = make_url(pg_url).database
    admin = create_engine(make_url(pg_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    killed = 0

    def terminate_all() -> int:
        with admin.connect() as conn:
            return len(conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :d AND pid <> pg_backend_pid()"
                ),
                {"d": database},
            ).all())

    try:
        # while the run goes, and while its result is being written
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:
            killed += terminate_all()
            time.sleep(0.2)
        h.open_gate()
        t_end = time.monotonic() + 3.0
        while time.monotonic() < t_end:
            killed += terminate_all()
            time.sleep(0.1)
    finally:
        admin.dispose()
    assert killed > 0
    h.wait_states(lambda s: s["slow"] == "scored" and s["next"] == "scored", 90, "both scored")
    assert d.alive()
    log = d.log()
    assert "LISTEN connection lost" in log or "database unavailable" in log, log[-3000:]
    assert "unexpected error" not in log, log[-3000:]
    d.send(signal.SIGTERM)
    assert d.wait_exit(10) == 0
    for n in ("slow", "next"):
        assert_scored_once(h.dep.engine, h.sid(n))
        assert len(run_rows(h.dep.engine, h.sid(n))) == 1
    h.assert_nothing_left()


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this test's own, which it may stop and start."""
    require_private_postgres()
    pg = PrivatePostgres()
    try:
        pg.init()
        yield pg
    finally:
        pg.destroy()


def test_postgresql_restart_mid_run(private_pg: PrivatePostgres, harness) -> None:
    url = private_pg.create_database("ramp_fault")
    h = harness(url, {"slow": GATED}, n_workers=1)
    edit_event_config(h.dep.event_path, "dispatcher", hunger_policy="sleep")
    d = h.daemon("d")
    wait_training(h, ["slow"])
    sid = h.sid("slow")
    status_path = Path(the_run(h, "slow").handle["status_path"])
    h.dep.engine.dispose()

    down_at = time.monotonic()
    private_pg.stop("fast")
    d.wait_log("database unavailable", 15)
    h.open_gate()  # the run ends while the database is away
    wait_for(lambda: status_has_reason(status_path), 60, "the run to end")
    time.sleep(max(0.0, down_at + 3.0 - time.monotonic()) + 1.0)  # >= 3 s down, a collection tried
    assert d.alive()
    private_pg.start()

    h.wait_states(lambda s: s["slow"] == "scored", 60, "scored after the restart")
    d.wait_log("database reachable again", 15)
    assert d.alive()  # the loop never died
    d.send(signal.SIGTERM)
    assert d.wait_exit(10) == 0
    [row] = run_rows(h.dep.engine, sid)
    assert row.outcome == "scored" and row.attempt == 1
    assert_scored_once(h.dep.engine, sid)
    assert h.ramp_test_count("slow") == 1
    h.assert_nothing_left()
    # the harness closes before the cluster is destroyed (fixture order)


def status_has_reason(path: Path) -> bool:
    """The supervisor's status file says the run ended."""
    try:
        return "reason" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- 6. SIGTERM drain


def test_sigterm_drain_and_restart(empty_db_url: str, harness) -> None:
    h = harness(empty_db_url, {"a": GATED, "b": GATED}, n_workers=2)
    edit_event_config(h.dep.event_path, "dispatcher", hunger_policy="sleep")
    d1 = h.daemon("first")
    wait_training(h, ["a", "b"])
    supervisors = {n: the_run(h, n).handle["pid"] for n in "ab"}

    t0 = time.monotonic()
    d1.send(signal.SIGTERM)
    assert d1.wait_exit(5) == 0
    assert time.monotonic() - t0 < 5
    assert "left 2 run(s) running" in d1.log()
    for pid in supervisors.values():
        assert is_alive(pid)
    now = naive_utcnow()
    for n in "ab":
        row = the_run(h, n)
        assert row.status == "running"
        # conda runs live on this host: the clean stop leaves their leases,
        # which another host would wait out (plus a grace); this host's next
        # daemon re-attaches at once all the same (the owner's pid is gone)
        assert row.lease_expires_at > now + dt.timedelta(seconds=30), "lease shortened on SIGTERM"

    edit_event_config(h.dep.event_path, "dispatcher", hunger_policy="exit")
    d2 = h.daemon("second")
    d2.wait_log("re-attached (was running)", 10, count=2)
    assert time.monotonic() - d2.started < 10
    h.open_gate()
    assert d2.wait_exit(60) == 0
    for n in "ab":
        row = the_run(h, n)
        assert row.attempt == 1 and row.handle["pid"] == supervisors[n]
        assert owner_pid(row.owner) == str(d2.pid)
        assert h.ramp_test_count(n) == 1
        assert_scored_once(h.dep.engine, h.sid(n))
    h.assert_nothing_left()


# --------------------------------------------------------------------------- 7. environment disappears


def test_environment_disappears(empty_db_url: str, harness, tmp_path: Path) -> None:
    env = tmp_path / "standin-env"
    (env / "bin").mkdir(parents=True)
    script = env / "bin" / "ramp-test"
    script.write_text(f'#!/bin/sh\nexec "{RAMP_TEST_EXE}" "$@"\n')
    script.chmod(0o755)

    h = harness(empty_db_url, {"first": GOOD}, n_workers=1, dispatcher_extra="max_attempts: 3\nretry_delay: 0")
    # (a stand-in env has no python of its own to score the predictions again with)
    edit_event_config(h.dep.event_path, "worker", conda_env=str(env), verify_scores=False)
    edit_event_config(h.dep.event_path, "dispatcher", hunger_policy="sleep")
    d = h.daemon("d")
    h.wait_states(lambda s: s["first"] == "scored", 60, "first scored")
    assert the_run(h, "first").handle["env_prefix"] == str(env)

    shutil.rmtree(env)
    second = add_submission(h.dep, "second", GOOD)
    h.wait_states(lambda s: s["second"] == "checking_error", 60, "second to fail for good")
    time.sleep(1.5)  # no fourth attempt
    assert d.alive()
    d.send(signal.SIGTERM)
    assert d.wait_exit(10) == 0

    s = h.dep.summaries()["second"]
    assert "platform's side" in s.error_msg and str(env) in s.error_msg
    assert "attempt 3 of 3" in s.error_msg
    rows = run_rows(h.dep.engine, second)
    assert [(r.attempt, r.outcome, r.failure_class) for r in rows] == [
        (1, "retry", "infrastructure"),
        (2, "retry", "infrastructure"),
        (3, "checking_error", "infrastructure"),
    ]
    assert all(str(env) in (r.message or "") for r in rows[:2])
    assert_scored_once(h.dep.engine, h.sid("first"))
    assert_never_scored(h.dep.engine, second)
    h.assert_nothing_left()


# --------------------------------------------------------------------------- 8. limits


def test_memory_and_time_limits(empty_db_url: str, harness) -> None:
    h = harness(
        empty_db_url, {"hog": MEMORY_HOG, "sleepy": sleeper(60)}, n_workers=2, timeout=8
    )
    edit_event_config(h.dep.event_path, "worker", memory_limit_mb=300)
    d = h.daemon("d")
    t0 = time.monotonic()
    assert d.wait_exit(90) == 0
    assert time.monotonic() - t0 < 60
    s = h.dep.summaries()
    assert s["hog"].state == "training_error"
    assert "memory limit of 300 MB" in s["hog"].error_msg, s["hog"].error_msg
    assert s["hog"].max_ram and s["hog"].max_ram > 300
    assert s["sleepy"].state == "training_error"
    assert "time limit of 8 s" in s["sleepy"].error_msg, s["sleepy"].error_msg
    rows = {r.submission_id: r for r in run_rows(h.dep.engine)}
    assert len(rows) == 2  # limits are not retried
    assert rows[s["hog"].id].failure_class == "memory"
    assert rows[s["sleepy"].id].failure_class == "timeout"
    for n in ("hog", "sleepy"):
        assert_never_scored(h.dep.engine, s[n].id)
    h.assert_nothing_left()


# --------------------------------------------------------------------------- 9. SIGHUP


def test_sighup_reloads_n_workers(pg_url: str, harness) -> None:
    names = ["s0", "s1", "s2", "s3"]
    h = harness(pg_url, {n: GATED for n in names}, n_workers=1)
    d = h.daemon("d")
    wait_training(h, ["s0"])
    first = the_run(h, "s0")
    time.sleep(1.5)  # a few claim cycles: still one at a time
    assert sum(v == "training" for v in h.states().values()) == 1

    edit_event_config(h.dep.event_path, "dispatcher", n_workers=3)
    d.send(signal.SIGHUP)
    d.wait_log("event config reloaded: 3 worker(s)", 10)
    h.wait_states(lambda s: sum(v == "training" for v in s.values()) == 3, 30, "3 runs training")
    states = h.states()
    assert states["s0"] == "training" and states["s3"] == "new"
    now = the_run(h, "s0")  # not dropped, not restarted
    assert (now.id, now.attempt, now.status, now.owner, now.handle) == (
        first.id, first.attempt, "running", first.owner, first.handle
    )
    assert is_alive(first.handle["pid"])
    h.open_gate()
    assert d.wait_exit(90) == 0
    for n in names:
        assert len(run_rows(h.dep.engine, h.sid(n))) == 1
        assert_scored_once(h.dep.engine, h.sid(n))
        assert h.ramp_test_count(n) == 1
    h.assert_nothing_left()


# --------------------------------------------------------------------------- 10. idempotence


def _in_process(h: Harness, monkeypatch):
    """A dispatcher object in this process (its runs carry the marker too)."""
    monkeypatch.setenv(MARKER_VAR, h.marker)
    return h.dep.dispatcher()


def _load_event(h: Harness) -> queries.EventInfo:
    with h.dep.engine.connect() as conn:
        return queries.load_event(conn, EVENT)


def test_collecting_twice_changes_nothing(empty_db_url: str, harness, monkeypatch) -> None:
    h = harness(empty_db_url, {"good": GOOD})
    monkeypatch.setenv(MARKER_VAR, h.marker)
    h.dep.run_until_done(timeout=90)
    sid = h.sid("good")
    assert_scored_once(h.dep.engine, sid)
    [row] = run_rows(h.dep.engine, sid)
    before = dump_submission(h.dep.engine, sid)
    event = _load_event(h)

    # the writes themselves, again: refused
    kept = h.dep.event_config().ramp.predictions_dir / sub_name(sid)
    results = parse_training_output(kept, event.n_folds, event.score_names)
    with h.dep.engine.begin() as conn:
        assert queries.write_results(conn, event, row.id, row.owner, sid, results, 123.0) is False
        assert queries.mark_finished(conn, row.id, row.owner, None, "", succeeded=True) is False
        assert queries.write_failure(conn, row.id, row.owner, sid, "training_error", "x", "participant", None) is False
        assert queries.requeue(conn, row.id, row.owner, sid, "infrastructure", "x", queries.utcnow()) is False
    assert dump_submission(h.dep.engine, sid) == before

    # the dispatcher's whole collection path, twice, from the real status file
    d = _in_process(h, monkeypatch)
    d._event = event
    for _ in range(2):
        run = ActiveRun(EVENT, row.id, sid, "good", row.attempt, d._request(sid, row.attempt), handle=row.handle,
                        state=RunState.RUNNING)  # fmt: skip
        run.end(d.worker.check(run.request, run.handle))
        assert run.outcome is not None and run.outcome.failure is None
        d._finish(run)
        assert dump_submission(h.dep.engine, sid) == before
    assert_scored_once(h.dep.engine, sid)
    h.assert_nothing_left()


#: the owner of attempt 1 in the superseded-attempt tests: a daemon that lost it
LOST_OWNER = "otherhost:1:1:lostlease"


def _supersede_attempt_1(h: Harness, event: queries.EventInfo, sid: int) -> int:
    """Attempt 1, run by a daemon that then lost it, was collected as 'retry'."""
    with h.dep.engine.begin() as conn:
        [claim] = queries.claim(conn, event, 1, LOST_OWNER, "conda", dt.timedelta(seconds=60))
        assert claim.attempt == 1
        queries.mark_running(
            conn, claim.run_id,
            {"pid": -1, "status_path": "/nonexistent/run-1.json", "log_path": "/nonexistent/log"},
        )
        assert queries.requeue(conn, claim.run_id, LOST_OWNER, sid, "infrastructure", "worker lost (simulated)", queries.utcnow())
    return claim.run_id


def _late_outcomes(stale, sid: int) -> list[RunOutcome]:
    """What a late collection of attempt 1 could report."""
    return [
        RunOutcome(None, "", exit_code=0, output_dir=stale._request(sid, 1).output_dir),
        RunOutcome(FailureClass.PARTICIPANT, "ramp-test exited with code 1", exit_code=1),
        RunOutcome(FailureClass.TIMEOUT, "Training stopped: the time limit of 1 s was reached."),
        RunOutcome(FailureClass.INFRASTRUCTURE, "the run's supervisor process disappeared"),
    ]


def _late_run(stale, run_id: int, sid: int, outcome: RunOutcome) -> ActiveRun:
    run = ActiveRun(EVENT, run_id, sid, "late", 1, stale._request(sid, 1), handle={}, state=RunState.RUNNING)
    run.end(outcome)
    return run


def test_late_result_of_a_superseded_attempt(empty_db_url: str, harness, monkeypatch) -> None:
    """Attempt 1 collected as 'retry', attempt 2 scored: a late result of
    attempt 1, written directly or through the dispatcher's collection path,
    is refused and changes no row."""
    h = harness(empty_db_url, {"late": GOOD}, n_workers=1)
    sid = h.sid("late")
    event = _load_event(h)
    run1 = _supersede_attempt_1(h, event, sid)
    monkeypatch.setenv(MARKER_VAR, h.marker)
    h.dep.run_until_done(timeout=90)
    rows = run_rows(h.dep.engine, sid)
    assert [(r.attempt, r.outcome) for r in rows] == [(1, "retry"), (2, "scored")]
    assert_scored_once(h.dep.engine, sid)
    before = dump_submission(h.dep.engine, sid)

    kept = h.dep.event_config().ramp.predictions_dir / sub_name(sid)
    results = parse_training_output(kept, event.n_folds, event.score_names)
    with h.dep.engine.begin() as conn:
        assert queries.write_results(conn, event, run1, LOST_OWNER, sid, results, 99.0) is False
        assert queries.mark_finished(conn, run1, LOST_OWNER, None, "", succeeded=True) is False
        assert queries.write_failure(conn, run1, LOST_OWNER, sid, "training_error", "late", "participant", None) is False
    assert dump_submission(h.dep.engine, sid) == before

    stale = h.dep.dispatcher()  # the daemon that lost attempt 1
    stale._event = event
    for outcome in _late_outcomes(stale, sid):
        stale._finish(_late_run(stale, run1, sid, outcome))
        assert dump_submission(h.dep.engine, sid) == before, outcome
    assert kept.is_dir()  # attempt 2's kept output untouched
    assert_scored_once(h.dep.engine, sid)
    h.assert_nothing_left()


def test_late_collection_leaves_the_running_attempt_alone(pg_url: str, harness, monkeypatch) -> None:
    """Attempt 1 was collected as 'retry'; attempt 2 is running. A late
    collection of attempt 1 (a daemon that lost its lease and comes back)
    changes nothing: not the database, not attempt 2's files."""
    h = harness(pg_url, {"late": GATED}, n_workers=1)
    sid = h.sid("late")
    event = _load_event(h)
    run1 = _supersede_attempt_1(h, event, sid)

    current = _in_process(h, monkeypatch)
    current.start()
    try:
        h.wait_states(lambda s: s["late"] == "training", 60, "attempt 2 training")
        request = current._request(sid, 2)
        wait_for(request.output_dir.is_dir, 30, "attempt 2's training_output")
        skip = ("heartbeat_at", "lease_expires_at")  # attempt 2's daemon renews them
        before = dump_submission(h.dep.engine, sid, run_columns_skip=skip)

        stale = h.dep.dispatcher()
        stale._event = event
        for outcome in _late_outcomes(stale, sid):
            stale._finish(_late_run(stale, run1, sid, outcome))
            assert dump_submission(h.dep.engine, sid, run_columns_skip=skip) == before, outcome
            assert request.output_dir.is_dir(), (
                f"late collection of attempt 1 ({outcome.failure}) deleted attempt 2's training_output"
            )
        h.open_gate()
        assert current.stopped.wait(60)
    finally:
        current.stop()
    rows = run_rows(h.dep.engine, sid)
    assert [(r.attempt, r.outcome) for r in rows] == [(1, "retry"), (2, "scored")]
    assert_scored_once(h.dep.engine, sid)
    h.assert_nothing_left()


# --------------------------------------------------------------------------- a running submission set back to new


def test_a_running_submission_set_back_to_new_is_stopped_and_run_again(empty_db_url: str, harness) -> None:
    """ramp-board's set-submission-state puts a running submission back to
    ``new``: the admin's ``new`` wins. The daemon stops the running attempt
    (and says so), closes its row without writing the submission's state or
    scores, then runs it again as a fresh attempt; no second attempt ever
    runs beside the first."""
    h = harness(empty_db_url, {"busy": GATED}, n_workers=2)
    a = h.daemon("a")
    wait_training(h, ["busy"])
    wait_for(lambda: h.ramp_test_count("busy") == 1, 30, "ramp-test running the submission")
    sid = h.sid("busy")
    first = the_run(h, "busy")
    with h.dep.engine.begin() as conn:
        queries.set_state(conn, [sid], "new")  # what ramp-database's set_submission_state writes
    a.wait_log("set back to new by an administrator while the run was in progress; stopping the run", 30)
    wait_for(lambda: len(run_rows(h.dep.engine, sid)) == 2, 60, "attempt 2 claimed")
    r1, r2 = run_rows(h.dep.engine, sid)
    assert (r1.status, r1.outcome) == ("collected", "superseded"), r1
    assert "set back to new" in r1.message and "result not written" in r1.message
    assert r2.created_at >= r1.collected_at  # the first was closed before the second was claimed
    assert not is_alive(first.handle["pid"]), "attempt 1's supervisor still runs beside attempt 2"
    h.open_gate()
    assert a.wait_exit(60) == 0, a.log()
    rows = run_rows(h.dep.engine, sid)
    assert [(r.attempt, r.outcome) for r in rows] == [(1, "superseded"), (2, "scored")]
    assert h.ramp_test_count("busy") == 2  # attempt 1 (stopped), then attempt 2
    assert_scored_once(h.dep.engine, sid)
    h.assert_nothing_left()


def test_a_submission_set_back_to_new_as_its_run_ends_keeps_the_admins_new(empty_db_url: str, harness) -> None:
    """The admin's ``new`` lands while the run is ending, before the daemon
    has looked for resets (its claim cycle is two minutes away): the run's
    end and result are not written over it; the run's row alone is closed,
    saying why, and the submission is run again as a fresh attempt."""
    h = harness(empty_db_url, {"ending": GATED}, n_workers=1)
    edit_event_config(h.dep.event_path, "dispatcher", poll_interval=120)
    a = h.daemon("a")
    wait_training(h, ["ending"])
    wait_for(lambda: h.ramp_test_count("ending") == 1, 30, "ramp-test running the submission")
    sid = h.sid("ending")
    with h.dep.engine.begin() as conn:
        queries.set_state(conn, [sid], "new")
    h.open_gate()  # attempt 1 ends now, and its collection finds the admin's new
    a.wait_log("closed without writing its result", 60)
    assert a.wait_exit(90) == 0, a.log()
    rows = run_rows(h.dep.engine, sid)
    assert [(r.attempt, r.outcome) for r in rows] == [(1, "superseded"), (2, "scored")], a.log()
    assert "set back to new" in rows[0].message
    assert h.ramp_test_count("ending") == 2
    assert_scored_once(h.dep.engine, sid)
    h.assert_nothing_left()


# --------------------------------------------------------------------------- a local run of another host


#: a daemon of another host (its conda runs are out of this host's reach)
OTHER_HOST_OWNER = "elsewhere.example:4242:1:otherhost"


def test_a_local_run_of_another_host_is_requeued_after_a_grace_not_reattached(
    empty_db_url: str, harness, monkeypatch
) -> None:
    """A conda run recorded by a daemon of another host: while its lease has
    lapsed for less than a grace period it is left alone; after that it is
    taken over and requeued without asking the worker about it or touching
    its files, and the next attempt runs here."""
    h = harness(empty_db_url, {"far": GOOD}, n_workers=1, dispatcher_extra="retry_delay: 0")
    sid = h.sid("far")
    event = _load_event(h)
    far_handle = {"pid": 1, "status_path": "/elsewhere/run-1.json", "log_path": "/elsewhere/log"}
    with h.dep.engine.begin() as conn:
        [claim] = queries.claim(conn, event, 1, OTHER_HOST_OWNER, "conda", dt.timedelta(seconds=60))
        queries.mark_running(conn, claim.run_id, far_handle)

    def lapse(seconds_ago: float) -> None:
        with h.dep.engine.begin() as conn:
            conn.execute(update(runs).where(runs.c.id == claim.run_id)
                         .values(lease_expires_at=queries.utcnow() - dt.timedelta(seconds=seconds_ago)))  # fmt: skip

    d = _in_process(h, monkeypatch)
    asked: list[dict] = []
    for name in ("check", "cleanup", "recover"):
        real = getattr(d.worker, name)

        def spy(request, *rest, _real=real, _name=name):
            if request.attempt == 1:
                asked.append({"call": _name})
            return _real(request, *rest)

        setattr(d.worker, name, spy)
    lapse(5)  # lapsed, but for less than the grace (one lease)
    d._event = event
    d._housekeeping_and_claim()  # one look at the runs, as the claim cycle does
    assert [(r.attempt, r.owner) for r in run_rows(h.dep.engine, sid)] == [(1, OTHER_HOST_OWNER)]
    lapse(d.lease.total_seconds() + 5)
    d.start()
    try:
        assert d.stopped.wait(120)
    finally:
        d.stop()
    rows = run_rows(h.dep.engine, sid)
    assert [(r.attempt, r.outcome) for r in rows] == [(1, "retry"), (2, "scored")]
    assert "elsewhere.example" in (rows[0].message or "")
    assert asked == []  # attempt 1 was neither checked, stopped nor searched for here
    assert_scored_once(h.dep.engine, sid)


def test_a_clean_stop_does_not_shorten_what_another_host_waits(empty_db_url: str, harness, monkeypatch) -> None:
    """A daemon (here one that calls itself a daemon of another host, by its
    owner id) stops cleanly while its conda run goes on: it leaves the run's
    lease to lapse on its own (a restart on its host re-attaches at once
    anyway), so a daemon of this host leaves the run alone, files and all,
    for the lease plus the grace, not just the grace after the stop."""
    h = harness(empty_db_url, {"far": GATED}, n_workers=1)
    sid = h.sid("far")
    edit_event_config(h.dep.event_path, "dispatcher", hunger_policy="sleep")
    far = _in_process(h, monkeypatch)
    far.owner = OTHER_HOST_OWNER
    far.start()
    try:
        wait_training(h, ["far"])
        run = the_run(h, "far")
        wait_for(lambda: far._request(sid, 1).output_dir.is_dir(), 30, "the run's training_output")
    finally:
        far.stop()
    stopped_at = naive_utcnow()
    row = the_run(h, "far")
    assert row.owner == OTHER_HOST_OWNER and row.status == "running"
    assert row.lease_expires_at >= stopped_at + far.lease - dt.timedelta(seconds=15), (
        f"the clean stop cut the lease short: it ends {row.lease_expires_at}, the stop was at {stopped_at}"
    )
    here = _in_process(h, monkeypatch)
    here._event = _load_event(h)
    here._housekeeping_and_claim()
    assert the_run(h, "far") == row  # not taken over, nothing written
    assert is_alive(run.handle["pid"]) and far._request(sid, 1).output_dir.is_dir()
    h.open_gate()
    wait_for(lambda: not is_alive(run.handle["pid"]), 60, "the run to end")
