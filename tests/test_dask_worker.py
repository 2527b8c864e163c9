"""``worker_type: dask`` on a real Dask cluster (issue 14).

Real parts: a ``dask scheduler`` and two ``dask worker --nthreads 1
--resources ramp=1`` processes on 127.0.0.1 (see ``dask_fixtures``), each in
its own mount namespace where the deployments' folders and this package are
hidden; the real daemon (in this process, or ``ramp-dispatcher run`` in a
subprocess for kill -9); real ``ramp-test`` on the iris kit; results read
back through ramp-database 0.10.1. No fake anywhere.

Runs that must be "in progress" are gated (``faults.gated_source``) on a
file in the cluster's folder, which the Dask workers can see but their
sandbox cannot: gated runs go with ``sandbox: none`` (:data:`UNSANDBOXED`).
Sandboxed runs get the cluster's marker through ``run_env`` (the sandbox
passes an allow-list), so that the tests find their ramp-test processes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

# CI (RAMP_DISPATCHER_REQUIRE_DASK=1) has the dask extra and unshare: fail, never skip.
_REQUIRED = os.environ.get("RAMP_DISPATCHER_REQUIRE_DASK") == "1"
try:
    import distributed  # noqa: F401
except ImportError as exc:
    if _REQUIRED:
        raise RuntimeError(f"the dask tests are required but distributed is missing: {exc}")
    pytest.skip(f"distributed is not installed: {exc}", allow_module_level=True)

from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

import dask_fixtures  # noqa: E402
from dask_fixtures import DaskCluster, TlsFiles, make_tls_files  # noqa: E402
from deployment import Deployment, run_in_thread  # noqa: E402
from helpers import recording_listener  # noqa: E402
from kit import GOOD as KIT_GOOD, RAISES as KIT_RAISES, make_iris_kit  # noqa: E402
from faults import (  # noqa: E402
    MARKER_VAR,
    Daemon,
    add_submission,
    assert_scored_once,
    edit_event_config,
    gated_source,
    install_write_audit,
    proc_state,
    run_rows,
    start_time,
    wait_for,
)

from ramp_dispatcher.cli import main as cli_main  # noqa: E402
from ramp_dispatcher.config import ConfigError, load_event_config, server_config_for_url  # noqa: E402
from ramp_dispatcher.database import migrate  # noqa: E402
from ramp_dispatcher.database.engine import make_engine, normalise_url  # noqa: E402
from ramp_dispatcher.dispatcher import Dispatcher  # noqa: E402
from ramp_dispatcher.workers import make_worker  # noqa: E402
from ramp_dispatcher.workers.base import FailureClass, RunRequest  # noqa: E402
from ramp_dispatcher.workers.dask import DaskConfig  # noqa: E402
from ramp_dispatcher.workers.dask.worker import DaskWorker  # noqa: E402

_problem = dask_fixtures.unavailable()
if _problem is not None and _REQUIRED:
    raise RuntimeError(f"the dask tests are required but cannot run here: {_problem}")
pytestmark = pytest.mark.skipif(_problem is not None, reason=_problem or "")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    hidden = [tmp_path_factory.getbasetemp(), dask_fixtures.PACKAGE_DIR]
    c = DaskCluster(hidden)
    try:
        c.start_scheduler()
        c.start_workers(["w1", "w2"])
        yield c
    finally:
        c.close()


@pytest.fixture
def dask_cluster(cluster: DaskCluster, request: pytest.FixtureRequest) -> Iterator[DaskCluster]:
    """The module's cluster, made whole again before and after each test; on
    a failure, the ends of its logs go into the test's report."""
    cluster.ensure()
    yield cluster
    call = getattr(request.node, "rep_call", None)
    if call is not None and call.failed:
        print(cluster.log_tails())
    cluster.ensure()
    wait_for(lambda: not cluster.ramp_tests(), 30, "no ramp-test left on the Dask workers")


#: for gated runs: the gate is a host file, which the sandbox hides
UNSANDBOXED = {"sandbox": "none"}


def marked(cluster: DaskCluster) -> dict[str, str]:
    """run_env that lets a sandboxed ramp-test be found by the cluster's marker."""
    return {MARKER_VAR: cluster.marker}


class Gate:
    """Gated submissions whose gate and counters the Dask workers can see."""

    def __init__(self, cluster: DaskCluster):
        self.root = cluster.dir / "gates" / uuid.uuid4().hex
        self.file = self.root / "open"
        self.counters = self.root / "runs"

    def source(self, name: str) -> str:
        return gated_source(self.file, self.counters / name)

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.file.touch()

    def count(self, name: str) -> int:
        folder = self.counters / name
        return len(list(folder.iterdir())) if folder.is_dir() else 0


def dask_deployment(
    root: Path, cluster: DaskCluster, sources: dict[str, str], n_workers: int = 2,
    dispatcher_extra: str = "", **worker: Any,
) -> Deployment:  # fmt: skip
    dep = Deployment(root, f"sqlite:///{root.parent / (root.name + '.sqlite')}", sources,
                     n_workers=n_workers, dispatcher_extra=dispatcher_extra)  # fmt: skip
    edit_event_config(
        dep.event_path, "worker", worker_type="dask", conda_env=None,
        dask_scheduler=cluster.address, **worker,
    )  # fmt: skip
    install_write_audit(dep.engine)
    return dep


def sub_name(sid: int) -> str:
    return f"submission_{sid:09d}"


def attempts(dep: Deployment, sid: int) -> list[tuple]:
    return [(r.attempt, r.outcome, r.failure_class) for r in run_rows(dep.engine, sid)]


def assert_lost_once_then_scored(dep: Deployment, sid: int) -> None:
    """The first attempt was the platform's failure, the retry scored, once."""
    assert attempts(dep, sid) == [(1, "retry", "infrastructure"), (2, "scored", None)]
    assert_scored_once(dep.engine, sid)


# --------------------------------------------------------------------------- config
def _event_yaml(worker: str) -> str:
    return textwrap.dedent(
        """\
        ramp:
          problem_name: iris
          event_name: iris_dask
          event_title: Iris
          event_is_public: true
        worker:
          worker_type: dask
        """
    ) + textwrap.indent(textwrap.dedent(worker), "  ")


