"""``ramp-dispatcher run`` before it serves: the worker is checked (a wrong
``conda_env`` exits 2 naming file and key, and no submission is touched), and
a database that is not there yet is waited for, not a traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

from deployment import GOOD, Deployment
from faults import (
    DISPATCHER_EXE,
    Daemon,
    PrivatePostgres,
    edit_event_config,
    require_private_postgres,
)


def _standin_conda(folder: Path, envs: list[Path]) -> Path:
    """A stand-in for ``conda`` (not the real tool, which cannot be installed
    here): it answers ``info --envs --json`` with ``envs`` and nothing else."""
    folder.mkdir(parents=True)
    (folder / "listing.json").write_text(json.dumps({"envs": [str(p) for p in envs]}))
    script = folder / "conda"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$1 $2 $3" = "info --envs --json" ] && exec cat "{folder}/listing.json"\n'
        "exit 2\n"
    )
    script.chmod(0o755)
    return script


def test_wrong_conda_env_exits_2_naming_file_and_key(empty_db_url: str, tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"good": GOOD})
    conda = _standin_conda(tmp_path / "conda", [tmp_path / "envs" / "ramp-iris"])
    env = {**os.environ, "CONDA_EXE": str(conda)}

    for conda_env, expected in (
        ("ramp-irs", "conda environment 'ramp-irs' not found (known: ramp-iris)"),
        (str(tmp_path / "gone"), f"conda environment '{tmp_path / 'gone'}': "
                                 f"'{tmp_path / 'gone'}' does not exist"),
    ):
        edit_event_config(dep.event_path, "worker", conda_env=conda_env)
        out = subprocess.run(
            [str(DISPATCHER_EXE), "run", "--config", str(dep.server_path),
             "--event-config", str(dep.event_path)],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert f"{dep.event_path}: key 'worker.conda_env': {expected}" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    # nothing was claimed: the submission waits for a corrected config
    assert dep.summaries()["good"].state == "new"


def test_database_that_comes_up_later_is_waited_for(tmp_path: Path) -> None:
    """The daemon starts while PostgreSQL is down: it logs that once, tells
    systemd (STATUS, start timeout extended), and serves once it is up."""
    require_private_postgres()
    pg = PrivatePostgres()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    daemon: Daemon | None = None
    try:
        pg.init()
        dep = Deployment(tmp_path / "deploy", pg.create_database("ramp_late"), {"good": GOOD})
        dep.engine.dispose()
        pg.stop("fast")

        notify.bind(str(tmp_path / "notify.sock"))
        notify.settimeout(30)
        os.environ["NOTIFY_SOCKET"] = str(tmp_path / "notify.sock")
        try:
            daemon = Daemon(dep, "startup-test", tmp_path / "daemon.log")
        finally:
            del os.environ["NOTIFY_SOCKET"]
        daemon.wait_log("database unavailable at start-up", timeout=60)
        message = notify.recv(4096).decode().split("\n")
        assert message[0].startswith("EXTEND_TIMEOUT_USEC=") and int(message[0].split("=")[1]) > 0
        assert message[1].startswith("STATUS=waiting for the database"), message
        time.sleep(4)  # a few retries (1 s, 2 s, ...) while it is down
        assert daemon.alive()

        pg.start()
        assert daemon.wait_exit(timeout=180) == 0, daemon.log()[-3000:]  # hunger_policy: exit
        log = daemon.log()
        assert log.count("database unavailable at start-up") == 1, log
        assert "database reachable after" in log
        assert "Traceback" not in log, log
        assert dep.summaries()["good"].state == "scored"
        statuses = []
        notify.settimeout(0.1)
        try:
            while True:
                statuses.append(notify.recv(4096).decode())
        except (TimeoutError, socket.timeout):
            pass
        assert any("READY=1" in m for m in statuses), statuses
    finally:
        if daemon is not None:
            daemon.stop_hard()
        notify.close()
        pg.destroy()
