"""What runs on the Dask worker: one submission, through the run supervisor.

:func:`run_submission` is the task the daemon submits (through :mod:`.stub`,
which loads this module once per Dask worker process); :func:`stop_run` is
sent with ``Client.run`` to the Dask worker running a task to stop it (it
runs beside the task, not in the worker's single slot). Both are shipped to
the Dask workers by value (cloudpickle), with the supervisor's source as
text, so a Dask worker needs Python, ``distributed`` and ramp-test's
environment, but no ramp_dispatcher. Hence standard library only here, plus
``distributed`` imported inside the functions, and the sandbox's builders
(``..sandbox``), shipped by value too: names imported from it one by one
(a module object would be pickled by reference). The trusted re-scoring
after a clean exit is the conda worker's (``..post_run``, shipped by value
too), with rescore.py's source in the spec, written beside the supervisor.

The spec (a plain dict: it crosses to another Python) and the result are
described in :func:`run_submission`.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..post_run import Scorer, check_output, env_python, sanitize_output
from ..sandbox import (
    Limits,
    SandboxSpec,
    bwrap_argv,
    bwrap_problem,
    find_bwrap,
    python_roots,
    rlimit_args,
    sandbox_env,
    system_binds,
)
from .cache import TREE_PREFIX, install_tree
from .files import read_files, write_files
from .stub import fetch_published

#: scheduler metadata namespace: ``[NS, key, "started"]`` records the first
#: execution of a run, so that a re-execution (Dask re-runs the tasks of a
#: lost worker) reports the loss instead of training the submission again
NS = "ramp-dispatcher"
PR_SET_PDEATHSIG = 1
#: seconds between two looks at whether the task is still wanted
WATCH_INTERVAL_S = 0.5
#: seconds a stopped supervisor gets before its session is killed
STOP_GRACE_S = 10.0
#: task states in which the worker still wants the task's result
_WANTED = frozenset({"executing", "long-running", "resumed"})


def cache_root(configured: str | None) -> Path:
    """The worker's cache: the config's cache_dir, $RAMP_DISPATCHER_CACHE, or <tmp>."""
    value = configured or os.environ.get("RAMP_DISPATCHER_CACHE")
    if value:
        return Path(os.path.expanduser(value))
    return Path(tempfile.gettempdir()) / f"ramp-dispatcher-cache-{os.getuid()}"


def _scheduler_call(worker: Any, name: str, **kwargs: Any) -> Any:
    """A scheduler RPC from a task thread, with the worker's own connection
    (and TLS credentials): no client needed on the Dask worker."""
    from distributed.utils import sync

    return sync(worker.loop, getattr(worker.scheduler, name), **kwargs)


def _fetch_tree(worker: Any, digest: str) -> bytes:
    return fetch_published(worker, TREE_PREFIX + digest)


def _ramp_test(conda_env: str | None) -> Path:
    if not conda_env:
        prefix = Path(sys.executable).parent.parent
    elif "/" in conda_env:
        prefix = Path(os.path.expanduser(conda_env))
    else:
        conda = os.environ.get("CONDA_EXE") or shutil.which("conda")
        if not conda:
            raise RuntimeError(f"conda environment {conda_env!r}: no conda on this Dask worker")
        out = subprocess.run(
            [conda, "info", "--envs", "--json"], capture_output=True, timeout=60, check=True
        )
        info = json.loads(out.stdout)
        root = info.get("root_prefix")
        names = {("base" if p == root else os.path.basename(p)): p for p in reversed(info["envs"])}
        if conda_env not in names:
            raise RuntimeError(f"conda environment {conda_env!r} not found on this Dask worker")
        prefix = Path(names[conda_env])
    exe = prefix / "bin" / "ramp-test"
    if not os.access(exe, os.X_OK):
        raise RuntimeError(f"{exe} is not an executable on this Dask worker")
    return exe


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
        return int(data[data.rfind(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _die_with_parent(parent: int) -> Any:
    """A preexec_fn for the supervisor: SIGTERM when the Dask worker dies (the
    task's thread waits for it, so that thread lives as long as the run).

    prctl is looked up here, in the worker: the forked child of a threaded
    process must not dlopen (another thread may have held the loader's lock).
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the worker died before the prctl
            os._exit(1)

    return in_child


class Spares:
    """One idle supervisor kept ready on this Dask worker (``supervise.py
    --spare``), handed the next run's arguments: the run does not wait for the
    fork and the Python start (~40 ms of its slot). A spare is started on a
    thread of its own that lives as long as the worker, so the parent-death
    signal (tied to the thread that forks) means the worker's death, as for a
    supervisor started by the run's task thread. A spare that finds its stdin
    closed (the worker gone) exits unused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: dict[Path, subprocess.Popen[bytes]] = {}  # supervisor script -> spare
        self._wanted: list[Path] = []
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def hand(self, script: Path, args: list[str], output: Path) -> subprocess.Popen[bytes] | None:
        """The ready spare of ``script``, now running ``args`` (its output to
        ``output``), or None; either way another spare is started for the next run."""
        with self._lock:
            proc = self._ready.pop(script, None)
            self._wanted.append(script)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="ramp-dispatcher-spares", daemon=True)
                self._thread.start()
            self._wake.notify()
        if proc is None or proc.stdin is None or proc.poll() is not None:
            return None
        try:
            proc.stdin.write(json.dumps({"argv": args, "output": str(output)}).encode() + b"\n")
            proc.stdin.close()
        except OSError:  # it died meanwhile
            _reap_spare(proc)
            return None
        return proc

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._wanted:
                    self._wake.wait()
                script = self._wanted.pop()
                self._wanted.clear()
                if script in self._ready:
                    continue
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", str(script), "--spare"], stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                    start_new_session=True, preexec_fn=_die_with_parent(os.getpid()),
                )  # fmt: skip
            except (OSError, subprocess.SubprocessError):
                continue  # the next run starts its own
            with self._lock:
                stale = [p for s, p in self._ready.items() if s != script]  # an older supervisor's
                self._ready = {script: proc}
            for old in stale:
                _reap_spare(old)


def _reap_spare(proc: subprocess.Popen[bytes]) -> None:
    """Close an unused spare's input (it exits) and reap it."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


def _spares(worker: Any) -> Spares:
    """This Dask worker process's spares, kept on the worker object (this
    module is shipped by value with each task: its globals do not last)."""
    spares = worker.__dict__.get("_ramp_dispatcher_spares")
    if spares is None:
        spares = worker.__dict__.setdefault("_ramp_dispatcher_spares", Spares())
    return spares


def _still_wanted(worker: Any, key: str) -> bool:
    try:
        ts = worker.state.tasks.get(key)
    except Exception:  # the worker is closing
        return False
    return ts is not None and ts.state in _WANTED


def _exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether the process ended within ``timeout`` s. Waits on a pidfd, so an
    end is seen at once (``Popen.wait`` polls with sleeps of up to 50 ms)."""
    try:
        fd: int | None = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # Python < 3.9, Linux < 5.3, or reaped already
        fd = None
    if fd is not None:
        try:
            select.select([fd], [], [], timeout)
        finally:
            os.close(fd)
    try:
        proc.wait(timeout=0 if fd is not None else timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _tail(path: Path, limit: int) -> tuple[bytes, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - limit))
            return f.read(), size
    except OSError:
        return b"", 0


def run_submission(spec: dict[str, Any], submission: bytes | None) -> dict[str, Any]:
    """Run one submission on this Dask worker; return what the daemon needs.

    ``spec`` keys: key, submission_name, cache_dir, conda_env, timeout,
    memory_limit_mb, niceness, max_log_mb, env (name -> value), supervisor_source,
    supervisor_digest, log_tail_bytes, shared; without a shared filesystem
    kit_digest and data_digest (trees published on the scheduler), with one
    kit_dir, data_dir, submissions_dir, log_path and status_path.
    ``submission`` is the submission folder's files (``files.read_files``;
    None when shared).
    ``sandbox`` is None (``sandbox: none``) or a dict: where (the config key,
    for messages), allow_network, run_env, limits (Limits' fields), n_threads
    and hidden (paths never shown; with a shared filesystem, the event's
    submissions, predictions and logs folders and its config).
    ``rescore`` is None (``verify_scores: false``) or a dict: source and
    digest (rescore.py), folds (the event's folds as npz bytes, or None).

    Returns ``{"status": <the supervisor's final status>, "worker", "host",
    "log_tail", "log_size", "output" (training_output's files, as
    ``files.read_files`` gives them, or None),
    "fetched" (trees fetched for this run)}``, and after a clean exit with
    ``rescore``: "check" (``post_run.check_output``'s dict) and "scores"
    (the recomputed scores, rescore.py's JSON, or None). A re-execution after the loss
    of the worker that started the run returns a status with reason
    ``worker_lost`` and runs nothing.
    """
    from distributed import get_worker

    worker = get_worker()
    key = spec["key"]
    started = [NS, key, "started"]
    previous = _scheduler_call(worker, "get_metadata", keys=started, default=None)
    base = {"worker": worker.address, "host": socket.gethostname(), "fetched": [],
            "log_tail": None, "log_size": 0, "output": None}  # fmt: skip
    if previous is not None:
        return dict(base, status={
            "reason": "worker_lost",
            "message": f"the Dask worker {previous.get('worker')} running it was lost",
        })  # fmt: skip
    _scheduler_call(
        worker, "set_metadata", keys=started,
        value={"worker": worker.address, "host": base["host"], "pid": os.getpid(), "at": time.time()},
    )  # fmt: skip

    root = cache_root(spec.get("cache_dir"))
    run_dir = root / "runs" / key
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    try:
        result = _run(worker, spec, submission, root, run_dir, base)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return _sandbox_verdict(spec.get("sandbox"), result)


def _sandbox_verdict(box: dict[str, Any] | None, result: dict[str, Any]) -> dict[str, Any]:
    """A failed sandboxed run: the host's fault if an empty sandbox cannot start
    here either (retried, never the participant's). Asked after a failure
    rather than before each run: an empty sandbox costs a run ~20 ms."""
    status = result.get("status") or {}
    code = status.get("exit_code")
    if not box or status.get("reason") != "exited" or not isinstance(code, int) or code == 0:
        return result
    problem = bwrap_problem(find_bwrap(), bool(box["allow_network"]))
    if problem is None:
        return result
    return dict(result, status={"reason": "spawn_error", "message": f"{box['where']}: {problem}"})


def _run(
    worker: Any, spec: dict[str, Any], submission: bytes | None, root: Path, run_dir: Path,
    base: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    key = spec["key"]
    supervisor = _script(root, "supervise", spec["supervisor_digest"], spec["supervisor_source"])

    name = spec["submission_name"]
    if spec["shared"]:
        kit, data = spec["kit_dir"], spec["data_dir"]
        submissions = Path(spec["submissions_dir"])
        log_path, status_path = Path(spec["log_path"]), Path(spec["status_path"])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(submissions / name / "training_output", ignore_errors=True)
    else:
        kit_path, kit_new = install_tree(root, spec["kit_digest"], lambda: _fetch_tree(worker, spec["kit_digest"]))
        data_path, data_new = install_tree(root, spec["data_digest"], lambda: _fetch_tree(worker, spec["data_digest"]))
        base["fetched"] = [d for d, new in ((spec["kit_digest"], kit_new), (spec["data_digest"], data_new)) if new]
        kit, data = str(kit_path), str(data_path)
        submissions = run_dir / "submissions"
        write_files(submission or [], submissions / name)
        log_path, status_path = run_dir / "log", run_dir / "status.json"

    ramp_test = _ramp_test(spec.get("conda_env"))
    command = [
        str(ramp_test), "--submission", name, "--ramp-kit-dir", kit,
        "--ramp-data-dir", data, "--ramp-submission-dir", str(submissions),
        "--save-output", "--ignore-warning",
    ]  # fmt: skip
    argv = [  # the supervisor's arguments
        "--log", str(log_path), "--status", str(status_path),
        "--timeout", repr(float(spec["timeout"])), "--nice", str(int(spec["niceness"])),
        "--cwd", kit,
    ]  # fmt: skip
    if spec.get("memory_limit_mb") is not None:
        argv += ["--memory-limit-mb", repr(float(spec["memory_limit_mb"]))]
    if spec.get("max_log_mb") is not None:
        argv += ["--max-log-mb", repr(float(spec["max_log_mb"]))]
    box = spec.get("sandbox")
    if box:
        bwrap = find_bwrap()
        # no bwrap at all is said at once; a sandbox that cannot start, after the run (_sandbox_verdict)
        problem = bwrap_problem(bwrap, bool(box["allow_network"])) if bwrap is None else None
        if problem is not None:  # the host's fault: retried, never the participant's
            return dict(base, status={"reason": "spawn_error", "message": f"{box['where']}: {problem}"})
        output = submissions / name / "training_output"
        output.mkdir(parents=True, exist_ok=True)  # the one folder it may write: bound, so it must exist
        sandbox = SandboxSpec(
            python_roots=python_roots(ramp_test.parent.parent),
            kit_dir=Path(os.path.abspath(kit)),
            data_dir=Path(os.path.abspath(data)),
            submission_dir=Path(os.path.abspath(submissions / name)),
            output_dir=Path(os.path.abspath(output)),
            # other runs' folders, should the cache lie below a bound folder
            hidden=tuple(Path(p) for p in box.get("hidden") or ()) + (root / "runs",),
            system=system_binds(),
            allow_network=bool(box["allow_network"]),
            run_env=dict(box.get("run_env") or {}),
            n_threads=box.get("n_threads"),
            limits=Limits(**box["limits"]),
            bwrap=str(bwrap),
        )
        command = bwrap_argv(sandbox, command)
        env = sandbox_env(sandbox, os.environ)
        argv += ["--clear-env", "--bwrap"]  # the Dask worker's environment stays outside
        argv += rlimit_args(sandbox.limits)
    else:
        env = dict(spec.get("env") or {})
        env["PATH"] = os.pathsep.join([str(ramp_test.parent), os.environ.get("PATH", "")])
    for var, value in env.items():
        argv += ["--setenv", f"{var}={value}"]
    argv += ["--", *command]
    status_path.unlink(missing_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        proc = _spares(worker).hand(supervisor, argv, log_path)
        if proc is None:  # none ready (this worker's first run, or it died): start one
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(supervisor), *argv], stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, close_fds=True,
                start_new_session=True, preexec_fn=_die_with_parent(os.getpid()),
            )  # fmt: skip
    finally:
        os.close(log_fd)
    _write_json(
        run_dir / "supervisor.json",
        {"pid": proc.pid, "start_time": _start_time(proc.pid), "status": str(status_path)},
    )

    stopping_since: float | None = None
    while True:
        if _exited(proc, WATCH_INTERVAL_S):
            break
        if stopping_since is None and not _still_wanted(worker, key):
            # released (cancelled, or its client gone before publishing it)
            stopping_since = time.monotonic()
            proc.send_signal(signal.SIGTERM)
        elif stopping_since is not None and time.monotonic() - stopping_since > STOP_GRACE_S:
            _kill_session(run_dir, status_path)

    status = _read_json(status_path) or {
        "reason": "killed",
        "message": f"the supervisor exited with code {proc.returncode} without a status",
    }
    code = status.get("exit_code")
    if box and status.get("reason") == "exited" and isinstance(code, int) and code > 128:
        # bwrap reports its command's death by signal N as exit code 128 + N
        status = dict(status, exit_code=None, signal=code - 128)
    result = dict(base, status=status)
    rescore, limit = spec.get("rescore"), spec.get("max_output_mb")
    output = submissions / name / "training_output"
    if status.get("reason") == "exited" and status.get("exit_code") == 0 and (rescore or limit is not None):
        # here, outside the sandbox, before the output leaves this host
        result["check"], result["scores"] = _check(
            worker, root, run_dir, rescore, limit, ramp_test, kit, data, output
        )
    if not spec["shared"]:
        tail, size = _tail(log_path, int(spec["log_tail_bytes"]))
        result["log_tail"], result["log_size"] = tail, size
        # an output over the limit is never packed into memory, nor sent
        if output.is_dir() and (limit is None or sanitize_output(output)[1] <= limit * 2**20):
            result["output"] = read_files(output)
    return result


def _script(root: Path, stem: str, digest: str, source: str) -> Path:
    """A script shipped as source, in the cache under its digest (written
    once, atomically: two tasks may write it at the same time)."""
    path = root / f"{stem}-{digest}.py"
    if not path.exists():
        tmp = root / f".{stem}-{os.getpid()}-{threading.get_ident()}.py"
        tmp.write_text(source)
        os.replace(tmp, path)
    return path


def _check(
    worker: Any, root: Path, run_dir: Path, rescore: dict[str, Any] | None, max_output_mb: float | None,
    ramp_test: Path, kit: str, data: str, output: Path,
) -> tuple[dict[str, Any], Any]:  # fmt: skip
    """The conda worker's post-run checks (the size limit, the re-scoring when
    ``rescore`` is given), with this host's environment Python: (the check's
    dict, the recomputed scores or None)."""
    scorer, folds_file = None, None
    if rescore:
        script = _script(root, "rescore", rescore["digest"], rescore["source"])
        scorer = _scorer(worker, env_python(ramp_test.parent.parent), script)
        if rescore.get("folds") is not None:
            folds_file = run_dir / "folds.npz"  # the run's folder: hidden from the sandbox
            folds_file.write_bytes(rescore["folds"])
    check = check_output(
        output, kit_dir=Path(kit), data_dir=Path(data), scorer=scorer,
        scores_target=run_dir / "scores.json", verify=bool(rescore), folds_file=folds_file,
        max_output_mb=max_output_mb,
    )  # fmt: skip
    scores = None
    if check["scores_path"] is not None:
        scores = _read_json(Path(check["scores_path"]))
        if scores is None:
            check.update(failure="infrastructure", message="the recomputed scores are unreadable")
    return check, scores


def _scorer(worker: Any, python: Path, script: Path) -> Scorer:
    """This Dask worker process's warm scorer for an environment and a
    rescore.py, kept on the worker object: this module is shipped by value
    with every task, so its own globals do not last from one run to the
    next. (``dict.setdefault`` is atomic: two tasks at once get one scorer.)"""
    scorers = worker.__dict__.setdefault("_ramp_dispatcher_scorers", {})
    return scorers.setdefault((python, script), Scorer(python, script))


def _kill_session(run_dir: Path, status_path: Path) -> None:
    """SIGKILL the supervisor's session and ramp-test's group, if still theirs."""
    record = _read_json(run_dir / "supervisor.json") or {}
    status = _read_json(status_path) or {}
    for pid, start in ((record.get("pid"), record.get("start_time")),
                       (status.get("child_pid"), status.get("child_start_time"))):  # fmt: skip
        if isinstance(pid, int) and pid > 1 and (start is None or _start_time(pid) == start):
            try:
                os.killpg(pid, signal.SIGKILL)  # both lead their own group
            except OSError:
                pass


def sandbox_problem(allow_network: bool) -> str | None:
    """Why the sandbox cannot start on this Dask worker, or None (sent with
    ``Client.run`` by the daemon's start-up check)."""
    return bwrap_problem(find_bwrap(), allow_network)


def stop_run(cache_dir: str | None, key: str) -> str:
    """Stop the run ``key`` on this Dask worker (sent with ``Client.run``).

    SIGTERM to the supervisor, which stops ramp-test's whole tree and writes
    its status; a thread kills what is left after :data:`STOP_GRACE_S`.
    Returns at once: it runs on the worker's event loop.
    """
    run_dir = cache_root(cache_dir) / "runs" / key
    record = _read_json(run_dir / "supervisor.json")
    if record is None:
        return "not running here"
    pid, start = record.get("pid"), record.get("start_time")
    if not isinstance(pid, int) or _start_time(pid) is None or (start is not None and _start_time(pid) != start):
        return "already stopped"
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return "already stopped"
    status_path = Path(record.get("status") or run_dir / "status.json")

    def escalate() -> None:
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            if _start_time(pid) != start:
                return
            time.sleep(0.2)
        _kill_session(run_dir, status_path)

    threading.Thread(target=escalate, name=f"stop-{key}", daemon=True).start()
    return f"stopping supervisor {pid}"
