"""Tests for ramp_dispatcher.results and ramp_dispatcher.messages.

The "real" fixtures run ramp-workflow's own ``ramp-test --save-output`` on a
tiny iris kit (one good submission, one raising ValueError in fit, one with a
SyntaxError), so the parser and the log helpers are checked against what
ramp-test actually writes; hand-made folders cover the malformed cases.
No database is involved.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from ramp_dispatcher.messages import (
    MAX_ERROR_CHARS,
    bound,
    error_message,
    extract_traceback,
    strip_ansi,
)
from ramp_dispatcher.results import (
    ResultsError,
    TrainingResults,
    parse_training_output,
    read_fold_error,
)

SCORE_NAMES = ["acc", "error", "nll", "f1_70"]
N_FOLDS = 2

# ---------------------------------------------------------------------------
# A real iris kit, run through the real ramp-test (once per session).

PROBLEM_PY = """\
import os

import pandas as pd
import rampwf as rw

problem_title = 'Iris'
_target_column_name = 'species'
_prediction_label_names = ['setosa', 'versicolor', 'virginica']
Predictions = rw.prediction_types.make_multiclass(
    label_names=_prediction_label_names)
# rampwf 0.7.0: Classifier() wants classifier.py; Estimator() wants
# estimator.py with get_estimator().
workflow = rw.workflows.Estimator()
score_types = [
    rw.score_types.Accuracy(name='acc'),
    rw.score_types.ClassificationError(name='error'),
    rw.score_types.NegativeLogLikelihood(name='nll'),
    rw.score_types.F1Above(name='f1_70', threshold=0.7),
]


def get_cv(X, y):
    from sklearn.model_selection import StratifiedShuffleSplit
    cv = StratifiedShuffleSplit(n_splits=2, test_size=0.2, random_state=57)
    return cv.split(X, y)


def _read_data(path, f_name):
    data = pd.read_csv(os.path.join(path, 'data', f_name))
    y_array = data[_target_column_name].values
    X_array = data.drop([_target_column_name], axis=1)
    return X_array, y_array


def get_train_data(path='.'):
    return _read_data(path, 'train.csv')


def get_test_data(path='.'):
    return _read_data(path, 'test.csv')
"""

SUBMISSIONS = {
    "good": """\
from sklearn.linear_model import LogisticRegression


def get_estimator():
    return LogisticRegression(max_iter=500)
""",
    "boom": """\
from sklearn.base import BaseEstimator, ClassifierMixin


class Boom(ClassifierMixin, BaseEstimator):
    def fit(self, X, y):
        raise ValueError("boom")


def get_estimator():
    return Boom()
