"""What the conda worker does after ramp-test exited 0, outside the sandbox.

1. The output folder was written by the participant's process: links and
   special files (a symlink ``error.txt`` to the server config, a FIFO named
   ``scores.csv`` that would block the reader) are removed before anything
   of the daemon reads it.
2. Its size is checked against ``limits.max_output_mb``.
3. With ``verify_scores``, :mod:`.rescore` scores the saved predictions again
   with the environment's own Python, on the event's folds from the database
   (handed over in a file, ``folds-<attempt>.npz`` beside the log, removed
   after), not on whatever the kit's ``get_cv`` makes today.

The result is a small JSON file beside the run's status file, so a restarted
daemon reads it instead of doing the work again. This runs in a worker
thread: scoring takes seconds, the dispatcher loop must not wait for it.

The scoring goes through a warm server (:class:`Scorer`): one
``rescore.py --serve`` per environment, forking a child per run.

The dask and aws workers do the same on the host that ran ramp-test, with
:func:`check_output` (paths in, a plain dict out). So this module imports
nothing of the package at run time and nothing beyond the standard library
at import: the dask worker ships it by value (cloudpickle) and the aws
worker ships it to the instance, where :mod:`.aws.launch` loads it by path.
"""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # annotations only: see the module's docstring
    from .base import RunRequest

#: the trusted scorer, run as a script with the environment's python
RESCORE_SCRIPT = Path(__file__).with_name("rescore.py").resolve()
#: its exit status for unusable predictions (rescore.BAD_PREDICTIONS)
BAD_PREDICTIONS = 3
#: how long the scorer may take (it reads the data and imports the kit)
RESCORE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class PostRunCheck:
    #: entries removed from the output folder (relative paths)
    removed: list[str] = field(default_factory=list)
    output_mb: float = 0.0
    #: "participant" or "infrastructure" when the run must fail after all
    failure: str | None = None
    message: str = ""
    #: the trusted scores (rescore.py's JSON) when verify_scores is on
    scores_path: str | None = None
    #: seconds the rescoring took
    rescore_s: float | None = None


def post_run_path(request: RunRequest) -> Path:
    return request.log_path.parent / f"checked-{request.attempt}.json"


def scores_path(request: RunRequest) -> Path:
    return request.log_path.parent / f"scores-{request.attempt}.json"


def folds_path(request: RunRequest) -> Path:
    return request.log_path.parent / f"folds-{request.attempt}.npz"


def folds_npz(folds: Sequence[tuple[Any, Any]]) -> bytes:
    """The folds as plain arrays (``train_<i>``, ``test_<i>``) in an npz:
    rescore.py loads them without pickle. Bytes, to ship to another host."""
    import io

    import numpy as np

    arrays = {}
    for i, (train_is, test_is) in enumerate(folds):
        arrays[f"train_{i}"] = np.asarray(train_is)
        arrays[f"test_{i}"] = np.asarray(test_is)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write_folds(path: Path, folds: Sequence[tuple[Any, Any]]) -> None:
    path.write_bytes(folds_npz(folds))


class FoldsNpz:
    """:func:`folds_npz`, made again only for other folds than last time's.
    Building the npz cost the daemon about 1 ms per run, and an event's folds
    rarely change: the daemon's reader (``queries.FoldsCache``) hands out the
    same object while the stored folds are the same, so the object says it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._folds: Sequence[tuple[Any, Any]] | None = None  # held: its identity stays its own
        self._npz = b""

    def __call__(self, folds: Sequence[tuple[Any, Any]]) -> bytes:
        with self._lock:
            if folds is self._folds:
                return self._npz
        npz = folds_npz(folds)
        with self._lock:
            self._folds, self._npz = folds, npz
        return npz


def read_post_run(path: Path) -> PostRunCheck | None:
    try:
        data = json.loads(path.read_text())
        return PostRunCheck(**data)
    except (OSError, ValueError, TypeError):
        return None


def sanitize_output(output_dir: Path) -> tuple[list[str], int]:
    """Remove what is neither a folder nor a regular file; return (removed, bytes).

    Never follows a link: a participant's link must not make the daemon read
    or delete anything outside the folder.
    """
    removed: list[str] = []
    total = 0
    if not output_dir.is_dir() or output_dir.is_symlink():
        return removed, total
    for root, dirs, files in os.walk(output_dir, followlinks=False):
        for name in dirs + files:
            path = os.path.join(root, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
                continue
            try:
                os.unlink(path)
                removed.append(os.path.relpath(path, output_dir))
            except OSError:
                pass
        # os.walk lists a link to a folder among dirs but does not enter it
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return sorted(removed), total


def env_python(prefix: Path) -> Path:
    """The environment's interpreter: ``bin/python``, else the one named by
    ``bin/ramp-test``'s ``#!`` line (an environment without a python link)."""
    python = prefix / "bin" / "python"
    if os.access(python, os.X_OK):
        return python
    try:
        with open(prefix / "bin" / "ramp-test", "rb") as f:
            first = f.readline(4096)
        named = Path(first[2:].decode(errors="replace").split()[0]) if first.startswith(b"#!") else None
    except (OSError, IndexError):
        named = None
    if named is not None and named.name.startswith("python") and os.access(named, os.X_OK):
        return named
    return python  # missing: the check reports it as the platform's failure


