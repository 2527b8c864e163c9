"""The conda worker with real processes and a real ramp-test (no mocks).

The environment is this virtualenv, given as a prefix path (``sys.prefix``):
it has ``bin/ramp-test`` from ramp-workflow 0.7.0. Name lookup goes through
a stand-in ``conda`` script written by the test, since no real conda is
assumed on the machine.

Every process a test starts carries a per-test tag in its environment; the
``no_leftovers`` fixture fails the test if a tagged process is still running
at the end (and kills it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from ramp_dispatcher.workers import conda, supervise
from ramp_dispatcher.workers.base import FailureClass, RunOutcome, RunRequest, WorkerError
from ramp_dispatcher.workers.conda import CondaConfig, CondaWorker, resolve_env
from ramp_dispatcher.workers.post_run import post_run_path

sys.path.insert(0, str(Path(__file__).parent))
import kit  # noqa: E402
from helpers import wait_for  # noqa: E402

VENV = Path(sys.prefix)
TAG_VAR = "RAMP_DISPATCHER_TEST_TAG"


# ------------------------------------------------------------------- helpers
def running(pid: int | None) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    if not pid:
        return False
    info = supervise.read_stat(pid)
    return info is not None and info.state not in ("Z", "X")


def tagged_processes(tag: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if f"{TAG_VAR}={tag}".encode() in environ.split(b"\0") and running(int(name)):
            found.append(int(name))
    return found


@pytest.fixture(autouse=True)
def no_leftovers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG_VAR, tag)
    yield
    deadline = time.monotonic() + 10
    while tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = tagged_processes(tag)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="session")
def iris_kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kit.make_iris_kit(tmp_path_factory.mktemp("iris_kit"))


_ids = iter(range(1, 10**6))


def make_request(
    tmp_path: Path, kit_dir: Path, source: str, attempt: int = 1, n_threads: int | None = None
) -> RunRequest:
    sid = next(_ids)
    name = f"submission_{sid:09d}"
    kit.add_submission_files(kit_dir, name, source, submissions_dir=tmp_path / "submissions")
    return RunRequest(
        submission_id=sid,
        submission_name=name,
        attempt=attempt,
        kit_dir=kit_dir,
        data_dir=kit_dir,
        submissions_dir=tmp_path / "submissions",
        logs_dir=tmp_path / "logs",
        predictions_dir=tmp_path / "predictions",
        n_threads=n_threads,
    )


def wait_outcome(
    worker: CondaWorker, request: RunRequest, handle: dict, limit: float = 30.0
) -> RunOutcome:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        outcome = worker.check(request, handle)
        if outcome is not None:
            return outcome
        time.sleep(0.1)
    raise AssertionError(f"no outcome within {limit} s")


def venv_worker(**kwargs: object) -> CondaWorker:
    # The sandbox passes on an allow-list of variables: the tag must be asked for.
    kwargs.setdefault("run_env", {TAG_VAR: os.environ[TAG_VAR]})
    return CondaWorker(CondaConfig(conda_env=str(VENV), **kwargs))  # type: ignore[arg-type]


def make_env(prefix: Path, ramp_test: bool = True) -> Path:
    """An env prefix whose bin/ramp-test is the venv's (its shebang is the venv python)."""
    (prefix / "bin").mkdir(parents=True)
    if ramp_test:
        (prefix / "bin" / "ramp-test").symlink_to(VENV / "bin" / "ramp-test")
    return prefix