""",
    "syntax": "def get_estimator(:\n    return None\n",
}


@dataclass(frozen=True)
class RealRun:
    returncode: int
    log: str  # stdout and stderr together, as a worker's log file has them
    output_dir: Path


def _write_iris_kit(kit: Path) -> None:
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split

    (kit / "data").mkdir(parents=True)
    (kit / "problem.py").write_text(PROBLEM_PY)
    iris = load_iris(as_frame=True)
    frame = iris.frame.rename(columns={"target": "species"})
    frame["species"] = frame["species"].map(dict(enumerate(iris.target_names)))
    train, test = train_test_split(
        frame, test_size=0.3, random_state=0, stratify=frame["species"]
    )
    train.to_csv(kit / "data" / "train.csv", index=False)
    test.to_csv(kit / "data" / "test.csv", index=False)
    for name, code in SUBMISSIONS.items():
        (kit / "submissions" / name).mkdir(parents=True)
        (kit / "submissions" / name / "estimator.py").write_text(code)


@pytest.fixture(scope="session")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RealRun]:
    """Run ramp-test on the three submissions (in parallel, ~3 s)."""
    pytest.importorskip("rampwf")
    pytest.importorskip("sklearn")
    kit = tmp_path_factory.mktemp("iris_kit")
    _write_iris_kit(kit)
    ramp_test = Path(sys.executable).parent / "ramp-test"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = {}
    for name in SUBMISSIONS:
        cmd = [
            str(ramp_test), "--submission", name,
            "--ramp-kit-dir", str(kit), "--ramp-data-dir", str(kit),
            "--ramp-submission-dir", str(kit / "submissions"),
            "--save-output", "--ignore-warning",
        ]  # fmt: skip
        procs[name] = subprocess.Popen(
            cmd, cwd=kit, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    runs = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        runs[name] = RealRun(
            returncode=proc.returncode,
            log=out.decode("utf-8", errors="replace"),
            output_dir=kit / "submissions" / name / "training_output",
        )
    assert runs["good"].returncode == 0, runs["good"].log
    return runs


@pytest.fixture(scope="session")
def good(real_runs: dict[str, RealRun]) -> RealRun:
    return real_runs["good"]


@pytest.fixture(scope="session")
def good_results(good: RealRun) -> TrainingResults:
    return parse_training_output(good.output_dir, N_FOLDS, SCORE_NAMES)


def _read_table(path: Path) -> Any:
    """Independent reader for the expectations: pandas, as ramp-board uses."""
    import pandas as pd

    return pd.read_csv(path)


# ---------------------------------------------------------------------------
# Real ramp-test output


def test_real_layout_is_what_the_parser_expects(good: RealRun) -> None:
    out = good.output_dir
    assert (out / "bagged_scores.csv").is_file()
    for i in range(N_FOLDS):
        names = {p.name for p in (out / f"fold_{i}").iterdir()}
        assert {"scores.csv", "train_time", "valid_time", "test_time", "state.txt"} <= names
        assert "error.txt" not in names
        assert (out / f"fold_{i}" / "state.txt").read_text() == "scored"
    header = (out / "fold_0" / "scores.csv").read_text().splitlines()[0]
    assert header == "step,acc,error,nll,f1_70,time"
    assert (out / "bagged_scores.csv").read_text().splitlines()[0] == "step,n_bag,acc,error,nll,f1_70"


def test_real_fold_scores_equal_the_csv_numbers(good: RealRun, good_results: TrainingResults) -> None:
    assert [fold.index for fold in good_results.folds] == list(range(N_FOLDS))
    for fold in good_results.folds:
        table = _read_table(good.output_dir / f"fold_{fold.index}" / "scores.csv").set_index("step")
        assert set(fold.scores) == set(SCORE_NAMES)  # not 'time'
        for name in SCORE_NAMES:
            for step in ("train", "valid", "test"):
                value = fold.scores[name][step]
                assert type(value) is float
                assert value == table.loc[step, name]


def test_real_times_equal_the_files_and_stats_match_numpy(
    good: RealRun, good_results: TrainingResults
) -> None:
    times: dict[str, list[float]] = {"train": [], "valid": [], "test": []}
    for fold in good_results.folds:
        for step in times:
            raw = (good.output_dir / f"fold_{fold.index}" / f"{step}_time").read_text()
            assert getattr(fold, f"{step}_time") == float(raw)
            times[step].append(float(raw))
    stats = good_results.time_stats()
    assert set(stats) == {"train", "valid", "test"}
    for step, values in times.items():
        mean, std = stats[step]
        assert type(mean) is float and type(std) is float
        assert mean == pytest.approx(np.mean(values), rel=1e-12)
        assert std == pytest.approx(np.std(values), rel=1e-9, abs=1e-15)


def test_real_bagged_scores_are_the_largest_n_bag_row(
    good: RealRun, good_results: TrainingResults
) -> None:
    table = _read_table(good.output_dir / "bagged_scores.csv")
    bagged = good_results.bagged
    for name in SCORE_NAMES:
        assert set(bagged.last[name]) == {"valid", "test"}
        for step in ("valid", "test"):
            rows = table[table["step"] == step].sort_values("n_bag")
            assert list(rows["n_bag"]) == list(range(N_FOLDS))
            assert bagged.all_bags[name][step] == list(rows[name])
            assert bagged.last[name][step] == rows[name].iloc[-1]
            assert type(bagged.last[name][step]) is float
            assert all(type(v) is float for v in bagged.all_bags[name][step])


def test_real_good_run_has_no_fold_error(good: RealRun) -> None:
    assert read_fold_error(good.output_dir) is None


def test_real_wrong_fold_count_is_refused(good: RealRun) -> None:
    with pytest.raises(ResultsError, match=r"^fold_2: missing fold folder \(expected 3 folds\)$"):
        parse_training_output(good.output_dir, 3, SCORE_NAMES)
    with pytest.raises(ResultsError, match=r"fold_1: unexpected fold folder.*1 CV folds"):
        parse_training_output(good.output_dir, 1, SCORE_NAMES)


def test_real_unknown_score_name_is_refused(good: RealRun) -> None:
    with pytest.raises(ResultsError, match=r"^fold_0/scores\.csv: missing column 'auc'$"):
        parse_training_output(good.output_dir, N_FOLDS, ["acc", "auc"])


@pytest.mark.parametrize("name", ["boom", "syntax"])
def test_real_failing_submission_leaves_error_and_state(
    real_runs: dict[str, RealRun], name: str
) -> None:
    run = real_runs[name]
    assert run.returncode == 1
    fold_0 = run.output_dir / "fold_0"
    assert (fold_0 / "state.txt").read_text() == "training_error"
    assert not (run.output_dir / "fold_1").exists()  # ramp-test stops at once
    assert not (run.output_dir / "bagged_scores.csv").exists()
    error = read_fold_error(run.output_dir)
    assert error == (fold_0 / "error.txt").read_text()
    assert error.startswith("Traceback (most recent call last):")
    expected = "ValueError: boom" if name == "boom" else "SyntaxError: invalid syntax"
    assert error.rstrip("\n").splitlines()[-1] == expected
    with pytest.raises(ResultsError, match=r"^fold_1: missing fold folder"):
        parse_training_output(run.output_dir, N_FOLDS, SCORE_NAMES)
    with pytest.raises(ResultsError, match=r"^fold_0/train_time: is missing$"):
        parse_training_output(run.output_dir, 1, SCORE_NAMES)


# ---------------------------------------------------------------------------
# Hand-made folders

FOLD_ROWS = {
    # fold -> step -> (acc, error, nll, f1_70)
    0: {"train": (0.95, 0.05, 0.15, 1.0), "valid": (0.9, 0.1, 0.21, 1.0), "test": (1.0, 0.0, 0.16, 1.0)},
    1: {"train": (0.93, 0.07, 0.17, 1.0), "valid": (1.0, 0.0, 0.15, 1.0), "test": (0.97, 0.03, 0.15, 0.5)},
}  # fmt: skip
FOLD_TIMES = {0: (0.25, 0.002, 0.0015), 1: (0.5, 0.004, 0.0025)}
BAGGED_ROWS = [
    ("valid", 0, 0.9, 0.1, 0.21, 1.0),
    ("valid", 1, 0.95, 0.05, 0.18, 1.0),
    ("test", 0, 1.0, 0.0, 0.16, 1.0),
    ("test", 1, 0.98, 0.02, 0.155, 0.75),
]


def _scores_csv(fold: int) -> str:
    lines = ["step," + ",".join(SCORE_NAMES) + ",time"]
    for step, values in FOLD_ROWS[fold].items():
        lines.append(",".join([step, *map(repr, values), "0.01"]))
    return "\n".join(lines) + "\n"


def _bagged_csv(rows=BAGGED_ROWS) -> str:
    lines = ["step,n_bag," + ",".join(SCORE_NAMES)]
    lines += [",".join(map(str, row)) for row in rows]
    return "\n".join(lines) + "\n"


def make_output(root: Path) -> Path:
    """A well-formed 2-fold training_output, shaped like ramp-test's."""
    out = root / "training_output"
    for fold, times in FOLD_TIMES.items():
        d = out / f"fold_{fold}"
        d.mkdir(parents=True)
        for step, t in zip(("train", "valid", "test"), times):
            (d / f"{step}_time").write_text(repr(t))
        (d / "scores.csv").write_text(_scores_csv(fold))
        (d / "state.txt").write_text("scored")
    (out / "bagged_scores.csv").write_text(_bagged_csv())
    return out


