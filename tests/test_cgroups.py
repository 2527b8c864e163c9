"""Per-run cgroups (workers/cgroups.py, supervise.py --cgroup), on the real cgroup v2.

What this machine can show, and what it cannot: its cgroup v2 hierarchy
offers no ``memory`` nor ``pids`` controller (both are bound to cgroup v1
hierarchies, and the memory one is in use by the machine's own process
manager), so no run here can get ``memory.max`` or ``pids.max``. What is
real here: a delegated subtree (marked as systemd marks it, chowned as
systemd chowns it for a service user, the daemon started in its
``supervisor`` leaf as DelegateSubgroup= starts it), a controller enabled for the runs (``hugetlb``, the
one controller this hierarchy offers, stands in for memory and pids: it is
named so in each test), the run's whole tree in its own cgroup, what left
the tree killed with it, and the cgroup removed after the run.
``test_limits_per_run`` needs the real controllers and skips without them
(RAMP_DISPATCHER_REQUIRE_CGROUP=1 makes it fail instead).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from ramp_dispatcher.workers import cgroups as cg
from ramp_dispatcher.workers.sandbox import Limits

ROOT = Path(__file__).resolve().parent.parent
SUPERVISE = ROOT / "ramp_dispatcher" / "workers" / "supervise.py"
#: the stand-in controller for the mechanics (see the module docstring)
STAND_IN = "hugetlb"


def test_limit_args_without_cgroups_are_the_rlimits() -> None:
    args = cg.limit_args(None, "submission_000000001", 1, Limits(), 1000.0, tmp_counted=True)
    assert "--cgroup" not in args
    assert ["--rlimit", "NPROC=512"] == args[:2]


def test_limit_args_with_a_cgroup_bound_the_run_there() -> None:
    run_cgroups = cg.RunCgroups(Path("/sys/fs/cgroup/x.service"))
    args = cg.limit_args(
        run_cgroups, "submission_000000001", 2, Limits(max_processes=64, tmp_size_mb=512.0),
        1000.0, tmp_counted=True,
    )  # fmt: skip
    assert args[:2] == ["--cgroup", "/sys/fs/cgroup/x.service/run-submission_000000001-2"]
    sets = dict(a.split("=") for a in args[3::2] if "=" in a and "." in a.split("=")[0])
    assert sets["pids.max"] == "64"
    # the run's limit, 25 % headroom (at least 256 MB), and its memory-backed /tmp
    assert int(sets["memory.max"]) == int((1000 + 256 + 512) * 2**20)
    assert sets["memory.oom.group"] == "1"
    # the process count is the cgroup's: RLIMIT_NPROC would count the user's every process
    assert not any(a.startswith("NPROC=") for a in args)
    assert "NOFILE=1024" in args
    no_memory = cg.limit_args(run_cgroups, "s", 1, Limits(), None, tmp_counted=False)
    assert not any(a.startswith("memory.") for a in no_memory)


# ------------------------------------------------------------ real cgroup v2
def _mount() -> Path:
    found = cg.cgroup2_mount()
    if found is None or os.geteuid() != 0:
        pytest.skip("needs root and a cgroup v2 mount")
    point, _ = found
    return point


@pytest.fixture
def delegated():
    """A fresh cgroup below the cgroup2 root, offering the stand-in controller."""
    point = _mount()
    if STAND_IN not in (point / "cgroup.controllers").read_text().split():
        pytest.skip(f"the cgroup v2 hierarchy offers no {STAND_IN} controller")
    root_control = point / "cgroup.subtree_control"
    had = STAND_IN in root_control.read_text().split()
    if not had:
        root_control.write_text(f"+{STAND_IN}")
    path = point / f"ramp-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    (path / cg.SUPERVISOR_GROUP).mkdir()
    yield path
    for child in sorted(path.iterdir(), reverse=True):
        if child.is_dir():
            cg.remove_run_cgroup(child) if child.name.startswith("run-") else _drop(child)
    _drop(path)
    if not had:
        try:
            root_control.write_text(f"-{STAND_IN}")
        except OSError:
            pass  # another cgroup uses it now


def _drop(path: Path) -> None:
    for pid in (path / "cgroup.procs").read_text().split():
        try:
            os.kill(int(pid), 9)
        except OSError:
            pass
    for _ in range(100):
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.02)


#: run in a process placed in the delegated cgroup: prepare it as the daemon
#: does, then one supervised run whose tree forks and leaves a detached sleeper
DRIVER = r"""
import json, os, subprocess, sys
from pathlib import Path
from ramp_dispatcher.workers import cgroups as cg, supervise
from ramp_dispatcher.workers.sandbox import Limits
out = Path(sys.argv[1])
run_cgroups, why = cg.detect((sys.argv[2],))
result = {"why": why, "own": cg.own_cgroup()}
if run_cgroups is not None:
    args = cg.limit_args(run_cgroups, "submission_000000007", 1, Limits(max_processes=None),
                         None, tmp_counted=True)
    script = ("cat /proc/self/cgroup > tree; setsid sh -c 'sleep 300' & echo $! > sleeper; "
              "sh -c 'cat /proc/self/cgroup' > grandchild")
    subprocess.run([sys.executable, "-I", "-S", supervise.__file__, "--log", str(out / "log"),
                    "--status", str(out / "status"), "--timeout", "60", "--cwd", str(out),
                    *args, "--", "sh", "-c", script], check=True)
    result["run_dir"] = str(run_cgroups.run_dir("submission_000000007", 1))
