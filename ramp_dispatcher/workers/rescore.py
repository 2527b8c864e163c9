"""Score a finished run again from its saved predictions, outside its sandbox.

Run with the event environment's own Python (it needs ramp-workflow and what
the kit imports, which the daemon may not have), as a plain script::

    <env>/bin/python -I -B .../ramp_dispatcher/workers/rescore.py \\
        --kit-dir K --data-dir D --output-dir S/<submission>/training_output \\
        --folds FOLDS.npz --json OUT

ramp-test scores inside the participant's process, so its ``scores.csv`` and
``bagged_scores.csv`` are whatever that process chose to write. Here the
scores come from the kit's own ``problem.py`` (score types, data readers),
the event's folds (``FOLDS.npz``: ``train_<i>``, ``test_<i>``, written by the
daemon from the ``cv_folds`` rows; without ``--folds``, the kit's ``get_cv``)
and the predictions ramp-test saved (``fold_<i>/y_pred_train.npz``,
``y_pred_test.npz``), exactly as ramp-workflow 0.7.0 computes them in
``run_submission_on_cv_fold`` and ``bag_submissions``. Predictions made on
other folds than the event's (a kit whose ``get_cv`` changed, or draws at
random) are scored on the event's, so the stored scores differ from the
reported ones and say so; predictions that do not have one row per row of
the data are the submission's error.

``OUT`` receives ``{"folds": [{"train": {score: value}, "valid": ..., "test":
...}, ...], "bagged": {"valid": {score: [per n_bag]}, "test": ...}}``.
Exit status: 0 scored; 3 the predictions are unusable (missing, malformed,
the wrong shape: the submission's doing); anything else is our failure.
Standard library, numpy and ramp-workflow only; no import from this package.

``rescore.py --serve`` is the same scorer kept warm: it imports what every
kit's scoring needs (numpy, pandas, ramp-workflow: about 1 s of CPU, most of
a one-shot scoring's cost) once, then reads one JSON request per line on
stdin (``{"argv": [...], "cwd": D, "stderr": F}``: the options above, a
private folder, where the error text goes) and answers each with
``{"code": <exit status>}`` on stdout. Every request is scored in a child
forked from the warm process, so a kit's imports and whatever its code does
stay in that child. End of input ends the server (the daemon closed the pipe,
or died); in the middle of a scoring it kills the server's process group (its
own session: the server, the child and whatever a kit started), so nothing
outlives a daemon killed with -9, even a kit that hangs. See :mod:`.post_run`'s
``Scorer``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

#: exit status when the saved predictions cannot be scored
BAD_PREDICTIONS = 3


class BadPredictions(Exception):
    pass


def _number(value: object) -> float:
    value = float(value)  # type: ignore[arg-type]
    return value if math.isfinite(value) else float("nan")


def _load(fold_dir: str, suffix: str):
    import numpy as np

    path = os.path.join(fold_dir, f"y_pred_{suffix}.npz")
    # Written inside the sandbox: a link or a special file is not ours to follow,
    # and a pickle inside is never loaded.
    if os.path.islink(path) or not os.path.isfile(path):
        raise BadPredictions(f"{os.path.basename(fold_dir)}/y_pred_{suffix}.npz is missing")
    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["y_pred"])
    except Exception as exc:
        raise BadPredictions(
            f"{os.path.basename(fold_dir)}/y_pred_{suffix}.npz cannot be read: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def load_folds(path: str, n_rows: int) -> list:
    """The event's folds from the daemon's file, checked against the data: a
    fold that names rows the data does not have is the platform's problem
    (the event and its data disagree), not the submission's."""
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        n = len([k for k in data.files if k.startswith("train_")])
        cv = [(np.asarray(data[f"train_{i}"]), np.asarray(data[f"test_{i}"])) for i in range(n)]
    for i, fold in enumerate(cv):
        for name, idx in zip(("train", "valid"), fold):
            if idx.dtype == bool:
                if len(idx) != n_rows:
                    raise ValueError(f"the event's fold {i} ({name}) is a mask of {len(idx)} rows, "
                                     f"the training data has {n_rows}")
            elif idx.size and (idx.min() < 0 or idx.max() >= n_rows):
                raise ValueError(f"the event's fold {i} ({name}) names row {idx.max()}, "
                                 f"the training data has {n_rows} rows")
    return cv


def _check_rows(y_pred, n_rows: int, fold: int, suffix: str) -> None:
    if len(y_pred) != n_rows:
        raise BadPredictions(
            f"fold_{fold}/y_pred_{suffix}.npz has {len(y_pred)} rows, the "
            f"{'training' if suffix == 'train' else 'test'} data has {n_rows}"
        )