def test_handmade_output_parses(tmp_path: Path) -> None:
    results = parse_training_output(make_output(tmp_path), 2, SCORE_NAMES)
    for fold in results.folds:
        assert (fold.train_time, fold.valid_time, fold.test_time) == FOLD_TIMES[fold.index]
        for step, values in FOLD_ROWS[fold.index].items():
            assert [fold.scores[n][step] for n in SCORE_NAMES] == list(values)
    assert results.bagged.last["f1_70"] == {"valid": 1.0, "test": 0.75}
    assert results.bagged.all_bags["nll"] == {"valid": [0.21, 0.18], "test": [0.16, 0.155]}


def test_only_requested_score_names_are_returned(tmp_path: Path) -> None:
    results = parse_training_output(make_output(tmp_path), 2, ["nll"])
    assert list(results.folds[0].scores) == ["nll"]
    assert list(results.bagged.last) == ["nll"]


def test_time_stats_match_numpy_population_std(tmp_path: Path) -> None:
    out = make_output(tmp_path)
    d = out / "fold_2"
    d.mkdir()
    for step, t in zip(("train", "valid", "test"), (2.0, 0.5, 0.125)):
        (d / f"{step}_time").write_text(f"{t}\n")
    (d / "scores.csv").write_text(_scores_csv(1))
    stats = parse_training_output(out, 3, SCORE_NAMES).time_stats()
    train = [0.25, 0.5, 2.0]
    assert stats["train"][0] == pytest.approx(np.mean(train))
    assert stats["train"][1] == pytest.approx(np.std(train))  # ddof=0
    assert stats["train"][1] != pytest.approx(np.std(train, ddof=1))
    assert stats["test"] == pytest.approx((np.mean([0.0015, 0.0025, 0.125]), np.std([0.0015, 0.0025, 0.125])))


