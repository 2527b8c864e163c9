"""Helpers shared by the benchmarks: databases, deployments, the daemon as a
subprocess, /proc readers, a stand-in ramp-test, SQL statement counting.

Everything that creates something (a PostgreSQL database, a folder, a process)
is a context manager, so a benchmark that fails half-way still cleans up.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

#: the benchmarks use the tools of the environment they run in (the project's venv)
VENV_BIN = Path(sys.executable).parent
RAMP_DISPATCHER = VENV_BIN / "ramp-dispatcher"
RAMP_TEST = VENV_BIN / "ramp-test"

PG_ADMIN_URL = os.environ.get(
    "RAMP_DISPATCHER_BENCH_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
BACKENDS = ("sqlite", "postgresql")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the final table."""

    benchmark: str
    figure: str
    value: str
    target: str = ""
    met: bool | None = None  # None: no target (an informative figure)


def say(*parts: Any) -> None:
    """Print a figure as soon as it is known (long benchmarks stay readable)."""
    print(*parts, flush=True)


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default method)."""
    data = sorted(values)
    if not data:
        return float("nan")
    k = (len(data) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def format_table(rows: Sequence[Row]) -> str:
    head = ("benchmark", "figure", "value", "target", "met?")
    cells = [
        (r.benchmark, r.figure, r.value, r.target or "-",
         "-" if r.met is None else ("yes" if r.met else "NO"))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(c)) for c in col) for col in zip(head, *cells)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


# --------------------------------------------------------------------------- databases


_pg_status: list[str] = []


def pg_problem() -> str | None:
    """None when PostgreSQL answers, else why not (asked once per process)."""
    if not _pg_status:
        try:
            engine = create_engine(PG_ADMIN_URL)
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
            _pg_status.append("")
        except Exception as exc:  # refused, auth, driver: all mean "skip PostgreSQL"
            _pg_status.append(f"PostgreSQL at {PG_ADMIN_URL} unreachable: {exc}".splitlines()[0])
    return _pg_status[0] or None


def _drop_pg(name: str) -> None:
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        # A daemon killed mid-way may still hold connections.
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :n AND pid <> pg_backend_pid()"
            ),
            {"n": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    engine.dispose()


@contextlib.contextmanager
def temp_database(backend: str, folder: Path) -> Iterator[str]:
    """A fresh empty database; yields its URL; dropped (PostgreSQL) on exit.

    SQLite's file lives in ``folder``, which the caller removes.
    """
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'ramp.sqlite'}"
        return
    problem = pg_problem()
    if problem:
        raise RuntimeError(problem)
    name = f"rdbench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        _drop_pg(name)


@contextlib.contextmanager
def scratch_dir(label: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"rdbench-{label}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def backends_to_run(wanted: Sequence[str]) -> list[str]:
    """The requested backends that can run here; says why one is skipped."""
    chosen = []
    for backend in wanted:
        if backend == "postgresql" and pg_problem():
            say(f"  (skipping PostgreSQL: {pg_problem()})")
            continue
        chosen.append(backend)
    return chosen


def sqlalchemy_section(url: str) -> str:
    """The server config's ``sqlalchemy`` section (ramp-board's format) for a URL."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return f"drivername: sqlite\n  database: {u.database}"
    lines = ["drivername: postgresql", f"username: {u.username}", f"host: {u.host}",
             f"port: {u.port or 5432}", f"database: {u.database}"]  # fmt: skip
    if u.password:
        lines.append(f"password: {u.password}")
    return "\n  ".join(lines)


# --------------------------------------------------------------------------- deployments


