"""Build a real ramp-board 0.10.1 database with ramp-database's own tools.

No network: ramp-database's ``testing.create_toy_db`` clones kits from GitHub,
so this uses the lower-level tools it is made of (``add_user``,
``add_problem``, ``add_event``, ``sign_up_team``, ``add_submission``) on the
iris kit of :mod:`tests.kit`, written under ``tmp_path``. What comes out is
exactly what a ramp-board deployment holds after two participants signed up
and submitted: the schema from ``Model.metadata.create_all``, file types,
users and their teams, a problem and its workflow, an event with its cv folds
(numpy blobs) and score types, and submissions with their per-fold and score
rows (blobs too), all in state ``new``.

Use :func:`build_rampboard_db` for any test that needs "a database ramp-board
made", e.g. adoption by ``db upgrade`` or the dispatcher running on it.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

from sqlalchemy import create_engine
from sqlalchemy.exc import SAWarning
from sqlalchemy.orm import Session

from ramp_dispatcher.database.engine import normalise_url

import kit  # tests/ is on sys.path (pytest rootdir conftest), as for deployment.py

PROBLEM = "iris"
#: ramp-database requires event names to start with "<problem>_"
EVENT = "iris_test"
SANDBOX = "starting_kit"
ADMIN = "iris_admin"
#: participants, each an individual team of the same name
USERS = ("alice", "bob")
#: extra (non-sandbox) submissions: (team, submission name, classifier.py source)
SUBMISSIONS = (
    ("alice", "logreg", kit.GOOD),
    ("bob", "broken", kit.RAISES),
)


@contextmanager
def _quick_and_quiet() -> Iterator[None]:
    """Cheap bcrypt rounds, and silence for ramp-database's known SQLAlchemy 2 warnings.

    ramp-database hashes each password with bcrypt's default 12 rounds (half a
    second each); 4 rounds still give a valid bcrypt hash. Its models also
    trigger "not in session" autoflush warnings under SQLAlchemy 2, harmless.
    """
    import bcrypt

    real_gensalt = bcrypt.gensalt
    with warnings.catch_warnings(), mock.patch.object(
        bcrypt, "gensalt", lambda *a, **kw: real_gensalt(rounds=4)
    ):
        warnings.filterwarnings("ignore", r"Object of type .* not in session", SAWarning)
        yield


def build_rampboard_db(url: str, tmp_path: Path) -> dict[str, Any]:
    """Create ramp-board's schema in the (empty) database at ``url`` and fill it.

    Everything goes through ramp-database 0.10.1 (a plain SQLAlchemy Session,
    the way its ``session_scope`` does it; a ``postgresql`` URL means psycopg2).
    Files are written under ``tmp_path``: the kit (also the data folder) in
    ``ramp-kits/iris`` and the event's submission folders in
    ``events/iris_test/submissions/submission_%09d``.

    Content: users ``iris_admin`` (admin), ``alice`` and ``bob``; problem
    ``iris`` (workflow ``Classifier``, 2 cv folds, scores ``acc`` and ``nll``,
    keyword ``botany``); event ``iris_test`` (admin ``iris_admin``) with both
    users' teams signed up (each gets the ``starting_kit`` sandbox
    submission), plus ``alice/logreg`` (works) and ``bob/broken`` (raises in
    fit), and one user interaction. Every submission is in state ``new``; the
    submissions' files are ``classifier.py`` (see :mod:`tests.kit`).

    The database must be empty; ``tmp_path`` must not hold these folders yet.

    Returns a dict with keys ``url``, ``problem``, ``event``, ``event_id``,
    ``sandbox``, ``users``, ``kit_dir``, ``data_dir``, ``submissions_dir``
    (Paths) and ``submissions``: ``{(team, name): submission id}``.
    """
    from ramp_database.model import Event, EventAdmin, Model, Submission, User
    from ramp_database.testing import setup_files_extension_type
    from ramp_database.tools.event import (
        add_event,
        add_keyword,
        add_problem,
        add_problem_keyword,
    )
    from ramp_database.tools.submission import add_submission
    from ramp_database.tools.team import sign_up_team
    from ramp_database.tools.user import add_user, add_user_interaction

    kit_dir = kit.make_iris_kit(tmp_path / "ramp-kits" / PROBLEM)
    submissions_dir = tmp_path / "events" / EVENT / "submissions"
    submissions_dir.mkdir(parents=True)
    # source folders of the extra submissions, outside the kit
    sources = tmp_path / "sources"

    engine = create_engine(normalise_url(url))
    try:
        Model.metadata.create_all(engine)
        with _quick_and_quiet(), Session(engine) as session:
            setup_files_extension_type(session)
            add_user(
                session, ADMIN, "admin-pw", "Admin", "Iris", "admin@example.org",
                access_level="admin",
            )
            for name in USERS:
                add_user(session, name, f"{name}-pw", name.title(), "Test", f"{name}@example.org")
            # the kit folder doubles as the data folder (data/train.csv, data/test.csv)
            add_problem(session, PROBLEM, str(kit_dir), str(kit_dir))
            add_keyword(session, "botany", "data_domain", category="scientific data")
            add_problem_keyword(session, problem_name=PROBLEM, keyword_name="botany")
            add_event(
                session,
                problem_name=PROBLEM,
                event_name=EVENT,
                event_title="Iris test event",
                ramp_sandbox_name=SANDBOX,
                ramp_submissions_path=str(submissions_dir),
                is_public=True,
            )
            for name in USERS:
                sign_up_team(session, EVENT, name)  # also submits the sandbox
            for team, name, source in SUBMISSIONS:
                folder = kit.add_submission_files(kit_dir, name, source, submissions_dir=sources)
                add_submission(session, EVENT, team, name, str(folder))
            event = session.query(Event).filter_by(name=EVENT).one()
            users = {u.name: u for u in session.query(User)}
            # tools.event.add_event_admin never adds its row: use the model directly
            session.add(EventAdmin(event=event, admin=users[ADMIN]))
            logreg = session.query(Submission).filter_by(name="logreg").one()
            add_user_interaction(
                session, interaction="submit", user=users["alice"], event=event,
                submission=logreg, ip="127.0.0.1",
            )
            session.commit()

            event_id = event.id
            ids = {
                (s.event_team.team.name, s.name): s.id
                for s in session.query(Submission).order_by(Submission.id)
            }
    finally:
        engine.dispose()
    return {
        "url": url,
        "problem": PROBLEM,
        "event": EVENT,
        "event_id": event_id,
        "sandbox": SANDBOX,
        "users": (ADMIN, *USERS),
        "kit_dir": kit_dir,
        "data_dir": kit_dir,
        "submissions_dir": submissions_dir,
        "submissions": ids,
    }