print(json.dumps(result))
"""


def _drive(cgroup: Path, python: str, user: tuple[int, int] | None, out: Path) -> dict:
    def enter() -> None:  # as systemd starts the service (DelegateSubgroup=supervisor)
        (cgroup / cg.SUPERVISOR_GROUP / "cgroup.procs").write_text(str(os.getpid()))

    argv = [python, "-c", DRIVER, str(out), STAND_IN]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    if user is not None:  # moved in as root (as systemd does), then the user's own process
        setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        argv = [setpriv, f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups", *argv]
        env = {"PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, env=env, cwd=out, preexec_fn=enter
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_run(cgroup: Path, result: dict, out: Path) -> None:
    assert result["why"] == "", result
    # the daemon lives in the leaf; the controller is handed to the runs
    assert result["own"].endswith(f"/{cgroup.name}/{cg.SUPERVISOR_GROUP}")
    assert STAND_IN in (cgroup / "cgroup.subtree_control").read_text().split()
    status = json.loads((out / "status").read_text())
    assert status["reason"] == "exited" and status["exit_code"] == 0, status
    run_rel = "/" + os.path.relpath(result["run_dir"], cg.cgroup2_mount()[0])
    for name in ("tree", "grandchild"):  # the command and what it started
        assert f"0::{run_rel}\n" in (out / name).read_text(), name
    sleeper = int((out / "sleeper").read_text())
    assert not Path(f"/proc/{sleeper}").exists() or "Z" in Path(f"/proc/{sleeper}/stat").read_text().split()[2]
    assert not Path(result["run_dir"]).exists(), "the run's cgroup is removed after the run"


def test_run_tree_in_its_own_cgroup_as_root(delegated: Path, tmp_path: Path) -> None:
    """Root may write any cgroup: only systemd's delegation mark makes one the
    daemon's; with it the run gets its cgroup (stand-in controller: hugetlb)."""
    unmarked = _drive(delegated, sys.executable, None, tmp_path)
    assert "delegation mark" in unmarked["why"]
    assert (delegated / "cgroup.subtree_control").read_text().strip() == "", "nothing changed"
    os.setxattr(delegated, "trusted.delegate", b"1")  # what systemd's Delegate=yes sets
    _check_run(delegated, _drive(delegated, sys.executable, None, tmp_path), tmp_path)


