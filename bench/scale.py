"""Scale: the dispatcher's database work on events of 1k, 10k and 100k submissions.

Each size gets a fresh database (our migrations, an iris event with 2 CV folds
and 2 score types) filled by bulk inserts in ramp-board's schema: users, teams,
event_teams with their sandbox (``new``, never trained), submissions (about 95%
``scored``, 5% ``training_error``, the 20 newest ``new`` and waiting), their
fold, score, fold-score and file rows, and one collected ``dispatcher_runs``
row per trained submission, as a daemon that ran the event leaves behind.
PostgreSQL gets ``VACUUM ANALYZE`` afterwards (what autovacuum would do after a
bulk load); SQLite is left as ramp-board leaves it (no ANALYZE).

Measured in this process, on a real ``Dispatcher`` whose worker is a stand-in
(start() returns at once, the run never ends by itself):

- a claim cycle that claims one submission (``Dispatcher.claim_cycle``:
  heartbeat, adopt orphans, claim, queue positions, start, mark running);
- an idle claim cycle (all slots busy: heartbeat, adopt, queue positions);
- writing one result (``queries.write_results``, 2 folds x 2 scores);
- ``status``, if the package has such a command.

SQL statements per operation are counted with a ``before_cursor_execute``
listener (SQLite's ``BEGIN IMMEDIATE`` included). Targets: <= 20 ms per cycle
and <= 2x growth from 1k to 100k. Where an operation misses, the plan of its
slowest statement is printed (EXPLAIN (ANALYZE, BUFFERS) on PostgreSQL).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import hashlib
import inspect
import io
import logging
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from sqlalchemy import Engine, select, text

from ramp_dispatcher.workers.base import Handle, RunOutcome, RunRequest, Wake, Worker

from .common import (
    Row,
    Statement,
    backends_to_run,
    count_statements,
    explain,
    median,
    one_line,
    say,
    scratch_dir,
    settle,
    sqlalchemy_section,
    temp_database,
)

EVENT = "iris_scale"
N_NEW = 20
CYCLE_TARGET_MS = 20.0
GROWTH_TARGET = 2.0


class StandInWorker(Worker):
    """STAND-IN worker (benchmarks only): starts nothing, returns at once, and
    its runs never finish by themselves, so a cycle's time is the database's."""

    type_name = "standin"

    def start(self, request: RunRequest, wake: Wake) -> Handle:
        return {"standin": True}

    def check(self, request: RunRequest, handle: Handle) -> RunOutcome | None:
        return None

    def cleanup(self, request: RunRequest, handle: Handle) -> None:
        pass


# --------------------------------------------------------------------------- building the event


def _write_configs(root: Path, url: str) -> tuple[Path, Path]:
    from ramp_dispatcher.demo import write_iris_kit

    write_iris_kit(root / "ramp-kits" / "iris", root / "ramp-data" / "iris", n_folds=2)
    server = root / "config.yml"
    server.write_text(f"sqlalchemy:\n  {sqlalchemy_section(url)}\n")
    event = root / "events" / EVENT / "config.yml"
    event.parent.mkdir(parents=True)
    event.write_text(textwrap.dedent(f"""\
        ramp:
          problem_name: iris
          event_name: {EVENT}
          event_title: Iris at scale
          event_is_public: true
        worker:
          worker_type: conda
          conda_env: {sys.prefix}
        dispatcher:
          n_workers: 1
          poll_interval: 5
          time_between_collection: 1
        """))  # fmt: skip
    return server, event


def _sqlite_time(value: dt.datetime) -> str:
    # SQLAlchemy's SQLite DateTime format: always with microseconds
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


def bulk_insert(engine: Engine, table: str, columns: Sequence[str], rows: list[tuple]) -> None:
    """COPY on PostgreSQL, executemany on SQLite; values already in column order."""
    if not rows:
        return
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if engine.dialect.name == "postgresql":
            buf = io.StringIO()
            writer = csv.writer(buf)
            for row in rows:
                writer.writerow(_pg_csv(v) for v in row)
            buf.seek(0)
            # rows are consistent by construction: skip the per-row foreign-key
            # triggers (and the NOTIFY trigger) for this load only
            cur.execute("SET LOCAL session_replication_role = replica")
            cur.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)", buf)
        else:
            marks = ", ".join("?" for _ in columns)
            # our engine puts pysqlite in autocommit: one transaction, not one per row
            cur.execute("BEGIN")
            cur.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                [tuple(_sqlite_value(v) for v in row) for row in rows],
            )
        cur.close()
        raw.commit()
    finally:
        raw.close()


def _pg_csv(value: Any) -> Any:
    if value is None:
        return ""  # unquoted empty field: NULL in COPY's csv format
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ")
    return value


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, dt.datetime):
        return _sqlite_time(value)
    return value


def populate(engine: Engine, n: int) -> dict[str, int]:
    """Fill the event with ``n`` submissions (sandboxes included); return row counts."""
    from ramp_dispatcher.database.ramp_schema import NumpyBlob

    with engine.connect() as conn:
        event_id = conn.execute(text("SELECT id FROM events WHERE name = :n"), {"n": EVENT}).scalar_one()
        fold_ids = conn.execute(
            text("SELECT id FROM cv_folds WHERE event_id = :e ORDER BY id"), {"e": event_id}
        ).scalars().all()
        score_type_ids = conn.execute(
            text("SELECT id FROM event_score_types WHERE event_id = :e ORDER BY id"), {"e": event_id}
        ).scalars().all()
        element_id = conn.execute(text(
            "SELECT we.id FROM workflow_elements we JOIN problems p ON p.workflow_id = we.workflow_id"
        )).scalars().first()  # fmt: skip
        type_ext_id = conn.execute(text(
            "SELECT fte.id FROM submission_file_type_extensions fte "
            "JOIN extensions e ON e.id = fte.extension_id WHERE e.name = 'py'"
        )).scalars().first()  # fmt: skip
    assert len(fold_ids) == 2 and len(score_type_ids) == 2, (fold_ids, score_type_ids)
    blob = NumpyBlob().process_bind_param([0.9, 0.91], None)  # ramp-board's bagging curve
    n_teams = max(10, n // 20)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    start = now - dt.timedelta(seconds=10 * n + 3600)

    users, teams, event_teams = [], [], []
    for t in range(1, n_teams + 1):
        signup = start + dt.timedelta(seconds=t)
        users.append((t, f"user{t}", "x", "L", "F", f"user{t}@example.org", "", "", "", "", "",
                      "", "", "", True, "user", signup, False))  # fmt: skip
        teams.append((t, f"user{t}", t, True, signup))
        event_teams.append((t, event_id, t, True, "starting_kit", signup, True, None, None, None))

    subs, folds, scores, fold_scores, files, runs = [], [], [], [], [], []
    fold_row = score_row = fold_score_row = 0
    trained = n - n_teams - N_NEW
    for i in range(1, n + 1):
        if i <= n_teams:  # each team's sandbox: new, never trained
            team, name, state = i, "starting_kit", "new"
            stamp = start + dt.timedelta(seconds=i)
        else:
            k = i - n_teams
            team, name = (k % n_teams) + 1, f"sub_{k}"
            stamp = start + dt.timedelta(seconds=n_teams + 10 * k)
            if k > trained:
                state = "new"
            else:
                state = "training_error" if k % 20 == 0 else "scored"
        waiting_pos = i - (n - N_NEW) if state == "new" and name != "starting_kit" else -1
        done = state in ("scored", "training_error")
        error = "Your submission failed: ValueError (exited with code 1)" if state == "training_error" else ""
        subs.append((
            i, team, name, hashlib.sha1(f"{i}".encode()).hexdigest(), stamp,
            stamp + dt.timedelta(seconds=1) if done else None,
            stamp + dt.timedelta(seconds=2) if done else None,
            0.0, 0.0, "live", state, waiting_pos, error, True, True, True, "",
            1.2, 0.1, 0.05, 0.1, 0.01, 0.01, 150.0 if done else 0.0, f"user{team}",
        ))  # fmt: skip
        my_scores = []
        for est in score_type_ids:
            score_row += 1
            my_scores.append(score_row)
            scores.append((score_row, i, est, 0.9, 0.91, blob, blob))
        for cv in fold_ids:
            fold_row += 1
            folds.append((fold_row, i, cv, 0.0, False, 0.6, 0.05, 0.05,
                          "scored" if state == "scored" else state, error))  # fmt: skip
            for sid in my_scores:
                fold_score_row += 1
                fold_scores.append((fold_score_row, fold_row, sid, 0.95, 0.9, 0.91))
        files.append((i, i, element_id, type_ext_id))
        if done:
            started = stamp + dt.timedelta(seconds=2)
            runs.append((len(runs) + 1, i, event_id, 1, "conda", "old-daemon:1:0", "collected",
                         None, state, "participant" if state == "training_error" else None,
                         None, 150, stamp + dt.timedelta(seconds=1), started,
                         started + dt.timedelta(seconds=3), started + dt.timedelta(seconds=3),
                         started + dt.timedelta(seconds=3), started + dt.timedelta(seconds=60),
                         None))  # fmt: skip

    plan = [
        ("users", ["id", "name", "hashed_password", "lastname", "firstname", "email", "linkedin_url",
                   "twitter_url", "facebook_url", "google_url", "github_url", "website_url",
                   "hidden_notes", "bio", "is_want_news", "access_level", "signup_timestamp",
                   "is_authenticated"], users),
        ("teams", ["id", "name", "admin_id", "is_individual", "creation_timestamp"], teams),
        ("event_teams", ["id", "event_id", "team_id", "is_active", "last_submission_name",
                         "signup_timestamp", "approved", "leaderboard_html",
                         "failed_leaderboard_html", "new_leaderboard_html"], event_teams),
        ("submissions", ["id", "event_team_id", "name", "hash_", "submission_timestamp",
                         "sent_to_training_timestamp", "training_timestamp", "contributivity",
                         "historical_contributivity", "type", "state", "queue_position",
                         "error_msg", "is_valid", "is_to_ensemble", "is_in_competition", "notes",
                         "train_time_cv_mean", "valid_time_cv_mean", "test_time_cv_mean",
                         "train_time_cv_std", "valid_time_cv_std", "test_time_cv_std", "max_ram",
                         "user_name"], subs),
        ("submission_scores", ["id", "submission_id", "event_score_type_id", "valid_score_cv_bag",
                               "test_score_cv_bag", "valid_score_cv_bags", "test_score_cv_bags"],
         scores),
        ("submission_on_cv_folds", ["id", "submission_id", "cv_fold_id", "contributivity", "best",
                                    "train_time", "valid_time", "test_time", "state", "error_msg"],
         folds),
        ("submission_score_on_cv_folds", ["id", "submission_on_cv_fold_id", "submission_score_id",
                                          "train_score", "valid_score", "test_score"], fold_scores),
        ("submission_files", ["id", "submission_id", "workflow_element_id",
                              "submission_file_type_extension_id"], files),
        ("dispatcher_runs", ["id", "submission_id", "event_id", "attempt", "worker_type", "owner",
                             "status", "handle", "outcome", "failure_class", "message",
                             "max_ram_mb", "created_at", "started_at", "finished_at",
                             "collected_at", "heartbeat_at", "lease_expires_at", "retry_after"],
         runs),
    ]  # fmt: skip
    for table, columns, rows in plan:
        bulk_insert(engine, table, columns, rows)
    with engine.begin() as conn:
        conn.execute(text("UPDATE events SET n_submissions = :n WHERE id = :e"),
                     {"n": n - n_teams, "e": event_id})  # fmt: skip
        if engine.dialect.name == "postgresql":
            for table, _, _ in plan:
                conn.execute(text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))"
                ))  # fmt: skip
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    return {table: len(rows) for table, _, rows in plan}


# --------------------------------------------------------------------------- measuring


def training_results(score_names: Sequence[str]) -> Any:
    """A parsed 2-fold result, as parse_training_output would return it."""
    from ramp_dispatcher.results import BaggedScores, FoldResult, TrainingResults

    folds = [
        FoldResult(index=i, train_time=0.5 + i, valid_time=0.05, test_time=0.04,
                   scores={s: {"train": 0.99, "valid": 0.9, "test": 0.91} for s in score_names})
        for i in range(2)
    ]  # fmt: skip
    bagged = BaggedScores(
        last={s: {"valid": 0.92, "test": 0.93} for s in score_names},
        all_bags={s: {"valid": [0.9, 0.92], "test": [0.91, 0.93]} for s in score_names},
    )
    return TrainingResults(folds=folds, bagged=bagged)


@dataclass
class Op:
    """Timings of one operation over repeats, with the statements of the slowest."""

    ms: list[float] = field(default_factory=list)
    statements: list[int] = field(default_factory=list)
    commits: list[int] = field(default_factory=list)
    slowest: Statement | None = None
    slowest_ms: float = 0.0

    def add(self, seconds: float, log: Any) -> None:
        self.ms.append(1000 * seconds)
        self.statements.append(log.count)
        self.commits.append(log.commits)
        if 1000 * seconds >= self.slowest_ms:
            self.slowest_ms = 1000 * seconds
            self.slowest = log.slowest()

    @property
    def median(self) -> float:
        return median(self.ms)

    def stmts(self) -> str:
        """Statements (and commits) per operation, as a range over the repeats."""

        def span(values: list[int]) -> str:
            lo, hi = min(values, default=0), max(values, default=0)
            return str(lo) if lo == hi else f"{lo}-{hi}"

        return f"{span(self.statements)} stmts/{span(self.commits)} commits"


def timed(engine: Engine | type[Engine], op: Op, fn: Callable[[], Any]) -> Any:
    with count_statements(engine) as log:
        t0 = time.perf_counter()
        value = fn()
        op.add(time.perf_counter() - t0, log)
    return value


def by_name(fn: Callable[..., Any], **values: Any) -> Any:
    """Call a ``queries`` function with the arguments it takes, by name: their
    signatures still change (an ``owner`` argument was added while this was
    written), and a benchmark should not break on such an addition."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in values.items() if k in params})


