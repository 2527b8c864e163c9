"""The local worker: runs ``ramp-test`` from a conda environment on this host.

Each run is a separate supervisor process (:mod:`.supervise`) started in its
own session. The supervisor applies the time and memory limits, makes sure
nothing of the run survives it, and writes a JSON status file beside the log.
Everything :meth:`CondaWorker.check` needs is in the handle and that file, so
a restarted daemon can pick up runs started by its predecessor.

Why one file of about 850 lines: one worker type, one module (the registry's
shape): its config, the environment lookup, the launch through the supervisor
and the sandbox, re-attach and the post-run checks. The sandbox's argv
(``sandbox``), the post-run checks (``post_run``) and the supervisor live in
their own modules; what is left here is the worker's own glue.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..configfile import ConfigError, InvalidSetting
from . import cgroups as cg
from . import sandbox as sb
from . import supervise
from .base import (
    FailureClass,
    Handle,
    RunOutcome,
    RunRequest,
    TryLater,
    Wake,
    Worker,
    WorkerConfigError,
    WorkerError,
)
from .outcome import outcome_from_status
from .post_run import (
    FoldsNpz,
    PostRunCheck,
    Scorer,
    env_python,
    post_run_path,
    read_post_run,
    run_post_run_checks,
)
from .sandbox import SandboxError

if TYPE_CHECKING:
    from ..configfile import Section
    from .registry import WorkerContext

log = logging.getLogger(__name__)

#: Each run's supervisor is this file, run as a plain script in isolated mode
#: (``python -I -S``: no site-packages, no user paths). It needs the standard
#: library only, and skipping the package import and ``site`` halves its
#: start-up, which every run waits for (bench/batch.py).
SUPERVISOR = Path(supervise.__file__).resolve()
#: How a live supervisor is recognised in /proc: by its script, or by the module
#: name under which earlier versions started it (a restart re-attaches those too).
_SUPERVISOR_ARGS = {str(SUPERVISOR).encode(), b"ramp_dispatcher.workers.supervise"}

#: how long ``conda info --envs`` may take
CONDA_INFO_TIMEOUT_S = 60.0
#: how long :meth:`CondaWorker.cleanup` waits for a stopping supervisor
STOP_WAIT_S = 10.0
#: seconds between two tries of post-run checks that wait for the database
TRY_LATER_PAUSE_S = 2.0
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: ``sandbox`` values; bubblewrap exists on Linux only
SANDBOX_CHOICES = ("bwrap", "none")
DEFAULT_SANDBOX = "bwrap" if sys.platform.startswith("linux") else "none"


@dataclass(frozen=True)
class CondaConfig:
    """The ``worker`` section of an event's config for ``worker_type: conda``."""

    #: an environment name known to ``conda``, or a path to an env prefix
    conda_env: str
    #: wall-clock limit of one run, seconds
    timeout: float = 7200.0
    #: limit on the run's process tree's unique memory (summed PSS, sampled every 0.5 s)
    memory_limit_mb: float | None = None
    #: niceness increment of the run (the daemon itself keeps its priority)
    niceness: int = 5
    #: how long a resolved environment name is trusted before asking conda again
    env_cache_s: float = 60.0
    #: bound of a run's log: past it the supervisor keeps the head and the
    #: latest output, with a line saying how much was dropped
    max_log_mb: float = 5.0
    #: ``bwrap``: ramp-test runs in a bubblewrap sandbox; ``none``: as the daemon's user
    sandbox: str = DEFAULT_SANDBOX
    #: the sandboxed run may use the network (it may not by default)
    allow_network: bool = False
    #: variables the run's environment gets beyond the sandbox's allow-list
    run_env: Mapping[str, str] = field(default_factory=dict)
    #: process count, open files, file size, /tmp and output size of one run
    limits: sb.Limits = sb.DEFAULT_LIMITS
    #: recompute the scores outside the sandbox from the saved predictions
    verify_scores: bool = True
    #: the event config file: never shown in the sandbox, named in errors
    config_path: Path | None = None

    def __post_init__(self) -> None:
        # The one place these values are checked: from_section names the file.
        if not isinstance(self.conda_env, str) or not self.conda_env.strip():
            raise InvalidSetting("conda_env", "must be a non-empty string")
        if not self.timeout > 0:
            raise InvalidSetting("timeout", f"must be positive, got {self.timeout!r}")
        if self.memory_limit_mb is not None and not self.memory_limit_mb > 0:
            raise InvalidSetting(
                "memory_limit_mb", f"must be positive, got {self.memory_limit_mb!r}"
            )
        if not self.max_log_mb > 0:
            raise InvalidSetting("max_log_mb", f"must be positive, got {self.max_log_mb!r}")
        if self.sandbox not in SANDBOX_CHOICES:
            raise InvalidSetting(
                "sandbox", f"must be one of {', '.join(SANDBOX_CHOICES)}, got {self.sandbox!r}"
            )

    @classmethod
    def from_section(cls, section: Section) -> CondaConfig:
        """The ``worker`` section of an event config (``worker_type: conda``)."""
        timeout = section.optional("timeout", float, "a number of seconds", 7200.0)
        memory = section.optional("memory_limit_mb", float, "a number of megabytes", None)
        max_log = section.optional("max_log_mb", float, "a number of megabytes", 5.0)
        try:
            return cls(
                conda_env=section.required("conda_env", str, "a string"),
                timeout=float(timeout),
                memory_limit_mb=None if memory is None else float(memory),
                max_log_mb=float(max_log),
                **sandbox_settings(section),
            )
        except InvalidSetting as exc:
            raise section.invalid(exc) from None


