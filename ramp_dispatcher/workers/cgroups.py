"""Per-run cgroups: the daemon's side (detection at start, the supervisor's options).

Where the service has a delegated cgroup v2 subtree (systemd ``Delegate=``,
see deploy/), each run's process tree gets a cgroup of its own with
``memory.max`` and ``pids.max``; the supervisor (:mod:`.supervise`) creates
it, moves the run into it before ``exec``, and removes it after the run. So
a fork bomb stops at its own run's bound, not at one shared by the daemon's
user, and memory grown faster than the supervisor samples it is stopped by
the kernel and reported as a memory error. Elsewhere the limits stay
rlimits (:func:`.sandbox.rlimit_args`).

Layout, with D the delegated cgroup (the unit's)::

    D/                  cgroup.subtree_control: +memory +pids; no process here
    D/supervisor/       the daemon and the runs' supervisors
    D/run-<submission>-<attempt>/   one run's tree: memory.max, pids.max

cgroup v2 lets no process live in a cgroup that hands controllers to its
children ("no internal processes"), hence the ``supervisor`` leaf, where
systemd (254+, ``DelegateSubgroup=supervisor``) starts the daemon. The daemon
never moves itself there: with an older systemd, a restart while runs go
would then find the unit's cgroup closed to the new daemon's process.

Delegation is judged, never assumed: D must offer the ``memory`` and
``pids`` controllers, be writable by this process, and carry the mark systemd
(252 and later) sets on the cgroups it delegates: the ``trusted.delegate``
or ``user.delegate`` extended attribute. Writable alone is not enough: root
may write anywhere, and a user's desktop session cgroups are the user's
own, yet neither is handed to this daemon to rearrange.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .sandbox import Limits, rlimit_args

__all__ = ["REQUIRED", "RunCgroups", "detect", "limit_args", "remove_run_cgroup"]

log = logging.getLogger(__name__)

#: controllers a run's cgroup needs
REQUIRED = ("memory", "pids")
#: the leaf of D holding the daemon and the supervisors
SUPERVISOR_GROUP = "supervisor"
RUN_PREFIX = "run-"
DELEGATE_XATTRS = ("trusted.delegate", "user.delegate")
#: memory.max is the run's memory_limit_mb plus this share of it (at least
#: MIN_HEADROOM_MB): the supervisor's PSS sampling stays the limit that is
#: reported; the kernel's bound catches only what grows between two samples
HEADROOM_SHARE = 0.25
MIN_HEADROOM_MB = 256.0


@dataclass(frozen=True)
class RunCgroups:
    """A usable delegated cgroup: runs get ``<root>/run-<submission>-<attempt>``."""

    root: Path

    def run_dir(self, submission_name: str, attempt: int) -> Path:
        return self.root / f"{RUN_PREFIX}{submission_name}-{attempt}"


def own_cgroup(proc_cgroup: str = "/proc/self/cgroup") -> str | None:
    """This process's cgroup v2 path ("/system.slice/x.service"), or None."""
    try:
        with open(proc_cgroup) as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> tuple[Path, str] | None:
    """(mount point, root inside the hierarchy) of the first cgroup2 mount."""
    try:
        with open(mountinfo) as f:
            for line in f:
                left, sep, right = line.partition(" - ")
                fields = left.split()
                if sep and right.split()[:1] == ["cgroup2"] and len(fields) >= 5:
                    # mountinfo escapes spaces and the like as octal (\040)
                    point = fields[4].encode().decode("unicode_escape")
                    return Path(point), fields[3]
    except OSError:
        pass
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _marked_delegated(path: Path) -> bool:
    for name in DELEGATE_XATTRS:
        try:
            if os.getxattr(path, name).strip(b"\0 \n") == b"1":
                return True
        except OSError:
            continue
    return False


def _writable(path: Path) -> bool:
    return all(
        os.access(p, os.W_OK)
        for p in (path, path / "cgroup.procs", path / "cgroup.subtree_control")
    )