def _trivial_write(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE events SET n_submissions = n_submissions WHERE name = :n"), {"n": EVENT})


def status_argv(server: Path, event: Path) -> list[str] | None:
    """The ``status`` command line, if the CLI has one (it is being written)."""
    from ramp_dispatcher import cli

    parser = cli.build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found = subparsers[0].choices.get("status") if subparsers else None
    if found is None:
        return None
    options = {o for a in found._actions for o in a.option_strings}
    argv = ["status"]
    if "--config" in options:
        argv += ["--config", str(server)]
    if "--event-config" in options:
        argv += ["--event-config", str(event)]
    elif "--event" in options:
        argv += ["--event", EVENT]
    return argv


@dataclass
class SizeResult:
    n: int
    build_s: float
    startup: Op
    claim: Op
    idle: Op
    write: Op
    status: Op | None
    status_note: str
    engine_name: str
    floor: Op  # one trivial write transaction: this machine's round trip + commit
    plans: dict[str, str] = field(default_factory=dict)


def measure(root: Path, url: str, n: int, repeats: int) -> SizeResult:
    from ramp_dispatcher import cli
    from ramp_dispatcher.config import load_event_config, load_server_config
    from ramp_dispatcher.database import admin, migrate, queries
    from ramp_dispatcher.database.engine import make_engine
    from ramp_dispatcher.dispatcher import Dispatcher

    server_path, event_path = _write_configs(root, url)
    server = load_server_config(server_path)
    config = load_event_config(event_path, server)
    engine = make_engine(server.database_url)
    try:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            migrate.upgrade(engine)
        with engine.begin() as conn:
            admin.deploy_event(conn, config.ramp)
        counts = populate(engine, n)
        build_s = time.perf_counter() - t0
        say(f"    built {n} submissions in {build_s:.1f} s (" + ", ".join(
            f"{k} {v}" for k, v in counts.items() if k != "users") + ")")  # fmt: skip
        # the daemon checks each claimed submission's folder before starting it
        for sid in range(n - N_NEW + 1, n + 1):
            (config.ramp.submissions_dir / f"submission_{sid:09d}").mkdir(parents=True, exist_ok=True)

        dispatcher = Dispatcher(engine, config, StandInWorker())
        with engine.begin() as conn:
            # what Dispatcher.start() does before it starts its scheduler
            dispatcher._event = queries.load_event(conn, EVENT)
        event = dispatcher.event
        results = training_results(event.score_names)
        startup, claim, idle, write = Op(), Op(), Op(), Op()

        def full_refresh() -> None:
            with engine.begin() as conn:
                queries.update_queue_positions(conn, event, full=True)

        def write_one(run: Any) -> None:
            with engine.begin() as conn:
                by_name(queries.write_results, conn=conn, event=event, run_id=run.run_id,
                        owner=dispatcher.owner, submission_id=run.submission_id,
                        results=results, max_ram_mb=150.0)  # fmt: skip

        settle()
        timed(engine, startup, full_refresh)
        floor = Op()
        for _ in range(20):
            timed(engine, floor, lambda: _trivial_write(engine))
        # one round untimed first: a running daemon has its statements compiled
        for i in range(repeats + 1):
            target = (claim, idle, write) if i else (Op(), Op(), Op())
            timed(engine, target[0], dispatcher.claim_cycle)
            if len(dispatcher.active) != 1:
                raise RuntimeError(f"a claim cycle started {len(dispatcher.active)} runs, not 1")
            timed(engine, target[1], dispatcher.claim_cycle)  # slots full: nothing to claim
            run = next(iter(dispatcher.active.values()))
            with engine.begin() as conn:
                by_name(queries.mark_finished, conn=conn, run_id=run.run_id, owner=dispatcher.owner,
                        failure_class=None, message="", succeeded=True)  # fmt: skip
            timed(engine, target[2], lambda: write_one(run))
            dispatcher.active.clear()
        state = _states(engine, [r for r in range(n - N_NEW + 1, n + 1)])
        expected = repeats + 1
        if state.get("scored", 0) != expected:
            say(f"    WARNING: {state} among the {N_NEW} new submissions, expected {expected} scored")

        status: Op | None = None
        argv = status_argv(server_path, event_path)
        note = "not measured: status command not present"
        if argv is not None:
            status = Op()
            note = " ".join(argv[:1] + [a if not a.startswith("/") else Path(a).name for a in argv[1:]])
            for _ in range(3):
                out = io.StringIO()
                with contextlib.redirect_stdout(out), _logging_kept():
                    # the command makes its own engine: count on every engine
                    code = timed(Engine, status, lambda: cli.main(argv))
                if code not in (0, None):
                    note = f"status exited with {code}"
                    status = None
                    break
        result = SizeResult(n, build_s, startup, claim, idle, write, status, note, engine.dialect.name,
                            floor)  # fmt: skip
        for label, op in (("claim", claim), ("idle", idle), ("write", write), ("startup", startup)):
            if op.slowest is not None:
                try:
                    result.plans[label] = explain(engine, op.slowest)
                except Exception as exc:  # a plan is a diagnosis, never a reason to fail
                    result.plans[label] = f"(no plan: {exc})"
        return result
    finally:
        engine.dispose()


@contextlib.contextmanager
def _logging_kept():
    """The CLI configures logging for its process; give ours back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _states(engine: Engine, ids: list[int]) -> dict[str, int]:
    from sqlalchemy import func

    from ramp_dispatcher.database.ramp_schema import submissions as S

    with engine.connect() as conn:
        return dict(conn.execute(
            select(S.c.state, func.count()).where(S.c.id.in_(ids)).group_by(S.c.state)
        ).all())  # fmt: skip


# --------------------------------------------------------------------------- reporting


def run(quick: bool, backends: list[str]) -> list[Row]:
    sizes = [1_000, 10_000] if quick else [1_000, 10_000, 100_000]
    repeats = 5 if quick else 8
    rows: list[Row] = []
    for backend in backends_to_run(backends):
        results = []
        for n in sizes:
            say(f"  [{backend}] {n} submissions:")
            with scratch_dir(f"scale-{backend}-{n}") as root, temp_database(backend, root) as url:
                r = measure(root, url, n, repeats)
            results.append(r)
            say(f"    claim cycle (claims 1): median {r.claim.median:.1f} ms, min {min(r.claim.ms):.1f}, max {max(r.claim.ms):.1f} ms, "
                f"{r.claim.stmts()}")  # fmt: skip
            say(f"    idle cycle (slots full): median {r.idle.median:.1f} ms, min {min(r.idle.ms):.1f}, max {max(r.idle.ms):.1f} ms, "
                f"{r.idle.stmts()}")  # fmt: skip
            say(f"    write one result: median {r.write.median:.1f} ms, min {min(r.write.ms):.1f}, max {max(r.write.ms):.1f} ms, "
                f"{r.write.stmts()}")  # fmt: skip
            say(f"    start-up full queue refresh: {r.startup.median:.1f} ms; one trivial write "
                f"transaction: median {r.floor.median:.2f} ms")  # fmt: skip
            say("    status: " + (f"median {r.status.median:.1f} ms, {r.status.stmts()} "
                                    f"({r.status_note})" if r.status else r.status_note))  # fmt: skip
            for label, op in (("claim", r.claim), ("idle", r.idle), ("write", r.write)):
                if op.slowest is not None:
                    say(f"      slowest statement of {label} ({1000 * op.slowest.seconds:.1f} ms): "
                        f"{one_line(op.slowest.sql)}")  # fmt: skip
        rows += _rows(backend, results)
    return rows


def _rows(backend: str, results: list[SizeResult]) -> list[Row]:
    b = f"scale[{backend}]"
    rows = []
    first, last = results[0], results[-1]
    for r in results:
        k = f"{r.n // 1000}k"
        for label, op, targeted in (("claim cycle (claims 1)", r.claim, True),
                                    ("idle cycle (slots full)", r.idle, True),
                                    ("write one result", r.write, False)):  # fmt: skip
            ok = op.median <= CYCLE_TARGET_MS if targeted else None
            rows.append(Row(b, f"{k}: {label}",
                            f"{op.median:.1f} ms (min {min(op.ms):.1f}), {op.stmts()}",
                            f"<= {CYCLE_TARGET_MS:.0f} ms" if targeted else "", ok))  # fmt: skip
        if r is first:  # the floor does not depend on the event's size
            rows.append(Row(b, "one trivial write transaction (floor)", f"{r.floor.median:.2f} ms"))
        if r.status is not None:
            rows.append(Row(b, f"{k}: status", f"{r.status.median:.1f} ms, {r.status.stmts()}"))
        else:
            rows.append(Row(b, f"{k}: status", r.status_note))
    span = f"{first.n // 1000}k->{last.n // 1000}k"
    for label, get in (("claim cycle", lambda r: r.claim), ("idle cycle", lambda r: r.idle),
                       ("write one result", lambda r: r.write),
                       ("status", lambda r: r.status)):  # fmt: skip
        a, z = get(first), get(last)
        if a is None or z is None or first is last:
            continue
        growth = z.median / a.median
        rows.append(Row(b, f"growth {span}: {label}", f"{growth:.2f}x", f"<= {GROWTH_TARGET:.0f}x",
                        growth <= GROWTH_TARGET))  # fmt: skip
        if growth > GROWTH_TARGET or z.median > CYCLE_TARGET_MS and label != "write one result":
            key = {"claim cycle": "claim", "idle cycle": "idle", "write one result": "write"}.get(label)
            plan = last.plans.get(key or "")
            if plan and z.slowest is not None:
                say(f"  [{backend}] {label} misses at {last.n}: slowest statement "
                    f"({1000 * z.slowest.seconds:.1f} ms):\n    {one_line(z.slowest.sql, 400)}\n"
                    + textwrap.indent(plan, "      "))  # fmt: skip
    return rows