def rescore(kit_dir: str, data_dir: str, output_dir: str, folds_file: str | None = None) -> dict:
    from rampwf.utils.combine import get_score_cv_bags
    from rampwf.utils.testing import assert_read_problem

    problem = assert_read_problem(kit_dir)
    X_train, y_train = problem.get_train_data(path=data_dir)
    X_test, y_test = problem.get_test_data(path=data_dir)
    if folds_file is not None:
        cv, origin = load_folds(folds_file, len(y_train)), "the event has"
    else:
        cv, origin = list(problem.get_cv(X_train, y_train)), "the kit's get_cv makes"
    score_types = problem.score_types
    n_present = sum(
        1 for name in os.listdir(output_dir)
        if name.startswith("fold_") and os.path.isdir(os.path.join(output_dir, name))
    )  # fmt: skip
    if n_present != len(cv):
        raise BadPredictions(f"{n_present} fold folders, {origin} {len(cv)} folds")

    folds = []
    valid_list, test_list = [], []
    for i, (train_is, valid_is) in enumerate(cv):
        fold_dir = os.path.join(output_dir, f"fold_{i}")
        y_pred_train = _load(fold_dir, "train")
        y_pred_test = _load(fold_dir, "test")
        _check_rows(y_pred_train, len(y_train), i, "train")
        _check_rows(y_pred_test, len(y_test), i, "test")
        try:
            pairs = {
                "train": (problem.Predictions(y_true=y_train, fold_is=train_is),
                          problem.Predictions(y_pred=y_pred_train, fold_is=train_is)),
                "valid": (problem.Predictions(y_true=y_train, fold_is=valid_is),
                          problem.Predictions(y_pred=y_pred_train, fold_is=valid_is)),
                "test": (problem.Predictions(y_true=y_test),
                         problem.Predictions(y_pred=y_pred_test)),
            }  # fmt: skip
            scores = {
                step: {st.name: _number(st.score_function(truth, pred)) for st in score_types}
                for step, (truth, pred) in pairs.items()
            }
        except Exception as exc:  # wrong shape, wrong dtype: not a prediction
            raise BadPredictions(f"fold_{i}: predictions cannot be scored: {type(exc).__name__}: {exc}")
        folds.append(scores)
        valid_list.append(pairs["valid"][1])
        test_list.append(pairs["test"][1])

    bagged: dict = {}
    for step, preds, y_true, test_is in (
        ("valid", valid_list, y_train, [valid_is for _, valid_is in cv]),
        ("test", test_list, y_test, None),
    ):
        truth = problem.Predictions(y_true=y_true)
        bagged[step] = {}
        for st in score_types:
            try:
                _, curve = get_score_cv_bags(st, preds, truth, test_is_list=test_is)
            except Exception as exc:
                raise BadPredictions(
                    f"bagged {step} predictions cannot be scored: {type(exc).__name__}: {exc}"
                )
            bagged[step][st.name] = [_number(v) for v in curve]
    return {"folds": folds, "bagged": bagged}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rescore.py", description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="answer requests on stdin (see above)")
    parser.add_argument("--kit-dir")
    parser.add_argument("--data-dir")
    parser.add_argument("--output-dir")
    parser.add_argument("--json", help="where the scores go")
    parser.add_argument("--folds", default=None, help="the event's folds (.npz); default: get_cv")
    args = parser.parse_args(argv)
    if args.serve:
        return serve()
    missing = [o for o in ("kit_dir", "data_dir", "output_dir", "json") if getattr(args, o) is None]
    if missing:
        parser.error("missing " + ", ".join("--" + o.replace("_", "-") for o in missing))
    try:
        result = rescore(args.kit_dir, args.data_dir, args.output_dir, args.folds)
    except BadPredictions as exc:
        print(f"rescore: {exc}", file=sys.stderr)
        return BAD_PREDICTIONS
    except Exception:
        traceback.print_exc()
        return 1
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, args.json)
    return 0


def serve() -> int:
    """The warm scorer (module docstring): one forked child per request."""
    import numpy  # noqa: F401
    import pandas  # noqa: F401
    import rampwf.utils.combine  # noqa: F401
    import rampwf.utils.testing  # noqa: F401  (score types, workflows, sklearn)

    # The folders whose change (a package installed or upgraded in the
    # environment) makes this warm process stale: the daemon restarts it then.
    import site

    watch = [p for p in site.getsitepackages() if os.path.isdir(p)]
    _reply({"ready": True, "watch": watch})
    requests = _Requests()
    while (request := requests.next()) is not None:
        pid = os.fork()
        if pid == 0:  # the child: score, then leave without running any cleanup of the server's
            code = 1
            try:
                os.chdir(request["cwd"])
                os.environ["HOME"] = request["cwd"]
                fd = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(fd, 2)
                os.close(fd)
                # stdout is the server's answer pipe, stdin its requests: a kit
                # prints to nowhere and reads nothing
                fd = os.open(os.devnull, os.O_RDWR)
                os.dup2(fd, 0)
                os.dup2(fd, 1)
                os.close(fd)
                code = main(request["argv"])
                sys.stderr.flush()
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(code)
        _reply({"code": _wait_child(pid, requests)})
    return 0


class _Requests:
    """The server's input, one JSON request per line, read from fd 0 with a
    buffer of our own, so that a wait can also watch it: only there can data
    be told from its end (a pipe cannot be peeked)."""

    def __init__(self) -> None:
        self._buffer = b""
        self.ended = False

    def next(self) -> dict | None:
        """The next request; None at the end of input."""
        while b"\n" not in self._buffer:
            if not self.take():
                return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def take(self) -> bool:
        """Read what is there (blocking until something is); False at the end."""
        if not self.ended:
            chunk = os.read(0, 65536)
            self._buffer += chunk
            self.ended = not chunk
        return not self.ended


def _wait_child(pid: int, requests: _Requests) -> int:
    """The child's exit status (negative: killed by that signal), as
    ``os.waitstatus_to_exitcode`` gives it (not called: it needs Python 3.9,
    and this runs in the kit's environment, which may be older). The
    input ending meanwhile means the daemon is gone: the server's process
    group goes then (module docstring)."""
    import select
    import signal

    try:
        pidfd: int | None = os.pidfd_open(pid)  # Linux 5.3, Python 3.9
    except (AttributeError, OSError):
        pidfd = None  # then the child's end is polled
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            watched = [0] if pidfd is None else [0, pidfd]
            ready, _, _ = select.select(watched, [], [], 0.01 if pidfd is None else None)
            if 0 in ready and not requests.take():
                # our group only when we lead it (Scorer starts us in a session
                # of our own); started by hand, the child alone
                if os.getpgrp() == os.getpid():
                    os.killpg(os.getpgrp(), signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
