"""The instance side of one aws run: check the image, then run ramp-test under
the supervisor, in the bubblewrap sandbox when configured.

Shipped to the instance by value (over SFTP, beside ``supervise.py``,
``sandbox.py``, ``post_run.py`` and ``rescore.py``, see :mod:`.remote`) and
run there by the image's ``python3`` as a lone script, so it uses the
standard library only; it loads ``sandbox.py`` and ``post_run.py`` from the
paths it is given. Usage::

    python3 -I -S launch.py check SPEC_JSON   prints one "ramp-dispatcher-check {json}" line
    python3 -I -S launch.py run SPEC_JSON     runs the run; writes <run>/maxrss, reason,
                                              checked.json (re-scoring), exit

SPEC_JSON keys: run_dir, kit_dir, data_dir, submissions_dir, submission,
env_prefix ("" = where the login shell finds ramp-test), sandbox ("bwrap" or
"none"), timeout, max_log_mb, n_threads, supervisor, sandbox_module, limits
(:class:`sandbox.Limits` fields), rescore (None, or post_run, script and
folds: the shipped ``post_run.py``, ``rescore.py`` and the event's folds).

After ramp-test exited 0, with ``rescore``, the conda worker's post-run
checks run here, outside the sandbox (links and special files removed from
``training_output``, the saved predictions scored again by ``rescore.py``
with the environment's own Python): their result goes to
``<run>/checked.json``, the scores to ``<run>/scores.json``, before ``exit``.

The sandbox is the conda worker's (``sandbox.bwrap_argv``): no network (so no
instance metadata service either: ``--unshare-net`` gives the run an empty
network namespace), read-only environment, kit and data, writable only its
``training_output`` and a private /tmp. Hidden even where a bound folder
holds them: the image's ``submissions`` and run folders, and the login user's
``~/.ssh`` and ``~/.aws``; the rest of that user's home is never bound.

``run`` replaces the login shell that wrote the run's pid file (``exec``), so
its pid stays the run's process group. It ignores SIGTERM: the kill command's
TERM reaches the supervisor, which stops ramp-test's tree and writes its
final status; this process then writes ``exit`` (last, atomically).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

#: the supervisor (supervise.py) needs this Python (subprocess's process_group)
MIN_PYTHON = (3, 11)


def load_sandbox(path: str) -> Any:
    """sandbox.py, loaded by path: its one package import (``..errors``) gets a
    stand-in package, so the module runs unchanged outside ramp_dispatcher."""
    return _load_shipped(path, "sandbox")


def _load_shipped(path: str, name: str) -> Any:
    """A shipped module of ``ramp_dispatcher.workers``, loaded by path."""
    errors = types.ModuleType("rd_shipped.errors")
    errors.UserError = type("UserError", (Exception,), {})  # type: ignore[attr-defined]
    for package_name in ("rd_shipped", "rd_shipped.workers"):
        package = types.ModuleType(package_name)
        package.__path__ = []  # type: ignore[attr-defined]
        sys.modules[package_name] = package
    sys.modules["rd_shipped.errors"] = errors
    spec = importlib.util.spec_from_file_location(f"rd_shipped.workers.{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def ramp_test_path(spec: dict[str, Any]) -> Path | None:
    """``<env_prefix>/bin/ramp-test``, or the login shell's ``ramp-test``."""
    if spec["env_prefix"]:
        path = Path(spec["env_prefix"]) / "bin" / "ramp-test"
        return path if os.access(path, os.X_OK) else None
    found = shutil.which("ramp-test")
    return Path(os.path.abspath(found)) if found else None


def check(spec: dict[str, Any]) -> tuple[str, str] | None:
    """(key, why) of what makes this image unable to run, or None."""
    if sys.version_info < MIN_PYTHON:
        return "remote_python_env", (
            f"the image's python3 ({sys.executable}) is {sys.version.split()[0]}; the run's "
            f"supervisor needs Python {'.'.join(map(str, MIN_PYTHON))} or later"
        )
    if ramp_test_path(spec) is None:
        where = spec["env_prefix"] or "the login shell's PATH"
        return "remote_python_env", f"the image has no ramp-test in {where}"
    if spec["sandbox"] == "bwrap":
        sb = load_sandbox(spec["sandbox_module"])
        try:
            sb.check_bwrap(sb.find_bwrap())
        except sb.SandboxError as exc:
            return "sandbox", f"the image cannot sandbox the run: {exc}"
    return None


