"""Set-up of the hostile-submission suite: a non-root user and a Python it can run.

What passes as root proves little (root reads every file, and the kernel
never applies RLIMIT_NPROC to root), so the daemon runs as a system user made
here. This machine's ``python3`` may live in root's home (pyenv), which that
user cannot enter, so the user's environment is a venv of Debian's own
``/usr/bin/python3.11``, with this package's dependencies (and the demo
extra: ramp-workflow, scikit-learn, pandas) installed from PyPI once and
cached under /var/cache; the package itself is copied in on every session
(seconds), so the code under test is always the worktree's.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pwd
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USER = "ramp-hostile"
SYSTEM_PYTHON = Path("/usr/bin/python3.11")
CACHE = Path("/var/cache/ramp-dispatcher-tests")


class SetupError(Exception):
    """The suite cannot be set up here (not root, no useradd, no Debian python)."""


@dataclass(frozen=True)
class HostileUser:
    name: str
    uid: int
    gid: int
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run as the user, with a clean login-less environment."""
        return [shutil.which("runuser") or "/usr/sbin/runuser", "-u", self.name, "--", *argv]


def ensure_user(name: str = USER) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if os.geteuid() != 0:
            raise SetupError("creating the test user needs root") from None
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        proc = subprocess.run(
            [useradd, "--system", "--user-group", "--no-create-home",
             "--shell", "/usr/sbin/nologin", name],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode not in (0, 9):  # 9: created meanwhile by another session
            raise SetupError(f"useradd {name} failed: {proc.stderr.strip()}")
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return sorted(project["dependencies"] + project["optional-dependencies"]["demo"])


def ensure_venv() -> Path:
    """The cached venv (dependencies only), built on first use."""
    if not SYSTEM_PYTHON.is_file():
        raise SetupError(f"{SYSTEM_PYTHON} is missing (Debian's python3.11 package)")
    reqs = _requirements()
    key = hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:12]
    venv = CACHE / f"venv-py311-{key}"
    stamp = venv / ".ready"
    if stamp.exists():
        return venv
    CACHE.mkdir(parents=True, exist_ok=True)
    CACHE.chmod(0o755)
    if venv.exists():
        shutil.rmtree(venv)
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run(str(SYSTEM_PYTHON), "-m", "venv", str(venv))
        run(str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", *reqs)
    except subprocess.CalledProcessError as exc:
        raise SetupError(f"building {venv} failed: {exc.stderr[-2000:]}") from None
    stamp.write_text("\n".join(reqs) + "\n")
    return venv


def _package_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "ramp_dispatcher").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def install_package(venv: Path) -> None:
    """Copy this worktree's package into the venv (no build, no egg-info in the
    tree), unless the same code is there already: a test process running in
    parallel may be running a daemon from it."""
    site = next((venv / "lib").glob("python3.*/site-packages"))
    dest = site / "ramp_dispatcher"
    stamp = site / "ramp_dispatcher.digest"
    digest = _package_digest()
    if dest.is_dir() and stamp.is_file() and stamp.read_text() == digest:
        return
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ROOT / "ramp_dispatcher", dest, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    stamp.write_text(digest)


def hostile_user() -> HostileUser:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".setup.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test processes in parallel set up one at a time
        uid, gid = ensure_user()
        venv = ensure_venv()
        install_package(venv)
    return HostileUser(USER, uid, gid, venv)


if __name__ == "__main__":  # warm the cache: python tests/hostile_setup.py
    print(hostile_user())