def test_run_tree_in_its_own_cgroup_as_service_user(delegated: Path) -> None:
    """A non-root daemon whose cgroup was chowned to it and marked, as systemd
    delegates to a unit's User= (stand-in controller: hugetlb)."""
    hostile_setup = pytest.importorskip("hostile_setup")
    try:
        user = hostile_setup.hostile_user()
    except hostile_setup.SetupError as exc:
        pytest.skip(str(exc))
    for group in (delegated, delegated / cg.SUPERVISOR_GROUP):
        for path in (group, *(group / n for n in ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads"))):
            os.chown(path, user.uid, user.gid)
    out = Path(tempfile.mkdtemp(prefix="ramp-cgroup-"))
    try:
        os.chown(out, user.uid, user.gid)
        # writable is not delegated: a user's own session cgroups are writable too
        unmarked = _drive(delegated, str(user.python), (user.uid, user.gid), out)
        assert "delegation mark" in unmarked["why"]
        assert (delegated / "cgroup.subtree_control").read_text().strip() == ""
        os.setxattr(delegated, "user.delegate", b"1")  # systemd's mark, readable by the user
        _check_run(delegated, _drive(delegated, str(user.python), (user.uid, user.gid), out), out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_this_host_falls_back_to_rlimits_saying_why() -> None:
    """Outside a delegated cgroup (here: the test's own), no cgroup is touched."""
    run_cgroups, why = cg.detect()
    if run_cgroups is not None:
        pytest.skip(f"this process's cgroup is delegated ({run_cgroups.root})")
    assert why and ("cgroup" in why)


@pytest.fixture
def real_controllers(delegated: Path) -> Path:
    available = (delegated / "cgroup.controllers").read_text().split()
    if not set(cg.REQUIRED) <= set(available):
        message = f"cgroup v2 offers {' '.join(available) or 'no controller'} here, not memory and pids"
        if os.environ.get("RAMP_DISPATCHER_REQUIRE_CGROUP") == "1":
            pytest.fail(message)
        pytest.skip(message)
    os.setxattr(delegated, "trusted.delegate", b"1")
    return delegated


FORK_AND_GROW = r"""
import os, sys, time
kids = []
for _ in range(40):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(30); os._exit(0)
    kids.append(pid)
print("forked", len(kids), flush=True)
for pid in kids:
    os.kill(pid, 9)
if sys.argv[1] == "grow":
    blocks = []
    while True:
        blocks.append(bytearray(64 << 20))  # faster than two memory samples apart
"""


def test_limits_per_run(real_controllers: Path, tmp_path: Path) -> None:
    """pids.max stops a fork loop at the run's own bound; memory grown past
    memory.max is reported as the memory limit."""
    code = (
        "import subprocess, sys\n"
        "from pathlib import Path\n"
        "from ramp_dispatcher.workers import cgroups as cg, supervise\n"
        "from ramp_dispatcher.workers.sandbox import Limits\n"
        "rc, why = cg.detect(); assert rc is not None, why\n"
        "out = Path(sys.argv[1])\n"
        "for mode in ('fork', 'grow'):\n"
        "    args = cg.limit_args(rc, 'submission_000000009', 1 if mode == 'fork' else 2,\n"
        "                         Limits(max_processes=10), 100.0, tmp_counted=False)\n"
        "    subprocess.run([sys.executable, '-I', '-S', supervise.__file__, '--log', str(out / mode),\n"
        "                    '--status', str(out / (mode + '.json')), '--timeout', '120',\n"
        "                    '--memory-limit-mb', '100000', *args, '--', sys.executable, '-c',\n"
        f"                    {FORK_AND_GROW!r}, mode], check=True)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], check=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        preexec_fn=lambda: (real_controllers / cg.SUPERVISOR_GROUP / "cgroup.procs").write_text(str(os.getpid())),
    )  # fmt: skip
    forked = int((tmp_path / "fork").read_text().split("forked ")[1].split()[0])
    assert forked < 10
    assert "reached its process limit (10)" in (tmp_path / "fork").read_text()
    grow = json.loads((tmp_path / "grow.json").read_text())
    # the supervisor's own (PSS) limit was set far above: the kernel's bound stopped it
    assert grow["reason"] == "memory", grow


def test_a_daemon_outside_the_supervisor_leaf_is_left_where_it_is(delegated: Path, tmp_path: Path) -> None:
    """systemd < 254 starts the daemon in the unit's cgroup itself: moving it
    would close that cgroup to the next daemon systemd starts, so no per-run
    cgroups there (and nothing moved)."""
    os.setxattr(delegated, "trusted.delegate", b"1")

    def enter() -> None:
        (delegated / "cgroup.procs").write_text(str(os.getpid()))

    proc = subprocess.run(
        [sys.executable, "-c", "from ramp_dispatcher.workers import cgroups as cg; print(cg.detect(('hugetlb',))[1])"],
        capture_output=True, text=True, timeout=60, preexec_fn=enter,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert "is not the 'supervisor' subgroup of a delegated cgroup" in proc.stdout, proc
    assert (delegated / "cgroup.subtree_control").read_text().strip() == ""
