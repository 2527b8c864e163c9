"""``ramp-dispatcher status``: a real deployment, event resolution, and 100k submissions."""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import insert

from ramp_dispatcher.cli import main
from ramp_dispatcher.database import admin, migrate, queries, reports
from ramp_dispatcher.database import ramp_schema as rs
from ramp_dispatcher.database.dispatcher_schema import daemons, runs
from ramp_dispatcher.database.engine import make_engine
from ramp_dispatcher.demo import EVENT, PROBLEM, write_submission
from ramp_dispatcher.status import duration, format_report

from deployment import GOOD, RAISES, Deployment
from faults import Daemon, edit_event_config, kill_marked
from helpers import wait_for


def test_status_of_a_real_deployment(
    empty_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"good": GOOD, "raises": RAISES})
    dep.run_until_done()
    with dep.engine.begin() as conn:
        late = admin.add_submission(conn, EVENT, "demo_team", "late", write_submission(tmp_path / "late", GOOD))
        # a run in progress, as the conda worker records it
        now = queries.utcnow()
        busy = admin.add_submission(conn, EVENT, "demo_team", "busy", write_submission(tmp_path / "busy", GOOD))
        conn.execute(
            insert(runs).values(
                submission_id=busy, event_id=1, attempt=1, worker_type="conda", owner="h:1:x",
                status="running", handle={"pid": 31337, "log_path": "/x"}, created_at=now,
                started_at=now - dt.timedelta(seconds=95), lease_expires_at=now,
                cancel_requested_at=now,
            )
        )
        queries.set_state(conn, [busy], "training")
    s = dep.summaries()

    assert main(["status", "--config", str(dep.server_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["event"] == EVENT
    assert data["counts"]["by_state"] == {"new": 1, "scored": 1, "training": 1, "training_error": 1}
    assert (data["counts"]["waiting"], data["counts"]["running"], data["counts"]["done"],
            data["counts"]["failed"], data["counts"]["total"]) == (1, 1, 1, 1, 4)
    assert data["n_waiting"] == 1
    [waiting] = data["waiting"]
    assert (waiting["id"], waiting["name"], waiting["team"]) == (late, "late", "demo_team")
    assert waiting["age_s"] >= 0 and waiting["submitted_at"].endswith("+00:00")
    [running] = data["running"]
    assert (running["submission_id"], running["pid"], running["instance_id"]) == (busy, 31337, None)
    assert running["worker_type"] == "conda" and running["attempt"] == 1
    assert 90 <= running["elapsed_s"] < 600 and running["cancel_requested"] is True
    finished = {f["name"]: f for f in data["finished"]}
    assert set(finished) == {"good", "raises"}
    assert finished["good"]["outcome"] == "scored" and finished["good"]["failure_class"] is None
    assert finished["raises"]["outcome"] == "training_error"
    assert finished["raises"]["failure_class"] == "participant"
    assert finished["good"]["duration_s"] > 0
    assert finished["good"]["submission_id"] == s["good"].id
    assert "\n" not in finished["raises"]["message"]

    assert main(["status", "--config", str(dep.server_path), "--event", EVENT]) == 0
    text = capsys.readouterr().out
    assert f"Event '{EVENT}'" in text
    assert "waiting 1, running 1, done 1, failed 1 (total 4)" in text
    assert "demo_team/late" in text and "pid 31337" in text and "cancel requested" in text
    # elapsed of the running one: started 95 s before the insert, read a moment later
    assert re.search(r"\b1m (3[5-9]|4\d)s\b", text), text
    assert "participant" in text and "scored" in text

    # the event taken from the event config; --limit 0 keeps only counts and running
    assert main(["status", "--url", str(dep.engine.url.render_as_string(hide_password=False)),
                 "--event-config", str(dep.event_path), "--limit", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["waiting"] == [] and data["finished"] == [] and data["n_waiting"] == 1
    assert len(data["running"]) == 1


def test_event_resolution_errors(
    empty_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"good": GOOD})
    assert main(["status", "--config", str(dep.server_path), "--event", "nope"]) == 2
    assert f"event 'nope' is not in the database (events: {EVENT})" in capsys.readouterr().err
    with dep.engine.begin() as conn:
        admin.add_event(
            conn, problem_name=PROBLEM, event_name="iris_second", event_title="second",
            sandbox_name="starting_kit", submissions_dir=tmp_path / "second",
        )
    assert main(["status", "--config", str(dep.server_path)]) == 2
    err = capsys.readouterr().err
    assert "2 events" in err and "--event" in err
    assert main(["status", "--config", str(dep.server_path), "--event", "iris_second"]) == 0
    out = capsys.readouterr().out
    assert "Event 'iris_second'" in out and "none" in out
    assert main(["status", "--config", str(dep.server_path), "--limit", "-1", "--event", EVENT]) == 2


def test_status_needs_the_current_schema(empty_db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    engine = make_engine(empty_db_url)
    migrate.upgrade(engine, "0002_dispatcher_runs")
    engine.dispose()
    assert main(["status", "--url", empty_db_url]) == 2
    assert "db upgrade" in capsys.readouterr().err
    assert main(["cancel", "1", "--url", empty_db_url]) == 2


def test_status_table_escapes_control_characters(
    empty_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stored name with an escape sequence and a newline: the table shows them
    escaped on one row; the JSON keeps the exact name."""
    dep = Deployment(tmp_path / "deploy", empty_db_url, {})
    hostile = "\x1b[2J\x1b]0;pwn\x07a\nb\x08"  # clear screen, set title, newline
    with dep.engine.begin() as conn:
        sid = admin.add_submission(conn, EVENT, "demo_team", hostile, write_submission(tmp_path / "h", GOOD))
        now = queries.utcnow()
        conn.execute(
            insert(runs).values(
                submission_id=sid, event_id=1, attempt=1, worker_type="conda", owner="h:1:x",
                status="collected", outcome="training_error", failure_class="participant",
                message="boom\x1b[31m red", created_at=now, started_at=now, finished_at=now,
            )
        )

    assert main(["status", "--config", str(dep.server_path)]) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\x07" not in text and "\x08" not in text
    escaped = "demo_team/\\x1b[2J\\x1b]0;pwn\\x07a\\nb\\x08"
    rows = [line for line in text.splitlines() if escaped in line]
    assert len(rows) == 2, text  # waiting and last finished, each on one line
    assert any("boom\\x1b[31m red" in row for row in rows), text

    assert main(["status", "--config", str(dep.server_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [w["name"] for w in data["waiting"]] == [hostile]
    assert [f["name"] for f in data["finished"]] == [hostile]


def _daemons(capsys: pytest.CaptureFixture[str], dep: Deployment) -> list[dict]:
    assert main(["status", "--config", str(dep.server_path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["daemons"]


def _text(capsys: pytest.CaptureFixture[str], dep: Deployment) -> str:
    assert main(["status", "--config", str(dep.server_path)]) == 0
    return capsys.readouterr().out


def test_status_shows_serving_stale_and_stopped_daemons(
    empty_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real ``ramp-dispatcher run`` processes: one serving is shown serving with
    its breaker closed; killed (-9) it is shown stale, not serving; the next
    daemon to start removes its row; a clean stop removes the daemon's own."""
    dep = Deployment(tmp_path / "deploy", empty_db_url, {})
    edit_event_config(dep.event_path, "dispatcher", hunger_policy="sleep")
    marker = uuid.uuid4().hex
    procs: list[Daemon] = []

    def daemon(label: str) -> Daemon:
        procs.append(Daemon(dep, marker, tmp_path / f"{label}.log"))
        return procs[-1]

    def only(d: Daemon) -> list[dict] | None:
        rows = _daemons(capsys, dep)
        return rows if [r["pid"] for r in rows] == [d.pid] else None

    first = daemon("first")
    try:
        [row] = wait_for(lambda: only(first), 60, "the daemon's row")
        assert (row["pid"], row["worker_type"], row["stale"]) == (first.pid, "conda", False)
        assert row["host"] == socket.gethostname() and row["owner"].startswith(f"{row['host']}:{first.pid}:")
        assert row["breaker"] == {"state": "closed", "since": None, "cause": None, "failures": None,
                                  "next_probe_at": None}  # fmt: skip
        started = dt.datetime.fromisoformat(row["started_at"])
        assert started <= dt.datetime.fromisoformat(row["heartbeat_at"]) < dt.datetime.fromisoformat(row["stale_after"])
        text = _text(capsys, dep)
        assert "Daemons (1 serving):" in text and re.search(rf"{row['host']}:{first.pid}\s+conda\s.*\sserving\s+closed", text), text

        first.kill9()  # no clean stop: the row stays, and must not read as serving
        [row] = _daemons(capsys, dep)
        assert row["pid"] == first.pid and row["stale"] is True
        text = _text(capsys, dep)
        assert "Daemons (0 serving, 1 stale):" in text and "STALE" in text
        assert f"{row['host']}:{first.pid}: stale, it stopped without saying so" in text

        second = daemon("second")  # takes the event over: the stale row goes
        [row] = wait_for(lambda: only(second), 60, "the second daemon's row alone")
        assert row["stale"] is False
        second.send(signal.SIGTERM)
        assert second.wait_exit(60) == 0
        assert _daemons(capsys, dep) == []
        assert "Daemons (0 serving):\n  none: no daemon serves this event" in _text(capsys, dep)
    finally:
        for d in procs:
            d.stop_hard()
        kill_marked(marker)


def test_a_daemon_of_another_host_is_stale_once_its_heartbeat_lapsed(
    empty_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows as a daemon on another host leaves them (written here by hand: no
    second host in a test). Its process cannot be seen from here: only its
    ``stale_after`` tells; an open breaker is shown with its cause and probe."""
    dep = Deployment(tmp_path / "deploy", empty_db_url, {})
    now = queries.utcnow()
    breaker = dict(breaker_state="open", breaker_since=now - dt.timedelta(seconds=125),
                   breaker_cause="conda environment 'x' has no bin/ramp-test", breaker_failures=3,
                   breaker_next_probe_at=now + dt.timedelta(seconds=300))  # fmt: skip
    with dep.engine.begin() as conn:
        for owner, beat in (("alive.example:41:7:aa", now), ("lost.example:42:7:bb", now - dt.timedelta(minutes=5))):
            conn.execute(insert(daemons).values(
                owner=owner, event_id=1, worker_type="aws", started_at=now - dt.timedelta(hours=1),
                heartbeat_at=beat, stale_after=beat + dt.timedelta(seconds=60), **breaker,
            ))  # fmt: skip
    rows = {r["host"]: r for r in _daemons(capsys, dep)}
    assert (rows["alive.example"]["stale"], rows["lost.example"]["stale"]) == (False, True)
    assert rows["alive.example"]["pid"] == 41
    assert rows["alive.example"]["breaker"]["state"] == "open"
    assert rows["alive.example"]["breaker"]["failures"] == 3
    text = _text(capsys, dep)
    assert "Daemons (1 serving, 1 stale):" in text
    assert re.search(r"alive.example:41 .* serving\s+open 2m 0[5-9]s \(since .*\), next probe in (4m 5\ds|5m 00s)", text), text
    assert re.search(r"lost.example:42 .* 5m 0\ds ago\s+STALE\s+open when last seen", text), text
    assert ("alive.example:41: queue held, 3 infrastructure failures in a row; "
            "last: conda environment 'x' has no bin/ramp-test") in text  # fmt: skip
    assert "lost.example:42: stale" in text and "lost.example:42: queue held" not in text


def test_duration_format() -> None:
    assert [duration(x) for x in (None, 0, 45.4, 62, 3600 * 3 + 420, 86400 * 2 + 3600 * 4)] == [
        "-", "0s", "45s", "1m 02s", "3h 07m", "2d 04h"
    ]


# --------------------------------------------------------------------------- scale


N_SUBMISSIONS = 100_000
N_TEAMS = 50


def _bulk_event(engine) -> None:
    """One event with 100k submissions (most finished, each with its run), the
    columns our queries read plus the NOT NULL ones; other columns stay NULL."""
    t0 = dt.datetime(2024, 1, 1)
    with engine.begin() as conn:
        wf = conn.execute(insert(rs.workflows).values(name="Estimator")).inserted_primary_key[0]
        pb = conn.execute(
            insert(rs.problems).values(name="big", workflow_id=wf, path_ramp_kit="/k", path_ramp_data="/d")
        ).inserted_primary_key[0]
        # a second, small event: the reports must filter, not just count everything
        for name in ("big_event", "other_event"):
            conn.execute(
                insert(rs.events).values(
                    name=name, title=name, problem_id=pb, ramp_sandbox_name="starting_kit",
                    path_ramp_submissions="/s",
                )
            )
        conn.execute(
            insert(rs.teams),
            [{"id": i, "name": f"team{i}", "is_individual": True, "creation_timestamp": t0}
             for i in range(1, N_TEAMS + 2)],
        )
        conn.execute(
            insert(rs.event_teams),
            [{"id": i, "event_id": 1 if i <= N_TEAMS else 2, "team_id": i, "signup_timestamp": t0}
             for i in range(1, N_TEAMS + 2)],
        )

        def state(i: int) -> str:
            if i % 10 == 0:
                return "new"  # 10k waiting
            if i % 10 == 1:
                return "training_error"
            return "scored"

        subs = []
        for i in range(1, N_SUBMISSIONS + 1):
            team = i % N_TEAMS + 1
            subs.append({
                "id": i, "event_team_id": team, "name": f"s{i}", "hash_": f"h{i}",
                "submission_timestamp": t0 + dt.timedelta(seconds=i),
                "state": state(i), "queue_position": -1,
            })
        subs.append({  # the other event's one submission, waiting
            "id": N_SUBMISSIONS + 1, "event_team_id": N_TEAMS + 1, "name": "x", "hash_": "hx",
            "submission_timestamp": t0, "state": "new", "queue_position": -1,
        })
        conn.execute(insert(rs.submissions), subs)
        run_rows = []
        for i in range(1, N_SUBMISSIONS + 1):
            st = state(i)
            if st == "new":
                continue
            start = t0 + dt.timedelta(seconds=i)
            run_rows.append({
                "submission_id": i, "event_id": 1, "attempt": 1, "worker_type": "conda",
                "owner": "o", "status": "collected", "outcome": st,
                "failure_class": None if st == "scored" else "participant",
                "message": "" if st == "scored" else "exit 1\ntraceback",
                "created_at": start, "started_at": start,
                "finished_at": start + dt.timedelta(seconds=30),
                "collected_at": start + dt.timedelta(seconds=31),
            })
        conn.execute(insert(runs), run_rows)
        # a few running ones (executemany wants the same keys in every row)
        running = []
        for i in range(10, 60, 10):
            running.append({
                "submission_id": i, "event_id": 1, "attempt": 1, "worker_type": "conda",
                "owner": "o", "status": "running", "handle": {"pid": 1000 + i},
                "created_at": t0, "started_at": t0,
            })
        conn.execute(insert(runs), running)
        if conn.dialect.name == "postgresql":  # explicit ids above: move the sequences on
            for table in ("teams", "event_teams", "submissions"):
                conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
                )


def test_status_answers_fast_on_100k_submissions(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        migrate.upgrade(engine)
        _bulk_event(engine)
        reports.read_report(engine, "big_event", limit=20)  # warm: connection, caches
        t0 = time.perf_counter()
        report = reports.read_report(engine, "big_event", limit=20)
        text = format_report(report)
        elapsed = time.perf_counter() - t0
    finally:
        engine.dispose()
    assert elapsed < 1.0, f"status took {elapsed:.2f} s on {N_SUBMISSIONS} submissions"
    c = report.counts
    assert (c.waiting, c.done, c.failed, c.total) == (10_000, 80_000, 10_000, 100_000)
    assert report.n_waiting == 10_000
    assert [w.name for w in report.waiting[:3]] == ["s10", "s20", "s30"]  # claim order
    assert len(report.waiting) == 20 and len(report.finished) == 20
    assert {r.pid for r in report.running} == {1010, 1020, 1030, 1040, 1050}
    # newest collected first
    assert report.finished[0].name == f"s{N_SUBMISSIONS - 1}"
    assert report.finished[0].duration_s == 30
    assert "... and 9980 more" in text
