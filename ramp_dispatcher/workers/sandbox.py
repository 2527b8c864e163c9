"""The bubblewrap sandbox that ``ramp-test`` runs in (conda worker; dask
worker, on the Dask worker's host, where the functions it uses arrive by
value: all but :func:`check_bwrap` refer to the standard library only).

A participant's code runs with what ``ramp-test`` needs and nothing else of
the host: its own mount, PID, IPC, UTS, cgroup and network namespaces (and a
user namespace where the kernel allows one); read-only, the Python
environment (and the interpreter prefix a virtualenv links to), the kit, the
event's data, the system's ``/usr`` and a few files of ``/etc``; read-write,
only this run's ``training_output`` folder and a private, size-capped
``/tmp``. The environment is an allow-list. The supervisor
(:mod:`.supervise`) stays outside and runs ``bwrap ... -- ramp-test ...``.

:func:`bwrap_argv` and :func:`sandbox_env` are pure: they turn a
:class:`SandboxSpec` into an argv and an environment. The few functions that
look at the host (:func:`python_roots`, :func:`system_binds`,
:func:`check_bwrap`) are separate and named for it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import UserError

__all__ = [
    "DEFAULT_LIMITS",
    "Limits",
    "SandboxError",
    "SandboxSpec",
    "bwrap_argv",
    "bwrap_problem",
    "check_bwrap",
    "find_bwrap",
    "python_roots",
    "rlimit_args",
    "sandbox_env",
    "system_binds",
]

#: the sandboxed process's working directory, HOME and TMPDIR
SANDBOX_TMP = "/tmp"
#: what the host's environment may pass in, besides the run's own variables
PASSED_VARIABLES = ("LANG", "LANGUAGE", "TZ")
PASSED_PREFIXES = ("LC_",)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: system folders bound read-only when they exist (a merged-/usr system has
#: /bin, /lib... as symlinks into /usr: those become the same symlinks)
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: the files of /etc a Python process may read; /etc as a whole holds the
#: host's secrets and configuration, so it is never bound
ETC_PATHS = (
    "/etc/alternatives",  # Debian's /usr/bin/* links go through it
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/mime.types",
)


class SandboxError(UserError):
    """The configured sandbox cannot run on this host (bwrap missing, no namespaces)."""


@dataclass(frozen=True)
class Limits:
    """Per-run bounds applied where the run starts (rlimits) and in the sandbox.

    ``None`` leaves a bound unset. The process count is the run's own
    ``pids.max`` where runs get cgroups (:mod:`.cgroups`); elsewhere it is
    RLIMIT_NPROC, which the kernel checks against every process and thread of
    the daemon's user (across user namespaces) when the run forks: it bounds
    a fork bomb, but is shared with the daemon and the event's other runs,
    and never applies to root.
    """

    #: processes and threads (RLIMIT_NPROC)
    max_processes: int | None = 512
    #: open files per process (RLIMIT_NOFILE)
    max_open_files: int | None = 1024
    #: largest file a run may write (RLIMIT_FSIZE; the supervisor bounds the log)
    max_file_size_mb: float | None = 1024.0
    #: size of the private /tmp (a tmpfs: host memory, outside memory_limit_mb's sampling)
    tmp_size_mb: float | None = 512.0
    #: the training_output folder's size after the run; above it the run fails
    max_output_mb: float | None = 2048.0


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class SandboxSpec:
    """What one run's sandbox shows. Paths must be absolute."""

    #: the environment's prefix and what its interpreter links to (:func:`python_roots`)
    python_roots: tuple[Path, ...]
    kit_dir: Path
    data_dir: Path
    #: ``<submissions_dir>/<submission>``: shown read-only, alone of its folder
    submission_dir: Path
    #: its ``training_output``: the one host folder the run may write
    output_dir: Path
    #: folders and files never shown, even below a bound folder (the event's
    #: submissions, predictions and logs folders, the config files)
    hidden: tuple[Path, ...] = ()
    #: (source, kind) from :func:`system_binds`: kind is "dir", "file" or a symlink target
    system: tuple[tuple[str, str], ...] = ()
    allow_network: bool = False
    #: what the run's environment holds beyond the allow-list (event config ``run_env``)
    run_env: Mapping[str, str] = field(default_factory=dict)
    n_threads: int | None = None
    limits: Limits = DEFAULT_LIMITS
    bwrap: str = "bwrap"


