"""Build a tiny, real RAMP kit (iris, ramp-workflow 0.7.0) for tests.

Layout written by :func:`make_iris_kit` (the kit folder is also the data
folder, so pass it as both ``--ramp-kit-dir`` and ``--ramp-data-dir``)::

    <kit>/problem.py
    <kit>/data/train.csv, <kit>/data/test.csv   (label column ``species``)
    <kit>/submissions/starting_kit/classifier.py

The workflow is ``rw.workflows.Classifier()``, whose single element in
ramp-workflow 0.7.0 is ``classifier``: a submission is one file
``classifier.py`` defining ``class Classifier`` with ``fit`` and
``predict_proba``. Estimator sources below are complete ``classifier.py``
files; pass them to :func:`add_submission_files`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

#: the workflow element, i.e. the file name (without .py) of a submission
ELEMENT = "classifier"
LABEL_NAMES = ("setosa", "versicolor", "virginica")
#: score names as declared in problem.py, in order
SCORE_NAMES = ("acc", "nll")

_PROBLEM_PY = '''\
import os

import pandas as pd
import rampwf as rw
from sklearn.model_selection import StratifiedShuffleSplit

problem_title = "Iris classification (test kit)"
_target_column_name = "species"
_prediction_label_names = {labels!r}

Predictions = rw.prediction_types.make_multiclass(
    label_names=_prediction_label_names)
workflow = rw.workflows.Classifier()
score_types = [
    rw.score_types.Accuracy(name="acc"),
    rw.score_types.NegativeLogLikelihood(name="nll"),
]


def get_cv(X, y):
    cv = StratifiedShuffleSplit(n_splits={n_folds}, test_size=0.3,
                                random_state=57)
    return cv.split(X, y)


def _read_data(path, f_name):
    data = pd.read_csv(os.path.join(path, "data", f_name))
    y_array = data[_target_column_name].values
    X_array = data.drop([_target_column_name], axis=1).values
    return X_array, y_array


def get_train_data(path="."):
    return _read_data(path, "train.csv")


def get_test_data(path="."):
    return _read_data(path, "test.csv")
'''

#: a working submission (logistic regression)
GOOD = '''\
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression


class Classifier(BaseEstimator):
    def __init__(self):
        self.clf = LogisticRegression(max_iter=500)

    def fit(self, X, y):
        self.clf.fit(X, y)
        return self

    def predict_proba(self, X):
        return self.clf.predict_proba(X)
'''

#: fails in fit with ``ValueError: deliberate failure in fit``
RAISES = '''\
from sklearn.base import BaseEstimator


class Classifier(BaseEstimator):
    def fit(self, X, y):
        raise ValueError("deliberate failure in fit")

    def predict_proba(self, X):
        raise AssertionError("not reached")
'''

#: not valid Python: the import of the submission fails
SYNTAX_ERROR = '''\
from sklearn.base import BaseEstimator


class Classifier(BaseEstimator)
    def fit(self, X, y):
        return self
'''

#: sleeps in fit for ``$KIT_SLOW_SECONDS`` seconds (default 60), then works
SLOW = '''\
import os
import time

from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression


class Classifier(BaseEstimator):
    def fit(self, X, y):
        time.sleep(float(os.environ.get("KIT_SLOW_SECONDS", "60")))
        self.clf = LogisticRegression(max_iter=500).fit(X, y)
        return self

    def predict_proba(self, X):
        return self.clf.predict_proba(X)
'''

#: grows its memory in fit, 50 MB at a time (pages touched), up to
#: ``$KIT_HOG_MB`` MB (default 2000), then sleeps 60 s
MEMORY_HOG = '''\
import os
import time

import numpy as np
from sklearn.base import BaseEstimator


class Classifier(BaseEstimator):
    def fit(self, X, y):
        blocks = []
        for _ in range(int(os.environ.get("KIT_HOG_MB", "2000")) // 50):
            blocks.append(np.ones(50 * 2**20 // 8))  # ones() touches pages
            time.sleep(0.05)
        time.sleep(60)
        return self

    def predict_proba(self, X):
        raise AssertionError("not reached")
'''


def slow_source(seconds: float, grandchild_pid_file: Path | None = None) -> str:
    """A submission whose ``fit`` sleeps ``seconds``.

    With ``grandchild_pid_file``, ``fit`` first starts ``sleep 300`` in a new
    session (so it escapes the run's process group, as a daemonising helper
    would) and writes that process's pid to the file.

    ramp-workflow's sanitizer rejects sources containing words such as
    ``subprocess``, ``Popen`` or `` open``; it is a keyword check, so the
    module and function names are assembled at run time here.
    """
    spawn = ""
    if grandchild_pid_file is not None:
        spawn = textwrap.dedent(f"""\
            sp = importlib.import_module("sub" + "process")
            child = getattr(sp, "Po" + "pen")(["sleep", "300"], start_new_session=True)
            pathlib.Path({str(grandchild_pid_file)!r}).write_text(str(child.pid))
            """)
    return (
        "import importlib\n"
        "import pathlib\n"
        "import time\n\n"
        "from sklearn.base import BaseEstimator\n\n\n"
        "class Classifier(BaseEstimator):\n"
        "    def fit(self, X, y):\n"
        + textwrap.indent(spawn, " " * 8)
        + f"        time.sleep({float(seconds)!r})\n"
        "        return self\n\n"
        "    def predict_proba(self, X):\n"
        "        raise AssertionError('not reached')\n"
    )


def env_probe_source(var: str, out_file: Path) -> str:
    """A working submission that writes ``os.environ.get(var)`` to ``out_file``
    when imported (``None`` is written as the text ``None``)."""
    return (
        "import os\n"
        "import pathlib\n"
        f"pathlib.Path({str(out_file)!r}).write_text(str(os.environ.get({var!r})))\n\n"
        + GOOD
    )


def make_iris_kit(dest: Path, n_folds: int = 2) -> Path:
    """Write a complete iris kit into ``dest`` (created if needed); return it.

    ``dest`` serves as kit folder and data folder. The data is the 150 iris
    rows shuffled with a fixed seed: 100 in ``train.csv``, 50 in
    ``test.csv``. ``submissions/starting_kit`` holds :data:`GOOD`.
    """
    import numpy as np
    import pandas as pd
    from sklearn.datasets import load_iris

    dest = Path(dest)
    (dest / "data").mkdir(parents=True, exist_ok=True)
    iris = load_iris()
    columns = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    df = pd.DataFrame(iris.data, columns=columns)
    df["species"] = np.asarray(LABEL_NAMES)[iris.target]
    df = df.sample(frac=1.0, random_state=42).reset_index(drop=True)
    df.iloc[:100].to_csv(dest / "data" / "train.csv", index=False)
    df.iloc[100:].to_csv(dest / "data" / "test.csv", index=False)
    (dest / "problem.py").write_text(
        _PROBLEM_PY.format(labels=list(LABEL_NAMES), n_folds=int(n_folds))
    )
    add_submission_files(dest, "starting_kit", GOOD)
    return dest


def add_submission_files(
    kit: Path,
    name: str,
    estimator_source: str,
    submissions_dir: Path | None = None,
) -> Path:
    """Write ``<submissions_dir>/<name>/classifier.py``; return that folder.

    ``submissions_dir`` defaults to ``<kit>/submissions``. An existing file is
    overwritten.
    """
    base = Path(submissions_dir) if submissions_dir is not None else Path(kit) / "submissions"
    folder = base / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{ELEMENT}.py").write_text(estimator_source)
    return folder
