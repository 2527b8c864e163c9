"""Nothing slow on the loop thread (issue 11, item 6): while the worker takes
seconds to stop a cancelled run, or ``conda`` takes its time to list the
environments a run's start needs, systemd's watchdog is pinged and the other
runs' leases are renewed at their usual period; a slow call that hangs holds
its slot only up to a bound."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path

from sqlalchemy import select

from ramp_dispatcher import dispatcher as dispatcher_module
from ramp_dispatcher.database import control
from ramp_dispatcher.database.dispatcher_schema import runs
from ramp_dispatcher.dispatcher import Dispatcher
from ramp_dispatcher.sdnotify import SystemdNotifier

from deployment import GOOD, Deployment, run_in_thread, sleeper
from faults import add_submission, edit_event_config, run_rows, wait_for

#: how long the STAND-IN slow stop takes (a run's tree that takes seconds to exit)
SLOW_STOP_S = 8.0


def heartbeat_of(dep, name: str):
    """The last lease renewal of the submission's run."""
    sid = dep.summaries()[name].id
    with dep.engine.connect() as conn:
        return conn.execute(select(runs.c.heartbeat_at).where(runs.c.submission_id == sid)).scalar()


def test_a_slow_stop_does_not_hold_the_loop(empty_db_url: str, tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"cancelled": sleeper(20), "other": sleeper(5)})
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.2)
    # a watchdog of 2 s: pings every second
    notifier = SystemdNotifier(env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "2000000"})
    d = Dispatcher.for_event(dep.engine, dep.event_config(), notifier)
    real_cleanup = d.worker.cleanup
    stopping: list[float] = []

    def slow_cleanup(request, handle) -> None:  # STAND-IN: a stop that takes seconds
        stopping.append(time.monotonic())
        time.sleep(SLOW_STOP_S)
        real_cleanup(request, handle)

    d.worker.cleanup = slow_cleanup  # type: ignore[method-assign]

    run_in_thread(d)
    try:
        wait_for(lambda: {s.state for n, s in dep.summaries().items() if n in ("cancelled", "other")} == {"training"},
                 120, "both runs training")  # fmt: skip
        with dep.engine.begin() as conn:
            control.cancel_submission(conn, control.find_submission(conn, "cancelled", dep.event_config().ramp.event_name))
        wait_for(lambda: stopping, 30, "the stop of the cancelled run to begin")
        pings, heartbeats = 0, set()
        while time.monotonic() < stopping[0] + SLOW_STOP_S - 1:
            try:
                pings += sock.recv(4096).count(b"WATCHDOG=1")
            except TimeoutError:
                pass
            heartbeats.add(heartbeat_of(dep, "other"))
        assert pings >= 3, f"{pings} watchdog pings during a {SLOW_STOP_S:g} s stop"
        assert len(heartbeats) >= 3, f"the other run's lease renewed {len(heartbeats) - 1} time(s)"
        assert d.stopped.wait(120), "the queue did not drain"
    finally:
        d.stop()
        sock.close()
    s = dep.summaries()
    assert s["cancelled"].state == "checking_error" and s["cancelled"].error_msg == control.CANCEL_MESSAGE
    assert s["other"].state == "scored"


#: how long the STAND-IN ``conda`` hangs at most while its gate file exists
CONDA_HANG_S = 90


def _slow_conda(tmp_path: Path, prefix: Path) -> tuple[Path, Path, Path]:
    """A STAND-IN for ``conda`` (none can be installed here): ``conda info
    --envs --json`` lists ``prefix``; while the gate file exists it first
    hangs, up to 90 s, and marks that it was called. Returns (executable,
    gate, called-marker)."""
    gate, called = tmp_path / "conda-hangs", tmp_path / "conda-was-slow"
    exe = tmp_path / "standin-bin" / "conda"
    exe.parent.mkdir()
    exe.write_text(f"""#!/bin/sh
n=0
while [ -e '{gate}' ] && [ $n -lt {CONDA_HANG_S * 5} ]; do touch '{called}'; sleep 0.2; n=$((n+1)); done
printf '{{"envs": ["%s"], "root_prefix": "/nonexistent-root"}}\n' '{prefix}'
""")
    exe.chmod(0o755)
    return exe, gate, called


def _conda_by_name(dep: Deployment, monkeypatch, tmp_path: Path) -> tuple[Path, Path]:
    """The event's conda_env becomes a name that the stand-in conda resolves
    (to this test's environment, which has ramp-test)."""
    prefix = Path(sys.prefix)
    exe, gate, called = _slow_conda(tmp_path, prefix)
    monkeypatch.setenv("CONDA_EXE", str(exe))
    edit_event_config(dep.event_path, "worker", conda_env=prefix.name)
    return gate, called