def _under(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or lies inside it, lexically. On absolute
    paths (the usual case) by their text, which a Path keeps normalised:
    pathlib's ``parents`` cost a run's start about half a millisecond."""
    if path.is_absolute() and root.is_absolute():
        p, r = str(path), str(root)
        return p == r or p.startswith(r if r.endswith("/") else r + "/")
    return path == root or root in path.parents


def bwrap_argv(spec: SandboxSpec, command: Sequence[str]) -> list[str]:
    """The full argv: ``bwrap <options> -- <command>``.

    Mount order matters: bwrap applies the options in sequence, so the private
    /tmp comes before binds that may lie below /tmp, the hiding mounts come
    after the folders they cover, and the run's own submission and output
    come last, on top of whatever hid their parent.
    """
    argv = [spec.bwrap, "--unshare-all"]
    if spec.allow_network:
        argv.append("--share-net")
    argv += [
        "--die-with-parent",  # the supervisor's death ends the sandbox
        "--new-session",  # no access to a controlling terminal (TIOCSTI)
        "--cap-drop", "ALL",
        "--hostname", "ramp-sandbox",
        "--proc", "/proc",
        "--dev", "/dev",
    ]  # fmt: skip
    if spec.limits.tmp_size_mb is not None:
        argv += ["--size", str(int(spec.limits.tmp_size_mb * 2**20))]
    argv += ["--tmpfs", SANDBOX_TMP]
    for source, kind in spec.system:
        if kind in ("dir", "file"):
            argv += ["--ro-bind", source, source]
        else:
            argv += ["--symlink", kind, source]
    bound = [*spec.python_roots, spec.kit_dir, spec.data_dir]
    for root in _dedupe(bound):
        argv += ["--ro-bind", str(root), str(root)]
    bound_roots = [Path(s) for s, kind in spec.system if kind == "dir"] + bound
    remount = []
    for hidden in _dedupe(spec.hidden):
        if not hidden.exists() or not any(_under(hidden, root) for root in bound_roots):
            continue  # not visible anyway
        if hidden.is_dir():
            # An empty folder over it, made read-only once the run's own
            # submission is mounted inside (bwrap needs to create its mount point).
            argv += ["--perms", "0555", "--tmpfs", str(hidden)]
            remount.append(str(hidden))
        else:
            argv += ["--ro-bind", "/dev/null", str(hidden)]
    argv += ["--ro-bind", str(spec.submission_dir), str(spec.submission_dir)]
    argv += ["--bind", str(spec.output_dir), str(spec.output_dir)]
    for path in remount:
        argv += ["--remount-ro", path]
    argv += ["--chdir", str(spec.kit_dir), "--", *command]
    return argv


def _dedupe(paths: Sequence[Path]) -> list[Path]:
    """Drop repeats and paths already inside another one of the list."""
    unique = sorted(set(paths), key=lambda p: len(p.parts))
    kept: list[Path] = []
    for path in unique:
        if not any(_under(path, k) for k in kept):
            kept.append(path)
    return kept


def sandbox_env(spec: SandboxSpec, host_env: Mapping[str, str]) -> dict[str, str]:
    """The run's whole environment: an allow-list, nothing else of the host's."""
    env = {
        "PATH": os.pathsep.join(
            [str(spec.python_roots[0] / "bin"), "/usr/local/bin", "/usr/bin", "/bin"]
        ),
        "HOME": SANDBOX_TMP,
        "TMPDIR": SANDBOX_TMP,
        "PYTHONUNBUFFERED": "1",
    }
    for name, value in host_env.items():
        if name in PASSED_VARIABLES or name.startswith(PASSED_PREFIXES):
            env[name] = value
    if spec.n_threads is not None:
        for name in THREAD_VARIABLES:
            env[name] = str(int(spec.n_threads))
    env.update(spec.run_env)
    return env


def rlimit_args(limits: Limits, nproc: bool = True) -> list[str]:
    """The supervisor's ``--rlimit NAME=VALUE`` options for these limits;
    without ``nproc`` the process count is left to the run's cgroup (:mod:`.cgroups`)."""
    values = {
        "NPROC": limits.max_processes if nproc else None,
        "NOFILE": limits.max_open_files,
        "FSIZE": None if limits.max_file_size_mb is None else int(limits.max_file_size_mb * 2**20),
    }
    args = []
    for name, value in values.items():
        if value is not None:
            args += ["--rlimit", f"{name}={int(value)}"]
    return args


# ------------------------------------------------------------ host inspection
def python_roots(prefix: Path) -> tuple[Path, ...]:
    """The environment's prefix first, then every prefix its interpreter needs.

    A virtualenv's ``bin/python`` is a symlink to its base interpreter (e.g.
    ``/usr/bin/python3.11`` or a pyenv install), whose prefix holds the
    standard library: ``home`` in ``pyvenv.cfg``, each hop of the interpreter's
    symlinks and the interpreter named by ``bin/ramp-test``'s ``#!`` line say
    where. A conda env is self-contained and yields its prefix alone.
    """
    prefix = Path(os.path.abspath(prefix))
    roots = [prefix]
    real = prefix.resolve()
    if real != prefix:
        roots.append(real)
    candidates: list[Path] = []
    try:
        for line in (prefix / "pyvenv.cfg").read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "home":
                candidates.append(Path(value.strip()).resolve().parent)
    except OSError:
        pass
    interpreters = [prefix / "bin" / "python", prefix / "bin" / "python3"]
    try:
        with open(prefix / "bin" / "ramp-test", "rb") as f:
            first = f.readline(4096)
        if first.startswith(b"#!"):
            interpreters.append(Path(first[2:].decode(errors="replace").split()[0]))
    except (OSError, IndexError):
        pass
    for exe in interpreters:
        for _ in range(16):  # each hop of a chain of links, up to a sane depth
            if not exe.is_absolute() or not os.path.lexists(exe):
                break
            candidates.append(Path(os.path.abspath(exe)).parent.parent)
            if not exe.is_symlink():
                break
            exe = exe.parent / os.readlink(exe)
    for cand in candidates:
        cand = Path(os.path.normpath(cand))
        # /usr is bound with the system anyway; "/" would undo the sandbox
        if cand != Path("/") and cand.is_dir() and not any(_under(cand, r) for r in roots):
            roots.append(cand)
    return tuple(roots)


def system_binds() -> tuple[tuple[str, str], ...]:
    """The system folders and /etc files present here: (path, "dir"|"file"|link target)."""
    found: list[tuple[str, str]] = []
    for path in SYSTEM_PATHS + ETC_PATHS:
        if os.path.islink(path) and path in SYSTEM_PATHS:
            found.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            found.append((path, "dir"))
        elif os.path.isfile(path):
            found.append((path, "file"))
    return tuple(found)


def find_bwrap() -> str | None:
    return shutil.which("bwrap") or next(
        (p for p in ("/usr/bin/bwrap", "/bin/bwrap") if os.access(p, os.X_OK)), None
    )


def check_bwrap(bwrap: str | None, allow_network: bool = False, timeout: float = 30.0) -> str:
    """Start an empty sandbox once; return bwrap's path or raise :class:`SandboxError`
    saying why the sandbox cannot start here (missing, namespaces refused)."""
    problem = bwrap_problem(bwrap, allow_network, timeout)
    if problem is not None:
        raise SandboxError(problem)
    assert bwrap is not None
    return bwrap


def empty_sandbox_argv(bwrap: str, allow_network: bool = False) -> list[str]:
    """bwrap's argv for a sandbox with only the system's folders (the command follows)."""
    argv = [bwrap, "--unshare-all", *(["--share-net"] if allow_network else [])]
    argv += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--proc", "/proc", "--dev", "/dev"]
    for source, kind in system_binds():
        argv += ["--ro-bind", source, source] if kind in ("dir", "file") else ["--symlink", kind, source]
    return argv


def bwrap_problem(bwrap: str | None, allow_network: bool = False, timeout: float = 30.0) -> str | None:
    """Why an empty sandbox cannot start here, or None. Refers to nothing of
    this package but its own module, so that the Dask worker, which has no
    ramp_dispatcher, runs it (shipped by value)."""
    if bwrap is None:
        return (
            "bubblewrap (bwrap) is not installed: install it (Debian/Ubuntu: "
            "apt-get install bubblewrap) or set 'sandbox: none' to run without a sandbox"
        )
    argv = empty_sandbox_argv(bwrap, allow_network) + ["--", "true"]
    try:
        proc = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, env={"PATH": "/usr/bin:/bin"}
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {bwrap}: {exc}"
    if proc.returncode != 0:
        why = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        return (
            f"{bwrap} cannot create a sandbox here ({' | '.join(why[-2:]) or f'exit {proc.returncode}'}); "
            "unprivileged user namespaces may be disabled (sysctl kernel.unprivileged_userns_clone "
            "or user.max_user_namespaces, or an AppArmor restriction)"
        )
    return None
