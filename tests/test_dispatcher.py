"""The daemon end to end: real ramp-test runs on the iris kit, SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from textwrap import dedent

import pytest
from sqlalchemy import func, select

from ramp_dispatcher.database.dispatcher_schema import runs
from ramp_dispatcher.database.ramp_schema import (
    submission_on_cv_folds,
)
from ramp_dispatcher.demo import write_submission

from deployment import GOOD, RAISES, SYNTAX_ERROR, Deployment, sleeper



def _fold_rows(dep: Deployment, submission_id: int):
    with dep.engine.connect() as conn:
        return conn.execute(
            select(submission_on_cv_folds)
            .where(submission_on_cv_folds.c.submission_id == submission_id)
            .order_by(submission_on_cv_folds.c.id)
        ).all()


def _csv_scores(path: Path) -> dict[str, dict[str, float]]:
    with open(path) as f:
        return {row["step"]: {k: float(v) for k, v in row.items() if k != "step"} for row in csv.DictReader(f)}


def test_batch_end_to_end(empty_db_url: str, tmp_path: Path) -> None:
    dep = Deployment(
        tmp_path / "deploy",
        empty_db_url,
        {"good": GOOD, "raises": RAISES, "syntax": SYNTAX_ERROR, "slow": sleeper(1)},
    )
    dep.run_until_done()
    s = dep.summaries()
    ramp = dep.event_config().ramp

    # the sandbox is never trained
    assert s["starting_kit"].state == "new"
    for name in ("good", "slow"):
        sub = s[name]
        assert sub.state == "scored", sub.error_msg
        assert sub.error_msg == ""
        assert sub.max_ram and sub.max_ram > 10  # MB: a Python with sklearn loaded
        assert sub.train_time is not None and sub.train_time > 0
        assert sub.queue_position == -1
        kept = ramp.predictions_dir / f"submission_{sub.id:09d}"
        # bagged scores as in the run's own CSV: the largest n_bag per step
        with open(kept / "bagged_scores.csv") as f:
            rows = list(csv.DictReader(f))
        for step in ("valid", "test"):
            last = max((r for r in rows if r["step"] == step), key=lambda r: int(r["n_bag"]))
            assert sub.scores["acc"][0 if step == "valid" else 1] == pytest.approx(float(last["acc"]))
        # per-fold times and state copied to the folds
        folds = _fold_rows(dep, sub.id)
        assert [f.state for f in folds] == ["scored"] * len(folds)
        for i, fold in enumerate(folds):
            t = float((kept / f"fold_{i}" / "train_time").read_text())
            assert fold.train_time == pytest.approx(t)
        # the working copy is gone, the log is kept
        assert not (dep.submission_dir(sub.id) / "training_output").exists()
        assert (ramp.logs_dir / f"submission_{sub.id:09d}" / "log").stat().st_size > 0
    assert s["slow"].train_time >= 1.0

    raises = s["raises"]
    assert raises.state == "training_error"
    assert "ValueError: this model refuses to learn" in raises.error_msg
    assert "\x1b" not in raises.error_msg
    assert [f.state for f in _fold_rows(dep, raises.id)] == ["training_error"] * 3
    assert s["syntax"].state == "training_error"
    assert "SyntaxError" in s["syntax"].error_msg

    # each submission ran exactly once: participant errors are not retried
    with dep.engine.connect() as conn:
        attempts = dict(conn.execute(select(runs.c.submission_id, func.count()).group_by(runs.c.submission_id)).all())
    assert attempts == {s[n].id: 1 for n in ("good", "raises", "syntax", "slow")}


def test_scores_match_csv_per_fold(empty_db_url: str, tmp_path: Path) -> None:
    from ramp_dispatcher.database.ramp_schema import (
        event_score_types,
        submission_score_on_cv_folds,
        submission_scores,
    )

    dep = Deployment(tmp_path / "deploy", empty_db_url, {"good": GOOD})
    dep.run_until_done()
    sub = dep.summaries()["good"]
    kept = dep.event_config().ramp.predictions_dir / f"submission_{sub.id:09d}"
    folds = _fold_rows(dep, sub.id)
    with dep.engine.connect() as conn:
        rows = conn.execute(
            select(
                submission_score_on_cv_folds.c.submission_on_cv_fold_id,
                event_score_types.c.name,
                submission_score_on_cv_folds.c.train_score,
                submission_score_on_cv_folds.c.valid_score,
                submission_score_on_cv_folds.c.test_score,
            )
            .join(submission_scores, submission_scores.c.id == submission_score_on_cv_folds.c.submission_score_id)
            .join(event_score_types, event_score_types.c.id == submission_scores.c.event_score_type_id)
            .where(submission_scores.c.submission_id == sub.id)
        ).all()
    by_fold = {f.id: i for i, f in enumerate(folds)}
    assert len(rows) == len(folds) * 2
    for r in rows:
        expected = _csv_scores(kept / f"fold_{by_fold[r.submission_on_cv_fold_id]}" / "scores.csv")
        assert r.train_score == pytest.approx(expected["train"][r.name])
        assert r.valid_score == pytest.approx(expected["valid"][r.name])
        assert r.test_score == pytest.approx(expected["test"][r.name])


def test_missing_file_and_broken_environment(empty_db_url: str, tmp_path: Path) -> None:
    dep = Deployment(
        tmp_path / "deploy", empty_db_url, {"good": GOOD, "nofile": GOOD},
        dispatcher_extra="max_attempts: 2\nretry_delay: 0",
    )
    s = dep.summaries()
    # a submission whose estimator.py vanished from disk: ramp-test fails on it
    (dep.submission_dir(s["nofile"].id) / "estimator.py").unlink()
    dep.run_until_done()
    s = dep.summaries()
    assert s["good"].state == "scored"
    assert s["nofile"].state == "training_error"
    assert "estimator.py" in s["nofile"].error_msg

    # an environment that does not exist: our side, retried, then checking_error
    text_ = dep.event_path.read_text().replace(f"conda_env: {sys.prefix}", "conda_env: /nonexistent/env")
    dep.event_path.write_text(text_)
    from ramp_dispatcher.database import admin

    with dep.engine.begin() as conn:
        admin.add_submission(conn, "iris_demo", "demo_team", "late", write_submission(tmp_path / "late", GOOD))
    dep.run_until_done()
    late = dep.summaries()["late"]
    assert late.state == "checking_error"
    assert "platform" in late.error_msg and "/nonexistent/env" in late.error_msg
    with dep.engine.connect() as conn:
        classes = conn.execute(
            select(runs.c.attempt, runs.c.outcome, runs.c.failure_class)
            .where(runs.c.submission_id == late.id)
            .order_by(runs.c.attempt)
        ).all()
    assert [tuple(c) for c in classes] == [
        (1, "retry", "infrastructure"),
        (2, "checking_error", "infrastructure"),
    ]


def test_malformed_output_is_reported_not_fatal(empty_db_url: str, tmp_path: Path) -> None:
    """Stand-in ramp-test (named so): runs the real one, then damages its output."""
    env = tmp_path / "standin-env"
    (env / "bin").mkdir(parents=True)
    real = Path(sys.prefix) / "bin" / "ramp-test"
    script = env / "bin" / "ramp-test"
    script.write_text(
        "#!/bin/sh\n"
        f'"{real}" "$@" || exit $?\n'
        'sub="$2"; out=""\n'
        'while [ $# -gt 0 ]; do [ "$1" = --ramp-submission-dir ] && out="$2"; shift; done\n'
        'case "$sub" in\n'
        f'  *) if grep -q MISSING_FOLD "$out/$sub/estimator.py"; then rm -r "$out/$sub/training_output/fold_1"; fi\n'
        '     if grep -q BAD_CSV "$out/$sub/estimator.py"; then echo "step,acc" > "$out/$sub/training_output/fold_0/scores.csv"; echo "train,notanumber" >> "$out/$sub/training_output/fold_0/scores.csv"; fi\n'
        '     if grep -q NO_OUTPUT "$out/$sub/estimator.py"; then rm -r "$out/$sub/training_output"; fi;;\n'
        "esac\n"
    )
    script.chmod(0o755)
    dep = Deployment(
        tmp_path / "deploy", empty_db_url,
        {
            "missing_fold": dedent(GOOD) + "# MISSING_FOLD\n",
            "bad_csv": dedent(GOOD) + "# BAD_CSV\n",
            "no_output": dedent(GOOD) + "# NO_OUTPUT\n",
            "good": GOOD,
        },
        dispatcher_extra="max_attempts: 1",
    )
    # The stand-in calls the real ramp-test of another prefix, which a sandbox
    # would not show; and the parser's own checks are tested, not the rescoring
    # (test_sandbox covers a damaged output in the sandbox).
    dep.event_path.write_text(dep.event_path.read_text().replace(
        f"conda_env: {sys.prefix}",
        f"conda_env: {env}\n  sandbox: none\n  verify_scores: false",
    ))
    dep.run_until_done()
    s = dep.summaries()
    assert s["good"].state == "scored"
    assert s["missing_fold"].state == "checking_error", s["missing_fold"].error_msg
    assert "fold_1" in s["missing_fold"].error_msg
    assert s["bad_csv"].state == "checking_error"
    assert "fold_0/scores.csv" in s["bad_csv"].error_msg
    # ramp-test said success but left nothing: the platform's problem, not the participant's
    assert s["no_output"].state == "checking_error"
    assert "training_output" in s["no_output"].error_msg


def test_timeout_kills_the_whole_tree(empty_db_url: str, tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    # ramp-workflow refuses sources naming subprocess/Popen/open: build the names at run time
    hog = f"""\
        import importlib, pathlib, time
        from sklearn.linear_model import LogisticRegression

        class Hang(LogisticRegression):
            def fit(self, X, y):
                sp = importlib.import_module("sub" + "process")
                child = getattr(sp, "Po" + "pen")(["sleep", "300"], start_new_session=True)
                pathlib.Path({str(pidfile)!r}).write_text(str(child.pid))
                time.sleep(300)

        def get_estimator():
            return Hang()
        """
    # the limit is 10x the good run's time alone (~3 s): a loaded machine
    # does not make the good run a timeout too
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"hang": hog, "good": GOOD}, timeout=30)
    # the supervisor's own tree stop, without the sandbox's PID namespace (test_sandbox: with it)
    dep.set_worker(sandbox="none")
    started = time.monotonic()
    dep.run_until_done()
    assert time.monotonic() - started < 250  # the hang sleeps 300 s: it was stopped, not waited for
    s = dep.summaries()
    assert s["good"].state == "scored"
    assert s["hang"].state == "training_error"
    assert "time limit of 30 s" in s["hang"].error_msg
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_queue_positions_and_one_at_a_time(empty_db_url: str, tmp_path: Path) -> None:
    dep = Deployment(
        tmp_path / "deploy", empty_db_url,
        {"a": sleeper(3), "b": GOOD, "c": GOOD, "d": GOOD}, n_workers=1,
    )
    d = dep.dispatcher()
    d.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            s = dep.summaries()
            if s["a"].state == "training":
                break
            time.sleep(0.2)
        s = dep.summaries()
        assert s["a"].state == "training"
        assert [s[n].queue_position for n in "abcd"] == [-1, 1, 2, 3]
        assert s["starting_kit"].queue_position == -1
        assert d.stopped.wait(120)
    finally:
        d.stop()
    s = dep.summaries()
    assert all(s[n].state == "scored" for n in "abcd")
    assert all(s[n].queue_position == -1 for n in "abcd")


def test_two_daemons_never_run_the_same_submission(empty_db_url: str, tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "deploy", empty_db_url, {f"s{i}": GOOD for i in range(6)}, n_workers=2)
    first, second = dep.dispatcher(), dep.dispatcher()
    first.start()
    second.start()
    try:
        assert first.stopped.wait(180) and second.stopped.wait(180)
    finally:
        first.stop()
        second.stop()
    s = dep.summaries()
    assert all(s[f"s{i}"].state == "scored" for i in range(6))
    with dep.engine.connect() as conn:
        rows = conn.execute(select(runs.c.submission_id, runs.c.owner)).all()
    assert sorted(r.submission_id for r in rows) == sorted(s[f"s{i}"].id for i in range(6))
    assert {r.owner for r in rows} <= {first.owner, second.owner}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_cli_daemon_idles_while_runs_go_and_stops_on_sigterm(empty_db_url: str, tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"slow": sleeper(8)})
    dep.event_path.write_text(dep.event_path.read_text().replace("hunger_policy: exit", "hunger_policy: sleep"))
    exe = Path(sys.prefix) / "bin" / "ramp-dispatcher"
    proc = subprocess.Popen(
        [str(exe), "run", "--config", str(dep.server_path), "--event-config", str(dep.event_path)],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while dep.summaries()["slow"].state != "training" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dep.summaries()["slow"].state == "training"
        cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(4)
        cpu = _cpu_seconds(proc.pid) - cpu0
        wall = time.monotonic() - t0
        # ramp-engine 0.10.1 burns 100% of a core here; we sleep between jobs
        assert cpu / wall < 0.05, f"daemon used {cpu:.2f} s CPU in {wall:.1f} s"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.communicate()[1]
    assert "sent_to_training" in stderr and "stopping" in stderr


def test_postgresql_notify_wakes_the_daemon(tmp_path: Path) -> None:
    from conftest import create_pg_database, drop_pg_database

    url = create_pg_database()
    try:
        dep = Deployment(tmp_path / "deploy", url, {})
        # polling every 5 minutes: only NOTIFY can explain a fast start
        dep.event_path.write_text(
            dep.event_path.read_text().replace("poll_interval: 1", "poll_interval: 300")
            .replace("hunger_policy: exit", "hunger_policy: sleep")
        )
        d = dep.dispatcher()
        d.start()
        try:
            time.sleep(1.5)  # let the first claim cycle pass and the listener start
            from ramp_dispatcher.database import admin

            with dep.engine.begin() as conn:
                admin.add_submission(conn, "iris_demo", "demo_team", "news", write_submission(tmp_path / "news", GOOD))
            t0 = time.monotonic()
            while dep.summaries()["news"].state == "new" and time.monotonic() - t0 < 10:
                time.sleep(0.05)
            assert dep.summaries()["news"].state != "new"
            assert time.monotonic() - t0 < 5
        finally:
            d.stop()
            dep.engine.dispose()
    finally:
        drop_pg_database(url)


def test_database_unreachable_at_start_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yml"
    cfg.write_text("sqlalchemy:\n  drivername: sqlite\n  database: empty.sqlite\n")
    ev = tmp_path / "event.yml"
    ev.write_text(
        "ramp: {problem_name: iris, event_name: nope, event_title: t, event_is_public: true}\n"
        f"worker: {{worker_type: conda, conda_env: {sys.prefix}}}\n"
    )
    exe = Path(sys.prefix) / "bin" / "ramp-dispatcher"
    out = subprocess.run(
        [str(exe), "run", "--config", str(cfg), "--event-config", str(ev)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert "db upgrade" in out.stderr and "Traceback" not in out.stderr