# The worker type's entry points for the registry (.registry).
def from_section(section: Section) -> CondaConfig:
    return CondaConfig.from_section(section)


def create_worker(config: CondaConfig, context: WorkerContext) -> CondaWorker:
    return CondaWorker(config, cv_folds=context.cv_folds)


def verify_scores_setting(section: Section) -> bool:
    """``verify_scores``: re-score runs outside their sandbox (every worker type)."""
    value: bool = section.optional("verify_scores", bool, "true or false", True)
    return value


def sandbox_settings(section: Section) -> dict[str, Any]:
    """The sandbox, limit and post-run check keys of a ``worker`` section
    (conda's and dask's), and the file they come from, as keyword arguments
    of CondaConfig and DaskConfig."""
    run_env = section.optional("run_env", lambda v: v, "a mapping", {})
    if not isinstance(run_env, dict) or not all(
        isinstance(k, str) and k and "=" not in k and isinstance(v, (str, int, float))
        and not isinstance(v, bool)
        for k, v in run_env.items()
    ):
        raise ConfigError(f"{section.where('run_env')} must be a mapping of variable names to strings")
    limit_keys = [
        ("max_processes", int, "an integer"),
        ("max_open_files", int, "an integer"),
        ("max_file_size_mb", float, "a number of megabytes"),
        ("tmp_size_mb", float, "a number of megabytes"),
        ("max_output_mb", float, "a number of megabytes"),
    ]
    limits: dict[str, Any] = {}
    for key, kind, type_name in limit_keys:
        value = section.optional(key, kind, type_name, getattr(sb.DEFAULT_LIMITS, key))
        if value is not None and value <= 0:
            raise ConfigError(f"{section.where(key)} must be positive")
        limits[key] = value
    settings: dict[str, Any] = {
        "sandbox": section.choice("sandbox", SANDBOX_CHOICES, DEFAULT_SANDBOX),
        "allow_network": section.optional("allow_network", bool, "true or false", False),
        "run_env": {k: str(v) for k, v in run_env.items()},
        "limits": sb.Limits(**limits),
        "verify_scores": verify_scores_setting(section),
        "config_path": Path(section.path),
    }
    return settings


# ---------------------------------------------------------------- environments
class EnvironmentNotFound(WorkerError):
    """conda does not list ``conda_env``. ``str()`` names the environments it
    does list (for the operator); :attr:`public` does not (for participants)."""

    def __init__(self, conda_env: str, known: str) -> None:
        self.public = f"conda environment {conda_env!r} not found"
        super().__init__(f"{self.public} (known: {known})")