def test_config_keys_are_read_and_checked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = server_config_for_url(f"sqlite:///{tmp_path / 'db.sqlite'}")
    path = tmp_path / "config.yml"
    tls = make_tls_files(tmp_path / "tls")

    def load(worker: str):
        path.write_text(_event_yaml(worker))
        return load_event_config(path, server)

    with caplog.at_level(logging.WARNING):
        cfg = load(
            f"""\
            dask_scheduler: tls://10.0.0.5:8786
            conda_env: /opt/envs/ramp
            timeout: 60
            memory_limit_mb: 500
            shared_filesystem: true
            cache_dir: /scratch/ramp
            tls_ca_file: tls/ca.pem
            tls_client_cert: {tls.client_cert}
            tls_client_key: {tls.client_key}
            unreachable_timeout: 30
            sandbox: none
            allow_network: true
            run_env: {{KIT_MODE: fast}}
            max_processes: 100
            tmp_size_mb: 64
            verify_scores: true
            max_output_mb: 10
            colour: blue
            """
        )
    w = cfg.worker
    assert isinstance(w, DaskConfig) and cfg.worker_type == "dask"
    assert (w.dask_scheduler, w.conda_env, w.timeout, w.memory_limit_mb) == (
        "tls://10.0.0.5:8786", "/opt/envs/ramp", 60.0, 500.0)
    assert w.shared_filesystem is True and w.cache_dir == "/scratch/ramp"
    assert w.tls_ca_file == tmp_path / "tls" / "ca.pem"  # relative to the event config
    assert f"{path}: unknown key 'worker.colour'" in caplog.text
    assert (w.unreachable_timeout, w.sandbox, w.allow_network, dict(w.run_env)) == (30.0, "none", True,
                                                                                   {"KIT_MODE": "fast"})
    assert (w.limits.max_processes, w.limits.tmp_size_mb, w.config_path) == (100, 64.0, path)
    # the post-run checks happen on the Dask worker: their keys here too
    assert w.verify_scores is True and "unknown key 'worker.verify_scores'" not in caplog.text
    assert w.limits.max_output_mb == 10.0 and "unknown key 'worker.max_output_mb'" not in caplog.text
    assert load("dask_scheduler: tcp://h:1\nverify_scores: false\n").worker.verify_scores is False

    defaults = load("dask_scheduler: tcp://127.0.0.1:8786\n").worker
    assert (defaults.timeout, defaults.conda_env, defaults.shared_filesystem) == (7200.0, None, False)
    assert (defaults.sandbox, defaults.allow_network, defaults.unreachable_timeout) == ("bwrap", False, 120.0)
    assert defaults.verify_scores is True
    assert not defaults.uses_tls

    for worker, message in [
        ("timeout: 5\n", "key 'worker.dask_scheduler' is required"),
        ("dask_scheduler: 127.0.0.1:8786\n", "key 'worker.dask_scheduler' must be tcp://host:port"),
        ("dask_scheduler: tcp://h:1\ntimeout: 0\n", "key 'worker.timeout' must be positive"),
        ("dask_scheduler: tcp://h:1\ntimeout: soon\n", "key 'worker.timeout' must be a number"),
        ("dask_scheduler: tcp://h:1\nmemory_limit_mb: -1\n", "key 'worker.memory_limit_mb' must be positive"),
        ("dask_scheduler: tls://h:1\n", "key 'worker.tls_ca_file' a tls:// scheduler needs"),
        (f"dask_scheduler: tcp://h:1\ntls_ca_file: {tls.ca}\n", "go together"),
        (f"dask_scheduler: tcp://h:1\ntls_ca_file: {tls.ca}\ntls_client_cert: {tls.client_cert}\n"
         f"tls_client_key: {tls.client_key}\n", "key 'worker.dask_scheduler' must start with tls://"),
        ("dask_scheduler: tls://h:1\ntls_ca_file: nowhere.pem\n", "key 'worker.tls_ca_file': no such file"),
        ("dask_scheduler: tcp://h:1\nshared_filesystem: maybe\n", "must be true or false"),
        ("dask_scheduler: tcp://h:1\nverify_scores: maybe\n", "key 'worker.verify_scores' must be true or false"),
        ("dask_scheduler: tcp://h:1\nsandbox: docker\n", "key 'worker.sandbox' must be one of"),
        ("dask_scheduler: tcp://h:1\nrun_env: [A]\n", "key 'worker.run_env' must be a mapping"),
        ("dask_scheduler: tcp://h:1\nmax_open_files: 0\n", "key 'worker.max_open_files' must be positive"),
        ("dask_scheduler: tcp://h:1\nunreachable_timeout: 0\n", "key 'worker.unreachable_timeout' must be"),
    ]:
        with pytest.raises(ConfigError) as err:
            load(worker)
        assert str(path) in str(err.value) and message in str(err.value), (worker, str(err.value))


