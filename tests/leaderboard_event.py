"""A ramp-board event in every state the leaderboards show, built by ramp-database.

ramp-database 0.10.1 creates the users, teams, event and submissions (its own
``add_submission``); the results are then written into its tables directly,
as our daemon writes them (plain floats, numpy blobs for the bags), without
running ``ramp-test``: the leaderboards only read the tables. What is in it:

- 5 teams, 3 score types (``SCORES``; the official one first: ``acc``, higher
  is better, or ``nll``, lower is better), 3 cv folds;
- scored submissions with scores drawn from few values, so that scores tie
  within and across teams, and some submitted within the same second (the
  competition tables' tie-break); one not valid, one out of the competition,
  one without ``max_ram``, and (``contributivity=True``) non-zero
  contributivities;
- failed ones (``training_error``, ``checking_error``), waiting ones (``new``
  with queue positions), one ``sent_to_training``, one ``training`` and one
  ``tested``; every team's sandbox (never on a leaderboard).
"""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session

from ramp_dispatcher.database import ramp_schema as rs
from ramp_dispatcher.database.engine import normalise_url

import kit
from rampboard import SANDBOX, _quick_and_quiet

PROBLEM = "iris"
EVENT = "iris_boards"
TEAMS = ("alice", "bob", "carol", "dave", "erin")
N_FOLDS = 3
#: (name, rampwf constructor); precision differs on purpose
SCORES_HIGHER = (
    ("acc", 'rw.score_types.Accuracy(name="acc", precision=3)'),
    ("nll", 'rw.score_types.NegativeLogLikelihood(name="nll", precision=2)'),
    ("err", 'rw.score_types.ClassificationError(name="err", precision=4)'),
)
SCORES_LOWER = (SCORES_HIGHER[1], SCORES_HIGHER[0], SCORES_HIGHER[2])

#: (team, name, state) in submission order; scored ones get results
PLAN = (
    ("alice", "a_good", "scored"),
    ("bob", "b_good", "scored"),
    ("carol", "c_good", "scored"),
    ("alice", "a_second", "scored"),
    ("dave", "d_broken", "training_error"),
    ("bob", "b_twin", "scored"),
    ("carol", "c_platform", "checking_error"),
    ("erin", "e_good", "scored"),
    ("dave", "d_good", "scored"),
    ("alice", "a_invalid", "scored"),
    ("bob", "b_nocomp", "scored"),
    ("carol", "c_noram", "scored"),
    ("erin", "e_broken", "training_error"),
    ("alice", "a_waiting", "new"),
    ("bob", "b_sent", "sent_to_training"),
    ("carol", "c_running", "training"),
    ("dave", "d_waiting", "new"),
    ("erin", "e_tested", "tested"),
)


def _problem_py(scores: tuple[tuple[str, str], ...]) -> str:
    lines = ",\n".join(f"    {ctor}" for _, ctor in scores)
    return f"score_types = [\n{lines},\n]\n"


def build_event(url: str, tmp_path: Path, *, official: str = "acc", contributivity: bool = False,
                seed: int = 15) -> dict[str, Any]:
    """Build the event in the empty database at ``url``; return facts about it."""
    from ramp_database.model import Event, Model
    from ramp_database.testing import setup_files_extension_type
    from ramp_database.tools.event import add_event, add_problem
    from ramp_database.tools.submission import add_submission
    from ramp_database.tools.team import sign_up_team
    from ramp_database.tools.user import add_user

    scores = SCORES_HIGHER if official == "acc" else SCORES_LOWER
    kit_dir = kit.make_iris_kit(tmp_path / "ramp-kits" / PROBLEM, n_folds=N_FOLDS)
    problem = kit_dir / "problem.py"
    text = problem.read_text()
    start = text.index("score_types = [")
    end = text.index("]\n", start) + 2
    problem.write_text(text[:start] + _problem_py(scores) + text[end:])
    submissions_dir = tmp_path / "events" / EVENT / "submissions"
    submissions_dir.mkdir(parents=True)
    sources = tmp_path / "sources"

    engine = create_engine(normalise_url(url))
    try:
        Model.metadata.create_all(engine)
        with _quick_and_quiet(), Session(engine) as session:
            setup_files_extension_type(session)
            for name in TEAMS:
                add_user(session, name, f"{name}-pw", name.title(), "Test", f"{name}@example.org")
            add_problem(session, PROBLEM, str(kit_dir), str(kit_dir))
            add_event(
                session, problem_name=PROBLEM, event_name=EVENT, event_title="Boards",
                ramp_sandbox_name=SANDBOX, ramp_submissions_path=str(submissions_dir),
                is_public=True,
            )
            event = session.query(Event).filter_by(name=EVENT).one()
            event.min_duration_between_submissions = 0
            session.commit()
            for name in TEAMS:
                sign_up_team(session, EVENT, name)
            for team, name, _ in PLAN:
                folder = kit.add_submission_files(kit_dir, name, kit.GOOD, submissions_dir=sources)
                add_submission(session, EVENT, team, name, str(folder))
            session.commit()
        ids = _write_results(engine, scores, contributivity, random.Random(seed))
    finally:
        engine.dispose()
    return {"kit_dir": kit_dir, "ids": ids, "scores": [s for s, _ in scores]}


