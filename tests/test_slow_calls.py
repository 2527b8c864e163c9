"""Nothing slow on the loop thread (issue 11, item 6): while the worker takes
seconds to stop a cancelled run, systemd's watchdog is pinged and the other
runs' leases are renewed at their usual period."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from sqlalchemy import select

from ramp_dispatcher.database import control
from ramp_dispatcher.database.dispatcher_schema import runs
from ramp_dispatcher.dispatcher import Dispatcher
from ramp_dispatcher.sdnotify import SystemdNotifier

from deployment import Deployment, run_in_thread, sleeper
from faults import wait_for

#: how long the STAND-IN slow stop takes (a run's tree that takes seconds to exit)
SLOW_STOP_S = 8.0


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

    def heartbeat_of(name: str):
        sid = dep.summaries()[name].id
        with dep.engine.connect() as conn:
            return conn.execute(select(runs.c.heartbeat_at).where(runs.c.submission_id == sid)).scalar()

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
            heartbeats.add(heartbeat_of("other"))
        assert pings >= 3, f"{pings} watchdog pings during a {SLOW_STOP_S:g} s stop"
        assert len(heartbeats) >= 3, f"the other run's lease renewed {len(heartbeats) - 1} time(s)"
        assert d.stopped.wait(120), "the queue did not drain"
    finally:
        d.stop()
        sock.close()
    s = dep.summaries()
    assert s["cancelled"].state == "checking_error" and s["cancelled"].error_msg == control.CANCEL_MESSAGE
    assert s["other"].state == "scored"
