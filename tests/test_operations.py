"""The daemon as systemd runs it: sd_notify, metrics, leaderboard command, and
admin cancel/retry reaching a running daemon through the database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from textwrap import dedent

from sqlalchemy import select

from ramp_dispatcher.cli import main as cli
from ramp_dispatcher.database.dispatcher_schema import runs

from deployment import GOOD, Deployment, sleeper
from helpers import free_port as _free_port
from helpers import wait_for as _wait

EXE = Path(sys.prefix) / "bin" / "ramp-dispatcher"


def test_service_notify_metrics_leaderboard_cancel_retry(empty_db_url: str, tmp_path: Path) -> None:
    # in the data folder: the sandbox shows the run that folder (read-only)
    marker = tmp_path / "deploy" / "ramp-data" / "iris" / "second-try"
    # fails until the test creates the marker file: a retry then succeeds
    flaky = dedent(GOOD) + dedent(
        f"""
        import pathlib
        if not pathlib.Path({str(marker)!r}).exists():
            raise RuntimeError("first attempt fails")
        """
    )
    refreshed = tmp_path / "leaderboard-runs"
    port = _free_port()
    dep = Deployment(
        tmp_path / "deploy",
        empty_db_url,
        {"good": GOOD, "flaky": flaky, "forever": sleeper(300)},
        dispatcher_extra=(
            f"metrics_port: {port}\n"
            f"leaderboard_command: [sh, -c, 'echo run >> {refreshed}']\n"
            "leaderboard_interval: 0.5\n"
        ),
    )
    text = dep.event_path.read_text().replace("hunger_policy: exit", "hunger_policy: sleep")
    dep.event_path.write_text(text)

    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(0.2)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="1000000")
    proc = subprocess.Popen(
        [str(EXE), "run", "--config", str(dep.server_path), "--event-config", str(dep.event_path)],
        env=env, stderr=subprocess.PIPE, text=True,
    )
    messages: list[str] = []
    done = threading.Event()

    def read() -> None:
        # read at once, as systemd does: a unix datagram queue holds only ~10
        while not done.is_set():
            try:
                messages.append(sock.recv(4096).decode())
            except (TimeoutError, socket.timeout):
                pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def drain() -> list[str]:
        return list(messages)

    db = ["--url", empty_db_url]
    try:
        _wait(lambda: "READY=1" in "\n".join(drain()), 30, "READY=1")
        s = dep.summaries()
        _wait(lambda: dep.summaries()["forever"].state == "training", 60, "the long run to start")
        _wait(lambda: dep.summaries()["good"].state == "scored", 90, "the good run")
        _wait(lambda: dep.summaries()["flaky"].state == "training_error", 90, "the flaky run to fail")
        # watchdog pings keep coming while the loop turns; STATUS carries the counts
        _wait(lambda: sum(m.startswith("WATCHDOG=1") for m in drain()) >= 2, 10, "watchdog pings")
        assert any(m.startswith("STATUS=") and "waiting" in m for m in messages)

        # the leaderboard command ran after results, coalesced, off the loop
        _wait(lambda: refreshed.exists(), 10, "the leaderboard command")
        assert 1 <= len(refreshed.read_text().splitlines()) <= 4

        # metrics are served on loopback
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'ramp_dispatcher_run_outcomes_total{event="iris_demo",outcome="scored"} 1' in body
        assert 'ramp_dispatcher_running_runs{event="iris_demo"} 1' in body

        # cancel the running one through the database: the daemon stops it
        with dep.engine.connect() as conn:
            handle = conn.execute(
                select(runs.c.handle).where(runs.c.submission_id == s["forever"].id)
            ).scalar_one()
        assert cli(["cancel", str(s["forever"].id), *db]) == 0
        _wait(lambda: dep.summaries()["forever"].state == "checking_error", 30, "the cancel")
        assert "Cancelled" in dep.summaries()["forever"].error_msg
        assert not Path(f"/proc/{handle['pid']}").exists()

        # retry the failed one: a new attempt, the history kept
        marker.write_text("ok")
        assert cli(["retry", f"submission_{s['flaky'].id:09d}", *db]) == 0
        _wait(lambda: dep.summaries()["flaky"].state == "scored", 90, "the retried run")
        with dep.engine.connect() as conn:
            attempts = conn.execute(
                select(runs.c.attempt, runs.c.outcome)
                .where(runs.c.submission_id == s["flaky"].id)
                .order_by(runs.c.attempt)
            ).all()
        assert [tuple(a) for a in attempts] == [(1, "training_error"), (2, "scored")]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        _wait(lambda: any(m.startswith("STOPPING=1") for m in drain()), 2, "STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.communicate()[1]
        done.set()
        reader.join()
        sock.close()
    # one line per state change naming event, submission and attempt
    assert "event iris_demo: submission" in stderr and "attempt 2: scored" in stderr