def supervisor_argv(spec: dict[str, Any]) -> list[str]:
    """The supervisor's full argv (ramp-test, in the sandbox when configured)."""
    ramp_test = ramp_test_path(spec)
    if ramp_test is None:
        raise RuntimeError("ramp-test not found (the image changed since the check)")
    prefix = ramp_test.parent.parent
    run, kit = spec["run_dir"], spec["kit_dir"]
    submission_dir = Path(spec["submissions_dir"]) / spec["submission"]
    output_dir = submission_dir / "training_output"
    command = [
        str(ramp_test), "--submission", spec["submission"],
        "--ramp-kit-dir", kit, "--ramp-data-dir", spec["data_dir"],
        "--ramp-submission-dir", spec["submissions_dir"], "--save-output", "--ignore-warning",
    ]  # fmt: skip
    n_threads = spec.get("n_threads")
    argv = [
        sys.executable, "-I", "-S", spec["supervisor"],
        "--log", os.path.join(run, "log"), "--status", os.path.join(run, "status.json"),
        "--timeout", repr(float(spec["timeout"])), "--nice", "0", "--cwd", kit,
        "--max-log-mb", repr(float(spec["max_log_mb"])),
    ]  # fmt: skip
    if spec["sandbox"] == "bwrap":
        sb = load_sandbox(spec["sandbox_module"])
        home = Path(os.path.expanduser("~"))
        hidden = [
            Path(spec["submissions_dir"]), Path(run).parent, home / ".ssh", home / ".aws",
        ]  # fmt: skip
        box = sb.SandboxSpec(
            python_roots=sb.python_roots(prefix),
            kit_dir=Path(kit),
            data_dir=Path(spec["data_dir"]),
            submission_dir=submission_dir,
            output_dir=output_dir,
            hidden=tuple(hidden),
            system=sb.system_binds(),
            allow_network=False,
            n_threads=n_threads,
            limits=sb.Limits(**spec["limits"]),
            bwrap=sb.find_bwrap() or "bwrap",
        )
        output_dir.mkdir(parents=True, exist_ok=True)  # bound: it must exist
        command = sb.bwrap_argv(box, command)
        env = sb.sandbox_env(box, os.environ)
        argv += ["--clear-env", "--bwrap"]
        argv += sb.rlimit_args(box.limits)
    else:
        env = {"PYTHONUNBUFFERED": "1", "PATH": f"{prefix / 'bin'}:{os.environ.get('PATH', '')}"}
        if n_threads is not None:
            for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env[name] = str(int(n_threads))
    for name, value in env.items():
        argv += ["--setenv", f"{name}={value}"]
    return argv + ["--", *command]


def rescore(spec: dict[str, Any]) -> dict[str, Any]:
    """The post-run checks of a clean exit (see the module's docstring): the
    dict for ``checked.json``; our own failure is the platform's."""
    box, run_dir = spec["rescore"], spec["run_dir"]
    try:
        ramp_test = ramp_test_path(spec)
        if ramp_test is None:
            raise RuntimeError("ramp-test not found (the image changed during the run)")
        post_run = _load_shipped(box["post_run"], "post_run")
        output = Path(spec["submissions_dir"]) / spec["submission"] / "training_output"
        # one run per instance: the scorer serves once
        scorer = post_run.Scorer(post_run.env_python(ramp_test.parent.parent), Path(box["script"]))
        try:
            checked: dict[str, Any] = post_run.check_output(
                output, kit_dir=Path(spec["kit_dir"]), data_dir=Path(spec["data_dir"]),
                scorer=scorer, scores_target=Path(run_dir) / "scores.json",
                folds_file=Path(box["folds"]) if box.get("folds") else None,
            )  # fmt: skip
        finally:
            scorer.close()
        return checked
    except Exception as exc:
        sys.stderr.write(f"[ramp-dispatcher] the post-run checks failed: {exc!r}\n")
        return {"failure": "infrastructure", "message": "the post-run checks failed on the instance"}


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
    os.replace(path + ".tmp", path)


def run(spec: dict[str, Any]) -> int:
    # The kill command TERMs the whole group: the supervisor handles it; this
    # process stays to write the exit code.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    run_dir = spec["run_dir"]
    status_path = os.path.join(run_dir, "status.json")
    try:
        subprocess.call(supervisor_argv(spec), stdin=subprocess.DEVNULL)
        with open(status_path) as f:
            status = json.load(f)
    except (OSError, ValueError, RuntimeError) as exc:
        sys.stderr.write(f"[ramp-dispatcher] the run's supervisor failed: {exc}\n")
        status = {"reason": "supervisor_failed"}
    reason = str(status.get("reason") or "supervisor_failed")
    code = status.get("exit_code")
    if code is None:  # killed by a signal (the shell's convention), or never ran
        code = 128 + int(status["signal"]) if status.get("signal") else 125
    if status.get("max_ram_mb") is not None:
        _write(os.path.join(run_dir, "maxrss"), str(int(float(status["max_ram_mb"]) * 1024)))
    # the reason first: ramp-test is over, the re-scoring's time is not the run's
    _write(os.path.join(run_dir, "reason"), reason)
    if spec.get("rescore") and reason == "exited" and code == 0:
        # after the supervisor stopped the run's whole tree: nothing of it writes any more
        _write(os.path.join(run_dir, "checked.json"), json.dumps(rescore(spec)))
    _write(os.path.join(run_dir, "exit"), str(int(code)))  # last: the run is over
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("check", "run"):
        sys.stderr.write("usage: launch.py check|run SPEC_JSON\n")
        return 2
    spec = json.loads(argv[2])
    if argv[1] == "run":
        return run(spec)
    problem = check(spec)
    result = {"key": problem[0], "error": problem[1]} if problem else {"key": None, "error": None}
    print("ramp-dispatcher-check " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