def locate() -> tuple[Path | None, str]:
    """The candidate delegated cgroup D, the parent of the daemon's ``supervisor``
    leaf (see the module's docstring), or (None, why not)."""
    mount = cgroup2_mount()
    if mount is None:
        return None, "no cgroup v2 hierarchy is mounted"
    own = own_cgroup()
    if own is None:
        return None, "this process is in no cgroup v2 (/proc/self/cgroup has no 0:: line)"
    point, root = mount
    rel = os.path.relpath(own, root) if own.startswith(root) else None
    if rel is None or rel.startswith(".."):
        return None, f"this process's cgroup {own} is outside the cgroup2 mount at {point}"
    path = Path(os.path.normpath(point / rel))
    if path.name != SUPERVISOR_GROUP:
        return None, (
            f"the daemon's cgroup {own} is not the '{SUPERVISOR_GROUP}' subgroup of a "
            f"delegated cgroup (systemd 254+: Delegate=memory pids, DelegateSubgroup={SUPERVISOR_GROUP})"
        )
    return path.parent, ""


def detect(required: tuple[str, ...] = REQUIRED) -> tuple[RunCgroups | None, str]:
    """Prepare the delegated cgroup for per-run cgroups, or say why there is none.

    Returns (RunCgroups, "") when runs can get their own cgroups (``required``
    is then enabled for D's children), else (None, a sentence for the
    start-up log).
    """
    path, why = locate()
    if path is None:
        return None, why
    available = _read(path / "cgroup.controllers").split()
    missing = [c for c in required if c not in available]
    if missing:
        return None, (
            f"the cgroup {path} does not offer the {' and '.join(missing)} controller"
            f"{'s' if len(missing) > 1 else ''} (cgroup.controllers: "
            f"{' '.join(available) or 'none'})"
        )
    if not _writable(path):
        return None, f"the cgroup {path} is not delegated to this user (not writable)"
    if not _marked_delegated(path):
        return None, (
            f"the cgroup {path} carries no delegation mark (trusted.delegate or "
            "user.delegate, set by systemd 252+ for Delegate=); a cgroup that was "
            "not delegated is not rearranged"
        )
    try:
        _enable(path, required)
    except OSError as exc:
        return None, f"cannot prepare {path} for per-run cgroups: {exc}"
    return RunCgroups(path), ""


def _enable(path: Path, required: tuple[str, ...]) -> None:
    """Enable ``required`` for D's children (kept from an earlier start)."""
    enabled = _read(path / "cgroup.subtree_control").split()
    wanted = " ".join(f"+{c}" for c in required if c not in enabled)
    if not wanted:
        return
    try:
        (path / "cgroup.subtree_control").write_text(wanted)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise OSError(exc.errno, f"processes live in {path} itself, outside its "
                          f"'{SUPERVISOR_GROUP}' subgroup") from None
        raise


def limit_args(
    cgroups: RunCgroups | None,
    submission_name: str,
    attempt: int,
    limits: Limits,
    memory_limit_mb: float | None,
    tmp_counted: bool,
) -> list[str]:
    """The supervisor's options for a run's limits: ``--cgroup`` and
    ``--cgroup-set`` where there are per-run cgroups, plus the rlimits.

    With a cgroup the process count is its ``pids.max`` and not RLIMIT_NPROC
    (the latter counts every process of the user, so one run's fork bomb
    would starve the others). ``tmp_counted``: the run's memory-backed /tmp
    (the sandbox's tmpfs) is charged to its cgroup, so memory.max makes room
    for it.
    """
    if cgroups is None:
        return rlimit_args(limits)
    args = ["--cgroup", str(cgroups.run_dir(submission_name, attempt))]
    if limits.max_processes is not None:
        args += ["--cgroup-set", f"pids.max={int(limits.max_processes)}"]
    if memory_limit_mb is not None:
        mb = memory_limit_mb + max(memory_limit_mb * HEADROOM_SHARE, MIN_HEADROOM_MB)
        if tmp_counted and limits.tmp_size_mb is not None:
            mb += limits.tmp_size_mb
        args += ["--cgroup-set", f"memory.max={int(mb * 2**20)}"]
        # the kernel's OOM kill takes the run's whole tree, never half of it
        args += ["--cgroup-set", "memory.oom.group=1"]
    return args + rlimit_args(limits, nproc=False)


def remove_run_cgroup(path: Path) -> bool:
    """Kill what is left in a run's cgroup and remove it (a lost supervisor's);
    True when it is gone. Only ``run-*`` folders are touched."""
    if not path.name.startswith(RUN_PREFIX) or not path.is_dir():
        return not path.exists()
    try:
        (path / "cgroup.kill").write_text("1")
    except OSError:
        pass  # kernel < 5.14, or already empty
    for _ in range(100):
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            time.sleep(0.02)  # killed tasks leave the cgroup asynchronously
    log.warning("cannot remove the run cgroup %s", path)
    return False