def _ask_conda_every_start(d: Dispatcher) -> None:
    # the worker trusts a looked-up environment for env_cache_s (60 s): ask
    # conda at each start, as it does once that lapsed
    d.worker.config = dataclasses.replace(d.worker.config, env_cache_s=0.0)


def test_a_slow_conda_lookup_does_not_hold_the_loop(empty_db_url: str, tmp_path: Path, monkeypatch) -> None:
    """The issue's test: while a run's start waits for a ``conda`` that
    sleeps (up to 90 s), watchdog pings and the running run's lease renewals
    keep their period; once conda answers, the run starts and is scored."""
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"other": sleeper(12)})
    gate, called = _conda_by_name(dep, monkeypatch, tmp_path)
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.2)
    notifier = SystemdNotifier(env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "2000000"})
    d = Dispatcher.for_event(dep.engine, dep.event_config(), notifier)
    _ask_conda_every_start(d)

    run_in_thread(d)
    try:
        wait_for(lambda: dep.summaries()["other"].state == "training", 120, "the first run training")
        gate.touch()
        add_submission(dep, "looked_up", GOOD)
        wait_for(called.exists, 30, "the next start to call the slow conda")
        pings, heartbeats = 0, set()
        window_end = time.monotonic() + 8
        while time.monotonic() < window_end:
            try:
                pings += sock.recv(4096).count(b"WATCHDOG=1")
            except TimeoutError:
                pass
            heartbeats.add(heartbeat_of(dep, "other"))
        assert pings >= 4, f"{pings} watchdog pings in 8 s while conda was being waited for"
        assert len(heartbeats) >= 4, f"the other run's lease renewed {len(heartbeats) - 1} time(s) in 8 s"
        # the start is still waiting for conda: the loop did not wait with it
        assert dep.summaries()["looked_up"].state == "sent_to_training"
        gate.unlink()
        assert d.stopped.wait(180), "the queue did not drain"
    finally:
        gate.unlink(missing_ok=True)
        d.stop()
        sock.close()
    s = dep.summaries()
    assert s["other"].state == "scored" and s["looked_up"].state == "scored"


def test_a_hung_start_holds_its_slot_only_up_to_a_bound(empty_db_url: str, tmp_path: Path, monkeypatch) -> None:
    """A start that does not return within the bound (here 3 s, 300 s in
    service) frees its slot: the run is an infrastructure failure, retried;
    what the late start still started is stopped, and the retry is scored."""
    monkeypatch.setattr(dispatcher_module, "SLOW_CALL_LIMIT_S", 3.0)
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"hung": GOOD}, n_workers=1)
    gate, called = _conda_by_name(dep, monkeypatch, tmp_path)
    # the retry after the late start was stopped (a stop waits for the tree)
    edit_event_config(dep.event_path, "dispatcher", retry_delay=10)
    gate.touch()
    d = Dispatcher.for_event(dep.engine, dep.event_config())
    _ask_conda_every_start(d)
    sid = dep.summaries()["hung"].id
    run_in_thread(d)
    try:
        wait_for(called.exists, 60, "the start to call the slow conda")
        wait_for(lambda: [r.outcome for r in run_rows(dep.engine, sid)] == ["retry"], 30,
                 "the hung start given up on and requeued")  # fmt: skip
        [first] = run_rows(dep.engine, sid)
        assert "starting the run took more than 3 s" in first.message
        gate.unlink()  # conda answers: the late start starts, and is stopped
        assert d.stopped.wait(180), "the queue did not drain"
    finally:
        gate.unlink(missing_ok=True)
        d.stop()
    rows = run_rows(dep.engine, sid)
    assert [(r.attempt, r.outcome) for r in rows] == [(1, "retry"), (2, "scored")]
    assert dep.summaries()["hung"].state == "scored"
    # the late start's supervisor (named by its status file in its argv) is gone
    status = str(dep.event_config().ramp.logs_dir / f"submission_{sid:09d}" / "run-1.json")
    wait_for(lambda: not _processes_naming(status), 30, "the late start's supervisor to stop")
    # stopped, not run to its end (it may have been stopped before it wrote a status)
    ended = json.loads(Path(status).read_text()) if Path(status).exists() else {}
    assert ended.get("reason") != "exited", ended


def _processes_naming(word: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if word.encode() in argv:
            found.append(int(pid))
    return found