def test_single_fold_std_is_zero(tmp_path: Path) -> None:
    out = make_output(tmp_path)
    for path in (out / "fold_1").iterdir():
        path.unlink()
    (out / "fold_1").rmdir()
    assert parse_training_output(out, 1, SCORE_NAMES).time_stats()["valid"] == (0.002, 0.0)


def test_tolerates_order_whitespace_bom_crlf_and_extra_columns(tmp_path: Path) -> None:
    out = make_output(tmp_path)
    (out / "fold_0" / "scores.csv").write_bytes(
        "\ufeff step , time ,f1_70, nll ,extra,error,acc\r\n"
        " test ,9, 1.0 ,0.16 ,x, 0.0 ,1.0\r\n"
        "valid,9,1.0,0.21,x,0.1,0.9\r\n"
        "holdout,9,0,0,x,0,0\r\n"
        "train,9,1.0,0.15,x,0.05,0.95\r\n"
        "\r\n\r\n".encode("utf-8")
    )
    (out / "fold_0" / "train_time").write_bytes(b"\xef\xbb\xbf  0.25 \r\n")
    (out / "bagged_scores.csv").write_text(
        "\ufeffstep,n_bag,acc,error,nll,f1_70,extra\n"
        "test, 1 ,0.98,0.02,0.155,0.75,x\n"
        "valid,1,0.95,0.05,0.18,1.0,x\n"
        "test,0,1.0,0.0,0.16,1.0,x\n"
        "valid,0,0.9,0.1,0.21,1.0,x\n\n"
    )
    results = parse_training_output(out, 2, SCORE_NAMES)
    fold = results.folds[0]
    assert fold.train_time == 0.25
    for step, values in FOLD_ROWS[0].items():
        assert [fold.scores[n][step] for n in SCORE_NAMES] == list(values)
    # Largest n_bag wins even when it comes first in the file.
    assert results.bagged.last["acc"] == {"valid": 0.95, "test": 0.98}
    assert results.bagged.all_bags["acc"] == {"valid": [0.9, 0.95], "test": [1.0, 0.98]}