class Deployment:
    """An iris deployment (kit, configs, migrated database, one team) built
    with the demo's builder, with the event config's sections adjusted."""

    def __init__(
        self,
        root: Path,
        url: str,
        submissions: dict[str, str] | None = None,
        dispatcher: dict[str, Any] | None = None,
        worker: dict[str, Any] | None = None,
    ):
        from ramp_dispatcher.config import load_event_config, load_server_config
        from ramp_dispatcher.database.engine import make_engine
        from ramp_dispatcher.demo import EVENT, TEAM, build_deployment

        self.root = root
        self.url = url
        self.event_name = EVENT
        self.team = TEAM
        # Only the sandbox unless submissions are given: benchmarks add their own.
        self.server_path, self.event_path = build_deployment(
            root,
            sqlalchemy_section=sqlalchemy_section(url),
            submissions=submissions if submissions is not None else {},
        )
        # Rewrite the sections rather than appending keys: a YAML mapping with
        # duplicate keys is ambiguous.
        data = yaml.safe_load(self.event_path.read_text())
        data.setdefault("dispatcher", {}).update(dispatcher or {})
        data.setdefault("worker", {}).update(worker or {})
        if (Path(data["worker"].get("conda_env", "")) / "bin" / "standin.json").exists():
            # the stand-in saves no predictions: there is nothing to score again
            data["worker"].setdefault("verify_scores", False)
        self.event_path.write_text(yaml.safe_dump(data, sort_keys=False))
        self.server = load_server_config(self.server_path)
        self.config = load_event_config(self.event_path, self.server)
        self.engine = make_engine(self.server.database_url)
        self.sources = root / "incoming"

    def add_submission(self, name: str, source: str) -> tuple[int, float]:
        """Add a submission as ramp-database would; return (id, commit time, epoch s)."""
        from ramp_dispatcher.database import admin
        from ramp_dispatcher.demo import write_submission

        folder = write_submission(self.sources / name, source)
        with self.engine.begin() as conn:
            sid = admin.add_submission(conn, self.event_name, self.team, name, folder)
        return sid, time.time()

    def states(self) -> dict[int, str]:
        from ramp_dispatcher.database.ramp_schema import submissions as S

        with self.engine.connect().execution_options(sqlite_readonly=True) as conn:
            return {r.id: r.state for r in conn.execute(S.select().with_only_columns(S.c.id, S.c.state))}

    def daemon_command(self, *extra: str) -> list[str]:
        return [str(RAMP_DISPATCHER), *extra, "run", "--config", str(self.server_path),
                "--event-config", str(self.event_path)]  # fmt: skip

    def close(self) -> None:
        self.engine.dispose()


# --------------------------------------------------------------------------- stand-in ramp-test

# A stand-in for ramp-test, named as such: it writes a minimal valid
# training_output (the layout of ramp-workflow 0.7.0) and exits 0, so that a
# run costs milliseconds and the benchmark measures the dispatcher, not sklearn.
STANDIN_RAMP_TEST = '''\
#!{python} -IS
"""STAND-IN for ramp-test (benchmarks only): writes a valid training_output."""
import json, os, sys, time

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "standin.json")) as f:
    spec = json.load(f)
args = sys.argv[1:]
opt = {{args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}}
out = os.path.join(opt["--ramp-submission-dir"], opt["--submission"], "training_output")
if spec["sleep_s"]:
    time.sleep(spec["sleep_s"])
names = spec["scores"]
for i in range(spec["n_folds"]):
    fold = os.path.join(out, "fold_%d" % i)
    os.makedirs(fold, exist_ok=True)
    for step in ("train", "valid", "test"):
        with open(os.path.join(fold, step + "_time"), "w") as f:
            f.write("0.01")
    with open(os.path.join(fold, "scores.csv"), "w") as f:
        f.write("step," + ",".join(names) + ",time\\n")
        for step in ("train", "valid", "test"):
            f.write(step + "," + ",".join("0.5" for _ in names) + ",0.01\\n")
    with open(os.path.join(fold, "state.txt"), "w") as f:
        f.write("scored")
with open(os.path.join(out, "bagged_scores.csv"), "w") as f:
    f.write("step,n_bag," + ",".join(names) + "\\n")
    for step in ("valid", "test"):
        for n in range(spec["n_folds"]):
            f.write("%s,%d," % (step, n) + ",".join("0.5" for _ in names) + "\\n")
print("stand-in ramp-test: wrote", out)
'''


def write_standin_env(prefix: Path, n_folds: int = 3, scores: Sequence[str] = ("acc", "nll"),
                      sleep_s: float = 0.0) -> Path:  # fmt: skip
    """An environment prefix whose ``bin/ramp-test`` is the stand-in; return the prefix."""
    bin_dir = prefix / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "ramp-test"
    script.write_text(STANDIN_RAMP_TEST.format(python=sys.executable))
    script.chmod(0o755)
    (bin_dir / "standin.json").write_text(
        json.dumps({"n_folds": n_folds, "scores": list(scores), "sleep_s": sleep_s})
    )
    return prefix


# --------------------------------------------------------------------------- /proc