def _write_results(engine, scores, contributivity: bool, rnd: random.Random) -> dict[str, int]:
    s, ss, sof, sscf = (
        rs.submissions, rs.submission_scores, rs.submission_on_cv_folds,
        rs.submission_score_on_cv_folds,
    )
    est = rs.event_score_types
    # few distinct values: ties within and across teams
    pool = {"acc": [0.9, 0.93333, 0.96667, 1.0], "nll": [0.08, 0.1234567, 0.25],
            "err": [0.0, 0.03333, 0.06667]}
    base = dt.datetime(2026, 11, 30, 9, 15, 42, 123456)
    with engine.begin() as conn:
        ids = {r.name: r.id for r in conn.execute(select(s.c.id, s.c.name).where(s.c.name != SANDBOX))}
        for i, (team, name, state) in enumerate(PLAN):
            sid = ids[name]
            # pairs of submissions within one second: the competition's tie-break
            stamp = base + dt.timedelta(seconds=2 * (i // 2), microseconds=rnd.randrange(10**5))
            values: dict[str, Any] = {"state": state, "submission_timestamp": stamp}
            if state == "new":
                values["queue_position"] = 1 if name == "a_waiting" else 2
            if "error" in state:
                values["error_msg"] = f"Your submission failed: ValueError: {name} broke"
            if name == "a_invalid":
                values["is_valid"] = False
            if name == "b_nocomp":
                values["is_in_competition"] = False
            if state == "scored":
                values["max_ram"] = None if name == "c_noram" else round(rnd.uniform(90, 400), 3)
                if contributivity:
                    values["contributivity"] = rnd.choice([0.0, 0.125, 0.3349])
                    values["historical_contributivity"] = rnd.choice([0.0, 0.5])
            conn.execute(update(s).where(s.c.id == sid).values(**values))
            conn.execute(update(sof).where(sof.c.submission_id == sid).values(state=state))
            if state != "scored":
                continue
            twin = name == "b_twin"  # the very same scores as b_good
            local = random.Random(ids["b_good"] if twin else sid)
            folds = conn.execute(
                select(sof.c.id).where(sof.c.submission_id == sid).order_by(sof.c.id)
            ).scalars().all()
            for fold_id in folds:
                conn.execute(update(sof).where(sof.c.id == fold_id).values(
                    train_time=local.uniform(0.01, 2.0), valid_time=local.uniform(0.001, 0.2),
                    test_time=local.uniform(0.001, 0.2),
                ))
            for score_row in conn.execute(
                select(ss.c.id, est.c.name).join(est, est.c.id == ss.c.event_score_type_id)
                .where(ss.c.submission_id == sid).order_by(ss.c.id)
            ).all():
                choices = pool[score_row.name]
                bags = {step: [local.choice(choices) for _ in folds] for step in ("valid", "test")}
                conn.execute(update(ss).where(ss.c.id == score_row.id).values(
                    valid_score_cv_bag=bags["valid"][-1], test_score_cv_bag=bags["test"][-1],
                    valid_score_cv_bags=bags["valid"], test_score_cv_bags=bags["test"],
                ))
                for fold_id in folds:
                    conn.execute(
                        update(sscf)
                        .where(sscf.c.submission_on_cv_fold_id == fold_id,
                               sscf.c.submission_score_id == score_row.id)
                        .values(train_score=local.choice(choices) + local.uniform(0, 1e-4),
                                valid_score=local.choice(choices),
                                test_score=local.choice(choices) + local.uniform(-1e-3, 1e-3))
                    )
    return ids
