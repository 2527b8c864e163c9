"""``ramp-dispatcher demo``: a whole deployment on SQLite, run to completion.

It writes an iris ramp kit (data from scikit-learn's bundled copy, no
download), a server and an event config in ramp-board's formats, creates the
database with our migrations and admin commands, adds a few submissions (good,
failing, slow), runs the daemon with the conda worker on this Python
environment until the queue is empty, and prints what the database says.
"""

from __future__ import annotations

import csv
import logging
import sys
import textwrap
import time
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

EVENT = "iris_demo"
PROBLEM = "iris"
TEAM = "demo_team"
MARKER = ".ramp-dispatcher-demo"

PROBLEM_PY = '''\
"""Iris: predict the species of a flower from four measurements."""
import os

import pandas as pd
import rampwf as rw
from sklearn.model_selection import StratifiedShuffleSplit

problem_title = "Iris classification"
_target_column_name = "species"
_prediction_label_names = ["setosa", "versicolor", "virginica"]
Predictions = rw.prediction_types.make_multiclass(label_names=_prediction_label_names)
workflow = rw.workflows.Estimator()
score_types = [
    rw.score_types.Accuracy(name="acc", precision=3),
    rw.score_types.NegativeLogLikelihood(name="nll", precision=3),
]


def get_cv(X, y):
    cv = StratifiedShuffleSplit(n_splits={n_folds}, test_size=0.3, random_state=57)
    return cv.split(X, y)


def _read_data(path, f_name):
    data = pd.read_csv(os.path.join(path, "data", f_name))
    y_array = data[_target_column_name].values
    X_array = data.drop([_target_column_name], axis=1)
    return X_array, y_array


def get_train_data(path="."):
    return _read_data(path, "train.csv")


def get_test_data(path="."):
    return _read_data(path, "test.csv")
'''

SUBMISSIONS: dict[str, str] = {
    # the sandbox every team starts from
    "starting_kit": """\
        from sklearn.linear_model import LogisticRegression


        def get_estimator():
            return LogisticRegression(max_iter=500)
        """,
    "random_forest": """\
        from sklearn.ensemble import RandomForestClassifier


        def get_estimator():
            return RandomForestClassifier(n_estimators=20, max_depth=3, random_state=0)
        """,
    "raises_in_fit": """\
        from sklearn.base import BaseEstimator, ClassifierMixin


        class Broken(ClassifierMixin, BaseEstimator):
            def fit(self, X, y):
                raise ValueError("this model refuses to learn")


        def get_estimator():
            return Broken()
        """,
    "syntax_error": """\
        def get_estimator(:
            return None
        """,
    "slow_knn": """\
        import time

        from sklearn.neighbors import KNeighborsClassifier


        class SlowKNN(KNeighborsClassifier):
            def fit(self, X, y):
                time.sleep(2)
                return super().fit(X, y)


        def get_estimator():
            return SlowKNN(n_neighbors=5)
        """,
}


def slow_estimator(seconds: float) -> str:
    """A correct estimator.py whose fit sleeps ``seconds`` (ramp-test fits once per fold)."""
    return f"""\
import time

from sklearn.linear_model import LogisticRegression


class Slow(LogisticRegression):
    def fit(self, X, y):
        time.sleep({seconds})
        return super().fit(X, y)


def get_estimator():
    return Slow(max_iter=500)
"""


