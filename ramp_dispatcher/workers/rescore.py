"""Score a finished run again from its saved predictions, outside its sandbox.

Run with the event environment's own Python (it needs ramp-workflow and what
the kit imports, which the daemon may not have), as a plain script::

    <env>/bin/python -I -B .../ramp_dispatcher/workers/rescore.py \\
        --kit-dir K --data-dir D --output-dir S/<submission>/training_output --json OUT

ramp-test scores inside the participant's process, so its ``scores.csv`` and
``bagged_scores.csv`` are whatever that process chose to write. Here the
scores come from the kit's own ``problem.py`` (score types, data readers,
``get_cv``) and the predictions ramp-test saved (``fold_<i>/y_pred_train.npz``,
``y_pred_test.npz``), exactly as ramp-workflow 0.7.0 computes them in
``run_submission_on_cv_fold`` and ``bag_submissions``.

``OUT`` receives ``{"folds": [{"train": {score: value}, "valid": ..., "test":
...}, ...], "bagged": {"valid": {score: [per n_bag]}, "test": ...}}``.
Exit status: 0 scored; 3 the predictions are unusable (missing, malformed,
the wrong shape: the submission's doing); anything else is our failure.
Standard library, numpy and ramp-workflow only; no import from this package.
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


def rescore(kit_dir: str, data_dir: str, output_dir: str) -> dict:
    from rampwf.utils.combine import get_score_cv_bags
    from rampwf.utils.testing import assert_read_problem

    problem = assert_read_problem(kit_dir)
    X_train, y_train = problem.get_train_data(path=data_dir)
    X_test, y_test = problem.get_test_data(path=data_dir)
    cv = list(problem.get_cv(X_train, y_train))
    score_types = problem.score_types
    n_present = sum(
        1 for name in os.listdir(output_dir)
        if name.startswith("fold_") and os.path.isdir(os.path.join(output_dir, name))
    )  # fmt: skip
    if n_present != len(cv):
        raise BadPredictions(f"{n_present} fold folders, the kit's get_cv makes {len(cv)} folds")

    folds = []
    valid_list, test_list = [], []
    for i, (train_is, valid_is) in enumerate(cv):
        fold_dir = os.path.join(output_dir, f"fold_{i}")
        y_pred_train = _load(fold_dir, "train")
        y_pred_test = _load(fold_dir, "test")
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
    parser.add_argument("--kit-dir", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--json", required=True, help="where the scores go")
    args = parser.parse_args(argv)
    try:
        result = rescore(args.kit_dir, args.data_dir, args.output_dir)
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


if __name__ == "__main__":
    sys.exit(main())