def proc_stat(pid: int) -> tuple[str, float, float] | None:
    """(state, own CPU s, reaped children's CPU s) or None if gone.

    Own = utime + stime (fields 14-15): the process's threads only, never its
    children. Children = cutime + cstime (fields 16-17): the children it has
    waited for, with their own waited-for descendants.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2 :].split()  # the name may hold spaces and ')'
    own = (int(rest[11]) + int(rest[12])) / CLK_TCK
    return rest[0], own, (int(rest[13]) + int(rest[14])) / CLK_TCK


def rss_kib(pid: int) -> int:
    return _status_field(pid, "VmRSS")


def n_threads(pid: int) -> int:
    return _status_field(pid, "Threads")


def _status_field(pid: int, name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def n_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def children(pid: int) -> set[int]:
    """Child pids of every thread of ``pid`` (zombies included)."""
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.update(int(x) for x in f.read().split())
        except OSError:
            continue
    return found


# --------------------------------------------------------------------------- machine load

# This machine is shared: other processes (test suites, builds) may run while a
# benchmark does. Each window measures how much CPU they took, so that a
# figure is never read without knowing how noisy its run was.


def _cpu_jiffies() -> tuple[int, int, int]:
    """(busy, idle, steal) jiffies summed over CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, idle + iowait, steal