def _lost_ramp_test(handle: Handle) -> bool:
    """The run's environment has no runnable ``bin/ramp-test`` any more."""
    prefix = handle.get("env_prefix")
    return bool(prefix) and not os.access(Path(prefix) / "bin" / "ramp-test", os.X_OK)


def _check_ramp_test(prefix: Path, label: str) -> Path:
    ramp_test = prefix / "bin" / "ramp-test"
    if not prefix.is_dir():
        raise WorkerError(f"{label}: '{prefix}' does not exist")
    if not (ramp_test.is_file() and os.access(ramp_test, os.X_OK)):
        raise WorkerError(f"{label}: '{prefix}' has no bin/ramp-test")
    return prefix


def _find_conda() -> str:
    exe = os.environ.get("CONDA_EXE")
    if exe:
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise WorkerError(f"CONDA_EXE={exe!r} is not an executable file")
        return exe
    found = shutil.which("conda")
    if found is None:
        raise WorkerError(
            "no conda executable: set CONDA_EXE or put conda on PATH, "
            "or give conda_env as a path to an environment prefix"
        )
    return found


def _conda_envs(conda: str) -> tuple[list[Path], Path | None]:
    """The env prefixes and the root prefix, as ``conda info`` reports them."""
    try:
        proc = subprocess.run(
            [conda, "info", "--envs", "--json"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=CONDA_INFO_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise WorkerError(
            f"'{conda} info --envs --json' did not answer within {CONDA_INFO_TIMEOUT_S:g} s"
        ) from None
    except OSError as exc:
        raise WorkerError(f"cannot run {conda!r}: {exc}") from exc
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise WorkerError(
            f"'{conda} info --envs --json' failed with code {proc.returncode}: "
            + " | ".join(tail)
        )
    try:
        info = json.loads(proc.stdout)
        envs = [Path(p) for p in info["envs"]]
        root = info.get("root_prefix")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WorkerError(
            f"'{conda} info --envs --json' printed unexpected output: {exc!r}"
        ) from exc
    return envs, (Path(root) if root else None)


def resolve_env(conda_env: str) -> Path:
    """Return the prefix of ``conda_env``; its ramp-test is ``<prefix>/bin/ramp-test``.

    ``conda_env`` holding a ``/`` is a prefix path; otherwise it is an
    environment name looked up with ``conda info --envs --json`` (``base``
    being the root prefix). Raises :class:`WorkerError` saying what is wrong.
    """
    if os.path.isabs(conda_env) or "/" in conda_env:
        prefix = Path(os.path.abspath(os.path.expanduser(conda_env)))
        return _check_ramp_test(prefix, f"conda environment {conda_env!r}")

    envs, root = _conda_envs(_find_conda())

    def name_of(prefix: Path) -> str:
        return "base" if root is not None and prefix == root else prefix.name

    matches = [p for p in envs if name_of(p) == conda_env]
    if conda_env == "base" and root is not None:
        matches = [root]
    if not matches:
        known = ", ".join(sorted({name_of(p) for p in envs})) or "none"
        raise EnvironmentNotFound(conda_env, known)
    # Same name in several envs_dirs: conda itself uses the first one listed.
    return _check_ramp_test(matches[0], f"conda environment {conda_env!r}")


# ----------------------------------------------------------------- processes
def _start_time(pid: int) -> int | None:
    info = supervise.read_stat(pid)
    return None if info is None else info.start_time


def _is_running(pid: Any, start_time: Any) -> bool:
    """True when ``pid`` is the same, not yet exited process as at start."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    info = supervise.read_stat(pid)
    if info is None or info.state in ("Z", "X"):
        return False
    # A different start time means the pid was reused by another process.
    return start_time is None or info.start_time == start_time


def _find_supervisor(status_path: Path) -> int | None:
    """The pid of a live supervisor started with ``--status status_path``."""
    wanted = str(status_path).encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if _SUPERVISOR_ARGS.intersection(argv) and wanted in argv:
            info = supervise.read_stat(int(name))
            if info is not None and info.state != "Z":
                return int(name)
    return None


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _status_path(request: RunRequest) -> Path:
    # Beside the log: survives daemon restarts, one file per attempt.
    return request.log_path.parent / f"run-{request.attempt}.json"


# -------------------------------------------------------------------- worker
class CondaWorker(Worker):
    """Runs submissions with ``<env>/bin/ramp-test`` on the local machine."""

    type_name = "conda"

    def __init__(
        self, config: CondaConfig, cv_folds: Callable[[int], Sequence[tuple[Any, Any]]] | None = None
    ) -> None:
        self.config = config
        # the event's folds of a submission (the database's), for re-scoring;
        # None (a worker used without a database) re-scores on the kit's get_cv
        self._cv_folds = cv_folds
        self._folds_npz = FoldsNpz()  # the file rescore.py reads them from, made once
        self._env_lock = threading.Lock()  # held while conda runs
        self._procs_lock = threading.Lock()
        self._env_cache: tuple[Path, float] | None = None  # prefix, expiry (monotonic)
        # Supervisors started by this daemon, so their exit status is reaped.
        self._procs: dict[tuple[int, int], subprocess.Popen[bytes]] = {}
        self._bwrap: str | None = None  # checked once: validate() or the first run
        self._system_binds: tuple[tuple[str, str], ...] | None = None
        # the environment's python_roots, by prefix, with their expiry (monotonic)
        self._roots_cache: dict[Path, tuple[tuple[Path, ...], float]] = {}
        self._cgroups: cg.RunCgroups | None = None  # per-run cgroups, when delegated
        self._cgroups_checked = False
        # post-run checks in progress, and the wake callback of each run
        self._post_runs: dict[tuple[int, int], threading.Thread] = {}
        self._scorers: dict[Path, Scorer] = {}
        self._wakes: dict[tuple[int, int], Wake] = {}

    # -- sandbox
    def _where(self, key: str) -> str:
        where = f"{self.config.config_path}: " if self.config.config_path else ""
        return f"{where}key 'worker.{key}'"

    def _check_sandbox(self) -> None:
        """The configured sandbox can start here (else a :class:`SandboxError`
        naming the file and key); ``sandbox: none`` is said loudly, since every
        submission then runs as this daemon's user."""
        if self.config.sandbox == "none":
            log.warning(
                "%s is 'none': submissions run WITHOUT a sandbox, as this daemon's user, "
                "with its files, environment and network",
                self._where("sandbox"),
            )
            return
        try:
            self._bwrap = sb.check_bwrap(sb.find_bwrap(), self.config.allow_network)
        except SandboxError as exc:
            raise SandboxError(f"{self._where('sandbox')}: {exc}") from None

    def _sandbox_spec(self, request: RunRequest, prefix: Path) -> sb.SandboxSpec:
        if self._bwrap is None:
            try:
                self._check_sandbox()
            except SandboxError as exc:
                raise WorkerError(str(exc)) from None
        if self._system_binds is None:
            self._system_binds = sb.system_binds()
        hidden = [request.submissions_dir, request.predictions_dir, request.logs_dir]
        if self.config.config_path is not None:
            hidden.append(self.config.config_path)
        return sb.SandboxSpec(
            python_roots=self._python_roots(prefix),
            kit_dir=Path(os.path.abspath(request.kit_dir)),
            data_dir=Path(os.path.abspath(request.data_dir)),
            submission_dir=Path(os.path.abspath(request.submissions_dir / request.submission_name)),
            output_dir=Path(os.path.abspath(request.output_dir)),
            hidden=tuple(Path(os.path.abspath(p)) for p in hidden),
            system=self._system_binds,
            allow_network=self.config.allow_network,
            run_env=dict(self.config.run_env),
            n_threads=request.n_threads,
            limits=self.config.limits,
            bwrap=self._bwrap or "bwrap",
        )

    def _python_roots(self, prefix: Path) -> tuple[Path, ...]:
        """:func:`.sandbox.python_roots`, trusted as long as the environment's
        lookup (``env_cache_s``): it reads files and follows links, about half
        a millisecond of every run's start for the same answer."""
        now = time.monotonic()
        with self._procs_lock:
            cached = self._roots_cache.get(prefix)
        if cached is not None and now < cached[1]:
            return cached[0]
        roots = sb.python_roots(prefix)
        with self._procs_lock:
            self._roots_cache = {prefix: (roots, now + self.config.env_cache_s)}
        return roots

    # -- environment
    def env_prefix(self) -> Path:
        """The resolved environment, re-checked cheaply on every call."""
        with self._env_lock:
            cached = self._env_cache
            now = time.monotonic()
            if cached is not None and now < cached[1]:
                prefix = cached[0]
                if os.access(prefix / "bin" / "ramp-test", os.X_OK):
                    return prefix
            self._env_cache = None
            prefix = resolve_env(self.config.conda_env)
            self._env_cache = (prefix, now + self.config.env_cache_s)
            return prefix

    # -- Worker interface
    def validate(self) -> None:
        """The environment exists and has ``bin/ramp-test``, and the sandbox can
        start (``run`` checks both before serving; the message, with conda's
        list of environments, goes to the operator only)."""
        try:
            self.env_prefix()
        except WorkerError as exc:
            raise WorkerConfigError("conda_env", str(exc)) from None
        self._check_sandbox()
        self._run_cgroups()

    def _run_cgroups(self) -> cg.RunCgroups | None:
        """Per-run cgroups where the service's cgroup is delegated (checked once)."""
        if not self._cgroups_checked:
            self._cgroups_checked = True
            self._cgroups, why = cg.detect()
            if self._cgroups is not None:
                log.info("conda worker: each run gets its own cgroup (memory, pids) under %s",
                         self._cgroups.root)
            else:
                log.info("conda worker: no per-run cgroups (%s); run limits are rlimits", why)
        return self._cgroups

    def start(self, request: RunRequest, wake: Wake) -> Handle:
        try:
            prefix = self.env_prefix()
        except EnvironmentNotFound as exc:
            # The message becomes the submission's error_msg: conda's list of
            # this host's environments is for the daemon's log only.
            log.error("conda worker: %s", exc)
            raise WorkerError(exc.public) from None
        log_path = Path(os.path.abspath(request.log_path))
        status_path = Path(os.path.abspath(_status_path(request)))
        output_dir = request.output_dir
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            if output_dir.exists():  # left by an earlier attempt
                shutil.rmtree(output_dir)
            for stale in (
                status_path, status_path.with_name(status_path.name + ".tmp"),
                post_run_path(request),
            ):
                stale.unlink(missing_ok=True)
        except OSError as exc:
            raise WorkerError(f"cannot prepare run folders: {exc}") from exc

        kit_dir = os.path.abspath(request.kit_dir)
        command = [
            str(prefix / "bin" / "ramp-test"),
            "--submission", request.submission_name,
            "--ramp-kit-dir", kit_dir,
            "--ramp-data-dir", os.path.abspath(request.data_dir),
            "--ramp-submission-dir", os.path.abspath(request.submissions_dir),
            "--save-output",
            "--ignore-warning",
        ]  # fmt: skip
        sandboxed = self.config.sandbox == "bwrap"
        if sandboxed:
            spec = self._sandbox_spec(request, prefix)
            try:
                # the one host folder the sandbox may write: it must exist to be bound
                request.output_dir.mkdir(parents=True)
            except OSError as exc:
                raise WorkerError(f"cannot prepare run folders: {exc}") from exc
            command = sb.bwrap_argv(spec, command)
            setenv = sb.sandbox_env(spec, os.environ)
        else:
            setenv = {"PYTHONUNBUFFERED": "1"}
            # The env's bin first, as `conda activate` would, for tools a kit calls.
            setenv["PATH"] = os.pathsep.join(
                [str(prefix / "bin")] + [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
            )
            if request.n_threads is not None:
                for name in THREAD_VARIABLES:
                    setenv[name] = str(int(request.n_threads))
            setenv.update(self.config.run_env)
        argv = [
            sys.executable, "-I", "-S", str(SUPERVISOR),
            "--log", str(log_path),
            "--status", str(status_path),
            "--timeout", repr(float(self.config.timeout)),
            "--nice", str(int(self.config.niceness)),
            "--cwd", kit_dir,
        ]  # fmt: skip
        if self.config.memory_limit_mb is not None:
            argv += ["--memory-limit-mb", repr(float(self.config.memory_limit_mb))]
        argv += ["--max-log-mb", repr(float(self.config.max_log_mb))]
        if sandboxed:
            argv += ["--clear-env", "--bwrap"]  # the daemon's environment stays outside
        for name, value in setenv.items():
            argv += ["--setenv", f"{name}={value}"]
        cgroups = self._run_cgroups()
        argv += cg.limit_args(
            cgroups, request.submission_name, request.attempt, self.config.limits,
            self.config.memory_limit_mb, tmp_counted=sandboxed,
        )
        argv += ["--", *command]

        try:
            # Truncate the log of an earlier attempt; O_APPEND because the
            # supervisor appends ramp-test's output to the same file.
            log_fd = os.open(
                log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            raise WorkerError(f"cannot open the log {log_path}: {exc}") from exc
        try:
            # Own session: not killed with the daemon; the log file (not a
            # pipe to us) takes its stderr, so our exit cannot SIGPIPE it.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            raise WorkerError(f"cannot start the run supervisor: {exc}") from exc
        finally:
            os.close(log_fd)
        started_at = time.time()
        # Not reaped yet (the waiter starts below), so /proc/<pid> exists.
        pid_start_time = _start_time(proc.pid)

        key = (request.submission_id, request.attempt)
        with self._procs_lock:
            self._procs[key] = proc
            self._wakes[key] = wake
        threading.Thread(
            target=self._wait_and_wake,
            args=(key, proc, wake, request, prefix, status_path),
            name=f"conda-run-{request.submission_id}-{request.attempt}",
            daemon=True,
        ).start()
        return {
            "pid": proc.pid,
            "pid_start_time": pid_start_time,
            "status_path": str(status_path),
            "log_path": str(log_path),
            "env_prefix": str(prefix),
            "started_at": started_at,
            "timeout": float(self.config.timeout),
            "memory_limit_mb": self.config.memory_limit_mb,
            "sandbox": self.config.sandbox,
            "cgroup": str(cgroups.run_dir(request.submission_name, request.attempt))
            if cgroups is not None else None,
        }

    def runs_on_this_host(self) -> bool:
        return True

    def forget(self, request: RunRequest, handle: Handle) -> None:
        # the waiter thread still reaps the supervisor; it neither checks the
        # run's output nor wakes anyone
        with self._procs_lock:
            self._procs.pop((request.submission_id, request.attempt), None)
            self._wakes.pop((request.submission_id, request.attempt), None)

    def reports_end(self, request: RunRequest) -> bool:
        # a waiter thread wakes the loop when a supervisor we spawned exits;
        # a re-attached run has none and is checked on the timer
        with self._procs_lock:
            return (request.submission_id, request.attempt) in self._procs

    def recover(self, request: RunRequest) -> Handle | None:
        """Find the attempt's supervisor by its status file: in its argv while it
        runs, and the status file names it once it wrote one."""
        status_path = Path(os.path.abspath(_status_path(request)))
        pid = _find_supervisor(status_path)
        if pid is None:
            status = _read_status(status_path) or {}
            pid = status.get("supervisor_pid")
            if pid is None:
                return None  # never spawned
        return {
            "pid": pid,
            "pid_start_time": _start_time(pid) if isinstance(pid, int) else None,
            "status_path": str(status_path),
            "log_path": str(Path(os.path.abspath(request.log_path))),
            "env_prefix": None,
            "started_at": None,
            "timeout": float(self.config.timeout),
            "memory_limit_mb": self.config.memory_limit_mb,
            "sandbox": self.config.sandbox,
            "cgroup": str(cgroups.run_dir(request.submission_name, request.attempt))
            if (cgroups := self._run_cgroups()) is not None else None,
        }

    def _wait_and_wake(
        self, key: tuple[int, int], proc: subprocess.Popen[bytes], wake: Wake,
        request: RunRequest, prefix: Path, status_path: Path,
    ) -> None:
        proc.wait()  # also reaps the supervisor
        with self._procs_lock:
            ours = self._procs.get(key) is proc
            if ours:
                del self._procs[key]
        if not ours:
            # Forgotten (another daemon took the run over) or this daemon is
            # stopping: the run's holder runs the post-run checks when it
            # checks the run; two daemons must not run them on one output.
            return
        status = _read_status(status_path) or {}
        if status.get("reason") == "exited" and self._exit_code(status) == 0:
            # Before the wake, so the check it triggers finds the outcome whole.
            with self._procs_lock:
                self._post_runs[key] = threading.current_thread()
            try:
                self._do_post_run(request, prefix)
            finally:
                with self._procs_lock:
                    self._post_runs.pop(key, None)
        try:
            wake()
        except Exception:  # a broken callback must not go unnoticed
            log.exception("conda worker: wake callback failed")

    def check(self, request: RunRequest, handle: Handle) -> RunOutcome | None:
        try:
            status_path = Path(handle["status_path"])
            log_path = Path(handle["log_path"])
        except (KeyError, TypeError) as exc:
            return RunOutcome(FailureClass.INFRASTRUCTURE, f"invalid conda run handle: {exc!r}")
        status = _read_status(status_path)
        if status is None or "reason" not in status:
            if _is_running(handle.get("pid"), handle.get("pid_start_time")):
                return None
            # It may have written its final status just before exiting.
            status = _read_status(status_path)
            if status is None or "reason" not in status:
                return RunOutcome(
                    FailureClass.INFRASTRUCTURE,
                    "the run's supervisor process disappeared",
                    log_path=log_path,
                )
        if status.get("reason") == "exited" and self._exit_code(status) == 0:
            post = self._post_run(request, handle)
            if post is None:
                return None  # the checks run in a thread; it wakes us
            return self._checked_outcome(request, handle, status, log_path, post)
        return self._outcome(request, handle, status, log_path)

    @staticmethod
    def _exit_code(status: dict[str, Any]) -> int | None:
        code = status.get("exit_code")
        return code if isinstance(code, int) else None

    def _post_run(self, request: RunRequest, handle: Handle) -> PostRunCheck | None:
        """The post-run checks' result, or None while they run (started here once)."""
        done = read_post_run(post_run_path(request))
        if done is not None:
            return done
        key = (request.submission_id, request.attempt)
        with self._procs_lock:
            if key in self._post_runs:
                return None
            prefix = handle.get("env_prefix")
            thread = threading.Thread(
                target=self._run_post_run,
                args=(key, request, Path(prefix) if prefix else None),
                name=f"conda-check-{request.submission_id}-{request.attempt}",
                daemon=True,
            )
            self._post_runs[key] = thread
        thread.start()
        return None

    def _do_post_run(self, request: RunRequest, prefix: Path | None) -> None:
        try:
            try:
                prefix = prefix or self.env_prefix()
                python = env_python(prefix)
            except WorkerError as exc:
                python = Path(f"(environment unavailable: {exc})")
            folds = None
            if self.config.verify_scores and self._cv_folds is not None:
                try:
                    folds = self._folds_npz(self._cv_folds(request.submission_id))
                except TryLater as exc:
                    # Nothing recorded: the next check() starts the checks again,
                    # after this pause (no busy loop through an outage).
                    log.warning("conda worker: post-run checks of %s wait: %s", request.submission_name, exc)
                    time.sleep(TRY_LATER_PAUSE_S)
                    return
            run_post_run_checks(
                request, self._scorer(python), self.config.limits.max_output_mb,
                self.config.verify_scores, folds,
            )  # fmt: skip
        except Exception:
            log.exception("conda worker: post-run checks of %s failed", request.submission_name)
            try:  # recorded, so check() reports it instead of waiting forever
                post_run_path(request).write_text(json.dumps(
                    {"failure": "infrastructure", "message": "the post-run checks failed"}
                ))
            except OSError:
                pass

    def _run_post_run(self, key: tuple[int, int], request: RunRequest, prefix: Path | None) -> None:
        """The checks of a run this daemon re-attached to (no waiter thread)."""
        try:
            self._do_post_run(request, prefix)
        finally:
            with self._procs_lock:
                self._post_runs.pop(key, None)
                wake = self._wakes.get(key)
            if wake is not None:
                try:
                    wake()
                except Exception:
                    log.exception("conda worker: wake callback failed")

    def _checked_outcome(
        self, request: RunRequest, handle: Handle, status: dict[str, Any], log_path: Path,
        post: PostRunCheck,
    ) -> RunOutcome:
        if post.removed:
            log.warning(
                "conda worker: %s: removed links or special files from its output: %s",
                request.submission_name, ", ".join(post.removed[:10]),
            )
        outcome = self._outcome(request, handle, status, log_path)
        if post.failure is not None:
            return dataclasses.replace(
                outcome,
                failure=FailureClass(post.failure),
                message=post.message,
                output_dir=None,
            )
        if post.scores_path is not None:
            return dataclasses.replace(outcome, trusted_scores=Path(post.scores_path))
        return outcome

    def _outcome(
        self, request: RunRequest, handle: Handle, status: dict[str, Any], log_path: Path
    ) -> RunOutcome:
        # the limits the run was started with (a reload may have changed the config since)
        timeout = float(handle.get("timeout", self.config.timeout))
        memory = float(handle.get("memory_limit_mb") or self.config.memory_limit_mb or 0)
        return outcome_from_status(
            status, log_path, request.output_dir,
            time_limit=f"the time limit of {timeout:g} s was reached",
            memory_limit=f"the memory limit of {memory:g} MB was exceeded",
            bwrap=handle.get("sandbox") == "bwrap",
            lost_ramp_test=_lost_ramp_test(handle),
        )  # fmt: skip

    def cleanup(self, request: RunRequest, handle: Handle) -> None:
        pid = handle.get("pid")
        start_time = handle.get("pid_start_time")
        with self._procs_lock:
            proc = self._procs.get((request.submission_id, request.attempt))
            self._wakes.pop((request.submission_id, request.attempt), None)
        if _is_running(pid, start_time):
            # A cancel: the supervisor stops its tree on SIGTERM (<= ~5 s).
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
            deadline = time.monotonic() + STOP_WAIT_S
            while time.monotonic() < deadline and _is_running(pid, start_time):
                time.sleep(0.05)
            if _is_running(pid, start_time):
                log.warning("conda worker: supervisor %s ignored SIGTERM; killing it", pid)
                try:
                    os.killpg(pid, signal.SIGKILL)  # session leader: pgid == pid
                except OSError:
                    pass
        if proc is not None:
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self._kill_orphaned_run(handle)
        if handle.get("cgroup"):  # a lost supervisor cannot remove it any more
            cg.remove_run_cgroup(Path(handle["cgroup"]))
        try:
            if request.output_dir.exists():
                shutil.rmtree(request.output_dir)
        except OSError as exc:
            log.warning("conda worker: cannot remove %s: %s", request.output_dir, exc)

    def _kill_orphaned_run(self, handle: Handle) -> None:
        """If the supervisor died without stopping ramp-test, stop its group."""
        status = _read_status(Path(str(handle.get("status_path", ""))))
        if not status or "reason" in status:
            return
        child = status.get("child_pid")
        if _is_running(child, status.get("child_start_time")):
            log.warning("conda worker: killing ramp-test %s left by a lost supervisor", child)
            try:
                os.killpg(child, signal.SIGKILL)  # ramp-test leads its own group
            except OSError:
                pass

    def close(self) -> None:
        # Runs keep going so a restarted daemon can re-attach to them; the
        # waiter threads still reap supervisors that end before we exit.
        with self._procs_lock:
            self._procs.clear()
            scorers, self._scorers = list(self._scorers.values()), {}
        for scorer in scorers:
            scorer.close()

    def _scorer(self, python: Path) -> Scorer:
        """This worker's warm scorer for an environment's interpreter."""
        with self._procs_lock:
            scorer = self._scorers.get(python)
            if scorer is None:
                scorer = self._scorers[python] = Scorer(python)
            return scorer

