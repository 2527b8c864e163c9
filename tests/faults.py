"""Fault injection helpers for the reliability tests.

Everything here drives *real* processes: the daemon is the installed
``ramp-dispatcher run`` command in a subprocess, runs are the conda worker's
detached supervisors running the real ``ramp-test``, and the database is a real
PostgreSQL (or SQLite) database.

Process hygiene: every process a test starts carries a test-specific marker in
its environment (:data:`MARKER_VAR`); the daemon passes its environment on to
the supervisors, and they to ``ramp-test``. :func:`marked_pids` finds whatever
is left of a test, whatever its parent, by reading ``/proc/<pid>/environ``.

Gated submissions: :func:`gated_source` is an estimator whose ``fit`` waits
until a gate file exists (bounded), so a test decides when a run finishes
instead of guessing with sleeps; at import it leaves one file named after the
ramp-test process's pid in a counter folder, so a test can tell how many
ramp-test processes ran the submission.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from sqlalchemy import Engine, create_engine, select, text

from ramp_dispatcher.database.clock import utcnow as naive_utcnow  # noqa: F401  (test_reliability imports it)
from ramp_dispatcher.database.dispatcher_schema import runs
from ramp_dispatcher.database.ramp_schema import (
    submission_on_cv_folds,
    submission_score_on_cv_folds,
    submission_scores,
    submissions,
)
from ramp_dispatcher.demo import EVENT, TEAM, write_submission

from deployment import Deployment
from helpers import free_port, wait_for

MARKER_VAR = "RAMP_DISPATCHER_FAULT_TEST"
DISPATCHER_EXE = Path(sys.prefix) / "bin" / "ramp-dispatcher"
RAMP_TEST_EXE = Path(sys.prefix) / "bin" / "ramp-test"
#: how long a gated fit waits at most for its gate (a test that forgets to
#: open it must not leave a process for long)
GATE_MAX_WAIT_S = 90.0


# --------------------------------------------------------------------------- sources


def gated_source(gate: Path, counter_dir: Path, max_wait: float = GATE_MAX_WAIT_S) -> str:
    """A correct estimator whose fit waits for ``gate`` to exist.

    At import it touches ``counter_dir/<pid>``: one file per ramp-test process
    that ran it (a re-import in the same process touches the same file).
    """
    return f"""\
import os
import pathlib
import time

from sklearn.linear_model import LogisticRegression

_RUNS = pathlib.Path({str(counter_dir)!r})
_RUNS.mkdir(parents=True, exist_ok=True)
(_RUNS / str(os.getpid())).touch()


class Gated(LogisticRegression):
    def fit(self, X, y):
        deadline = time.monotonic() + {float(max_wait)!r}
        gate = pathlib.Path({str(gate)!r})
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return super().fit(X, y)


def get_estimator():
    return Gated(max_iter=500)
"""


#: grows by 50 MB every 0.1 s (pages touched) up to 3 GB, then sleeps
MEMORY_HOG = """\
import time

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin


class Hog(ClassifierMixin, BaseEstimator):
    def fit(self, X, y):
        blocks = []
        for _ in range(60):
            blocks.append(np.ones(50 * 2**20 // 8))
            time.sleep(0.1)
        time.sleep(60)
        return self


def get_estimator():
    return Hog()
"""


# --------------------------------------------------------------------------- processes


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (R, S, Z, T, ...), None when gone."""
    data = _read(f"/proc/{pid}/stat")
    if not data:
        return None
    return data.rsplit(b")", 1)[1].split()[0].decode()


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None when gone."""
    data = _read(f"/proc/{pid}/stat")
    if not data:
        return None
    return int(data.rsplit(b")", 1)[1].split()[19])


def is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    return proc_state(pid) not in (None, "Z", "X")


def marked_pids(marker: str) -> list[int]:
    """Processes (zombies excluded) whose environment holds the test marker."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        env = _read(f"/proc/{entry}/environ")
        if needle in env.split(b"\0") and is_alive(int(entry)):
            found.append(int(entry))
    return sorted(found)


def cmdline(pid: int) -> list[str]:
    return [a.decode(errors="replace") for a in _read(f"/proc/{pid}/cmdline").split(b"\0") if a]


def ramp_test_pids(marker: str, submission_name: str) -> list[int]:
    """Live ramp-test processes of one submission (``submission_%09d``)."""
    out = []
    for pid in marked_pids(marker):
        argv = cmdline(pid)
        if any(a.endswith("/ramp-test") for a in argv[:2]) and submission_name in argv:
            out.append(pid)
    return out


def kill_marked(marker: str) -> list[int]:
    """SIGKILL everything left of a test (a safety net for teardown)."""
    killed: list[int] = []
    for _ in range(20):
        pids = marked_pids(marker)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        killed += pids
        time.sleep(0.1)
    return sorted(set(killed))


class Daemon:
    """``ramp-dispatcher run`` in a subprocess, its log in a file."""

    def __init__(self, dep: Deployment, marker: str, log_path: Path):
        self.log_path = log_path
        env = dict(os.environ)
        env[MARKER_VAR] = marker
        env["PYTHONUNBUFFERED"] = "1"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(DISPATCHER_EXE), "run",
                    "--config", str(dep.server_path),
                    "--event-config", str(dep.event_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )  # fmt: skip
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, needle: str, timeout: float, count: int = 1) -> str:
        def seen() -> bool:
            if self.proc.poll() is not None and self.log().count(needle) < count:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) before logging {needle!r}:\n"
                    + self.log()[-3000:]
                )
            return self.log().count(needle) >= count

        wait_for(seen, timeout, f"{needle!r} in the daemon log", interval=0.05)
        return self.log()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        """SIGKILL, and reap it: /proc/<pid> must disappear, as under systemd."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"daemon {self.pid} still running after {timeout:g} s:\n" + self.log()[-3000:]
            ) from None

    def stop_hard(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def owner_pid(owner: str) -> str:
    """The pid part of an owner id ``host:pid:uuid``."""
    return owner.split(":")[1]


# --------------------------------------------------------------------------- database


def edit_event_config(path: Path, section: str, **values: Any) -> None:
    """Set keys of one section of the event config (None removes a key)."""
    data = yaml.safe_load(path.read_text())
    sec = data.setdefault(section, {})
    for key, value in values.items():
        if value is None:
            sec.pop(key, None)
        else:
            sec[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def add_submission(dep: Deployment, name: str, source: str) -> int:
    from ramp_dispatcher.database import admin

    folder = write_submission(dep.root / "incoming-late" / name, source)
    with dep.engine.begin() as conn:
        return admin.add_submission(conn, EVENT, TEAM, name, folder)


def run_rows(engine: Engine, submission_id: int | None = None) -> list[Any]:
    query = select(runs).order_by(runs.c.submission_id, runs.c.attempt)
    if submission_id is not None:
        query = query.where(runs.c.submission_id == submission_id)
    with engine.connect() as conn:
        return conn.execute(query).all()


_AUDIT_PG = [
    "CREATE TABLE fault_audit (id SERIAL PRIMARY KEY, tbl TEXT NOT NULL, row_id INTEGER NOT NULL)",
    """CREATE FUNCTION fault_audit_fn() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         INSERT INTO fault_audit (tbl, row_id) VALUES (TG_TABLE_NAME, NEW.id);
         RETURN NEW;
       END $$""",
    "CREATE TRIGGER fault_audit_ssf AFTER UPDATE ON submission_score_on_cv_folds "
    "FOR EACH ROW EXECUTE FUNCTION fault_audit_fn()",
    "CREATE TRIGGER fault_audit_ss AFTER UPDATE ON submission_scores "
    "FOR EACH ROW EXECUTE FUNCTION fault_audit_fn()",
    "CREATE TRIGGER fault_audit_sub AFTER UPDATE ON submissions "
    "FOR EACH ROW WHEN (NEW.state = 'scored') EXECUTE FUNCTION fault_audit_fn()",
]
_AUDIT_SQLITE = [
    "CREATE TABLE fault_audit (id INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, "
    "row_id INTEGER NOT NULL)",
    "CREATE TRIGGER fault_audit_ssf AFTER UPDATE ON submission_score_on_cv_folds BEGIN "
    "INSERT INTO fault_audit (tbl, row_id) VALUES ('submission_score_on_cv_folds', NEW.id); END",
    "CREATE TRIGGER fault_audit_ss AFTER UPDATE ON submission_scores BEGIN "
    "INSERT INTO fault_audit (tbl, row_id) VALUES ('submission_scores', NEW.id); END",
    "CREATE TRIGGER fault_audit_sub AFTER UPDATE ON submissions WHEN NEW.state = 'scored' BEGIN "
    "INSERT INTO fault_audit (tbl, row_id) VALUES ('submissions', NEW.id); END",
]


def install_write_audit(engine: Engine) -> None:
    """Record every write of a score row, and every write of state 'scored'.

    ramp-board creates the score rows when a submission is added (INSERT); the
    dispatcher only UPDATEs them, so one score set == one UPDATE per row.
    """
    statements = _AUDIT_PG if engine.dialect.name == "postgresql" else _AUDIT_SQLITE
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def _audit_counts(engine: Engine, table: str, ids: Iterable[int]) -> dict[int, int]:
    ids = list(ids)
    counts = {i: 0 for i in ids}
    with engine.connect() as conn:
        for (row_id,) in conn.execute(
            text("SELECT row_id FROM fault_audit WHERE tbl = :t"), {"t": table}
        ):
            if row_id in counts:
                counts[row_id] += 1
    return counts


def assert_scored_once(engine: Engine, submission_id: int) -> None:
    """Scored, one run scored, and every score row written exactly once."""
    with engine.connect() as conn:
        state, error_msg = conn.execute(
            select(submissions.c.state, submissions.c.error_msg).where(
                submissions.c.id == submission_id
            )
        ).one()
        fold_ids = conn.execute(
            select(submission_on_cv_folds.c.id).where(
                submission_on_cv_folds.c.submission_id == submission_id
            )
        ).scalars().all()
        score_ids = conn.execute(
            select(submission_scores.c.id).where(submission_scores.c.submission_id == submission_id)
        ).scalars().all()
        fold_scores = conn.execute(
            select(
                submission_score_on_cv_folds.c.id,
                submission_score_on_cv_folds.c.valid_score,
            ).where(submission_score_on_cv_folds.c.submission_on_cv_fold_id.in_(fold_ids))
        ).all()
    assert state == "scored", f"submission {submission_id} is {state}: {error_msg}"
    scored_runs = [r for r in run_rows(engine, submission_id) if r.outcome == "scored"]
    assert len(scored_runs) == 1, f"submission {submission_id}: scored runs {scored_runs}"
    assert fold_scores and score_ids
    assert _audit_counts(engine, "submissions", [submission_id]) == {submission_id: 1}
    assert set(_audit_counts(engine, "submission_scores", score_ids).values()) == {1}
    assert set(_audit_counts(engine, "submission_score_on_cv_folds", [f.id for f in fold_scores]).values()) == {1}


def assert_never_scored(engine: Engine, submission_id: int) -> None:
    assert _audit_counts(engine, "submissions", [submission_id]) == {submission_id: 0}


def _plain(row: Any) -> tuple:
    """A row as comparable values (numpy blobs come back as arrays)."""
    return tuple(v.tolist() if hasattr(v, "tolist") and hasattr(v, "shape") else v for v in row)


def dump_submission(engine: Engine, submission_id: int, run_columns_skip: Iterable[str] = ()) -> dict[str, list[tuple]]:
    """Every row the dispatcher writes for one submission, for before/after comparisons."""
    skip = set(run_columns_skip)
    with engine.connect() as conn:
        fold_ids = conn.execute(
            select(submission_on_cv_folds.c.id).where(
                submission_on_cv_folds.c.submission_id == submission_id
            )
        ).scalars().all()
        run_cols = [c for c in runs.c if c.name not in skip]
        return {
            "submissions": [_plain(r) for r in conn.execute(select(submissions).where(submissions.c.id == submission_id))],
            "folds": [_plain(r) for r in conn.execute(
                select(submission_on_cv_folds)
                .where(submission_on_cv_folds.c.submission_id == submission_id)
                .order_by(submission_on_cv_folds.c.id)
            )],
            "scores": [_plain(r) for r in conn.execute(
                select(submission_scores)
                .where(submission_scores.c.submission_id == submission_id)
                .order_by(submission_scores.c.id)
            )],
            "fold_scores": [_plain(r) for r in conn.execute(
                select(submission_score_on_cv_folds)
                .where(submission_score_on_cv_folds.c.submission_on_cv_fold_id.in_(fold_ids))
                .order_by(submission_score_on_cv_folds.c.id)
            )],
            "runs": [_plain(r) for r in conn.execute(
                select(*run_cols).where(runs.c.submission_id == submission_id).order_by(runs.c.attempt)
            )],
            "audit": [_plain(r) for r in conn.execute(text("SELECT tbl, row_id FROM fault_audit ORDER BY id"))],
        }


# --------------------------------------------------------------------------- harness


@dataclass
class Harness:
    """One deployment, its gate, its marker and the daemons a test started."""

    root: Path
    dep: Deployment
    marker: str
    gate: Path
    counters: Path
    daemons: list[Daemon] = field(default_factory=list)

    def daemon(self, label: str) -> Daemon:
        d = Daemon(self.dep, self.marker, self.root / f"daemon-{label}.log")
        self.daemons.append(d)
        return d

    def open_gate(self) -> None:
        self.gate.touch()

    def sid(self, name: str) -> int:
        return self.dep.summaries()[name].id

    def state(self, name: str) -> str:
        return self.dep.summaries()[name].state

    def states(self) -> dict[str, str]:
        return {n: s.state for n, s in self.dep.summaries().items() if n != "starting_kit"}

    def wait_states(self, wanted: Callable[[dict[str, str]], bool], timeout: float, what: str) -> dict[str, str]:
        last: dict[str, str] = {}

        def check() -> bool:
            last.clear()
            last.update(self.states())
            return wanted(last)

        try:
            wait_for(check, timeout, what, interval=0.15)
        except AssertionError as exc:
            logs = "\n".join(f"--- {d.log_path.name}\n{d.log()[-2500:]}" for d in self.daemons)
            raise AssertionError(f"{exc}; states {last}\n{logs}") from None
        return dict(last)

    def ramp_test_count(self, name: str) -> int:
        """How many ramp-test processes imported the (gated) submission."""
        folder = self.counters / name
        return len(list(folder.iterdir())) if folder.is_dir() else 0

    def supervisors(self) -> set[tuple[int, Any]]:
        """(pid, start time) of the supervisor of every run recorded with a handle."""
        return {
            (int(r.handle["pid"]), r.handle.get("pid_start_time"))
            for r in run_rows(self.dep.engine)
            if isinstance(r.handle, dict)
            and isinstance(r.handle.get("pid"), int)
            and r.handle["pid"] > 0
        }

    def assert_nothing_left(self, timeout: float = 15.0) -> None:
        """No supervisor of any recorded run, no process with our marker."""
        recorded = self.supervisors()

        def present() -> list[int]:
            # /proc/<pid> still there, and not a reuse of the pid by another process
            return sorted(p for p, start in recorded if start_time(p) is not None
                          and (start is None or start_time(p) == start))

        try:
            wait_for(lambda: not present() and not marked_pids(self.marker), timeout, "", interval=0.1)
        except AssertionError:
            raise AssertionError(
                f"processes left after {timeout:g} s: supervisors {present()}, "
                f"marked {[(p, cmdline(p)[:3]) for p in marked_pids(self.marker)]}"
            ) from None

    def close(self) -> None:
        for d in self.daemons:
            d.stop_hard()
        kill_marked(self.marker)
        self.dep.engine.dispose()


def make_harness(
    root: Path,
    url: str,
    sources: dict[str, str | None],
    **deployment_kw: Any,
) -> Harness:
    """A deployment whose ``None`` sources are gated submissions."""
    root.mkdir(parents=True, exist_ok=True)
    gate = root / "gate"
    counters = root / "ramp-test-runs"
    real = {
        name: gated_source(gate, counters / name) if src is None else src
        for name, src in sources.items()
    }
    dep = Deployment(root / "deploy", url, real, **deployment_kw)
    # The faults are steered through host files (gate, counters) and runs are
    # found by an environment marker: both are what the sandbox takes away.
    dep.set_worker(sandbox="none")
    install_write_audit(dep.engine)
    return Harness(root, dep, uuid.uuid4().hex, gate, counters)


# --------------------------------------------------------------------------- PostgreSQL


def pg_bindir() -> Path | None:
    """Where the PostgreSQL server programs (initdb, pg_ctl) are, whatever the version.

    ``pg_config --bindir`` first; then the Debian clusters' own folders
    (``/usr/lib/postgresql/<version>/bin``, newest first); then ``PATH``.
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=False
            )
            if out.returncode == 0 and out.stdout.strip():
                candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.TimeoutExpired):
            pass

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in path.parent.name.split(".") if p.isdigit())

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def require_private_postgres() -> None:
    """Skip (with the reason) when no private cluster can be made here; fail
    instead under RAMP_DISPATCHER_REQUIRE_PG=1, as CI sets it."""
    import pytest

    why = PrivatePostgres.unavailable()
    if why:
        if os.environ.get("RAMP_DISPATCHER_REQUIRE_PG") == "1":
            pytest.fail(f"a private PostgreSQL cluster is required but cannot be made: {why}")
        print(f"skipping a private-PostgreSQL test: {why}")
        pytest.skip(why)