def test_nan_and_infinite_scores_are_kept(tmp_path: Path) -> None:
    out = make_output(tmp_path)
    # pandas' to_csv writes NaN as an empty cell; 'nan' and 'inf' also occur.
    (out / "fold_1" / "scores.csv").write_text(
        "step,acc,error,nll,f1_70\ntrain,,nan,inf,1.0\nvalid,NaN,0,-inf,1\ntest,1,0,0.1,1\n"
    )
    (out / "bagged_scores.csv").write_text(
        _bagged_csv([("valid", 0, "", 0.1, 0.2, 1.0), ("test", 0, 1.0, 0.0, "nan", 1.0)])
    )
    results = parse_training_output(out, 2, SCORE_NAMES)
    scores = results.folds[1].scores
    assert math.isnan(scores["acc"]["train"]) and math.isnan(scores["error"]["train"])
    assert math.isnan(scores["acc"]["valid"])
    assert scores["nll"]["train"] == math.inf and scores["nll"]["valid"] == -math.inf
    assert type(scores["acc"]["train"]) is float
    assert math.isnan(results.bagged.last["acc"]["valid"])
    assert math.isnan(results.bagged.all_bags["nll"]["test"][0])


def test_step_absent_from_bagged_scores_is_left_out(tmp_path: Path) -> None:
    out = make_output(tmp_path)
    (out / "bagged_scores.csv").write_text(_bagged_csv(BAGGED_ROWS[:2]))
    bagged = parse_training_output(out, 2, SCORE_NAMES).bagged
    for name in SCORE_NAMES:
        assert list(bagged.last[name]) == ["valid"]
        assert list(bagged.all_bags[name]) == ["valid"]
    assert bagged.last["acc"]["valid"] == 0.95


def _rm(rel: str) -> Callable[[Path], None]:
    def mutate(out: Path) -> None:
        path = out / rel
        if path.is_dir():
            for child in path.iterdir():
                child.unlink()
            path.rmdir()
        else:
            path.unlink()

    return mutate


def _write(rel: str, text: str) -> Callable[[Path], None]:
    def mutate(out: Path) -> None:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)

    return mutate


def _extra_fold(out: Path) -> None:
    d = out / "fold_2"
    d.mkdir()
    (d / "error.txt").write_text("leftover")


def _fold_is_a_file(out: Path) -> None:
    _rm("fold_1")(out)
    (out / "fold_1").write_text("not a folder")


HEADER = "step,acc,error,nll,f1_70,time\n"
GOOD_ROWS = "train,1,0,0.1,1,0\nvalid,1,0,0.1,1,0\ntest,1,0,0.1,1,0\n"
BAGGED_HEADER = "step,n_bag,acc,error,nll,f1_70\n"

