"""Leaderboards: ramp-board's cached pages refreshed by the daemon, at event scale.

Each size gets a fresh database filled like ``bench/scale.py`` (our migrations,
an iris event with 2 folds and 2 score types, about 95% of submissions
``scored``), plus one "probe" team that always holds the same 10 submissions
(8 scored, 1 failed, 1 waiting), whatever the event's size. Measured:

- a full event refresh (the event's seven tables) at about 1,000 scored
  submissions: ours (``update_event_leaderboards``) and ramp-database 0.10.1's
  ``update_leaderboards``, on the same database; and ours with every team's
  three tables too (the daemon's start-up refresh);
- one team's refresh (its three tables) at 100 and 10,000 submissions: the probe
  team, so the work is the same and only the event's size differs;
- result -> visible: a running :class:`LeaderboardService` on the 1,000-scored
  event; a waiting submission is marked scored (its score rows are already
  there), the dispatcher's ``request`` is called, and the time until the
  event's public page lists it is taken (p50 of several).

Targets: visible within 1 s (p50); one team's refresh at 10,000 within 2x of
its time at 100.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from pathlib import Path

from sqlalchemy import Engine, select, text

from .common import Row, backends_to_run, median, percentile, say, scratch_dir, settle, temp_database
from .scale import EVENT, _write_configs, populate

PROBE = "probe"
VISIBLE_TARGET_S = 1.0
FLAT_TARGET = 2.0


def _build(root: Path, url: str, n: int) -> tuple[Engine, int]:
    """An event of ``n`` submissions and the probe team; return (engine, its event_team id)."""
    from ramp_dispatcher.config import load_event_config, load_server_config
    from ramp_dispatcher.database import admin, migrate
    from ramp_dispatcher.database.engine import make_engine

    server_path, event_path = _write_configs(root, url)
    server = load_server_config(server_path)
    config = load_event_config(event_path, server)
    engine = make_engine(server.database_url)
    with contextlib.redirect_stdout(io.StringIO()):
        migrate.upgrade(engine)
    with engine.begin() as conn:
        admin.deploy_event(conn, config.ramp)
    populate(engine, n)
    with engine.begin() as conn:
        # the probe team takes over 10 submissions: 8 scored, 1 failed, 1 waiting
        team_id = conn.execute(text("SELECT max(id) + 1 FROM teams")).scalar_one()
        conn.execute(text(
            "INSERT INTO users (id, name, hashed_password, lastname, firstname, email, linkedin_url, "
            "twitter_url, facebook_url, google_url, github_url, website_url, hidden_notes, bio, "
            "is_want_news, access_level, signup_timestamp, is_authenticated) VALUES (:i, :n, 'x', "
            "'L', 'F', :e, '', '', '', '', '', '', '', '', false, 'user', CURRENT_TIMESTAMP, false)"
        ), {"i": team_id, "n": PROBE, "e": f"{PROBE}@example.org"})  # fmt: skip
        conn.execute(text(
            "INSERT INTO teams (id, name, admin_id, is_individual, creation_timestamp) "
            "VALUES (:i, :n, :i, true, CURRENT_TIMESTAMP)"
        ), {"i": team_id, "n": PROBE})  # fmt: skip
        et_id = conn.execute(text("SELECT max(id) + 1 FROM event_teams")).scalar_one()
        conn.execute(text(
            "INSERT INTO event_teams (id, event_id, team_id, is_active, signup_timestamp, approved) "
            "SELECT :et, id, :t, true, CURRENT_TIMESTAMP, true FROM events WHERE name = :ev"
        ), {"et": et_id, "t": team_id, "ev": EVENT})  # fmt: skip
        picks = []
        for state, count in (("scored", 8), ("training_error", 1), ("new", 1)):
            picks += conn.execute(text(
                "SELECT id FROM submissions WHERE state = :s AND name <> 'starting_kit' "
                "ORDER BY id LIMIT :c"
            ), {"s": state, "c": count}).scalars().all()  # fmt: skip
        conn.execute(
            text(f"UPDATE submissions SET event_team_id = :et WHERE id IN ({', '.join(map(str, picks))})"),
            {"et": et_id},
        )
    return engine, et_id


def _event_id(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT id FROM events WHERE name = :n"), {"n": EVENT}).scalar_one()


def _score_direction(engine: Engine) -> float:
    """Reading the official score's direction from the kit's problem.py (a child
    process importing ramp-workflow): once per daemon, cached afterwards."""
    from ramp_dispatcher.leaderboards import update as boards

    with engine.connect() as conn:
        ctx = boards.Context.load(conn, _event_id(engine))
        t0 = time.perf_counter()
        ctx.lower_is_better(conn)
        return time.perf_counter() - t0


def _ours_full(engine: Engine, teams: bool) -> float:
    """The event's seven tables (``teams``: and every team's three), from a
    fresh context: nothing cached but the score direction."""
    from ramp_dispatcher.leaderboards import update as boards

    event_id = _event_id(engine)
    t0 = time.perf_counter()
    with engine.begin() as conn:
        if teams:
            boards.update_all_leaderboards(conn, event_id)
        else:
            boards.update_event_leaderboards(conn, event_id)
    return time.perf_counter() - t0


def _theirs_full(engine: Engine) -> float:
    """ramp-database's ``update_leaderboards`` (the event's seven tables)."""
    from ramp_database.tools.leaderboard import update_leaderboards
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    raw = create_engine(engine.url)
    try:
        with warnings.catch_warnings(), Session(raw) as session:
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            update_leaderboards(session, EVENT)
            return time.perf_counter() - t0
    finally:
        raw.dispose()


def _team_refresh(engine: Engine, et_id: int, repeats: int) -> list[float]:
    from ramp_dispatcher.leaderboards import update as boards

    event_id = _event_id(engine)
    with engine.connect() as conn:
        ctx = boards.Context.load(conn, event_id)
        ctx.lower_is_better(conn)  # once per daemon: not part of a refresh
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with engine.begin() as conn:
            boards.update_team_leaderboards(conn, event_id, [et_id], ctx=ctx)
        times.append(time.perf_counter() - t0)
    return times[1:]  # the first fills the file-name cache, as the daemon's start-up does


def _visible_latency(engine: Engine, repeats: int) -> list[float]:
    from ramp_dispatcher.leaderboards.refresher import LeaderboardService

    with engine.connect() as conn:
        waiting = conn.execute(text(
            "SELECT id, name FROM submissions WHERE state = 'new' AND name <> 'starting_kit' "
            "ORDER BY id"
        )).all()[:repeats]  # fmt: skip
    service = LeaderboardService(engine.url, EVENT)
    service.start()
    try:
        assert service.wait_idle(600), "start-up refresh did not finish"
        latencies = []
        for sid, name in waiting:
            with engine.begin() as conn:  # what write_results leaves: the state, scores in place
                conn.execute(text("UPDATE submissions SET state = 'scored' WHERE id = :i"), {"i": sid})
                conn.execute(text("UPDATE submission_on_cv_folds SET state = 'scored' "
                                  "WHERE submission_id = :i"), {"i": sid})  # fmt: skip
            t0 = time.perf_counter()
            service.request([sid])
            while True:
                with engine.connect() as conn:
                    page = conn.execute(
                        select(text("public_leaderboard_html_no_links")).select_from(text("events"))
                    ).scalar()
                if page and f"<td>{name}</td>" in page:
                    break
                if time.perf_counter() - t0 > 60:
                    raise AssertionError(f"{name} not visible after 60 s")
                time.sleep(0.005)
            latencies.append(time.perf_counter() - t0)
            service.wait_idle(60)
        return latencies
    finally:
        service.close()


def run(quick: bool, backends: list[str]) -> list[Row]:
    rows: list[Row] = []
    repeats = 5 if quick else 10
    for backend in backends_to_run(backends):
        b = f"leaderboards[{backend}]"
        # ~1,000 scored: n - teams - 20 waiting, 95% of them scored
        with scratch_dir(f"boards-{backend}-1k") as root, temp_database(backend, root) as url:
            engine, _ = _build(root, url, 1_150)
            with engine.connect() as conn:
                n_scored = conn.execute(text("SELECT count(*) FROM submissions WHERE state = 'scored'")).scalar()
            probe = _score_direction(engine)
            say(f"  [{backend}] score direction from problem.py (once per daemon): {probe:.1f} s")
            rows.append(Row(b, "score direction from problem.py (once)", f"{probe:.1f} s"))
            settle()
            ours = _ours_full(engine, teams=False)
            everything = _ours_full(engine, teams=True)
            theirs = None if quick else _theirs_full(engine)
            say(f"  [{backend}] event refresh at {n_scored} scored: ours {ours:.2f} s"
                + ("" if theirs is None else f", ramp-database's update_leaderboards {theirs:.1f} s")
                + f"; ours with every team's tables too: {everything:.2f} s")  # fmt: skip
            rows.append(Row(b, f"event refresh, {n_scored} scored (ours)", f"{ours:.2f} s"))
            if theirs is not None:
                rows.append(Row(b, f"event refresh, {n_scored} scored (ramp-database)", f"{theirs:.1f} s"))
            rows.append(Row(b, f"event + every team, {n_scored} scored (ours)", f"{everything:.2f} s"))
            lat = _visible_latency(engine, repeats)
            p50 = median(lat)
            say(f"  [{backend}] result -> visible: p50 {p50 * 1000:.0f} ms, "
                f"p90 {percentile(lat, 90) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms")  # fmt: skip
            rows.append(Row(b, f"result -> visible p50 ({n_scored} scored)", f"{p50 * 1000:.0f} ms",
                            f"<= {VISIBLE_TARGET_S * 1000:.0f} ms", p50 <= VISIBLE_TARGET_S))  # fmt: skip
            engine.dispose()
        team = {}
        for n in (100, 10_000):
            with scratch_dir(f"boards-{backend}-{n}") as root, temp_database(backend, root) as url:
                engine, et_id = _build(root, url, n)
                settle()
                team[n] = median(_team_refresh(engine, et_id, repeats))
                engine.dispose()
            say(f"  [{backend}] one team's refresh (10 submissions) at {n} submissions: "
                f"median {team[n] * 1000:.1f} ms")  # fmt: skip
        growth = team[10_000] / team[100]
        rows.append(Row(b, "one team's refresh at 100", f"{team[100] * 1000:.1f} ms"))
        rows.append(Row(b, "one team's refresh at 10,000", f"{team[10_000] * 1000:.1f} ms",
                        f"<= {FLAT_TARGET:g}x of 100", growth <= FLAT_TARGET))  # fmt: skip
    return rows
