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

The dask and aws workers do the same on the host that ran ramp-test, with
:func:`check_output` (paths in, a plain dict out). So this module imports
nothing of the package at run time and nothing beyond the standard library
at import: the dask worker ships it by value (cloudpickle) and the aws
worker ships it to the instance, where :mod:`.aws.launch` loads it by path.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tempfile
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
                mode = os.lstat(path).st_mode
            except OSError:
                continue
            if stat.S_ISDIR(mode):
                continue
            if stat.S_ISREG(mode):
                total += os.lstat(path).st_size
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


def check_output(
    output_dir: Path,
    *,
    kit_dir: Path,
    data_dir: Path,
    python: Path,
    scores_target: Path,
    verify: bool = True,
    folds_file: Path | None = None,
    max_output_mb: float | None = None,
    script: Path = RESCORE_SCRIPT,
) -> dict[str, Any]:
    """Sanitize ``output_dir``, check its size, re-score it into ``scores_target``.

    Returns :class:`PostRunCheck`'s fields as a plain dict (it crosses to
    another Python as pickle or JSON). ``folds_file``: the event's folds
    (:func:`folds_npz`); None scores on the kit's ``get_cv``. ``script``:
    rescore.py where this host has it.
    """
    import time

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
    scores_target.unlink(missing_ok=True)
    t0 = time.monotonic()
    argv = [
        # -B: no __pycache__ written into the kit
        str(python), "-I", "-B", str(script),
        "--kit-dir", os.path.abspath(kit_dir),
        "--data-dir", os.path.abspath(data_dir),
        "--output-dir", os.path.abspath(output_dir),
        "--json", str(scores_target),
    ]  # fmt: skip
    if folds_file is not None:
        argv += ["--folds", os.path.abspath(folds_file)]
    with tempfile.TemporaryDirectory(prefix="ramp-rescore-") as home:
        env = rescore_env() | {"HOME": home}
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                cwd=home,
                env=env,
                timeout=RESCORE_TIMEOUT_S,
                check=False,
            )
            code, err = proc.returncode, proc.stderr.decode("utf-8", "replace").strip()
        except subprocess.TimeoutExpired:
            code, err = -1, f"did not finish within {RESCORE_TIMEOUT_S:g} s"
        except OSError as exc:
            code, err = -1, str(exc)
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
    python: Path,
    max_output_mb: float | None,
    verify: bool,
    folds: Sequence[tuple[Any, Any]] | None = None,
) -> PostRunCheck:
    """Do the checks, write their result atomically to :func:`post_run_path`, return it.

    ``folds``: the event's (train_is, test_is) in ramp-test's fold order; None
    (a worker used without a database) scores on the kit's ``get_cv``.
    """
    folds_file = None
    if verify and folds is not None:
        folds_file = folds_path(request)
        write_folds(folds_file, folds)
    try:
        result = PostRunCheck(**check_output(
            request.output_dir, kit_dir=request.kit_dir, data_dir=request.data_dir,
            python=python, scores_target=scores_path(request), verify=verify,
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
