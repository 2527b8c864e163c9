"""The leaderboard refresher: coalescing, failures, and the real ramp-database CLI."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from ramp_dispatcher.config import ConfigError, Section
from ramp_dispatcher.database.ramp_schema import events
from ramp_dispatcher.leaderboard import (
    DEFAULT_INTERVAL,
    LeaderboardRefresher,
    leaderboard_settings,
    parse_command,
)

from deployment import GOOD, Deployment
from helpers import wait_for

LOGGER = "ramp_dispatcher.leaderboard"


def recorder(path: Path, sleep: float = 0.0) -> list[str]:
    """A command that appends its start time to ``path`` (then sleeps)."""
    code = (
        "import sys, time\n"
        "with open(sys.argv[1], 'a') as f: f.write(repr(time.time()) + '\\n')\n"
        f"time.sleep({sleep})\n"
    )
    return [sys.executable, "-c", code, str(path)]


def starts(path: Path) -> list[float]:
    return [float(x) for x in path.read_text().split()] if path.exists() else []


# --------------------------------------------------------------------------- coalescing


def test_burst_of_requests_is_coalesced(tmp_path: Path) -> None:
    out = tmp_path / "starts"
    refresher = LeaderboardRefresher(recorder(out), interval=1.5)
    try:
        t0 = time.time()
        for _ in range(10):  # 10 results written within one second
            refresher.request()
            time.sleep(0.1)
        # request() returned at once each time: the command ran off this thread
        assert time.time() - t0 < 1.5
        wait_for(lambda: len(starts(out)) >= 2 and not refresher.busy)
        time.sleep(2.0)  # nothing else is coming
        runs = starts(out)
        # one run at the first request, exactly one more for the nine others
        assert len(runs) == 2, runs
        assert runs[1] - runs[0] >= 1.5 - 0.05  # spaced by the interval
        assert refresher.runs == 2 and refresher.failures == 0
        assert refresher.last_success is not None
    finally:
        refresher.close()


def test_requests_during_a_run_make_exactly_one_more(tmp_path: Path) -> None:
    out = tmp_path / "starts"
    refresher = LeaderboardRefresher(recorder(out, sleep=1.0), interval=0)
    try:
        refresher.request()
        wait_for(lambda: len(starts(out)) == 1)
        threads = [threading.Thread(target=refresher.request) for _ in range(8)]
        for t in threads:  # from several threads at once: request() is thread-safe
            t.start()
        for t in threads:
            t.join()
        wait_for(lambda: len(starts(out)) == 2 and not refresher.busy)
        time.sleep(0.5)
        runs = starts(out)
        assert len(runs) == 2
        assert runs[1] - runs[0] >= 1.0  # never overlapping the previous run
    finally:
        refresher.close()


def test_no_command_is_a_no_op() -> None:
    refresher = LeaderboardRefresher(None, interval=1)
    refresher.request()
    assert not refresher.busy and refresher.runs == 0
    refresher.close()


# --------------------------------------------------------------------------- failures


def test_failures_are_logged_with_stderr_and_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger=LOGGER)
    fail = [sys.executable, "-c", "import sys; print('line one', file=sys.stderr); "
            "print('database is locked, giving up', file=sys.stderr); sys.exit(3)"]
    refresher = LeaderboardRefresher(fail, interval=0)
    try:
        refresher.request()
        wait_for(lambda: refresher.failures == 1 and not refresher.busy)
        assert "exited with status 3" in caplog.text
        assert "database is locked, giving up" in caplog.text
        # still serving: the next request runs again
        refresher.request()
        wait_for(lambda: refresher.failures == 2 and not refresher.busy)
    finally:
        refresher.close()

    caplog.clear()
    missing = LeaderboardRefresher([str(tmp_path / "no-such-ramp-database"), "x"], interval=0)
    missing.request()
    wait_for(lambda: missing.failures == 1 and not missing.busy)
    missing.close()
    assert "could not start" in caplog.text and "no-such-ramp-database" in caplog.text


def test_timeout_kills_the_command(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger=LOGGER)
    pidfile = tmp_path / "grandchild.pid"
    # the command starts a grandchild that would outlive a plain kill of the child
    code = (
        "import os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(60); os._exit(0)\n"
        f"open({str(pidfile)!r}, 'w').write(str(pid))\n"
        "print('computing...', file=sys.stderr, flush=True)\n"
        "time.sleep(60)\n"
    )
    refresher = LeaderboardRefresher([sys.executable, "-c", code], interval=0, timeout=1.0)
    try:
        t0 = time.monotonic()
        refresher.request()
        wait_for(lambda: refresher.failures == 1 and not refresher.busy)
        assert time.monotonic() - t0 < 10
        assert "timed out after 1 s" in caplog.text and "computing..." in caplog.text
        grandchild = int(pidfile.read_text())
        wait_for(lambda: not _alive(grandchild), timeout=5)
    finally:
        refresher.close()


def test_close_stops_a_running_command(tmp_path: Path) -> None:
    out = tmp_path / "starts"
    refresher = LeaderboardRefresher(recorder(out, sleep=60), interval=0)
    refresher.request()
    wait_for(lambda: len(starts(out)) == 1)
    t0 = time.monotonic()
    refresher.close(wait=0.5)
    assert time.monotonic() - t0 < 6
    assert not refresher.busy
    refresher.request()  # after close: ignored
    time.sleep(0.3)
    assert len(starts(out)) == 1


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --------------------------------------------------------------------------- config


def test_parse_command_forms() -> None:
    assert parse_command(None, "f: key 'x'") is None
    assert parse_command("", "f: key 'x'") is None
    assert parse_command([], "f: key 'x'") is None
    assert parse_command(
        "ramp-database update-leaderboards --config '/srv/my ramp/config.yml' --event iris", "w"
    ) == ["ramp-database", "update-leaderboards", "--config", "/srv/my ramp/config.yml",
          "--event", "iris"]
    # no shell: metacharacters are plain arguments
    assert parse_command("refresh; rm -rf / $HOME", "w") == ["refresh;", "rm", "-rf", "/", "$HOME"]
    assert parse_command(["/usr/bin/refresh", "--event", 42], "w") == [
        "/usr/bin/refresh", "--event", "42"
    ]
    with pytest.raises(ConfigError, match="f.yml: key 'dispatcher.leaderboard_command'.*cannot split"):
        parse_command("refresh 'unclosed", "f.yml: key 'dispatcher.leaderboard_command'")
    with pytest.raises(ConfigError, match="list of strings, got dict"):
        parse_command(["a", {"b": 1}], "w")
    with pytest.raises(ConfigError, match="a string or a list"):
        parse_command({"cmd": "x"}, "w")


def test_leaderboard_settings_from_a_section(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.yml"
    section = Section(path, "dispatcher", {"leaderboard_command": ["true"], "leaderboard_interval": 5})
    s = leaderboard_settings(section)
    assert s.command == ("true",) and s.interval == 5.0
    section.warn_unknown()
    assert "unknown key" not in caplog.text  # both keys are marked as known

    defaults = leaderboard_settings(Section(path, "dispatcher", {}))
    assert defaults.command is None and defaults.interval == DEFAULT_INTERVAL
    assert defaults.refresh is True  # the built-in refresh is on unless turned off
    off = Section(path, "dispatcher", {"leaderboard_refresh": False})
    assert leaderboard_settings(off).refresh is False
    off.warn_unknown()
    assert "unknown key" not in caplog.text
    with pytest.raises(ConfigError, match="leaderboard_refresh' must be true or false"):
        leaderboard_settings(Section(path, "dispatcher", {"leaderboard_refresh": "sometimes"}))

    with pytest.raises(ConfigError, match="leaderboard_interval' must not be negative"):
        leaderboard_settings(Section(path, "dispatcher", {"leaderboard_interval": -1}))
    with pytest.raises(ConfigError, match="leaderboard_interval' must be a number"):
        leaderboard_settings(Section(path, "dispatcher", {"leaderboard_interval": "soon"}))

    caplog.clear()
    leaderboard_settings(Section(path, "dispatcher", {"leaderboard_command": "no-such-tool-xyz"}))
    assert "not on PATH" in caplog.text


# --------------------------------------------------------------------------- real CLI


def test_real_ramp_database_update_leaderboards(empty_db_url: str, tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"forest_one": GOOD})
    dep.run_until_done()
    assert dep.summaries()["forest_one"].state == "scored"

    ramp_database = Path(sys.prefix) / "bin" / "ramp-database"
    assert ramp_database.exists(), "ramp-database (the test extra) is not installed"
    # ramp-database's own reading of the server config (ramp-utils) wants all of
    # username, password, host and port, even for SQLite, and builds its URL from
    # the section as is: with SQLAlchemy 2.1 plain "postgresql" means psycopg 3,
    # so name psycopg2. The dispatcher reads such a file too (tested below).
    url = dep.engine.url
    config = tmp_path / "ramp-board-config.yml"
    config.write_text(
        "sqlalchemy:\n"
        f"  drivername: {url.drivername}\n"
        f"  username: {url.username or 'null'}\n"
        "  password: null\n"
        f"  host: {url.host or 'null'}\n"
        f"  port: {url.port or 'null'}\n"
        f"  database: {url.database}\n"
    )
    from ramp_dispatcher.config import load_server_config

    assert load_server_config(config).database_url == url
    command = [str(ramp_database), "update-leaderboards", "--config", str(config),
               "--event", "iris_demo"]
    refresher = LeaderboardRefresher(command, interval=60, cwd=dep.root)
    try:
        refresher.request()
        wait_for(lambda: refresher.runs == 1 and not refresher.busy, timeout=120)
    finally:
        refresher.close()
    assert refresher.failures == 0
    with dep.engine.connect() as conn:
        row = conn.execute(
            select(events.c.public_leaderboard_html_no_links, events.c.private_leaderboard_html)
            .where(events.c.name == "iris_demo")
        ).one()
    for html in row:
        assert html and "forest_one" in html
