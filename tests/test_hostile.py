"""Hostile submissions through the real daemon, run as a non-root user.

One deployment (SQLite, the demo's iris kit, conda worker with the default
bubblewrap sandbox) gets two honest submissions and one submission per
attack, and one daemon started as the test user ``ramp-hostile`` (made by
``hostile_setup``) serves them all: what passes as root proves little. Every
attack is shipped base64-encoded and exec'd, so ramp-workflow's keyword
filter sees nothing. The attacks write what they achieved to their own log
(``PROBE`` lines), where the tests read it; the tests also check from the
outside that nothing changed, no secret leaked and the daemon stayed up.

Needs root (to create the user), bwrap and Debian's python3.11; without them
the tests skip, unless RAMP_DISPATCHER_REQUIRE_SANDBOX=1 (CI), where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import create_engine, select

from ramp_dispatcher.database import queries
from ramp_dispatcher.database.dispatcher_schema import runs
from ramp_dispatcher.demo import EVENT, SUBMISSIONS, build_deployment
from ramp_dispatcher.status import status_text
from ramp_dispatcher.workers import sandbox as sb

sys.path.insert(0, str(Path(__file__).parent))
from helpers import recording_listener  # noqa: E402
from hostile_setup import HostileUser, SetupError, hostile_user  # noqa: E402
from sandbox_attacks import denied, forging_estimator, probe_estimator, probe_results, snapshot  # noqa: E402

GOOD = SUBMISSIONS["random_forest"]
FINAL_STATES = {"scored", "training_error", "checking_error", "validating_error", "testing_error"}


def _fail_or_skip(why: str) -> None:
    if os.environ.get("RAMP_DISPATCHER_REQUIRE_SANDBOX") == "1":
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="session")
def user() -> HostileUser:
    if os.geteuid() != 0:
        _fail_or_skip("the hostile suite creates a user: it needs root")
    try:
        sb.check_bwrap(sb.find_bwrap())
        return hostile_user()
    except (SetupError, sb.SandboxError) as exc:
        _fail_or_skip(f"the hostile suite cannot be set up: {exc}")
        raise


@dataclass
class Arena:
    root: Path
    server_path: Path
    event_path: Path
    secret: str
    listener_hits: list[bytes]
    listener_port: int
    daemon: subprocess.Popen[bytes]
    daemon_log: Path
    before: dict[str, tuple[int, int]]
    volatile: tuple[Path, ...]

    @property
    def events_dir(self) -> Path:
        return self.root / "events" / EVENT

    def summaries(self) -> dict[str, queries.SubmissionSummary]:
        engine = create_engine(f"sqlite:///{self.root / 'ramp.sqlite'}")
        try:
            with engine.connect() as conn:
                info = queries.load_event(conn, EVENT)
                return {s.name: s for s in queries.submission_summaries(conn, info)}
        finally:
            engine.dispose()

    def run_messages(self) -> dict[int, str]:
        engine = create_engine(f"sqlite:///{self.root / 'ramp.sqlite'}")
        try:
            with engine.connect() as conn:
                return {r.submission_id: r.message or "" for r in conn.execute(select(runs))}
        finally:
            engine.dispose()

    def log(self, name: str) -> str:
        sid = self.summaries()[name].id
        return (self.events_dir / "logs" / f"submission_{sid:09d}" / "log").read_text(errors="replace")


def attacks(root: Path, port: int) -> dict[str, str]:
    ev = root / "events" / EVENT
    subs, preds, logs = ev / "submissions", ev / "predictions", ev / "logs"
    kit, data = root / "ramp-kits" / "iris", root / "ramp-data" / "iris"
    snoop = f"""
        import signal
        found = []
        def search():
            for top, dirs, files in _os.walk("/"):
                if top.startswith(("/proc", "/sys", "/dev")):
                    dirs[:] = []
                    continue
                found.extend(_os.path.join(top, f) for f in files
                             if f in ("config.yml", "ramp.sqlite") or (f.startswith("run-") and f.endswith(".json")))
            return found
        attempt("read_server_config", lambda: read({str(root / 'config.yml')!r}))
        attempt("read_event_config", lambda: read({str(ev / 'config.yml')!r}))
        attempt("read_database", lambda: read({str(root / 'ramp.sqlite')!r}))
        attempt("search", search)
        attempt("read_found", lambda: [read(f) for f in found])
        attempt("environ", lambda: {{p: read(f"/proc/{{p}}/environ") for p in listing("/proc") if p.isdigit()}})
        attempt("own_environ", lambda: dict(_os.environ))
        attempt("list_submissions", lambda: listing({str(subs)!r}))
        # the team's starting kit and the two honest submissions come first: ids 1-3
        others = [f"submission_{{sid:09d}}" for sid in (1, 2, 3)]
        attempt("read_other", lambda: [read({str(subs)!r} + f"/{{o}}/estimator.py") for o in others])
        attempt("write_other", lambda: [write({str(subs)!r} + f"/{{o}}/estimator.py") for o in others])
        attempt("list_predictions", lambda: listing({str(preds)!r}))
        attempt("read_other_predictions", lambda: [read({str(preds)!r} + f"/{{o}}/bagged_scores.csv") for o in others[1:]])
        attempt("write_other_predictions", lambda: [write({str(preds)!r} + f"/{{o}}/bagged_scores.csv") for o in others[1:]])
        attempt("write_kit", lambda: write({str(kit / 'problem.py')!r}))
        attempt("write_data", lambda: write({str(data / 'data' / 'test.csv')!r}))
        attempt("list_logs", lambda: listing({str(logs)!r}))
        def status_files():
            out = []
            for sid in range(1, 12):
                d = {str(logs)!r} + f"/submission_{{sid:09d}}"
                out.append(write(d + "/run-1.json", b'{{"reason": "exited", "exit_code": 0}}'))
            return out
        attempt("write_status_files", status_files)
        attempt("read_home", lambda: listing("/home"))
        report("snoop")
        # show whatever was obtained to the author, in the error message
        raise RuntimeError("LEAK " + _json.dumps(_results)[:3000])
    """
    network = f"""
        import socket
        attempt("tcp_listener", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=3).send(b"hi"))
        attempt("tcp_postgres", lambda: socket.create_connection(("127.0.0.1", 5432), timeout=3))
        def unix_pg():
            s = socket.socket(socket.AF_UNIX)
            s.connect("/var/run/postgresql/.s.PGSQL.5432")
            return "connected"
        attempt("unix_postgres", unix_pg)
        attempt("dns", lambda: socket.getaddrinfo("pypi.org", 443))
        report("network")
    """
    signals = """
        import signal
        attempt("visible_pids", lambda: sum(1 for p in range(1, 70000) if _alive(p)))
        attempt("kill_parent", lambda: _os.kill(_os.getppid(), signal.SIGKILL))
        attempt("kill_all", lambda: _os.kill(-1, signal.SIGKILL))
        report("signals")
    """
    signals = "def _alive(p):\n    try:\n        _os.kill(p, 0)\n        return True\n    except OSError:\n        return False\n" + textwrap.dedent(signals)
    forkbomb = """
        import time
        def forks():
            n, kids = 0, []
            try:
                while n < 1000:  # bounded: far above the limit, far below a real bomb
                    pid = _os.fork()
                    if pid == 0:
                        time.sleep(3)
                        _os._exit(0)
                    kids.append(pid)
                    n += 1
            finally:
                for k in kids:
                    _os.kill(k, 9)
                    _os.waitpid(k, 0)
                _results["forked"] = n
            return n
        attempt("fork", forks)
        report("forkbomb")
    """
    bigfile = """
        import sys
        out = [a for a in sys.argv if a.endswith("submissions")][0]
        me = [a for a in sys.argv if a.startswith("submission_")][0]
        attempt("big_tmp", lambda: write("/tmp/big", b"x" * (12 * 2**20)))
        attempt("big_output", lambda: write(_os.path.join(out, me, "training_output", "big"), b"x" * (12 * 2**20)))
        report("bigfile")
    """
    return {
        "victim": GOOD,
        "honest": GOOD,
        "forger": forging_estimator(),
        "network": probe_estimator(network, GOOD),
        "bigfile": probe_estimator(bigfile, GOOD),
        "forkbomb": probe_estimator(forkbomb, GOOD),
        "signals": probe_estimator(signals, GOOD),
        "snoop": probe_estimator(snoop, GOOD),
    }


@pytest.fixture(scope="module")
def arena(user: HostileUser) -> Iterator[Arena]:
    root = Path(tempfile.mkdtemp(prefix="ramp-hostile-", dir="/tmp"))
    root.chmod(0o755)
    listening = contextlib.ExitStack()
    port, hits = listening.enter_context(recording_listener())
    secret = "HOSTILE-" + secrets.token_hex(8)
    server_path, event_path = build_deployment(
        root, n_workers=2, timeout=90, submissions=attacks(root, port)
    )
    server_path.write_text(server_path.read_text() + f"flask:\n  secret_key: {secret}\n")
    server_path.chmod(0o600)
    event_path.write_text(
        event_path.read_text()
        .replace(f"conda_env: {sys.prefix}", f"conda_env: {user.venv}\n  max_processes: 64\n  max_file_size_mb: 5")
        .replace("hunger_policy: exit", "hunger_policy: sleep")
        + f"# {secret}\n"
    )
    event_path.chmod(0o600)
    for path in [root, *root.rglob("*")]:
        os.chown(path, user.uid, user.gid, follow_symlinks=False)
    ev = root / "events" / EVENT
    volatile = (ev / "predictions", ev / "logs", root / "incoming")
    before = snapshot(root, skip=volatile)
    daemon_log = Path(tempfile.mkdtemp(prefix="ramp-hostile-log-")) / "daemon.log"
    with open(daemon_log, "wb") as out:
        daemon = subprocess.Popen(
            [
                "/usr/bin/setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
                "--", str(user.python), "-m", "ramp_dispatcher.cli", "run",
                "--config", str(server_path), "--event-config", str(event_path),
            ],  # fmt: skip
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root,
            env={"PATH": "/usr/bin:/bin", "HOME": str(root), "RAMP_HOSTILE_SECRET": secret},
        )
    a = Arena(root, server_path, event_path, secret, hits, port, daemon, daemon_log, before, volatile)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            if daemon.poll() is not None:
                break
            try:
                states = {s.state for s in a.summaries().values() if s.name != "starting_kit"}
            except Exception:  # the daemon may hold the write lock
                states = set()
            if states and states <= FINAL_STATES:
                break
            time.sleep(1)
        yield a
    finally:
        listening.close()
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(daemon_log.parent, ignore_errors=True)


def test_every_submission_ends_and_the_daemon_stays_up(arena: Arena) -> None:
    assert arena.daemon.poll() is None, arena.daemon_log.read_text()[-3000:]
    s = arena.summaries()
    states = {name: s[name].state for name in s if name != "starting_kit"}
    assert states == {
        "victim": "scored", "honest": "scored", "forger": "scored", "network": "scored",
        "bigfile": "scored", "forkbomb": "scored", "signals": "scored", "snoop": "training_error",
    }, (states, {n: s[n].error_msg[:300] for n in s})
    # the honest twins scored identically, and nothing had to be corrected for them
    assert s["victim"].scores == s["honest"].scores and s["victim"].scores["acc"][1] > 0.8
    messages = arena.run_messages()
    assert messages[s["victim"].id] == "" and messages[s["honest"].id] == ""
    # the daemon user ran the daemon and its runs (what root would pass proves little)
    assert os.stat(arena.events_dir / "logs").st_uid != 0
    # the attacked submissions are the ones the snoop aimed at
    assert {s["victim"].id, s["honest"].id} <= {1, 2, 3}
    victim_preds = arena.events_dir / "predictions" / f"submission_{s['victim'].id:09d}"
    assert (victim_preds / "bagged_scores.csv").is_file()


def test_nothing_outside_the_runs_folders_changed(arena: Arena) -> None:
    after = snapshot(arena.root, skip=arena.volatile)
    changed = {
        k for k in set(arena.before) | set(after)
        if arena.before.get(k) != after.get(k) and "/training_output" not in f"/{k}"
    }  # fmt: skip
    assert not changed, sorted(changed)[:20]


def test_no_secret_reaches_a_participant(arena: Arena) -> None:
    s = arena.summaries()
    r = probe_results(arena.log("snoop"), "snoop")
    for name in (
        "read_server_config", "read_event_config", "read_database", "environ_secret",
        "read_other", "write_other", "list_predictions", "read_other_predictions",
        "write_other_predictions", "write_kit", "write_data", "list_logs", "write_status_files",
    ):
        if name in r:
            assert denied(r, name), (name, r[name])
    assert r["list_submissions"] == f"ok: ['submission_{s['snoop'].id:09d}']", r["list_submissions"]
    # a search of the whole tree finds no file of the deployment (system files only)
    assert r["search"].startswith("ok: ") and str(arena.root) not in r["search"], r["search"]
    assert arena.secret not in r["read_found"] and "sqlalchemy" not in r["read_found"]
    assert "RAMP_HOSTILE_SECRET" not in r["own_environ"]
    assert denied(r, "read_home") or r["read_home"] == "ok: []"
    # the author's view: its error message (the frontend shows it) and its log
    assert s["snoop"].error_msg.startswith("Your submission failed: RuntimeError: LEAK")
    for text in (s["snoop"].error_msg, arena.log("snoop"), r["environ"]):
        assert arena.secret not in text


def test_network_is_out_of_reach(arena: Arena) -> None:
    r = probe_results(arena.log("network"), "network")
    for name in ("tcp_listener", "tcp_postgres", "unix_postgres", "dns"):
        assert denied(r, name), (name, r[name])
    assert arena.listener_hits == []


def test_signals_reach_nothing_outside(arena: Arena) -> None:
    r = probe_results(arena.log("signals"), "signals")
    assert int(r["visible_pids"].removeprefix("ok: ")) < 10, r  # its own PID namespace
    assert arena.daemon.poll() is None


def test_fork_bomb_stops_at_the_limit(arena: Arena) -> None:
    r = probe_results(arena.log("forkbomb"), "forkbomb")
    assert r["fork"].startswith("denied: BlockingIOError"), r
    assert isinstance(r["forked"], int) and 0 < r["forked"] < 64, r


def test_file_size_limit(arena: Arena) -> None:
    r = probe_results(arena.log("bigfile"), "bigfile")
    for name in ("big_tmp", "big_output"):
        assert r[name].startswith("denied: OSError: [Errno 27] File too large"), r


def test_forged_scores_are_recomputed(arena: Arena) -> None:
    s = arena.summaries()
    r = probe_results(arena.log("forger"), "forger")
    assert r["overwrite_scores"].startswith("ok: ["), r  # it did overwrite its files
    valid_acc, test_acc = s["forger"].scores["acc"]
    assert test_acc < 0.5 and valid_acc < 0.5, s["forger"].scores  # a constant guess
    message = arena.run_messages()[s["forger"].id]
    assert message.startswith("scores recomputed outside the sandbox differ"), message
    assert "bagged" in message and "reported 1" in message
    engine = create_engine(f"sqlite:///{arena.root / 'ramp.sqlite'}")
    try:
        text = status_text(engine, EVENT, limit=50)
    finally:
        engine.dispose()
    assert "scores recomputed outside the sandbox" in text
    assert "scores recomputed outside the sandbox differ" in arena.daemon_log.read_text()


def test_a_sandbox_that_cannot_start_is_the_platforms_failure(user: HostileUser) -> None:
    """Another run of the daemon's user holding every process RLIMIT_NPROC
    allows (a fork bomb) makes bwrap fail before the submission's code runs:
    the supervisor says spawn_error, which the workers treat as the
    platform's failure (retried), not an exit of the run. Played with
    RLIMIT_NPROC=1 for the supervisor's command, as the non-root user (the
    kernel never applies it to root); the control, the same sandbox whose
    command exits 1, is the command's exit."""
    site = next((user.venv / "lib").glob("python3.*/site-packages"))
    supervisor = site / "ramp_dispatcher" / "workers" / "supervise.py"
    folder = Path(tempfile.mkdtemp(prefix="ramp-nproc-", dir="/tmp"))
    try:
        os.chown(folder, user.uid, user.gid)
        sandbox = sb.empty_sandbox_argv(sb.find_bwrap() or "bwrap")

        def supervised(name: str, command: list[str], *options: str) -> dict:
            status = folder / f"{name}.json"
            subprocess.run(user.command([
                str(user.python), "-I", "-S", str(supervisor), "--log", str(folder / f"{name}.log"),
                "--status", str(status), "--timeout", "60", "--bwrap", *options, "--", *command,
            ]), check=True, timeout=120)  # fmt: skip
            return json.loads(status.read_text())

        starved = supervised("starved", [*sandbox, "--", "/bin/true"], "--rlimit", "NPROC=1")
        assert starved["reason"] == "spawn_error", starved
        assert "the sandbox did not start" in starved["message"], starved
        assert "Resource temporarily unavailable" in starved["message"], starved
        assert "the platform's failure" in (folder / "starved.log").read_text()

        failing = supervised("failing", [*sandbox, "--", "/bin/sh", "-c", "exit 1"])
        assert (failing["reason"], failing["exit_code"]) == ("exited", 1), failing
    finally:
        shutil.rmtree(folder, ignore_errors=True)