def test_example_config_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "deploy" / "dask-event-config.yml"
    tls = make_tls_files(tmp_path / "tls")
    text = example.read_text()
    for old, new in (("/etc/ramp-dask/ca.pem", tls.ca), ("/etc/ramp-dask/daemon.pem", tls.client_cert),
                     ("/etc/ramp-dask/daemon-key.pem", tls.client_key)):  # fmt: skip
        assert old in text
        text = text.replace(old, str(new))
    path = tmp_path / "config.yml"
    path.write_text(text)
    config = load_event_config(path, server_config_for_url(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    assert config.worker_type == "dask" and config.worker.uses_tls
    assert config.worker.dask_scheduler == "tls://ramp-scheduler.example.org:8786"


def test_supervisor_status_is_read_as_the_conda_worker_reads_it(tmp_path: Path) -> None:
    from ramp_dispatcher.workers.dask.worker import _Run

    cfg = DaskConfig("tcp://h:1", timeout=60, memory_limit_mb=300, shared_filesystem=True)
    times = {"started_at": 100.0, "finished_at": 112.5, "max_ram_mb": 151.2}
    request = RunRequest(7, "submission_000000007", 1, tmp_path, tmp_path, tmp_path / "subs",
                         tmp_path / "logs", tmp_path / "preds")  # fmt: skip
    log, out = request.log_path, request.output_dir
    worker = DaskWorker.__new__(DaskWorker)  # only the outcome reading: no cluster
    worker.config = cfg

    def read(**status: Any):
        result = {"status": {**times, **status}, "host": "h", "worker": "tcp://w:1"}
        return worker._outcome(_Run("key", request), result)

    ok = read(reason="exited", exit_code=0)
    assert (ok.failure, ok.output_dir, ok.max_ram_mb, ok.duration_s, ok.log_path) == (None, out, 151.2, 12.5, log)
    failed = read(reason="exited", exit_code=1)
    assert (failed.failure.value, failed.message) == ("participant", "ramp-test exited with code 1")
    killed = read(reason="exited", exit_code=None, signal=9)
    assert killed.failure.value == "participant" and killed.exit_code == -9
    assert "SIGKILL" in killed.message and "lack of memory" in killed.message
    slow = read(reason="timeout", message="the time limit of 60 s was reached")
    assert (slow.failure.value, slow.message) == ("timeout", "Training stopped: the time limit of 60 s was reached.")
    big = read(reason="memory", message="the memory limit of 300 MB was exceeded (412 MB in use)")
    assert big.failure.value == "memory" and big.message.startswith("Training stopped: the memory limit of 300 MB")
    for status, words in [
        ({"reason": "worker_lost", "message": "the Dask worker tcp://w:2 running it was lost"}, "tcp://w:2"),
        ({"reason": "killed", "message": "the supervisor received signal 15"}, "signal 15"),
        ({"reason": "spawn_error", "message": "no such file"}, "could not start ramp-test on h"),
        ({"reason": "??"}, "unknown run status"),
    ]:
        got = read(**status)
        assert got.failure.value == "infrastructure" and words in got.message, got


def test_the_output_sent_back_is_written_as_plain_files_or_refused(tmp_path: Path) -> None:
    from ramp_dispatcher.workers.dask.worker import _Run

    cfg = DaskConfig("tcp://h:1", timeout=60, sandbox="none", verify_scores=False)
    request = RunRequest(7, "submission_000000007", 1, tmp_path, tmp_path, tmp_path / "subs",
                         tmp_path / "logs", tmp_path / "preds")  # fmt: skip
    worker = DaskWorker.__new__(DaskWorker)  # only the outcome reading: no cluster
    worker.config = cfg
    status = {"reason": "exited", "exit_code": 0, "started_at": 1.0, "finished_at": 2.0}

    def read(output: Any):
        result = {"status": status, "host": "h", "worker": "tcp://w:1", "log_tail": b"ok\n", "log_size": 3,
                  "output": output}  # fmt: skip
        return worker._outcome(_Run("key", request), result)

    request.output_dir.mkdir(parents=True)
    (request.output_dir / "stale").write_text("from an earlier attempt")
    ok = read([("fold_0", None), ("fold_0/y_pred_test.npz", b"npz"), ("bagged_scores.csv", b"s\n")])
    assert ok.failure is None and ok.output_dir == request.output_dir
    assert sorted(os.listdir(request.output_dir)) == ["bagged_scores.csv", "fold_0"]
    assert (request.output_dir / "fold_0" / "y_pred_test.npz").read_bytes() == b"npz"
    for hostile in ([("../../escaped", b"x")], [("a", b"1"), ("a", b"2")], b"not entries", {"a": b"1"}):
        refused = read(hostile)
        assert refused.failure == FailureClass.INFRASTRUCTURE and "refused" in refused.message, refused
        assert not request.output_dir.exists() and not (tmp_path / "escaped").exists()
    big = DaskConfig("tcp://h:1", timeout=60, sandbox="none", verify_scores=False,
                     limits=dataclasses.replace(DaskConfig("tcp://h:1").limits, max_output_mb=0.001))  # fmt: skip
    worker.config = big
    assert "refused" in read([("a", b"x" * 2000)]).message


def test_no_tls_warns_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        make_worker("dask", DaskConfig("tcp://127.0.0.1:1"), event_name="e").close()
    assert "tcp://127.0.0.1:1 is not TLS" in caplog.text
    tls = make_tls_files(tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        make_worker("dask", DaskConfig("tls://127.0.0.1:1", tls_ca_file=tls.ca,
                    tls_client_cert=tls.client_cert, tls_client_key=tls.client_key),
                    event_name="e").close()  # fmt: skip
    assert "not TLS" not in caplog.text
    assert "WITHOUT a sandbox" not in caplog.text  # sandboxed by default
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        make_worker("dask", DaskConfig("tcp://127.0.0.1:1", sandbox="none", config_path=tmp_path / "e.yml"),
                    event_name="e").close()  # fmt: skip
    assert f"{tmp_path / 'e.yml'}: key 'worker.sandbox' is 'none': submissions run WITHOUT a sandbox" in caplog.text


# --------------------------------------------------------------------------- the whole path
def _rampboard_configs(tmp_path: Path, board: dict, cluster: DaskCluster) -> tuple[Path, Path]:
    from deployment import sqlalchemy_section

    server = tmp_path / "config.yml"
    server.write_text(f"sqlalchemy:\n  {sqlalchemy_section(board['url'])}\n")
    event = tmp_path / "events" / board["event"] / "config.yml"
    event.parent.mkdir(parents=True, exist_ok=True)
    event.write_text(textwrap.dedent(f"""\
        ramp:
          problem_name: {board['problem']}
          event_name: {board['event']}
          event_title: Iris test event
          event_is_public: true
          kit_dir: {board['kit_dir']}
          data_dir: {board['data_dir']}
          submissions_dir: {board['submissions_dir']}
          sandbox_dir: {board['sandbox']}
        worker:
          worker_type: dask
          dask_scheduler: {cluster.address}
          timeout: 120
        dispatcher:
          n_workers: 2
          n_threads: 1
          hunger_policy: exit
          poll_interval: 1
        """))
    return server, event


def test_rampboard_event_runs_on_the_cluster(
    empty_db_url: str, tmp_path: Path, dask_cluster: DaskCluster
) -> None:
    """A ramp-board database, runs on Dask workers that cannot see the
    deployment, results read back through ramp-database 0.10.1."""
    import csv

    from ramp_database.tools.submission import (
        get_scores,
        get_submission_error_msg,
        get_submission_max_ram,
        get_submission_state,
        get_time,
    )
    from rampboard import build_rampboard_db

    from ramp_dispatcher.config import load_server_config

    board = build_rampboard_db(empty_db_url, tmp_path)
    engine = make_engine(empty_db_url)
    migrate.upgrade(engine)
    server_path, event_path = _rampboard_configs(tmp_path, board, dask_cluster)
    config = load_event_config(event_path, load_server_config(server_path))

    # what the Dask workers see: neither the deployment nor this package
    from distributed import Client

    with Client(dask_cluster.address, set_as_default=False) as client:
        seen = client.run(os.path.exists, str(board["kit_dir"] / "problem.py"))
        package = client.run(os.path.exists, str(dask_fixtures.PACKAGE_DIR / "workers" / "supervise.py"))
    assert len(seen) == 2 and not any(seen.values()), seen
    assert not any(package.values()), package
    assert (board["kit_dir"] / "problem.py").exists()

    d = Dispatcher.for_event(engine, config)
    d.start()
    try:
        assert d.stopped.wait(180), "the daemon did not finish"
    finally:
        d.stop()

    good, broken = board["submissions"][("alice", "logreg")], board["submissions"][("bob", "broken")]
    raw = create_engine(normalise_url(empty_db_url))
    with Session(raw) as session:
        assert get_submission_state(session, good) == "scored"
        scores, times = get_scores(session, good), get_time(session, good)
        assert get_submission_max_ram(session, good) > 10  # MB, measured on the Dask worker
        assert get_submission_state(session, broken) == "training_error"
        assert "ValueError: deliberate failure in fit" in get_submission_error_msg(session, broken)
    raw.dispose()
    # predictions laid out exactly as the conda worker leaves them
    out = config.ramp.predictions_dir / sub_name(good)
    for fold in range(2):
        for f in ("scores.csv", "y_pred_train.npz", "y_pred_test.npz", "train_time"):
            assert (out / f"fold_{fold}" / f).is_file()
        with open(out / f"fold_{fold}" / "scores.csv") as f:
            rows = {r["step"]: r for r in csv.DictReader(f)}
        assert scores.loc[(fold, "valid"), "acc"] == pytest.approx(float(rows["valid"]["acc"]))
        assert times.loc[fold, "train"] == pytest.approx(float((out / f"fold_{fold}" / "train_time").read_text()))
    assert (out / "bagged_scores.csv").is_file()
    assert "ValueError" in (config.ramp.logs_dir / sub_name(broken) / "log").read_text()
    # the kit (which is also the data folder here) went to the Dask workers as one tree
    trees = {t for w in ("w1", "w2") for t in dask_cluster.cache_trees(w)}
    assert len(trees) >= 1
    engine.dispose()


def test_kit_and_data_go_once_and_are_refreshed_on_change(
    tmp_path: Path, dask_cluster: DaskCluster
) -> None:
    dep = dask_deployment(tmp_path / "deploy", dask_cluster, {f"g{i}": GOOD_EST for i in range(2)})
    before = {w: set(dask_cluster.cache_trees(w)) for w in ("w1", "w2")}
    dep.run_until_done(180)
    assert {s.state for n, s in dep.summaries().items() if n != "starting_kit"} == {"scored"}
    after = {w: set(dask_cluster.cache_trees(w)) - before[w] for w in ("w1", "w2")}
    # kit and data (two folders here) arrived on each Dask worker that ran something, once
    assert all(len(new) in (0, 2) for new in after.values()), after
    first = set().union(*after.values())
    assert len(first) == 2
    cache = {w: {t: (dask_cluster.dir / w / "cache" / "trees" / t).stat().st_ino for t in first
                 if (dask_cluster.dir / w / "cache" / "trees" / t).exists()} for w in ("w1", "w2")}  # fmt: skip

    # unchanged: later runs reuse the copies (same folders, nothing new)
    add_submission(dep, "again", GOOD_EST)
    dep.run_until_done(180)
    for w in ("w1", "w2"):
        for t, ino in cache[w].items():
            assert (dask_cluster.dir / w / "cache" / "trees" / t).stat().st_ino == ino
    assert {t for w in ("w1", "w2") for t in dask_cluster.cache_trees(w)} - before["w1"] - before["w2"] == first

    # the data changes: a new copy goes out and the runs use it
    config = dep.event_config()
    train = config.ramp.data_dir / "data" / "train.csv"
    train.write_text(train.read_text() + train.read_text().splitlines()[1] + "\n")
    add_submission(dep, "after_change", GOOD_EST)
    dep.run_until_done(180)
    assert dep.summaries()["after_change"].state == "scored"
    now = {t for w in ("w1", "w2") for t in dask_cluster.cache_trees(w)} - before["w1"] - before["w2"]
    assert len(now - first) == 1  # the new data tree; the kit's is reused


GOOD_EST = """\
from sklearn.linear_model import LogisticRegression


def get_estimator():
    return LogisticRegression(max_iter=500)
"""


# after the kit test: the same kit, run here first, would already be in the caches it looks at
def test_the_runs_code_goes_once_to_each_dask_worker(tmp_path: Path, dask_cluster: DaskCluster) -> None:
    import cloudpickle
    from distributed import Client

    from ramp_dispatcher.workers.dask import stub
    from ramp_dispatcher.workers.dask.worker import code_digest

    dep = dask_deployment(tmp_path / "deploy", dask_cluster, {f"g{i}": GOOD_EST for i in range(3)}, **UNSANDBOXED)
    dep.run_until_done(180)
    assert [dep.summaries()[f"g{i}"].state for i in range(3)] == ["scored"] * 3
    digest = code_digest(cloudpickle.__version__)
    with Client(dask_cluster.address, set_as_default=False) as client:
        # published once on the scheduler, named by its sources (the same in every daemon)...
        assert stub.CODE_PREFIX + digest in client.list_datasets()
        # ...and loaded once by each Dask worker that ran something, kept for the next runs
        probe: dict[str, Any] = {"__name__": "not_importable_probe"}  # pickled by value
        exec("def loaded(dask_worker):\n    return sorted(dask_worker.__dict__.get('_ramp_dispatcher_code', {}))",
             probe)  # fmt: skip
        loaded = client.run(probe["loaded"])
        assert [(digest, "run_submission")] in [[tuple(k) for k in v] for v in loaded.values()], loaded


# --------------------------------------------------------------------------- slots, re-attach, cancel
def test_one_run_per_slot_and_reattach_after_kill9(tmp_path: Path, dask_cluster: DaskCluster) -> None:
    gate = Gate(dask_cluster)
    names = ["a", "b", "c"]
    dep = dask_deployment(tmp_path / "deploy", dask_cluster, {n: gate.source(n) for n in names},
                          n_workers=3, **UNSANDBOXED)  # fmt: skip
    marker = uuid.uuid4().hex
    first = Daemon(dep, marker, tmp_path / "daemon-a.log")
    try:
        wait_for(lambda: all(dep.summaries()[n].state == "training" for n in names), 60, "3 runs claimed")
        sids = {n: dep.summaries()[n].id for n in names}
        # three runs claimed, but each single-slot Dask worker runs one at a time
        wait_for(lambda: len(dask_cluster.ramp_tests()) == 2, 60, "two ramp-tests on the cluster")
        time.sleep(1.0)
        running = [n for n in names if dask_cluster.ramp_tests(sub_name(sids[n]))]
        assert len(running) == 2
        assert {dask_cluster.runner_of(sub_name(sids[n])) for n in running} == {"w1", "w2"}
        pids = sorted(dask_cluster.ramp_tests())

        first.kill9()
        time.sleep(0.5)
        assert sorted(dask_cluster.ramp_tests()) == pids  # the runs live on without the daemon
        second = Daemon(dep, marker, tmp_path / "daemon-b.log")
        second.wait_log("re-attached (was running)", 30, count=3)
        assert sorted(dask_cluster.ramp_tests()) == pids  # nothing restarted
        gate.open()
        assert second.wait_exit(120) == 0
        assert "Traceback" not in second.log()
    finally:
        for d in (first,):
            d.stop_hard()
    for n in names:
        assert attempts(dep, sids[n]) == [(1, "scored", None)]  # collected, not retrained
        assert gate.count(n) == 1
        assert_scored_once(dep.engine, sids[n])


def test_cancel_stops_ramp_test_on_the_dask_worker(tmp_path: Path, dask_cluster: DaskCluster) -> None:
    gate = Gate(dask_cluster)
    dep = dask_deployment(tmp_path / "deploy", dask_cluster, {"stuck": gate.source("stuck"), "fine": GOOD_EST},
                          n_workers=1, **UNSANDBOXED)  # fmt: skip
    d = dep.dispatcher()
    run_in_thread(d)
    try:
        sid = wait_for(lambda: dep.summaries()["stuck"].state == "training" and dep.summaries()["stuck"].id,
                       60, "the run to start")  # fmt: skip
        pid = wait_for(lambda: dask_cluster.ramp_tests(sub_name(sid)), 60, "ramp-test on a Dask worker")[0]
        born = start_time(pid)
        wait_for(lambda: gate.count("stuck") == 1, 60, "ramp-test to be in the submission's code")
        assert cli_main(["cancel", str(sid), "--config", str(dep.server_path)]) == 0
        wait_for(lambda: start_time(pid) != born or proc_state(pid) == "Z", 30, "ramp-test to be stopped")
        assert not dask_cluster.ramp_tests(sub_name(sid))
        wait_for(lambda: dep.summaries()["fine"].state == "scored", 120, "the next run, in the freed slot")
    finally:
        d.stopped.set()
        d.stop()
    assert dep.summaries()["stuck"].state == "checking_error"
    assert attempts(dep, sid) == [(1, "checking_error", "cancelled")]
    assert gate.count("stuck") == 1


# --------------------------------------------------------------------------- faults
def _fault_setup(tmp_path: Path, cluster: DaskCluster) -> tuple[Deployment, Gate, Daemon, int]:
    gate = Gate(cluster)
    dep = dask_deployment(tmp_path / "deploy", cluster, {"slow": gate.source("slow")}, n_workers=1,
                          dispatcher_extra="retry_delay: 0", connect_timeout=3, **UNSANDBOXED)  # fmt: skip
    daemon = Daemon(dep, uuid.uuid4().hex, tmp_path / "daemon.log")
    sid = wait_for(lambda: dep.summaries()["slow"].state == "training" and dep.summaries()["slow"].id,
                   60, "the run to start")  # fmt: skip
    wait_for(lambda: cluster.runner_of(sub_name(sid)), 60, "ramp-test on a Dask worker")
    return dep, gate, daemon, sid


def test_dask_worker_killed_mid_run(tmp_path: Path, dask_cluster: DaskCluster) -> None:
    dep, gate, daemon, sid = _fault_setup(tmp_path, dask_cluster)
    try:
        victim = dask_cluster.runner_of(sub_name(sid))
        doomed = dask_cluster.ramp_tests(sub_name(sid))
        dask_cluster.kill_worker(victim, signal.SIGKILL)
        # its run dies with it (the supervisor's parent-death signal)
        wait_for(lambda: not set(doomed) & set(dask_cluster.ramp_tests()), 30, "the lost run to stop")
        daemon.wait_log("infrastructure failure", 60)
        gate.open()
        assert daemon.wait_exit(120) == 0
    finally:
        daemon.stop_hard()
    assert "was lost" in daemon.log()
    assert_lost_once_then_scored(dep, sid)


def test_a_spare_supervisor_takes_the_next_run_and_dies_with_its_worker(
    tmp_path: Path, dask_cluster: DaskCluster
) -> None:
    # Two runs at once: one on each Dask worker, each leaving a spare behind.
    warm = dask_deployment(tmp_path / "warm", dask_cluster, {"a": GOOD_EST, "b": GOOD_EST}, n_workers=2,
                           **UNSANDBOXED)  # fmt: skip
    d = warm.dispatcher()
    run_in_thread(d)
    try:
        wait_for(lambda: [warm.summaries()[n].state for n in "ab"] == ["scored"] * 2, 120, "two runs")
    finally:
        d.stopped.set()
        d.stop()
    wait_for(lambda: all(len(dask_cluster.spares(w)) == 1 for w in ("w1", "w2")), 30, "a spare on each worker")
    ready = {w: dask_cluster.spares(w)[0] for w in ("w1", "w2")}

    dep, gate, daemon, sid = _fault_setup(tmp_path, dask_cluster)
    try:
        victim = dask_cluster.runner_of(sub_name(sid))
        doomed = dask_cluster.ramp_tests(sub_name(sid))
        # the run went to the worker's ready spare, and another took its place
        assert [proc_ppid(p) for p in doomed] == [ready[victim]]
        wait_for(lambda: dask_cluster.spares(victim) not in ([], [ready[victim]]), 30, "a new spare")
        idle = dask_cluster.spares(victim)
        dask_cluster.kill_worker(victim, signal.SIGKILL)
        # the run and the idle spare die with the worker
        wait_for(lambda: not set(doomed + idle) & set(dask_cluster.ramp_tests() + _alive(idle)), 30,
                 "the lost run and the spare to stop")  # fmt: skip
        daemon.wait_log("infrastructure failure", 60)
        gate.open()
        assert daemon.wait_exit(120) == 0
    finally:
        daemon.stop_hard()
    assert_lost_once_then_scored(dep, sid)


def proc_ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if proc_state(p) not in (None, "Z")]


def test_the_client_keeps_its_periodic_work_rare(dask_cluster: DaskCluster) -> None:
    from ramp_dispatcher.workers.dask.worker import CLIENT_SETTINGS

    worker = DaskWorker(DaskConfig(dask_cluster.address, sandbox="none"))
    try:
        client = worker.client()
        client._heartbeat()  # the scheduler answers: "5 s" for both
        time.sleep(1.0)
        every = {name: client._periodic_callbacks[name].callback_time for name in ("heartbeat", "scheduler-info")}
        assert every == {"heartbeat": 300_000, "scheduler-info": 300_000}, every
        assert set(CLIENT_SETTINGS.values()) == {"300s"}
        # what the start-up check asks for is fetched afresh
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
    finally:
        worker.close()


def test_scheduler_stopped_and_restarted(tmp_path: Path, dask_cluster: DaskCluster) -> None:
    dep, gate, daemon, sid = _fault_setup(tmp_path, dask_cluster)
    try:
        dask_cluster.stop_scheduler(signal.SIGKILL)
        # the Dask workers leave with their scheduler, and their runs with them
        wait_for(lambda: not dask_cluster.ramp_tests(), 60, "the runs to stop")
        time.sleep(3.0)
        assert daemon.alive() and dep.summaries()["slow"].state == "training"  # held, not failed
        dask_cluster.ensure()
        daemon.wait_log("does not know this run", 60)
        gate.open()
        assert daemon.wait_exit(120) == 0
    finally:
        daemon.stop_hard()
    assert_lost_once_then_scored(dep, sid)


def test_dask_worker_paused_with_sigstop(tmp_path: Path, dask_cluster: DaskCluster) -> None:
    dep, gate, daemon, sid = _fault_setup(tmp_path, dask_cluster)
    victim = dask_cluster.runner_of(sub_name(sid))
    try:
        os.kill(dask_cluster.worker_pid(victim), signal.SIGSTOP)
        # the scheduler drops the silent worker (worker-ttl) and the daemon is told
        daemon.wait_log("infrastructure failure", 90)
        gate.open()  # the paused worker's ramp-test may finish too: never collected
        wait_for(lambda: dep.summaries()["slow"].state == "scored", 120, "the retry to be scored")
        os.kill(dask_cluster.worker_pid(victim), signal.SIGCONT)
        assert daemon.wait_exit(60) == 0
        time.sleep(2.0)  # whatever the resumed worker says now is ignored
    finally:
        daemon.stop_hard()
    assert_lost_once_then_scored(dep, sid)


# --------------------------------------------------------------------------- TLS
def test_tls_with_client_certificates(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    c = DaskCluster([tmp_path_factory.getbasetemp(), dask_fixtures.PACKAGE_DIR], tls=tls)
    # the certificates live in the hidden folder: give the cluster its own copies
    own = c.dir / "tls"
    own.mkdir()
    for name in ("ca.pem", "cluster.pem", "cluster-key.pem"):
        (own / name).write_bytes((tls.ca.parent / name).read_bytes())
    c.tls = TlsFiles(own / "ca.pem", own / "cluster.pem", own / "cluster-key.pem", tls.client_cert, tls.client_key)
    try:
        c.start_scheduler()
        c.start_worker("t1")
        from distributed import Client
        from distributed.security import Security

        # without a client certificate the scheduler refuses the connection
        with pytest.raises(Exception):
            Client(c.address, security=Security(tls_ca_file=str(tls.ca), require_encryption=True),
                   timeout=3, set_as_default=False)  # fmt: skip

        kit = make_iris_kit(tmp_path / "kit")
        subs = tmp_path / "subs"
        (subs / sub_name(1)).mkdir(parents=True)
        (subs / sub_name(1) / "classifier.py").write_text(KIT_GOOD)
        request = RunRequest(1, sub_name(1), 1, kit, kit, subs, tmp_path / "logs", tmp_path / "pred", 1)
        worker = DaskWorker(DaskConfig(c.address, tls_ca_file=tls.ca, tls_client_cert=tls.client_cert,
                                       tls_client_key=tls.client_key, timeout=120), event_name="tls")  # fmt: skip
        try:
            handle = worker.start(request, lambda: None)
            outcome = wait_for(lambda: worker.check(request, handle), 120, "the TLS run")
            assert outcome.failure is None, outcome
            assert (request.output_dir / "fold_0" / "y_pred_test.npz").is_file()
            assert outcome.max_ram_mb and outcome.max_ram_mb > 10
            worker.cleanup(request, handle)
        finally:
            worker.close()
    finally:
        c.close()


def test_raises_is_a_participant_failure_with_the_traceback(tmp_path: Path, dask_cluster: DaskCluster) -> None:
    """A direct run through the worker API: the log tail comes back, the
    output folder of a failed run is where the conda worker would leave it."""
    kit = make_iris_kit(tmp_path / "kit")
    subs = tmp_path / "subs"
    (subs / sub_name(7)).mkdir(parents=True)
    (subs / sub_name(7) / "classifier.py").write_text(KIT_RAISES)
    request = RunRequest(7, sub_name(7), 1, kit, kit, subs, tmp_path / "logs", tmp_path / "pred", 1)
    worker = DaskWorker(DaskConfig(dask_cluster.address, timeout=120), event_name="direct")
    try:
        handle = worker.start(request, lambda: None)
        outcome = wait_for(lambda: worker.check(request, handle), 120, "the run")
        assert outcome.failure is not None and outcome.failure.value == "participant"
        assert outcome.message == "ramp-test exited with code 1"
        assert "deliberate failure in fit" in request.log_path.read_text()
        assert (request.output_dir / "fold_0" / "error.txt").is_file()
        worker.cleanup(request, handle)
    finally:
        worker.close()


def _direct_request(tmp_path: Path, sid: int, source: str, kit: Path | None = None) -> RunRequest:
    kit = kit or make_iris_kit(tmp_path / "kit")
    subs = tmp_path / "subs"
    (subs / sub_name(sid)).mkdir(parents=True)
    (subs / sub_name(sid) / "classifier.py").write_text(source)
    return RunRequest(sid, sub_name(sid), 1, kit, kit, subs, tmp_path / "logs", tmp_path / "pred", 1)


def test_the_loop_never_waits_for_an_unreachable_cluster(tmp_path: Path) -> None:
    """start and check return at once while the scheduler does not answer;
    the run waits (holding its slot), it is not failed."""
    port = dask_fixtures.free_port()
    request = _direct_request(tmp_path, 1, KIT_GOOD)
    worker = DaskWorker(DaskConfig(f"tcp://127.0.0.1:{port}", connect_timeout=10), event_name="away")
    try:
        t0 = time.monotonic()
        handle = worker.start(request, lambda: None)
        checks = [worker.check(request, handle) for _ in range(5)]
        elapsed = time.monotonic() - t0
        assert checks == [None] * 5
        assert elapsed < 1.0  # one connection attempt alone may take 10 s
        time.sleep(2.0)
        assert worker.check(request, handle) is None  # still waiting for the cluster
        assert handle["key"].startswith("ramp-run-away-") and handle["key"].endswith("-1-1")
    finally:
        worker.close()


def test_timeout_is_enforced_on_the_dask_worker(tmp_path: Path, dask_cluster: DaskCluster) -> None:
    from kit import slow_source

    request = _direct_request(tmp_path, 8, slow_source(120))
    worker = DaskWorker(DaskConfig(dask_cluster.address, timeout=4, run_env=marked(dask_cluster)), event_name="limits")
    try:
        handle = worker.start(request, lambda: None)
        wait_for(lambda: dask_cluster.ramp_tests(sub_name(8)), 60, "ramp-test (in its sandbox) on a Dask worker")
        outcome = wait_for(lambda: worker.check(request, handle), 90, "the timed-out run")
        assert outcome.failure is not None and outcome.failure.value == "timeout", outcome
        assert outcome.message == "Training stopped: the time limit of 4 s was reached."
        assert "the time limit of 4 s was reached" in request.log_path.read_text()
        worker.cleanup(request, handle)
    finally:
        worker.close()
    assert not dask_cluster.ramp_tests(sub_name(8))


def test_memory_limit_is_enforced_on_the_dask_worker(tmp_path: Path, dask_cluster: DaskCluster) -> None:
    from kit import MEMORY_HOG

    request = _direct_request(tmp_path, 9, MEMORY_HOG)
    worker = DaskWorker(DaskConfig(dask_cluster.address, timeout=120, memory_limit_mb=400,
                                   run_env=marked(dask_cluster)), event_name="limits")
    try:
        handle = worker.start(request, lambda: None)
        outcome = wait_for(lambda: worker.check(request, handle), 90, "the memory-hungry run")
        assert outcome.failure is not None and outcome.failure.value == "memory", outcome
        assert outcome.message.startswith("Training stopped: the memory limit of 400 MB was exceeded")
        assert outcome.max_ram_mb is not None and outcome.max_ram_mb > 400
        worker.cleanup(request, handle)
    finally:
        worker.close()
    assert not dask_cluster.ramp_tests(sub_name(9))


def test_reaper_stops_runs_no_daemon_owns(tmp_path: Path, dask_cluster: DaskCluster) -> None:
    from distributed import Client
    from kit import slow_source

    kit = make_iris_kit(tmp_path / "kit")
    lost = _direct_request(tmp_path, 21, slow_source(120), kit)
    kept = RunRequest(22, sub_name(22), 1, kit, kit, lost.submissions_dir, lost.logs_dir, lost.predictions_dir, 1)
    (kept.submissions_dir / sub_name(22)).mkdir()
    (kept.submissions_dir / sub_name(22) / "classifier.py").write_text(KIT_GOOD)
    first = DaskWorker(DaskConfig(dask_cluster.address, timeout=300, run_env=marked(dask_cluster)), event_name="reap")
    lost_handle = first.start(lost, lambda: None)
    wait_for(lambda: dask_cluster.ramp_tests(sub_name(21)), 60, "the run to start")
    first.close()  # its daemon died before recording the run anywhere
    second = DaskWorker(DaskConfig(dask_cluster.address, timeout=300, run_env=marked(dask_cluster)), event_name="reap")
    try:
        handle = second.start(kept, lambda: None)
        assert wait_for(lambda: second.check(kept, handle), 120, "the kept run").failure is None
        with Client(dask_cluster.address, set_as_default=False) as client:
            assert {lost_handle["key"], handle["key"]} <= set(client.list_datasets())
            second.reap({(22, 1)})  # the database knows only run 22
            wait_for(lambda: not dask_cluster.ramp_tests(sub_name(21)), 30, "the orphan to be stopped")
            wait_for(lambda: lost_handle["key"] not in client.list_datasets(), 30, "the orphan released")
            assert handle["key"] in client.list_datasets()  # until its cleanup
            second.cleanup(kept, handle)
            wait_for(lambda: handle["key"] not in client.list_datasets(), 30, "the run released")
    finally:
        second.close()


def test_shared_filesystem_runs_in_place(tmp_path: Path) -> None:
    """Dask workers that see the deployment: nothing copied, ramp-test writes
    the output and the log straight into the deployment's folders."""
    c = DaskCluster(hidden=[])
    try:
        c.start_scheduler()
        c.start_worker("s1")
        request = _direct_request(tmp_path, 3, KIT_GOOD)
        worker = DaskWorker(DaskConfig(c.address, shared_filesystem=True, timeout=120), event_name="shared")
        try:
            handle = worker.start(request, lambda: None)
            outcome = wait_for(lambda: worker.check(request, handle), 120, "the run")
            assert outcome.failure is None, outcome
            assert (request.output_dir / "fold_1" / "y_pred_test.npz").is_file()
            log = request.log_path.read_text()
            assert "Bagged scores" in log or "bagged" in log.lower()
            assert (request.log_path.parent / "run-1.json").is_file()  # the supervisor's status
            assert c.cache_trees("s1") == []  # no copy of the kit or the data
        finally:
            worker.close()
    finally:
        c.close()


# --------------------------------------------------------------------------- trusted re-scoring
def test_forged_scores_are_recomputed_on_the_dask_worker(tmp_path: Path, dask_cluster: DaskCluster) -> None:
    """A weak model that patches rampwf's score functions and rewrites its
    scores.csv inside the sandbox: the Dask worker scores its saved
    predictions again, outside the sandbox, on the event's folds; those are
    stored and the run says they differ. The same submission with
    ``verify_scores: false`` gets its forged scores (the test can fail)."""
    from rescoring import expected_valid_scores, run_message, stored_valid_scores
    from sandbox_attacks import forging_estimator, probe_results

    deps = {
        verify: dask_deployment(tmp_path / f"verify-{verify}", dask_cluster, {"forger": forging_estimator()},
                                n_workers=1, verify_scores=verify)
        for verify in (True, False)
    }  # fmt: skip
    dispatchers = [dep.dispatcher() for dep in deps.values()]
    try:
        for d in dispatchers:  # both at once: the cluster has a slot for each
            run_in_thread(d)
        for d in dispatchers:
            assert d.stopped.wait(180), "the daemon did not finish"
    finally:
        for d in dispatchers:
            d.stop()

    dep = deps[True]
    forger = dep.summaries()["forger"]
    assert forger.state == "scored", forger.error_msg
    ramp = dep.event_config().ramp
    log = (ramp.logs_dir / sub_name(forger.id) / "log").read_text()
    assert probe_results(log, "forger")["overwrite_scores"].startswith("ok: ['"), log[-2000:]  # it did
    expected = expected_valid_scores(dep.engine, ramp.kit_dir, ramp.data_dir,
                                     ramp.predictions_dir / sub_name(forger.id), "acc")  # fmt: skip
    assert max(expected) < 0.5  # a constant guess
    assert stored_valid_scores(dep.engine, forger.id, "acc") == pytest.approx(expected)
    message = run_message(dep.engine, forger.id)
    assert message.startswith("scores recomputed outside the sandbox differ"), message
    assert "bagged" in message and "reported 1" in message
    assert (ramp.logs_dir / sub_name(forger.id) / "scores-1.json").is_file()  # beside the log, as conda's

    bare = deps[False]
    forged = bare.summaries()["forger"]
    assert forged.state == "scored", forged.error_msg
    assert stored_valid_scores(bare.engine, forged.id, "acc") == [1.0] * len(expected)
    assert run_message(bare.engine, forged.id) == ""


def test_folds_out_of_reach_delay_the_run_without_charging_it(tmp_path: Path, dask_cluster: DaskCluster) -> None:
    """The event's folds are read before the run goes out; a database outage
    (TryLater) holds it back until they can be read; an honest run's
    recomputed scores are its own."""
    from rampwf.utils.testing import assert_read_problem

    from ramp_dispatcher.results import parse_training_output
    from ramp_dispatcher.trusted_scores import read_results
    from rescoring import failing_once

    request = _direct_request(tmp_path, 5, KIT_GOOD)
    problem = assert_read_problem(str(request.kit_dir))
    X, y = problem.get_train_data(path=str(request.data_dir))
    folds = list(problem.get_cv(X, y))
    cv_folds, calls = failing_once(folds)

    worker = DaskWorker(DaskConfig(dask_cluster.address, timeout=120), event_name="folds", cv_folds=cv_folds)
    try:
        handle = worker.start(request, lambda: None)
        assert handle["verify_scores"] is True
        outcome = wait_for(lambda: worker.check(request, handle), 120, "the run")
        assert outcome.failure is None, (outcome, request.log_path.read_text()[-2000:])
        assert calls == [5, 5]
        assert outcome.trusted_scores == request.log_path.parent / "scores-1.json"
        results, note = read_results(request.output_dir, len(folds), ["acc", "nll"], outcome.trusted_scores)
        assert note == "" and results == parse_training_output(request.output_dir, len(folds), ["acc", "nll"])
        worker.cleanup(request, handle)
    finally:
        worker.close()


def test_output_over_the_limit_fails_on_the_dask_worker(tmp_path: Path, dask_cluster: DaskCluster) -> None:
    """``max_output_mb`` is checked where the run wrote its output: over it,
    the run is the participant's failure and the output is never sent."""
    from ramp_dispatcher.workers.sandbox import Limits

    request = _direct_request(tmp_path, 6, KIT_GOOD)
    tiny = Limits(max_output_mb=0.001)  # an iris output has tens of KB
    worker = DaskWorker(DaskConfig(dask_cluster.address, timeout=120, limits=tiny, verify_scores=False))
    try:
        handle = worker.start(request, lambda: None)
        outcome = wait_for(lambda: worker.check(request, handle), 120, "the run")
        assert outcome.failure is FailureClass.PARTICIPANT, outcome
        assert "into its output folder, more than the limit of 0.001 MB" in outcome.message
        assert not request.output_dir.exists()  # not sent to the daemon
        worker.cleanup(request, handle)
    finally:
        worker.close()


# --------------------------------------------------------------------------- sandbox on the Dask worker
@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP listener on 127.0.0.1 (the Dask workers share this network) that
    records whatever reaches it."""
    with recording_listener() as port_and_got:
        yield port_and_got


def test_sandbox_on_the_dask_worker(tmp_path: Path, dask_cluster: DaskCluster, listener) -> None:
    """The default sandbox, on the Dask worker's host (bwrap inside the Dask
    worker's own mount namespace): what the Dask worker reads and reaches,
    its run cannot; the run sees its environment, kit, data and submission
    read-only, and writes only its output and a private /tmp."""
    import socket

    from distributed import Client
    from sandbox_attacks import denied, probe_classifier, probe_results

    port, got = listener
    secret = dask_cluster.dir / f"secret-{uuid.uuid4().hex[:8]}.txt"  # visible to the Dask workers
    secret.write_text("hunter2")
    sid = 41
    probe = f"""
        import socket, sys
        subs = sys.argv[sys.argv.index("--ramp-submission-dir") + 1]
        attempt("env", lambda: sorted(_os.environ))
        attempt("tmpdir", lambda: _os.environ["TMPDIR"])
        attempt("read_secret", lambda: read({str(secret)!r}))
        attempt("list_cluster", lambda: listing({str(dask_cluster.dir)!r}))
        attempt("list_submissions", lambda: listing(subs))
        attempt("read_kit", lambda: read(_os.path.join(_os.getcwd(), "problem.py")))
        attempt("write_kit", lambda: write(_os.path.join(_os.getcwd(), "problem.py")))
        attempt("write_submission", lambda: write(_os.path.join(subs, {sub_name(sid)!r}, "classifier.py")))
        attempt("write_env", lambda: write(_os.path.join(sys.prefix, "planted")))
        attempt("write_tmp", lambda: write("/tmp/scratch"))
        attempt("tcp", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=3))
        report("dask")
    """
    # the controls: the Dask workers themselves read the secret and reach the listener
    with Client(dask_cluster.address, set_as_default=False) as client:
        assert set(client.run(lambda p: open(p).read(), str(secret)).values()) == {"hunter2"}
        client.run(lambda p: socket.create_connection(("127.0.0.1", p), timeout=3).close(), port)
    wait_for(lambda: len(got) == 2, 10, "the Dask workers to reach the listener")
    got.clear()

    request = _direct_request(tmp_path, sid, probe_classifier(probe, KIT_GOOD))
    worker = DaskWorker(DaskConfig(dask_cluster.address, timeout=120, run_env=marked(dask_cluster)),
                        event_name="boxed")  # fmt: skip
    try:
        handle = worker.start(request, lambda: None)
        outcome = wait_for(lambda: worker.check(request, handle), 120, "the sandboxed run")
        log = request.log_path.read_text()
        assert outcome.failure is None, (outcome, log[-3000:])
        assert (request.output_dir / "fold_0" / "y_pred_test.npz").is_file()
        r = probe_results(log, "dask")
        # PWD comes from bwrap's --chdir, KMP_* from scikit-learn's own import
        env = {v for v in eval(r["env"].removeprefix("ok: ")) if v != "PWD" and not v.startswith("KMP_")}
        assert env <= {"PATH", "HOME", "TMPDIR", "PYTHONUNBUFFERED", "LANG", "LC_ALL", "LC_CTYPE",
                       "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", MARKER_VAR}, env
        assert r["tmpdir"] == "ok: '/tmp'"  # not the Dask worker's own TMPDIR
        for name in ("read_secret", "write_kit", "write_submission", "write_env", "tcp"):
            assert denied(r, name), (name, r[name])
        # the cluster's folder shows at most the way to the cached kit and the run (bwrap's mount points)
        assert denied(r, "list_cluster") or set(eval(r["list_cluster"].removeprefix("ok: "))) <= {"w1", "w2"}
        assert r["list_submissions"] == f"ok: [{sub_name(sid)!r}]"
        assert r["read_kit"].startswith("ok: b'import os") and r["write_tmp"] == "ok: 'written'"
        assert got == [], "nothing reached the listener from the sandbox"
        assert "hunter2" not in log
        worker.cleanup(request, handle)
    finally:
        worker.close()


def test_sandbox_that_cannot_start_is_the_platforms_failure(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Dask worker host without bwrap (masked in its namespace): a warning
    at start-up naming the worker, then each run there an infrastructure
    failure naming the file and key, never the participant's; with
    ``sandbox: none`` the same host runs it."""
    import shutil

    bwrap = Path(shutil.which("bwrap") or "/usr/bin/bwrap").resolve()
    c = DaskCluster([tmp_path_factory.getbasetemp(), dask_fixtures.PACKAGE_DIR], masked=[bwrap])
    config_path = tmp_path / "event-config.yml"
    try:
        c.start_scheduler()
        worker = DaskWorker(DaskConfig(c.address, timeout=120, config_path=config_path), event_name="bare")
        try:
            with caplog.at_level(logging.WARNING):
                worker.validate()  # a scheduler without workers yet: a warning, not an error
            assert f"no Dask worker of {c.address} has the 'ramp' resource yet" in caplog.text
            c.start_worker("bare")
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                worker.validate()
            assert f"{config_path}: key 'worker.sandbox': the Dask worker tcp://127.0.0.1:" in caplog.text
            assert "bubblewrap (bwrap) is not installed" in caplog.text

            request = _direct_request(tmp_path / "boxed", 51, KIT_GOOD)
            handle = worker.start(request, lambda: None)
            outcome = wait_for(lambda: worker.check(request, handle), 120, "the run")
            assert outcome.failure is not None and outcome.failure.value == "infrastructure", outcome
            assert outcome.message.startswith("could not start ramp-test on "), outcome.message
            assert f"{config_path}: key 'worker.sandbox': bubblewrap (bwrap) is not installed" in outcome.message
            assert not request.output_dir.exists()
            worker.cleanup(request, handle)
        finally:
            worker.close()
        plain = DaskWorker(DaskConfig(c.address, timeout=120, sandbox="none"), event_name="bare")
        try:
            request = _direct_request(tmp_path / "plain", 52, KIT_GOOD)
            handle = plain.start(request, lambda: None)
            outcome = wait_for(lambda: plain.check(request, handle), 120, "the unsandboxed run")
            assert outcome.failure is None, outcome
            plain.cleanup(request, handle)
        finally:
            plain.close()
    finally:
        c.close()


def test_a_signal_inside_the_sandbox_is_read_as_the_signal(tmp_path: Path, dask_cluster: DaskCluster) -> None:
    """bwrap reports its command's death by signal N as exit code 128 + N:
    the participant's run is still 'killed by SIGKILL', as without a sandbox."""
    source = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n" + KIT_GOOD
    request = _direct_request(tmp_path, 61, source)
    worker = DaskWorker(DaskConfig(dask_cluster.address, timeout=120), event_name="signal")
    try:
        handle = worker.start(request, lambda: None)
        outcome = wait_for(lambda: worker.check(request, handle), 120, "the run")
        assert outcome.failure is not None and outcome.failure.value == "participant", outcome
        assert outcome.message.startswith("ramp-test was killed by SIGKILL (signal 9)"), outcome.message
        assert outcome.exit_code == -9
        worker.cleanup(request, handle)
    finally:
        worker.close()


# --------------------------------------------------------------------------- start-up check
def test_run_checks_the_cluster_before_serving(tmp_path: Path) -> None:
    """``ramp-dispatcher run`` exits 2 naming the file and key when the
    scheduler does not answer in time or a TLS file does not load; nothing
    is claimed."""
    import subprocess

    from faults import DISPATCHER_EXE

    dep = Deployment(tmp_path / "deploy", f"sqlite:///{tmp_path / 'db.sqlite'}", {"good": GOOD_EST})
    tls = make_tls_files(tmp_path / "tls")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    tls_keys = {"tls_ca_file": str(tls.ca), "tls_client_cert": str(tls.client_cert),
                "tls_client_key": str(tls.client_key)}  # fmt: skip
    address = f"127.0.0.1:{dask_fixtures.free_port()}"  # nothing listens there
    for worker, key, words in [
        ({"dask_scheduler": f"tcp://{address}", "connect_timeout": 2}, "dask_scheduler",
         "the scheduler did not answer within 2 s"),
        ({"dask_scheduler": f"tls://{address}", **tls_keys, "tls_client_cert": str(garbage)},
         "tls_client_cert", "is not a PEM certificate and its key"),
        ({"dask_scheduler": f"tls://{address}", **tls_keys, "tls_ca_file": str(garbage)},
         "tls_ca_file", "is not a PEM CA certificate"),
    ]:
        keys = {"tls_ca_file": None, "tls_client_cert": None, "tls_client_key": None, **worker}
        edit_event_config(dep.event_path, "worker", worker_type="dask", conda_env=None, **keys)
        t0 = time.monotonic()
        out = subprocess.run(
            [str(DISPATCHER_EXE), "run", "--config", str(dep.server_path), "--event-config", str(dep.event_path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert f"{dep.event_path}: key 'worker.{key}': " in out.stderr and words in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
        assert time.monotonic() - t0 < 60  # bounded: one connection attempt
    assert dep.summaries()["good"].state == "new"


# --------------------------------------------------------------------------- circuit breaker
def test_breaker_holds_the_queue_while_the_cluster_is_gone(tmp_path: Path, dask_cluster: DaskCluster) -> None:
    """The scheduler is killed with the queue half done: the runs it took
    and the next ones fail as the platform's, the breaker opens and holds the
    queue (no checking_error, no attempt used while it holds), the daemon
    lives on; once the cluster is back, every submission is scored once."""
    names = [f"q{i}" for i in range(6)]
    # retry_delay: the runs that failed wait a little (as in production), so
    # the next failures are other submissions': the breaker counts those
    dep = dask_deployment(tmp_path / "deploy", dask_cluster, {n: GOOD_EST for n in names}, n_workers=2,
                          dispatcher_extra="retry_delay: 5\nmax_attempts: 3", connect_timeout=2,
                          unreachable_timeout=4, run_env=marked(dask_cluster))  # fmt: skip

    def states() -> dict[str, str]:
        return {n: s.state for n, s in dep.summaries().items() if n in names}

    daemon = Daemon(dep, uuid.uuid4().hex, tmp_path / "daemon.log")
    try:
        wait_for(lambda: "scored" in states().values(), 120, "a first submission scored")
        dask_cluster.stop_scheduler(signal.SIGKILL)
        daemon.wait_log("circuit breaker open after", 120)
        time.sleep(12.0)  # the first probe (10 s after it opened) comes and fails meanwhile
        assert daemon.alive()
        held = states()
        assert "checking_error" not in held.values() and "scored" in held.values(), (held, daemon.log()[-5000:])
        assert set(held.values()) != {"scored"}, "the scheduler went before the queue was done"
        dask_cluster.ensure()
        assert daemon.wait_exit(300) == 0, daemon.log()[-3000:]
    finally:
        daemon.stop_hard()
    log = daemon.log()
    assert "circuit breaker closed" in log and "Traceback" not in log
    assert set(states().values()) == {"scored"}, states()
    rows = run_rows(dep.engine)
    assert any(r.outcome == "held" for r in rows), rows
    ids = {n: s.id for n, s in dep.summaries().items() if n in names}
    for name, sid in ids.items():
        retries = [r for r in rows if r.submission_id == sid and r.outcome == "retry"]
        assert len(retries) < 3, (name, rows)  # the held attempts were not charged
        assert_scored_once(dep.engine, sid)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-x", "-q"]))