def _own_cpu() -> float:
    """CPU seconds of this process and of its reaped descendants."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


#: above this share of the CPUs used by other processes, a timing is taken again
MAX_NOISE = 0.10


class CpuWindow:
    """System CPU use over a stretch of time, split into ours and others'.

    "Ours" is this process and every descendant it has reaped by the end of the
    window (a daemon's supervisors and their ramp-test runs included), plus what
    ``live()`` reports for a subprocess still running (a daemon's tree); "others"
    is everything else that ran, PostgreSQL's server processes included.
    """

    def __init__(self, live: Callable[[], float] | None = None):
        self.live = live or (lambda: 0.0)

    def __enter__(self) -> CpuWindow:
        self.t0 = time.monotonic()
        self.j0 = _cpu_jiffies()
        self.own0 = _own_cpu() + self.live()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.monotonic() - self.t0
        j1 = _cpu_jiffies()
        self.busy = (j1[0] - self.j0[0]) / CLK_TCK
        self.steal = (j1[2] - self.j0[2]) / CLK_TCK
        self.ours = _own_cpu() + self.live() - self.own0
        self.others = max(self.busy - self.ours, 0.0)

    @property
    def others_share(self) -> float:
        """Other processes' CPU as a fraction of the machine's capacity."""
        return self.others / max(self.wall * (os.cpu_count() or 1), 1e-9)

    @property
    def noisy(self) -> bool:
        return self.others_share > MAX_NOISE

    def describe(self) -> str:
        capacity = self.wall * (os.cpu_count() or 1)
        return (
            f"machine: {self.busy:.1f} CPU-s busy of {capacity:.1f}, ours {self.ours:.1f}, "
            f"other processes {self.others:.1f} ({100 * self.others / capacity:.0f}% of capacity)"
            + (f", steal {self.steal:.1f}" if self.steal > 0.05 else "")
        )


def load_now(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over the next ``seconds``."""
    a = _cpu_jiffies()
    time.sleep(seconds)
    b = _cpu_jiffies()
    busy, idle = b[0] - a[0], b[1] - a[1]
    return busy / max(busy + idle, 1)


#: seconds settle() may wait for other processes to calm down (set by __main__)
QUIET_WAIT = [0.0]


def settle() -> None:
    """Before a sensitive measurement: wait a little for a quiet machine."""
    wait_until_quiet(QUIET_WAIT[0])


def wait_until_quiet(max_wait: float, threshold: float = 0.15) -> None:
    """Wait (at most ``max_wait`` s) for 3 s in a row under ``threshold`` CPU use."""
    if max_wait <= 0:
        return
    deadline = time.monotonic() + max_wait
    quiet = 0
    load = 1.0
    while time.monotonic() < deadline:
        load = load_now()
        quiet = quiet + 1 if load < threshold else 0
        if quiet >= 3:
            say(f"  (machine quiet: {100 * load:.0f}% CPU busy)")
            return
    say(f"  (machine still busy after {max_wait:.0f} s: {100 * load:.0f}% CPU; going on)")


# --------------------------------------------------------------------------- the daemon


class Daemon:
    """``ramp-dispatcher run`` as a real subprocess, watched through /proc."""

    def __init__(self, command: list[str], log_path: Path):
        self.command = command
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.started_epoch = 0.0
        self.exited = 0.0
        self.cpu_s = 0.0  # last own-CPU sample
        self.history: list[tuple[float, float]] = []  # (epoch s, own CPU s) samples
        self.returncode: int | None = None

    def start(self) -> Daemon:
        log = open(self.log_path, "wb")
        try:
            self.started = time.monotonic()
            self.started_epoch = time.time()
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def sample(self) -> str | None:
        """Read state and own CPU; returns the state (None once reaped)."""
        got = proc_stat(self.pid)
        if got is None:
            return None
        state, cpu, _ = got
        self.cpu_s = cpu
        self.history.append((time.time(), cpu))
        return state

    def wait_exit(self, timeout: float, every: float = 0.02) -> float:
        """Wait for the daemon to exit by itself; return its wall time (s).

        We do not reap it until it is a zombie: its /proc entry then still
        holds its final own CPU time (threads included, children excluded).
        """
        deadline = time.monotonic() + timeout
        while True:
            state = self.sample()
            if state in ("Z", "X", None):
                self.exited = time.monotonic()
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"daemon did not exit within {timeout:.0f} s; log: {self.tail()}")
            time.sleep(every)
        assert self.proc is not None
        self.returncode = self.proc.wait()  # reaps it: its tree's CPU joins ours
        return self.exited - self.started

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the daemon's clean stop), SIGKILL if it hangs; then make
        sure the runs it leaves behind (by design, for a restart to re-attach)
        are over, so that nothing writes into a folder we are about to remove."""
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        left = {pid: start for pid in children(self.pid) if (start := _start_time(pid)) is not None}
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait()
        _end_runs(left)
        return self.returncode

    def tree_cpu(self) -> float:
        """CPU s of the daemon and of the runs it has reaped so far."""
        got = proc_stat(self.pid)
        return 0.0 if got is None else got[1] + got[2]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
        return int(data[data.rfind(")") + 2 :].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _end_runs(supervisors: dict[int, int], grace: float = 15.0) -> None:
    """Wait for run supervisors our daemon started; SIGTERM (they stop their
    run's tree), then SIGKILL, those still there after ``grace`` seconds.
    A pid is only signalled while its start time proves it is the same process."""

    def alive() -> list[int]:
        return [p for p, t in supervisors.items() if _start_time(p) == t and
                (proc_stat(p) or ("Z",))[0] != "Z"]  # fmt: skip

    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            for pid in alive():
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not alive():
            return


def wait_for(predicate: Callable[[], Any], timeout: float, every: float = 0.005,
             what: str = "condition") -> Any:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# --------------------------------------------------------------------------- SQL statements


@dataclass
class Statement:
    sql: str
    params: Any
    executemany: bool
    seconds: float = 0.0


@dataclass
class StatementLog:
    statements: list[Statement] = field(default_factory=list)
    commits: int = 0

    @property
    def count(self) -> int:
        return len(self.statements)

    def slowest(self) -> Statement | None:
        return max(self.statements, key=lambda s: s.seconds, default=None)


@contextlib.contextmanager
def count_statements(engine: Engine | type[Engine]) -> Iterator[StatementLog]:
    """Record every statement sent to the driver (BEGIN IMMEDIATE on SQLite
    included) with its duration; pass the Engine class to see every engine."""
    log = StatementLog()
    started: list[float] = []

    def before(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        log.statements.append(Statement(statement, parameters, executemany))
        started.append(time.perf_counter())

    def after(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if started:
            log.statements[-1].seconds = time.perf_counter() - started.pop()

    def commit(conn):  # noqa: ANN001
        log.commits += 1

    hooks = (("before_cursor_execute", before), ("after_cursor_execute", after), ("commit", commit))
    for name, fn in hooks:
        event.listen(engine, name, fn)
    try:
        yield log
    finally:
        for name, fn in hooks:
            event.remove(engine, name, fn)


def explain(engine: Engine, stmt: Statement) -> str:
    """The plan of a recorded statement, run for real and rolled back:
    EXPLAIN (ANALYZE, BUFFERS) on PostgreSQL, EXPLAIN QUERY PLAN on SQLite."""
    params = stmt.params[0] if stmt.executemany and stmt.params else stmt.params
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if engine.dialect.name == "postgresql":
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + stmt.sql, params)
        else:
            cur.execute("EXPLAIN QUERY PLAN " + stmt.sql, params)
        plan = "\n".join(" | ".join(str(c) for c in row) for row in cur.fetchall())
        cur.close()
        raw.rollback()  # EXPLAIN ANALYZE of an UPDATE changes rows: undo it
        return plan
    finally:
        raw.close()


def one_line(sql: str, limit: int = 160) -> str:
    flat = " ".join(sql.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def utc_seconds(stamp: dt.datetime) -> float:
    """Epoch seconds of ramp-board's naive-UTC timestamps."""
    return stamp.replace(tzinfo=dt.timezone.utc).timestamp()


def dedent(source: str) -> str:
    return textwrap.dedent(source)