def install_standin_conda(folder: Path, envs: list[Path], root: Path | None) -> Path:
    """Write a stand-in for ``conda`` (not the real tool): it answers
    ``info --envs --json`` with the listing in ``listing.json`` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    write_standin_listing(folder, envs, root)
    script = folder / "conda"
    script.write_text(
        "#!/bin/sh\n"
        "# Test stand-in for conda: only `conda info --envs --json` is supported.\n"
        'if [ "$1 $2 $3" = "info --envs --json" ]; then\n'
        f'  exec cat "{folder}/listing.json"\n'
        "fi\n"
        'echo "stand-in conda: unsupported arguments: $*" >&2\n'
        "exit 2\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


def write_standin_listing(folder: Path, envs: list[Path], root: Path | None) -> None:
    listing: dict[str, object] = {"envs": [str(p) for p in envs]}
    if root is not None:
        listing["root_prefix"] = str(root)
    (folder / "listing.json").write_text(json.dumps(listing))


# --------------------------------------------------------------------- runs
def test_good_submission(iris_kit: Path, tmp_path: Path) -> None:
    worker = venv_worker(timeout=120)
    request = make_request(tmp_path, iris_kit, kit.GOOD)
    woken = threading.Event()
    handle = worker.start(request, woken.set)
    json.dumps(handle)  # stored in the database: must be JSON
    assert woken.wait(30), "wake was not called"
    outcome = worker.check(request, handle)
    assert outcome is not None
    assert outcome.failure is None, outcome
    assert outcome.message == ""
    assert outcome.exit_code == 0
    assert outcome.output_dir == request.output_dir
    assert (request.output_dir / "fold_0" / "scores.csv").is_file()
    assert outcome.log_path == request.log_path
    log_text = request.log_path.read_text()
    assert "Iris classification (test kit)" in log_text and "CV fold 1" in log_text
    assert outcome.max_ram_mb is not None and outcome.max_ram_mb > 10
    assert outcome.duration_s is not None and 0 < outcome.duration_s < 60
    status = json.loads(Path(handle["status_path"]).read_text())
    assert status["reason"] == "exited" and status["exit_code"] == 0

    worker.cleanup(request, handle)
    assert not request.output_dir.exists()  # the working copy goes
    assert request.log_path.is_file()  # the log stays


def test_failing_submissions_are_participant_failures(iris_kit: Path, tmp_path: Path) -> None:
    worker = venv_worker(timeout=120)
    raises = make_request(tmp_path, iris_kit, kit.RAISES)
    syntax = make_request(tmp_path, iris_kit, kit.SYNTAX_ERROR)
    handles = [(r, worker.start(r, lambda: None)) for r in (raises, syntax)]
    for request, handle in handles:
        outcome = wait_outcome(worker, request, handle)
        assert outcome.failure is FailureClass.PARTICIPANT, outcome
        # ramp-workflow 0.7.0's ramp-test exits with code 1 on a failing submission.
        assert outcome.exit_code == 1
        assert outcome.message == "ramp-test exited with code 1"
        worker.cleanup(request, handle)
    assert "ValueError: deliberate failure in fit" in raises.log_path.read_text()
    assert "SyntaxError" in syntax.log_path.read_text()


def test_timeout_stops_the_whole_tree(iris_kit: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    # room for ramp-test to import and reach fit on a loaded CI machine; no
    # sandbox: the supervisor's own tree stop is tested (test_sandbox: with it)
    worker = venv_worker(timeout=10, sandbox="none")
    request = make_request(tmp_path, iris_kit, kit.slow_source(60, grandchild_pid_file=pid_file))
    t0 = time.monotonic()
    handle = worker.start(request, lambda: None)
    outcome = wait_outcome(worker, request, handle, limit=30)
    assert time.monotonic() - t0 < 25
    assert outcome.failure is FailureClass.TIMEOUT, outcome
    assert outcome.message == "Training stopped: the time limit of 10 s was reached."
    assert pid_file.exists(), "the submission did not reach fit before the time limit"
    status = json.loads(Path(handle["status_path"]).read_text())
    assert status["reason"] == "timeout"
    for pid in (handle["pid"], status["child_pid"], int(pid_file.read_text())):
        wait_for(lambda: not running(pid), limit=5)
    assert "time limit of 10 s was reached" in request.log_path.read_text()
    worker.cleanup(request, handle)


def test_memory_limit(iris_kit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIT_HOG_MB", "1500")
    worker = venv_worker(timeout=60, memory_limit_mb=400)
    request = make_request(tmp_path, iris_kit, kit.MEMORY_HOG)
    handle = worker.start(request, lambda: None)
    outcome = wait_outcome(worker, request, handle)
    assert outcome.failure is FailureClass.MEMORY, outcome
    assert outcome.message == "Training stopped: the memory limit of 400 MB was exceeded."
    assert outcome.max_ram_mb is not None and outcome.max_ram_mb > 400
    worker.cleanup(request, handle)


def test_n_threads_sets_thread_variables(iris_kit: Path, tmp_path: Path) -> None:
    probe = tmp_path / "omp.txt"
    worker = venv_worker(timeout=120, sandbox="none")  # test_sandbox: the same inside it
    request = make_request(
        tmp_path, iris_kit, kit.env_probe_source("OMP_NUM_THREADS", probe), n_threads=2
    )
    handle = worker.start(request, lambda: None)
    outcome = wait_outcome(worker, request, handle)
    assert outcome.failure is None, outcome
    assert probe.read_text() == "2"
    worker.cleanup(request, handle)


def test_reattach_with_only_the_handle(iris_kit: Path, tmp_path: Path) -> None:
    first = venv_worker(timeout=120)
    request = make_request(tmp_path, iris_kit, kit.GOOD, attempt=3)
    handle = json.loads(json.dumps(first.start(request, lambda: None)))
    first.close()
    del first  # the daemon "restarts"
    second = venv_worker(timeout=120)
    assert second.check(request, handle) is None  # still running
    outcome = wait_outcome(second, request, handle)
    assert outcome.failure is None, outcome
    assert (request.output_dir / "fold_1" / "scores.csv").is_file()
    assert Path(handle["status_path"]) == request.log_path.parent / "run-3.json"
    second.cleanup(request, handle)


def test_a_forgotten_run_is_left_to_its_new_owner(iris_kit: Path, tmp_path: Path) -> None:
    """Another daemon took the run over: when its supervisor ends, the old
    worker still reaps it but runs no post-run checks and wakes nobody; the
    checks (and the run's files) are the new owner's."""
    old = venv_worker(timeout=120)
    request = make_request(tmp_path, iris_kit, kit.GOOD)
    woken = threading.Event()
    handle = json.loads(json.dumps(old.start(request, woken.set)))
    old.forget(request, handle)
    waiter = next(t for t in threading.enumerate()
                  if t.name == f"conda-run-{request.submission_id}-{request.attempt}")
    waiter.join(120)  # the run ended and the old worker reaped it
    assert not waiter.is_alive()
    assert not woken.is_set()
    assert not post_run_path(request).exists()
    new = venv_worker(timeout=120)
    outcome = wait_outcome(new, request, handle)
    assert outcome.failure is None, outcome
    assert post_run_path(request).is_file()  # the new owner's checks
    new.cleanup(request, handle)


def test_lost_supervisor_is_an_infrastructure_failure(iris_kit: Path, tmp_path: Path) -> None:
    worker = venv_worker(timeout=120)
    request = make_request(tmp_path, iris_kit, kit.slow_source(60))
    handle = worker.start(request, lambda: None)
    status_path = Path(handle["status_path"])
    wait_for(status_path.exists)
    child = json.loads(status_path.read_text())["child_pid"]
    assert running(child)
    assert child in tagged_processes(os.environ[TAG_VAR])  # the leftover check sees runs
    os.kill(handle["pid"], signal.SIGKILL)
    outcome = wait_outcome(worker, request, handle, limit=10)
    assert outcome.failure is FailureClass.INFRASTRUCTURE
    assert outcome.message == "the run's supervisor process disappeared"
    # cleanup stops the ramp-test the dead supervisor left behind
    worker.cleanup(request, handle)
    wait_for(lambda: not running(child), limit=5)


def test_cleanup_cancels_a_running_run(iris_kit: Path, tmp_path: Path) -> None:
    worker = venv_worker(timeout=120)
    request = make_request(tmp_path, iris_kit, kit.slow_source(60))
    handle = worker.start(request, lambda: None)
    wait_for(lambda: "CV fold 0" in request.log_path.read_text())
    t0 = time.monotonic()
    worker.cleanup(request, handle)
    assert time.monotonic() - t0 < 8
    assert not running(handle["pid"])
    outcome = worker.check(request, handle)
    assert outcome is not None and outcome.failure is FailureClass.INFRASTRUCTURE
    assert outcome.message.startswith("the run was stopped before it finished")


def test_exit_zero_is_success_and_leaves_the_output_to_the_parser(tmp_path: Path) -> None:
    """The worker reports what ramp-test said; whether the output is usable is
    decided by the results parser (the dispatcher may have moved it already)."""
    # A stand-in ramp-test that succeeds without writing anything.
    prefix = tmp_path / "env"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "ramp-test").write_text("#!/bin/sh\necho stand-in ramp-test\nexit 0\n")
    (prefix / "bin" / "ramp-test").chmod(0o755)
    worker = CondaWorker(CondaConfig(conda_env=str(prefix)))
    request = make_request(tmp_path, tmp_path, kit.GOOD)
    handle = worker.start(request, lambda: None)
    outcome = wait_outcome(worker, request, handle)
    assert outcome.failure is None and outcome.exit_code == 0
    assert outcome.output_dir == request.output_dir and not request.output_dir.exists()
    assert "stand-in ramp-test" in request.log_path.read_text()


def test_supervisor_reports_spawn_errors(tmp_path: Path) -> None:
    status = tmp_path / "run-1.json"
    # In a child process: main() installs signal handlers and makes the
    # calling process a subreaper, which pytest itself must not become.
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(conda.SUPERVISOR),
         "--log", str(tmp_path / "log"), "--status", str(status), "--timeout", "5",
         "--", str(tmp_path / "missing-ramp-test")],
        timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0
    data = json.loads(status.read_text())
    assert data["reason"] == "spawn_error" and data["exit_code"] is None
    assert "missing-ramp-test" in data["message"]


# -------------------------------------------------------------- environments
def test_prefix_without_ramp_test(tmp_path: Path) -> None:
    prefix = make_env(tmp_path / "noramp", ramp_test=False)
    worker = CondaWorker(CondaConfig(conda_env=str(prefix)))
    request = make_request(tmp_path, tmp_path, kit.GOOD)
    with pytest.raises(WorkerError, match=r"has no bin/ramp-test"):
        worker.start(request, lambda: None)
    with pytest.raises(WorkerError, match=r"does not exist"):
        resolve_env(str(tmp_path / "nowhere"))


def test_lookup_by_name_through_standin_conda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_env(tmp_path / "miniconda")
    alpha = make_env(tmp_path / "miniconda" / "envs" / "alpha")
    broken = make_env(tmp_path / "miniconda" / "envs" / "broken", ramp_test=False)
    standin = install_standin_conda(tmp_path / "standin", [root, alpha, broken], root)

    # Through PATH ...
    monkeypatch.delenv("CONDA_EXE", raising=False)
    monkeypatch.setenv("PATH", f"{standin.parent}{os.pathsep}/usr/bin{os.pathsep}/bin")
    assert resolve_env("alpha") == alpha
    assert resolve_env("base") == root
    # ... and through CONDA_EXE, which wins over PATH.
    monkeypatch.setenv("CONDA_EXE", str(standin))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert resolve_env("alpha") == alpha
    with pytest.raises(WorkerError) as err:
        resolve_env("nope")
    assert str(err.value) == "conda environment 'nope' not found (known: alpha, base, broken)"
    with pytest.raises(WorkerError, match=r"'broken'.*has no bin/ramp-test"):
        resolve_env("broken")

    # Without root_prefix, "base" is matched on the folder name like any other.
    write_standin_listing(standin.parent, [alpha], None)
    with pytest.raises(WorkerError, match=r"'base' not found \(known: alpha\)"):
        resolve_env("base")


def test_no_conda_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONDA_EXE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing named conda there
    with pytest.raises(WorkerError) as err:
        resolve_env("alpha")
    assert str(err.value) == (
        "no conda executable: set CONDA_EXE or put conda on PATH, "
        "or give conda_env as a path to an environment prefix"
    )


def test_deleted_env_is_noticed(
    iris_kit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alpha = make_env(tmp_path / "conda" / "envs" / "alpha")
    beta = make_env(tmp_path / "conda" / "envs" / "beta")
    standin = install_standin_conda(tmp_path / "standin", [alpha, beta], None)
    monkeypatch.setenv("CONDA_EXE", str(standin))

    worker = CondaWorker(CondaConfig(conda_env="alpha", timeout=60))
    request = make_request(tmp_path, iris_kit, kit.GOOD)
    handle = worker.start(request, lambda: None)
    assert handle["env_prefix"] == str(alpha)
    # The env disappears (as `conda env remove` does): noticed on the next
    # start although the resolved name is still cached.
    shutil.rmtree(alpha)
    write_standin_listing(standin.parent, [beta], None)
    with caplog.at_level(logging.ERROR, logger="ramp_dispatcher.workers.conda"):
        with pytest.raises(WorkerError) as err:
            worker.start(make_request(tmp_path, iris_kit, kit.GOOD), lambda: None)
    # what participants read names no other environment of the host; the log does
    assert str(err.value) == "conda environment 'alpha' not found"
    assert "'alpha' not found (known: beta)" in caplog.text
    worker.cleanup(request, handle)  # the first run loses its env: cancel it


def test_env_cache_expires(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alpha = make_env(tmp_path / "conda" / "envs" / "alpha")
    standin = install_standin_conda(tmp_path / "standin", [alpha], None)
    monkeypatch.setenv("CONDA_EXE", str(standin))
    worker = CondaWorker(CondaConfig(conda_env="alpha", env_cache_s=0.3))
    assert worker.env_prefix() == alpha
    # conda no longer lists it (folder still there): trusted until expiry.
    write_standin_listing(standin.parent, [], None)
    assert worker.env_prefix() == alpha
    time.sleep(0.4)
    with pytest.raises(WorkerError, match=r"'alpha' not found \(known: none\)"):
        worker.env_prefix()


def test_supervisor_starts_light() -> None:
    """Every run starts a supervisor: it must not load SQLAlchemy or YAML
    (they cost ~0.4 s of CPU per run, measured by bench/batch.py). The worker
    runs it without site-packages, which only a standard-library program survives;
    started as a module through the package, it must stay light as well."""
    isolated = subprocess.run(
        [sys.executable, "-I", "-S", str(conda.SUPERVISOR), "--help"],
        capture_output=True, text=True, timeout=60,
    )
    assert isolated.returncode == 0 and "--timeout" in isolated.stdout, isolated.stderr
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys, runpy; sys.argv = ['x', '--help']\n"
         "try:\n    runpy.run_module('ramp_dispatcher.workers.supervise', run_name='__main__')\n"
         "except SystemExit:\n    pass\n"
         "print(sorted(m for m in ('sqlalchemy', 'yaml', 'numpy') if m in sys.modules))"],
        capture_output=True, text=True, timeout=60,
    )
    assert probe.stdout.strip().splitlines()[-1] == "[]", probe.stderr