def rescore_env() -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = "1"
    for name in ("LANG", "TZ"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


class Scorer:
    """One warm ``rescore.py --serve`` per environment interpreter.

    A one-shot scoring spends most of its second of CPU importing pandas,
    scikit-learn and ramp-workflow; the warm server pays that once and forks
    a child per request (rescore.py's docstring). Requests are served one at
    a time (scoring a finished run takes a fraction of a second once warm).
    The server is started on first use, started again when it died or when
    its environment's site-packages changed (a package installed or upgraded:
    the warm imports would be stale), and killed, with the child it is
    waiting for, when a request passes its time limit. It ends by itself when
    its stdin closes, with the child of a scoring in progress and what a kit
    started, so a daemon killed with -9 leaves nothing behind.
    """

    def __init__(self, python: Path, script: Path = RESCORE_SCRIPT):
        self.python = python
        self.script = script  # rescore.py where this host has it
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._home: tempfile.TemporaryDirectory[str] | None = None
        self._watch: dict[str, float] = {}
        self._buffer = b""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def score(self, argv: Sequence[str], timeout: float) -> tuple[int, str]:
        """Run rescore.py with these options; (exit status, its error text).
        -1 with the reason when the server could not score at all."""
        with self._lock:
            deadline = time.monotonic() + timeout
            try:
                proc = self._ready(deadline)
            except (OSError, _ServerError) as exc:  # no interpreter there, ramp-workflow missing
                self._stop()
                return -1, self._why(exc, timeout)
            with tempfile.TemporaryDirectory(prefix="ramp-rescore-") as home:
                err_path = Path(home) / ".stderr"
                request = {"argv": list(argv), "cwd": home, "stderr": str(err_path)}
                try:
                    assert proc.stdin is not None
                    proc.stdin.write(json.dumps(request).encode() + b"\n")
                    proc.stdin.flush()
                    code = int(self._read(deadline)["code"])
                except (OSError, _ServerError, KeyError, TypeError, ValueError) as exc:
                    self._stop()  # killed with the child it waits for, on a time-out
                    return -1, self._why(exc, timeout)
                try:
                    err = err_path.read_text(errors="replace").strip()
                except OSError:
                    err = ""
            return code, err

    def close(self) -> None:
        with self._lock:
            self._stop()

    @staticmethod
    def _why(exc: Exception, timeout: float) -> str:
        if isinstance(exc, _TimedOut):
            return f"did not finish within {timeout:g} s"
        if isinstance(exc, (OSError, _ServerError)):
            return str(exc)
        return f"the scoring server answered wrongly: {exc}"

    def _ready(self, deadline: float) -> subprocess.Popen[bytes]:
        if self._proc is not None and _running(self._proc) and not self._stale():
            return self._proc
        self._stop()
        self._home = tempfile.TemporaryDirectory(prefix="ramp-rescore-server-")
        log_path = Path(self._home.name) / "server.log"
        with open(log_path, "wb") as log_file:
            self._proc = subprocess.Popen(
                # -B: no __pycache__ written into a kit
                [str(self.python), "-I", "-B", str(self.script), "--serve"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                cwd=self._home.name, env=rescore_env() | {"HOME": self._home.name},
                start_new_session=True,  # one group: a time-out kills it with its child
            )  # fmt: skip
        try:
            hello = self._read(deadline)
        except _TimedOut:
            raise
        except _ServerError as exc:
            try:
                last = (log_path.read_text(errors="replace").strip().splitlines() or [""])[-1]
            except OSError:
                last = ""
            raise _ServerError(last or str(exc)) from None
        self._watch = {p: _mtime(p) for p in hello.get("watch", []) if isinstance(p, str)}
        return self._proc

    def _stale(self) -> bool:
        return any(_mtime(p) != seen for p, seen in self._watch.items())

    def _read(self, deadline: float) -> dict[str, Any]:
        """The server's next line, parsed, or _ServerError (timed out, or gone)."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _TimedOut()
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise _ServerError("the scoring server exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise _ServerError(f"the scoring server said {line[:200]!r}")
        return message

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        self._buffer = b""
        if proc is not None:
            # Never reaped until here (``_running`` does not reap): its number
            # is still its group's, which a reaped one's might not be (pid_max
            # can be 32768), and a child that outlived it goes with the group.
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the server and a child it waits for
                except OSError:
                    pass
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        if self._home is not None:
            self._home.cleanup()
            self._home = None


class _ServerError(Exception):
    pass


class _TimedOut(_ServerError):
    pass


def _running(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the process has not ended, without reaping it if it has."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


def check_output(
    output_dir: Path,
    *,
    kit_dir: Path,
    data_dir: Path,
    scorer: Scorer | None,
    scores_target: Path,
    verify: bool = True,
    folds_file: Path | None = None,
    max_output_mb: float | None = None,
) -> dict[str, Any]:
    """Sanitize ``output_dir``, check its size, re-score it into ``scores_target``.

    Returns :class:`PostRunCheck`'s fields as a plain dict (it crosses to
    another Python as pickle or JSON). ``folds_file``: the event's folds
    (:func:`folds_npz`); None scores on the kit's ``get_cv``. ``scorer``:
    the host's warm scorer for the environment that ran ramp-test (None
    without ``verify``).
    """
    removed, size = sanitize_output(output_dir)
    try:  # the sandbox made the folder; ramp-test wrote nothing into it
        output_dir.rmdir()
    except OSError:
        pass  # not empty (the usual case), or absent
    output_mb = round(size / 2**20, 2)
    result: dict[str, Any] = {
        "removed": removed, "output_mb": output_mb, "failure": None, "message": "",
        "scores_path": None, "rescore_s": None,
    }  # fmt: skip
    if max_output_mb is not None and output_mb > max_output_mb:
        result["failure"] = "participant"
        result["message"] = (
            f"the run wrote {output_mb:.0f} MB into its output folder, "
            f"more than the limit of {max_output_mb:g} MB"
        )
        return result
    if not verify or not (output_dir / "fold_0").is_dir():
        return result  # (no fold at all: nothing to score; the results parser reports it)
    assert scorer is not None, "verify needs a scorer"
    scores_target.unlink(missing_ok=True)
    t0 = time.monotonic()
    argv = [
        "--kit-dir", os.path.abspath(kit_dir),
        "--data-dir", os.path.abspath(data_dir),
        "--output-dir", os.path.abspath(output_dir),
        "--json", str(scores_target),
    ]  # fmt: skip
    if folds_file is not None:
        argv += ["--folds", os.path.abspath(folds_file)]
    code, err = scorer.score(argv, RESCORE_TIMEOUT_S)
    result["rescore_s"] = round(time.monotonic() - t0, 3)
    last = (err.splitlines() or [""])[-1]
    if code == 0 and scores_target.is_file():
        result["scores_path"] = str(scores_target)
    elif code == BAD_PREDICTIONS:
        result["failure"] = "participant"
        result["message"] = "the saved predictions could not be scored: " + last.removeprefix("rescore: ")
    else:
        result["failure"] = "infrastructure"
        result["message"] = f"scoring the saved predictions failed: {last or f'exit code {code}'}"
    return result


def run_post_run_checks(
    request: RunRequest,
    scorer: Scorer,
    max_output_mb: float | None,
    verify: bool,
    folds: bytes | None = None,
) -> PostRunCheck:
    """Do the checks, write their result atomically to :func:`post_run_path`, return it.

    ``folds``: the event's (train_is, test_is) in ramp-test's fold order, as
    :func:`folds_npz` packs them; None (a worker used without a database)
    scores on the kit's ``get_cv``.
    """
    folds_file = None
    if verify and folds is not None:
        folds_file = folds_path(request)
        folds_file.write_bytes(folds)
    try:
        result = PostRunCheck(**check_output(
            request.output_dir, kit_dir=request.kit_dir, data_dir=request.data_dir,
            scorer=scorer, scores_target=scores_path(request), verify=verify,
            folds_file=folds_file, max_output_mb=max_output_mb,
        ))  # fmt: skip
    finally:
        if folds_file is not None:
            folds_file.unlink(missing_ok=True)
    path = post_run_path(request)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(result)))
    os.replace(tmp, path)
    return result