MALFORMED = {
    "missing fold folder": (_rm("fold_1"), "fold_1", "missing fold folder"),
    "fold path is a file": (_fold_is_a_file, "fold_1", "missing fold folder"),
    "extra fold folder": (_extra_fold, "fold_2", "the event has 2 CV folds"),
    "missing train_time": (_rm("fold_0/train_time"), "fold_0/train_time", "is missing"),
    "missing test_time": (_rm("fold_1/test_time"), "fold_1/test_time", "is missing"),
    "time not a number": (_write("fold_1/valid_time", "fast\n"), "fold_1/valid_time", "not a number: 'fast'"),
    "time empty": (_write("fold_0/test_time", " \n"), "fold_0/test_time", "empty file"),
    "time nan": (_write("fold_0/train_time", "nan"), "fold_0/train_time", "not a finite number"),
    "time two numbers": (_write("fold_0/train_time", "1.0 2.0"), "fold_0/train_time", "not a number"),
    "missing scores.csv": (_rm("fold_1/scores.csv"), "fold_1/scores.csv", "is missing"),
    "scores.csv is a folder": (lambda out: (_rm("fold_1/scores.csv")(out), (out / "fold_1/scores.csv").mkdir()),
                               "fold_1/scores.csv", "is not a file"),
    "empty scores.csv": (_write("fold_0/scores.csv", ""), "fold_0/scores.csv", "empty file"),
    "blank scores.csv": (_write("fold_0/scores.csv", "\n\n"), "fold_0/scores.csv", "empty file"),
    "header-only scores.csv": (_write("fold_1/scores.csv", HEADER), "fold_1/scores.csv", "header only"),
    "missing step row": (_write("fold_1/scores.csv", HEADER + "train,1,0,0.1,1,0\nvalid,1,0,0.1,1,0\n"),
                         "fold_1/scores.csv", "missing row for step 'test'"),
    "missing score column": (_write("fold_1/scores.csv", "step,error,nll,f1_70\ntrain,0,0,1\nvalid,0,0,1\ntest,0,0,1\n"),
                             "fold_1/scores.csv", "missing column 'acc'"),
    "missing step column": (_write("fold_0/scores.csv", "acc,error,nll,f1_70\n1,0,0,1\n"),
                            "fold_0/scores.csv", "missing column 'step'"),
    "non-numeric score": (_write("fold_0/scores.csv", HEADER + "train,1,0,0.1,1,0\nvalid,1,0,oops,1,0\ntest,1,0,0.1,1,0\n"),
                          "fold_0/scores.csv", "line 3, column 'nll': not a number: 'oops'"),
    "duplicate step row": (_write("fold_0/scores.csv", HEADER + GOOD_ROWS + "valid,1,0,0.1,1,0\n"),
                           "fold_0/scores.csv", "duplicate row for step 'valid'"),
    "duplicate column": (_write("fold_0/scores.csv", "step,acc,acc,error,nll,f1_70\ntrain,1,1,0,0,1\n"),
                         "fold_0/scores.csv", "duplicate column 'acc'"),
    "ragged row": (_write("fold_0/scores.csv", HEADER + "train,1,0,0.1,1\nvalid,1,0,0.1,1,0\ntest,1,0,0.1,1,0\n"),
                   "fold_0/scores.csv", "line 2 has 5 fields, header has 6"),
    "not utf-8": (lambda out: (out / "fold_0/scores.csv").write_bytes(b"step,acc\xff\n"),
                  "fold_0/scores.csv", "not UTF-8"),
    "missing bagged_scores.csv": (_rm("bagged_scores.csv"), "bagged_scores.csv", "is missing"),
    "empty bagged_scores.csv": (_write("bagged_scores.csv", ""), "bagged_scores.csv", "empty file"),
    "header-only bagged_scores.csv": (_write("bagged_scores.csv", BAGGED_HEADER), "bagged_scores.csv", "header only"),
    "bagged missing column": (_write("bagged_scores.csv", "step,n_bag,acc,error,f1_70\nvalid,0,1,0,1\n"),
                              "bagged_scores.csv", "missing column 'nll'"),
    "bagged missing n_bag": (_write("bagged_scores.csv", "step,acc,error,nll,f1_70\nvalid,1,0,0,1\n"),
                             "bagged_scores.csv", "missing column 'n_bag'"),
    "bagged bad n_bag": (_write("bagged_scores.csv", BAGGED_HEADER + "valid,last,1,0,0.1,1\n"),
                         "bagged_scores.csv", "line 2, column 'n_bag'"),
    "bagged non-numeric score": (_write("bagged_scores.csv", BAGGED_HEADER + "valid,0,1,0,0.1,1\ntest,0,1,0,-,1\n"),
                                 "bagged_scores.csv", "line 3, column 'nll': not a number: '-'"),
    "bagged duplicate bag": (_write("bagged_scores.csv", BAGGED_HEADER + "valid,0,1,0,0.1,1\nvalid,0,1,0,0.1,1\n"),
                             "bagged_scores.csv", "duplicate row for step 'valid', n_bag 0"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_output_raises_results_error_naming_the_file(tmp_path: Path, case: str) -> None:
    mutate, file_name, problem = MALFORMED[case]
    out = make_output(tmp_path)
    mutate(out)
    with pytest.raises(ResultsError) as info:
        parse_training_output(out, 2, SCORE_NAMES)
    message = str(info.value)
    assert message.startswith(file_name + ":"), message
    assert problem in message
    assert str(tmp_path) not in message  # relative to the output folder


def test_missing_output_folder(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="training output folder is missing"):
        parse_training_output(tmp_path / "nope", 2, SCORE_NAMES)


def test_read_fold_error_takes_the_lowest_fold_numerically(tmp_path: Path) -> None:
    out = make_output(tmp_path)
    assert read_fold_error(out) is None
    for i in (2, 10):
        (out / f"fold_{i}").mkdir()
        (out / f"fold_{i}" / "error.txt").write_text(f"Traceback\nValueError: fold {i}\n")
    (out / "fold_x").mkdir()
    (out / "fold_x" / "error.txt").write_text("not a fold")
    assert read_fold_error(out) == "Traceback\nValueError: fold 2\n"
    (out / "fold_1" / "error.txt").write_bytes(b"\xef\xbb\xbfbad byte \xff\n")
    assert read_fold_error(out) == "bad byte \ufffd\n"


def test_read_fold_error_reads_only_the_end_of_a_huge_error(tmp_path: Path) -> None:
    """A participant's exception message can be any size: the daemon reads the
    end of error.txt (where the exception line is), never the whole file."""
    out = make_output(tmp_path)
    (out / "fold_0" / "error.txt").write_text(
        "Traceback\nValueError: " + "x" * (20 * 1024 * 1024) + "\nValueError: the last line\n"
    )
    error = read_fold_error(out)
    assert error is not None and error.endswith("ValueError: the last line\n")
    assert len(error) <= 256 * 1024


def test_read_fold_error_without_folder(tmp_path: Path) -> None:
    assert read_fold_error(tmp_path / "missing") is None


# ---------------------------------------------------------------------------
# messages


def test_strip_ansi_on_a_real_coloured_log(good: RealRun) -> None:
    assert "\x1b[" in good.log  # ramp-test colours even when piped
    clean = strip_ansi(good.log)
    assert "\x1b" not in clean
    assert "Bagged scores" in clean
    assert re.search(r"^\tvalid +0\.95 +0\.05", clean, re.M)
    # rampwf puts no-break spaces around its ± signs.
    assert "0.94\xa0±\xa00.012" in clean


def test_strip_ansi_synthetic_sequences() -> None:
    text = (
        "\x1b[31mred\x1b[0m \x1b[1;32mbold green\x1b[m \x1b[38;5;178mx\x1b[39;49m"
        "\x1b]0;window title\x07 \x1b]8;;https://x.org\x1b\\link\x1b]8;;\x1b\\"
        " \x1b[2K\x1b[1Aup\x1b(B\x1b7\x1b8\x07\x08\r\n"
        "10%\r50%\r100%\n"
        "\x1b]unterminated\nnext line\n"
    )
    assert strip_ansi(text) == "red bold green x link up\n100%\n\nnext line\n"


def test_strip_ansi_keeps_plain_text() -> None:
    plain = "Traceback (most recent call last):\n\tx = [1]\nValueError: é ± ✓\n"
    assert strip_ansi(plain) == plain


@pytest.mark.parametrize(
    ("name", "last_line", "inside"),
    [
        ("boom", "ValueError: boom", 'raise ValueError("boom")'),
        ("syntax", "SyntaxError: invalid syntax", "def get_estimator(:"),
    ],
)
def test_extract_traceback_from_real_log(
    real_runs: dict[str, RealRun], name: str, last_line: str, inside: str
) -> None:
    run = real_runs[name]
    tb = extract_traceback(run.log)
    lines = tb.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == last_line
    assert inside in tb
    assert "CV fold 0" not in tb and "\x1b" not in tb
    assert "" not in lines  # rampwf's double spacing is gone
    # It is the very text ramp-test saved in error.txt.
    assert tb == (run.output_dir / "fold_0" / "error.txt").read_text().rstrip("\n")


COLOURED_LOG = """\
\x1b[38;5;178m\x1b[1mTesting Iris\x1b[0m
\x1b[38;5;178m\x1b[1mCV fold 0\x1b[0m
Traceback (most recent call last):
  File "a.py", line 1, in <module>
    first()
KeyError: 'first'

During handling of the above exception, another exception occurred:

\x1b[31mTraceback (most recent call last):\x1b[0m
  File "estimator.py", line 4, in fit\r
    raise ValueError("bad shape\\nsecond line")
\x1b[1;31mValueError\x1b[0m: bad shape
second line

\x1b[38;5;178mcleaning up\x1b[0m
"""


def test_extract_traceback_takes_the_last_one_from_a_coloured_log() -> None:
    tb = extract_traceback(COLOURED_LOG)
    assert tb == (
        "Traceback (most recent call last):\n"
        '  File "estimator.py", line 4, in fit\n'
        '    raise ValueError("bad shape\\nsecond line")\n'
        "ValueError: bad shape\n"
        "second line"
    )


def test_extract_traceback_without_traceback_gives_the_tail() -> None:
    log = "\n".join(f"\x1b[1mstep {i}\x1b[0m\n" for i in range(50)) + "\nKilled\n\n"
    tail = extract_traceback(log).splitlines()
    assert len(tail) == 20
    assert tail[-1] == "Killed" and tail[0] == "step 31"


def test_extract_traceback_stderr_style_runs_to_the_end() -> None:
    log = "loading\nTraceback (most recent call last):\n  File \"p.py\", line 3\nMemoryError\n"
    assert extract_traceback(log) == "Traceback (most recent call last):\n  File \"p.py\", line 3\nMemoryError"


def test_bound_short_text_is_unchanged() -> None:
    assert bound("abc", 3) == "abc"
    assert bound("", 10) == ""


def test_bound_keeps_head_and_end_with_marker() -> None:
    text = "\n".join(f"  File \"f{i}.py\", line {i}, in g" for i in range(2000)) + "\nValueError: boom"
    out = bound(text, 1000)
    assert len(out) <= 1000
    assert out.startswith('  File "f0.py", line 0, in g\n')
    assert out.endswith("\nValueError: boom")
    match = re.search(r"^\.\.\. \[(\d+) characters cut\] \.\.\.$", out, re.M)
    assert match
    marker = "\n" + match.group(0) + "\n"
    assert len(out) - len(marker) + int(match.group(1)) == len(text)
    head, tail = out.split(marker)
    assert text.startswith(head) and text.endswith(tail)
    assert len(tail) > len(head)  # the end matters most


@pytest.mark.parametrize("limit", [1, 5, 30, 41, 60, 200, 999, MAX_ERROR_CHARS])
def test_bound_never_exceeds_limit_and_keeps_the_last_char(limit: int) -> None:
    text = "x" * 30_000 + "END"
    out = bound(text, limit)
    assert len(out) <= limit
    assert out.endswith("END"[-limit:])


def test_bound_default_limit() -> None:
    out = bound("a" * (MAX_ERROR_CHARS * 3) + "\nlast line")
    assert len(out) <= MAX_ERROR_CHARS and out.endswith("\nlast line")


def test_error_message_layout() -> None:
    assert error_message("Training failed.", None) == "Training failed."
    assert error_message("Training failed.", "  \n") == "Training failed."
    msg = error_message("Training failed.", "\x1b[31mValueError: boom\x1b[0m\n")
    assert msg == "Training failed.\n\nValueError: boom"


def test_error_message_from_real_log_is_bounded_and_clean(real_runs: dict[str, RealRun]) -> None:
    log = real_runs["boom"].log
    noisy = "\x1b[33mwarning: noise\x1b[0m\n" * 5000 + log
    msg = error_message("The submission raised an error while training.", noisy)
    assert len(msg) <= MAX_ERROR_CHARS
    assert msg.startswith("The submission raised an error while training.\n\n")
    assert "\x1b" not in msg
    assert msg.rstrip().endswith("ValueError: boom")
    short = error_message("Training failed.", extract_traceback(log))
    assert short.endswith("ValueError: boom") and "characters cut" not in short


def test_error_message_with_huge_reason_still_fits() -> None:
    msg = error_message("r" * (MAX_ERROR_CHARS + 50), "detail")
    assert len(msg) <= MAX_ERROR_CHARS
