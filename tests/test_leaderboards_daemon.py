"""The daemon keeps ramp-board's cached leaderboards current by itself.

Real daemon, real ``ramp-test`` on the iris kit, both backends: what the pages
hold after a run, while a submission trains, after a restart on stale pages,
with the built-in refresh turned off, and when a refresh cannot finish.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select, text, update

from ramp_dispatcher.database import ramp_schema as rs
from ramp_dispatcher.demo import EVENT
from ramp_dispatcher.leaderboards import data, update as boards
from ramp_dispatcher.leaderboards.refresher import LeaderboardService

from deployment import GOOD, RAISES, Deployment, run_in_thread, sleeper
from helpers import wait_for

STALE = "stale"


def _tables(dep: Deployment) -> dict:
    e, et = rs.events, rs.event_teams
    with dep.engine.connect() as conn:
        event = conn.execute(
            select(*[e.c[c] for c in boards.EVENT_COLUMNS]).where(e.c.name == EVENT)
        ).one()
        teams = conn.execute(select(et.c.id, *[et.c[c] for c in boards.TEAM_COLUMNS])).all()
    return {
        "event": dict(zip(boards.EVENT_COLUMNS, event)),
        "teams": {r[0]: dict(zip(boards.TEAM_COLUMNS, r[1:])) for r in teams},
    }


def _fresh(dep: Deployment) -> dict:
    """What the tables must hold now: computed from the rows, in a rolled-back transaction."""
    with dep.engine.connect() as conn:
        with conn.begin() as tx:
            event_id = data.event_id_by_name(conn, EVENT)
            event = boards.update_event_leaderboards(conn, event_id)
            teams = boards.update_team_leaderboards(conn, event_id, data.event_team_ids(conn, event_id))
            tx.rollback()
    return {"event": event, "teams": teams}


def test_pages_are_fresh_when_the_daemon_exits(empty_db_url: str, tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "d", empty_db_url, {"good": GOOD, "broken": RAISES})
    dep.run_until_done()
    states = {n: s.state for n, s in dep.summaries().items()}
    assert (states["good"], states["broken"]) == ("scored", "training_error")
    pages = _tables(dep)
    assert pages == _fresh(dep)
    event = pages["event"]
    assert ">good</a>" in event["public_leaderboard_html_with_links"]
    assert ">good</a>" in event["private_leaderboard_html"]
    assert "<td>good</td>" in event["public_competition_leaderboard_html"]  # no links there
    assert ">broken</a>" in event["failed_leaderboard_html"]
    assert event["new_leaderboard_html"] is None
    (team,) = pages["teams"].values()
    assert ">good</a>" in team["leaderboard_html"] and ">broken</a>" in team["failed_leaderboard_html"]
    assert team["new_leaderboard_html"] is None


def test_training_shows_on_the_new_tables(empty_db_url: str, tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "d", empty_db_url, {"slow": sleeper(6)}, n_workers=1)
    before = _tables(dep)
    # add_submission wrote the "new" tables (waiting, no queue position yet)
    assert "<td>new</td>" in before["event"]["new_leaderboard_html"]
    d = dep.dispatcher()
    thread = run_in_thread(d)
    try:
        wait_for(lambda: "<td>training</td>" in (_tables(dep)["event"]["new_leaderboard_html"] or ""), 60.0)
        (team,) = _tables(dep)["teams"].values()
        assert "<td>training</td>" in team["new_leaderboard_html"]
        assert ">slow</a>" in team["new_leaderboard_html"]
        assert not d.stopped.is_set()  # seen while it trains
        assert d.stopped.wait(120)
    finally:
        d.stop()
        thread.join(5)
    pages = _tables(dep)
    assert pages["event"]["new_leaderboard_html"] is None
    assert ">slow</a>" in pages["event"]["public_leaderboard_html_no_links"].replace("<td>slow</td>", ">slow</a>")


def test_start_up_refreshes_everything(empty_db_url: str, tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "d", empty_db_url, {"good": GOOD})
    dep.run_until_done()
    fresh = _tables(dep)
    # pages left stale (e.g. results written while another daemon had no refresh)
    with dep.engine.begin() as conn:
        conn.execute(update(rs.events).values({c: STALE for c in boards.EVENT_COLUMNS}))
        conn.execute(update(rs.event_teams).values({c: STALE for c in boards.TEAM_COLUMNS}))
    d = dep.dispatcher()
    d.start()  # nothing to run: hunger_policy exit stops it at once
    try:
        assert d.stopped.wait(60)
    finally:
        d.stop()  # the start-up refresh completes before stop returns
    assert _tables(dep) == fresh


def test_refresh_can_be_turned_off_and_the_hook_still_runs(empty_db_url: str, tmp_path: Path) -> None:
    marker = tmp_path / "hook-ran"
    hook = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"]
    extra = f"leaderboard_refresh: false\nleaderboard_command: {hook!r}\nleaderboard_interval: 0"
    dep = Deployment(tmp_path / "d", empty_db_url, {"good": GOOD}, dispatcher_extra=extra)
    assert dep.event_config().dispatcher.leaderboard_refresh is False
    before = _tables(dep)
    d = dep.run_until_done()
    assert dep.summaries()["good"].state == "scored"
    assert _tables(dep) == before  # untouched: "good" is still listed as new
    assert "<td>new</td>" in before["event"]["new_leaderboard_html"]
    assert d.leaderboard.refreshes == 0
    assert marker.exists()  # the admin's hook ran (at start-up at least)


def test_hook_runs_after_the_built_in_refresh(empty_db_url: str, tmp_path: Path) -> None:
    out = tmp_path / "hook.txt"
    # the hook sees the refreshed page: it runs after the built-in refresh
    code = (
        "import sqlite3, sys\n"
        "from sqlalchemy import create_engine, text\n"
        "e = create_engine(sys.argv[1])\n"
        "with e.connect() as c:\n"
        "    html = c.execute(text('SELECT public_leaderboard_html_no_links FROM events')).scalar()\n"
        "open(sys.argv[2], 'a').write(str(html and 'good' in html) + '\\n')\n"
    )
    dep = Deployment(tmp_path / "d", empty_db_url, {"good": GOOD})
    url = dep.engine.url.render_as_string(hide_password=False)
    config = dep.event_config()
    from dataclasses import replace

    config = replace(
        config,
        dispatcher=replace(
            config.dispatcher,
            leaderboard_command=(sys.executable, "-c", code, url, str(out)),
            leaderboard_interval=0.0,
        ),
    )
    from ramp_dispatcher.dispatcher import Dispatcher

    d = Dispatcher.for_event(dep.engine, config)
    d.start()
    try:
        assert d.stopped.wait(120)
        wait_for(lambda: out.exists() and "True" in out.read_text(), 60.0)
    finally:
        d.stop()


def test_requests_never_wait_and_shutdown_is_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # SQLite only: the test holds SQLite's write lock to stall the refresh
    dep = Deployment(tmp_path / "d", f"sqlite:///{tmp_path / 'ramp.sqlite'}", {"good": GOOD})
    service = LeaderboardService(dep.engine.url, EVENT)
    raw = dep.engine.raw_connection()  # another writer holds the database
    raw.driver_connection.isolation_level = None
    raw.cursor().execute("BEGIN EXCLUSIVE")
    try:
        service.start()
        t0 = time.monotonic()
        for i in range(1000):
            service.request([i])
            service.request([i], new_only=True)
        assert time.monotonic() - t0 < 1.0  # never waited on the stalled refresh
        assert service.busy
        t0 = time.monotonic()
        caplog.set_level("WARNING", logger="ramp_dispatcher.leaderboards.refresher")
        service.close(wait=1.0)
        assert time.monotonic() - t0 < 10.0  # close() waited its 1 s, not for the stalled refresh
        assert "not finished" in caplog.text
    finally:
        raw.cursor().execute("ROLLBACK")
        raw.close()


def test_a_failing_refresh_is_logged_and_retried(
    empty_db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dep = Deployment(tmp_path / "d", empty_db_url, {"good": GOOD})
    caplog.set_level("INFO", logger="ramp_dispatcher.leaderboards.refresher")
    service = LeaderboardService(dep.engine.url, "no_such_event")
    try:
        service.start()
        wait_for(lambda: service.failures >= 1, 20.0)
        assert "leaderboard refresh failed" in caplog.text
        assert service.busy  # kept, to be tried again
    finally:
        service.close(wait=1.0)
    ok = LeaderboardService(dep.engine.url, EVENT)
    try:
        ok.start()
        assert ok.wait_idle(60) and ok.failures == 0 and ok.refreshes == 1
    finally:
        ok.close()
    with dep.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM events")).scalar() == 1