def write_iris_kit(kit_dir: Path, data_dir: Path, n_folds: int = 3) -> None:
    """An iris ramp kit: problem.py, the starting kit, data/{train,test}.csv."""
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split

    kit_dir.mkdir(parents=True, exist_ok=True)
    (kit_dir / "problem.py").write_text(PROBLEM_PY.replace("{n_folds}", str(n_folds)))
    write_submission(kit_dir / "submissions" / "starting_kit", SUBMISSIONS["starting_kit"])
    iris = load_iris()
    labels = [iris.target_names[t] for t in iris.target]
    X_train, X_test, y_train, y_test = train_test_split(
        iris.data, labels, test_size=0.2, random_state=42, stratify=labels
    )
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    header = ["sepal length", "sepal width", "petal length", "petal width", "species"]
    for name, X, y in (("train.csv", X_train, y_train), ("test.csv", X_test, y_test)):
        with open(data_dir / "data" / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows([*map(float, row), label] for row, label in zip(X, y))


def write_submission(folder: Path, estimator_source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "estimator.py").write_text(textwrap.dedent(estimator_source))
    return folder


def build_deployment(
    root: Path,
    n_workers: int = 2,
    timeout: float = 120.0,
    sqlalchemy_section: str = "drivername: sqlite\n  database: ramp.sqlite",
    submissions: dict[str, str] | None = None,
    dispatcher_extra: str = "",
) -> tuple[Path, Path]:
    """Write kit, configs and database under ``root``; return (server, event) configs.

    Tests reuse it with another database section, other submissions
    (name -> estimator.py source) and extra ``dispatcher`` keys.
    """
    from .config import load_event_config, load_server_config
    from .database import admin, migrate
    from .database.engine import make_engine

    write_iris_kit(root / "ramp-kits" / PROBLEM, root / "ramp-data" / PROBLEM)
    server_path = root / "config.yml"
    server_path.write_text(f"sqlalchemy:\n  {sqlalchemy_section}\n")
    event_path = root / "events" / EVENT / "config.yml"
    event_path.parent.mkdir(parents=True, exist_ok=True)
    event_path.write_text(
        textwrap.dedent(
            f"""\
            ramp:
              problem_name: {PROBLEM}
              event_name: {EVENT}
              event_title: Iris demo
              event_is_public: true
            worker:
              worker_type: conda
              # a prefix path works where conda is not installed: this Python's own
              conda_env: {sys.prefix}
              timeout: {timeout}
            dispatcher:
              n_workers: {n_workers}
              n_threads: 1
              hunger_policy: exit
              poll_interval: 1
              time_between_collection: 1
            """
        )
        + "".join(f"  {line}\n" for line in dispatcher_extra.splitlines())
    )
    server = load_server_config(server_path)
    event = load_event_config(event_path, server)
    engine = make_engine(server.database_url)
    migrate.upgrade(engine)
    sources = root / "incoming"
    with engine.begin() as conn:
        admin.deploy_event(conn, event.ramp)
        admin.add_user(conn, name=TEAM, password="demo", email="demo@localhost", access_level="admin")
        admin.sign_up_team(conn, EVENT, TEAM)
        chosen = SUBMISSIONS if submissions is None else submissions
        for name, source in chosen.items():
            if name == "starting_kit":
                continue
            folder = write_submission(sources / name, source)
            admin.add_submission(conn, EVENT, TEAM, name, folder)
    engine.dispose()
    return server_path, event_path


def run_demo(root: Path, n_workers: int = 2) -> int:
    from .config import load_event_config, load_server_config
    from .database import queries
    from .database.engine import make_engine
    from .dispatcher import Dispatcher

    root = root.absolute()
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise UserError(f"{root} exists and is not a demo deployment: choose an empty folder")
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text("built by `ramp-dispatcher demo`; safe to delete\n")
    print(f"Building the demo deployment in {root} ...", flush=True)
    server_path, event_path = build_deployment(root, n_workers=n_workers)
    server = load_server_config(server_path)
    event = load_event_config(event_path, server)
    engine = make_engine(server.database_url)
    dispatcher = Dispatcher.for_event(engine, event)
    print(f"Running the dispatcher ({n_workers} workers) until the queue is empty ...", flush=True)
    started = time.monotonic()
    dispatcher.start()
    try:
        dispatcher.stopped.wait()
    finally:
        dispatcher.stop()
    elapsed = time.monotonic() - started
    with engine.connect() as conn:
        info = queries.load_event(conn, EVENT)
        rows = queries.submission_summaries(conn, info)
    engine.dispose()
    print(f"\nDone in {elapsed:.1f} s. What the database says:\n")
    print(format_table(rows, info.score_names))
    print(
        f"\nDeployment: {root}\n"
        f"  server config: {server_path}\n  event config:  {event_path}\n"
        f"  logs:          {event.ramp.logs_dir}\n  predictions:   {event.ramp.predictions_dir}\n"
        f"Run it again as a service: ramp-dispatcher run --config {server_path} "
        f"--event-config {event_path}"
    )
    return 0


def format_table(rows: list, score_names: list[str]) -> str:
    head = ["submission", "state"] + [f"{n} (valid/test)" for n in score_names]
    head += ["train s", "valid s", "max RAM MB", "error"]
    lines = []
    for r in rows:
        scores = [
            "-" if r.state != "scored" else "/".join(_num(v) for v in r.scores.get(n, (None, None)))
            for n in score_names
        ]
        first_error = next((ln for ln in r.error_msg.splitlines() if ln.strip()), "")
        lines.append(
            [r.name, r.state, *scores, _num(r.train_time), _num(r.valid_time),
             _num(r.max_ram, 0), first_error[:70]]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