class PrivatePostgres:
    """A throw-away PostgreSQL cluster (trust auth) that a test may stop and start."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rdpg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.logfile = self.dir / "server.log"
        self.started = False
        bindir = pg_bindir()
        if bindir is None:
            raise RuntimeError(PrivatePostgres.unavailable())
        self.bin = bindir

    @staticmethod
    def unavailable() -> str | None:
        if pg_bindir() is None:
            return (
                "no PostgreSQL server programs (initdb, pg_ctl): not in `pg_config --bindir`, "
                "/usr/lib/postgresql/*/bin or PATH"
            )
        if shutil.which("runuser") is None:
            return "runuser not found"
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "no 'postgres' OS user"
        if os.geteuid() != 0:
            return "needs root to run initdb as the postgres user"
        return None

    def _as_postgres(self, *argv: str, timeout: float = 120) -> None:
        env = {k: v for k, v in os.environ.items() if k != MARKER_VAR}
        out = subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, env=env,
            cwd=str(self.dir),
        )
        if out.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({out.returncode}): {out.stdout}\n{out.stderr}")

    def init(self) -> None:
        shutil.chown(self.dir, "postgres", "postgres")
        self.dir.chmod(0o700)
        self._as_postgres(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
            "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip
        self.start()

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off"
        )
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.logfile), "-w", "start"
        )
        self.started = True

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        self.started = False

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        engine = create_engine(self.admin_url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.admin_url(name)

    def destroy(self) -> None:
        if self.data.exists():
            try:
                self.stop("immediate")
            except Exception:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
