"""The admin layer writes what ramp-database 0.10.1 writes.

The main proof is :func:`test_same_rows_as_ramp_database`: the same deployment
built once with ramp-database's own tools and once with ours, every table
dumped and compared. The other tests read our rows back through ramp-database's
ORM and tools, mix both writers, and check the errors and the CLI.
"""

from __future__ import annotations

import datetime
import math
import re
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from sqlalchemy import Engine, create_engine, func, inspect, select, update
from sqlalchemy.orm import Session

from kit import ELEMENT, GOOD, RAISES, SCORE_NAMES, add_submission_files, make_iris_kit
from ramp_dispatcher.cli import main
from ramp_dispatcher.config import RampConfig
from ramp_dispatcher.database import admin
from ramp_dispatcher.database import ramp_schema as rs
from ramp_dispatcher.database.admin import AdminError
from ramp_dispatcher.database.engine import make_engine, normalise_url
from ramp_dispatcher.errors import UserError

# ramp-database's own autoflush noise under SQLAlchemy 2 (its objects, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Object of type:sqlalchemy.exc.SAWarning")

EVENT = "iris_test"
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}


def create_schema(engine: Engine) -> None:
    """Our migrations when they exist, else the baseline tables."""
    try:
        from ramp_dispatcher.database.migrate import upgrade
    except ImportError:
        rs.metadata.create_all(engine)
        return
    upgrade(engine)


@pytest.fixture
def kit(tmp_path: Path) -> Path:
    return make_iris_kit(tmp_path / "kit")


@pytest.fixture
def engine(empty_db_url: str) -> Iterator[Engine]:
    engine = make_engine(empty_db_url)
    create_schema(engine)
    yield engine
    engine.dispose()


class RampSession:
    """A ramp-database ORM session on a URL, closed and disposed on exit."""

    def __init__(self, url: str | Any):
        self.engine = create_engine(normalise_url(url))
        self.session = Session(self.engine)

    def __enter__(self) -> Session:
        return self.session

    def __exit__(self, *exc: Any) -> None:
        self.session.close()
        self.engine.dispose()


def source(tmp_path: Path, name: str, code: str = GOOD) -> Path:
    return add_submission_files(tmp_path, name, code, submissions_dir=tmp_path / "src")


def expected_folds(kit: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    module = admin.load_problem_module(kit)
    X, y = module.get_train_data(path=str(kit))
    return [(np.asarray(a), np.asarray(b)) for a, b in module.get_cv(X, y)]


# --------------------------------------------------------------------------- scenario


def build_ours(engine: Engine, kit: Path, subs: Path, tmp_path: Path) -> dict[str, int]:
    ids: dict[str, int] = {}
    with engine.begin() as conn:
        admin.add_problem(conn, "iris", kit, kit)
        ids["event"] = admin.add_event(conn, "iris", EVENT, "Iris test", "starting_kit", subs, True)
        admin.add_user(conn, "alice", PASSWORDS["alice"], "Alice@Example.org", "user", "Alice", "L")
        admin.add_user(conn, "bob", PASSWORDS["bob"], "bob@example.org", "admin", "Bob", "B")
        ids["alice_et"] = admin.sign_up_team(conn, EVENT, "alice")
        admin.sign_up_team(conn, EVENT, "bob")
        ids["s1"] = admin.add_submission(conn, EVENT, "alice", "s1", source(tmp_path, "s1"))
        admin.add_submission(conn, EVENT, "bob", "b1", source(tmp_path, "b1"))
        admin.add_submission(conn, EVENT, "bob", "b2", source(tmp_path, "b2", RAISES))
    return ids


def build_ramp_database(url: str, kit: Path, subs: Path, tmp_path: Path) -> None:
    from ramp_database.model import Model
    from ramp_database.testing import setup_files_extension_type
    from ramp_database.tools.event import add_event, add_problem
    from ramp_database.tools.submission import add_submission
    from ramp_database.tools.team import sign_up_team
    from ramp_database.tools.user import add_user

    with RampSession(url) as session:
        Model.metadata.create_all(session.get_bind())
        setup_files_extension_type(session)  # what ramp-utils' deploy does first
        add_problem(session, "iris", str(kit), str(kit))
        add_event(session, "iris", EVENT, "Iris test", "starting_kit", str(subs), True)
        add_user(session, "alice", PASSWORDS["alice"], "L", "Alice", "Alice@Example.org", "user")
        add_user(session, "bob", PASSWORDS["bob"], "B", "Bob", "bob@example.org", "admin")
        sign_up_team(session, EVENT, "alice")
        sign_up_team(session, EVENT, "bob")
        add_submission(session, EVENT, "alice", "s1", str(source(tmp_path, "s1")))
        add_submission(session, EVENT, "bob", "b1", str(source(tmp_path, "b1")))
        add_submission(session, EVENT, "bob", "b2", str(source(tmp_path, "b2", RAISES)))


def fail_s1(engine: Engine) -> None:
    """What a failed run leaves, so that a resubmission has something to reset."""
    s, soc, sscf = rs.submissions, rs.submission_on_cv_folds, rs.submission_score_on_cv_folds
    with engine.begin() as conn:
        sid = conn.execute(select(s.c.id).where(s.c.name == "s1")).scalar_one()
        conn.execute(
            update(s).where(s.c.id == sid).values(state="training_error", error_msg="boom")
        )
        conn.execute(
            update(soc)
            .where(soc.c.submission_id == sid)
            .values(state="training_error", error_msg="boom", train_time=1.5, best=True)
        )
        socs = select(soc.c.id).where(soc.c.submission_id == sid)
        conn.execute(
            update(sscf).where(sscf.c.submission_on_cv_fold_id.in_(socs)).values(train_score=0.5)
        )


def _ramp_board_tables() -> set[str]:
    from ramp_database.model import Model

    return set(Model.metadata.tables)


RAMP_BOARD_TABLES = _ramp_board_tables()

TIMESTAMPS = {
    ("users", "signup_timestamp"),
    ("users", "update_timestamp"),
    ("teams", "creation_timestamp"),
    ("user_teams", "update_timestamp"),
    ("event_teams", "signup_timestamp"),
    ("submissions", "submission_timestamp"),
}
_STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{6})?")


def dump(engine: Engine, subs: Path) -> dict[str, list[dict[str, Any]]]:
    """Every ramp-board table, rows by id; volatile values checked, then masked."""
    out: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as conn:
        for table in rs.metadata.sorted_tables:
            if table.name not in RAMP_BOARD_TABLES:
                continue  # our own tables, when the schema came from our migrations
            rows = []
            for row in conn.execute(select(table).order_by(table.c.id)).mappings():
                row = dict(row)
                for col in table.columns:
                    name, value = col.name, row[col.name]
                    if (table.name, name) in TIMESTAMPS:
                        assert value is not None or name == "update_timestamp", (table, name)
                        row[name] = "<timestamp>"
                    elif isinstance(col.type, rs.NumpyBlob):
                        arr = np.asarray(value)
                        row[name] = (arr.dtype.str, arr.shape, arr.tolist())
                    elif name == "hashed_password":
                        import bcrypt

                        password = PASSWORDS[row["name"]].encode()
                        assert bcrypt.checkpw(password, value.encode())
                        row[name] = "<bcrypt>"
                    elif table.name == "score_types" and name == "name":
                        assert uuid.UUID(value).version == 4
                        row[name] = "<uuid4>"
                    elif name == "path_ramp_submissions":
                        assert value == str(subs)
                        row[name] = "<submissions>"
                    elif isinstance(value, str) and "<thead>" in value:
                        row[name] = _STAMP.sub("<timestamp>", value)
                rows.append(row)
            out[table.name] = rows
    return out


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- tests


def test_same_rows_as_ramp_database(
    engine: Engine, other_db_url: str, kit: Path, tmp_path: Path
) -> None:
    """The main proof: ramp-database's tools and ours write the same rows."""
    from ramp_database.tools.submission import add_submission as ramp_add_submission

    ours_subs, ramp_subs = tmp_path / "ours-subs", tmp_path / "ramp-subs"
    build_ours(engine, kit, ours_subs, tmp_path)
    build_ramp_database(other_db_url, kit, ramp_subs, tmp_path)
    ramp_engine = make_engine(other_db_url)
    try:
        ours, theirs = dump(engine, ours_subs), dump(ramp_engine, ramp_subs)
        for name in ours:
            assert ours[name] == theirs[name], name
        # Resubmitting a failed submission resets it the same way.
        fail_s1(engine)
        fail_s1(ramp_engine)
        with engine.begin() as conn:
            admin.add_submission(conn, EVENT, "alice", "s1", source(tmp_path, "s1"))
        with RampSession(other_db_url) as session:
            ramp_add_submission(session, EVENT, "alice", "s1", str(source(tmp_path, "s1")))
        ours, theirs = dump(engine, ours_subs), dump(ramp_engine, ramp_subs)
    finally:
        ramp_engine.dispose()
    for name in ours:
        assert ours[name] == theirs[name], name
    # The scenario did touch what it claims to compare.
    assert len(ours["submissions"]) == 5
    assert len(ours["submission_score_on_cv_folds"]) == 5 * 2 * 2
    assert ours["events"][0]["n_submissions"] == 3
    assert ours["submissions"][2]["state"] == "new"
    assert ours["submissions"][2]["error_msg"] == "boom"  # ramp-database keeps it
    assert ours["event_teams"][1]["new_leaderboard_html"].count("<tr>") == 2
    assert set(ours) == RAMP_BOARD_TABLES
    assert tree(ours_subs) == tree(ramp_subs)
    assert sorted(p.name for p in ours_subs.iterdir()) == [
        f"submission_{i:09d}" for i in range(1, 6)
    ]


def test_ramp_database_reads_our_rows(
    engine: Engine, empty_db_url: str, kit: Path, tmp_path: Path
) -> None:
    from ramp_database.tools.event import get_event
    from ramp_database.tools.frontend import is_user_signed_up
    from ramp_database.tools.leaderboard import get_leaderboard
    from ramp_database.tools.submission import (
        get_event_nb_folds,
        get_scores,
        get_submission_by_name,
        get_submission_state,
        get_submissions,
        get_time,
    )
    from ramp_database.tools.team import get_event_team_by_name
    from ramp_database.tools.user import get_user_by_name
    from ramp_database.utils import check_password

    subs = tmp_path / "subs"
    ids = build_ours(engine, kit, subs, tmp_path)
    module = admin.load_problem_module(kit)
    worst = {st.name: st.worst for st in module.score_types}
    with RampSession(empty_db_url) as session:
        event = get_event(session, EVENT)
        assert event.id == ids["event"]
        assert event.problem.name == "iris"
        assert event.problem.path_ramp_kit == str(kit)
        assert event.workflow.name == "Classifier"
        assert [e.name for e in event.workflow.elements] == [ELEMENT]
        assert event.workflow.elements[0].file_type == "code"
        assert event.official_score_name == SCORE_NAMES[0]
        assert event.is_public and not event.is_send_trained_mails
        assert event.min_duration_between_submissions == 900
        assert event.ramp_sandbox_name == "starting_kit"
        assert event.path_ramp_submissions == str(subs)
        assert event.is_open and event.n_jobs == 2
        assert event.n_submissions == 3
        assert [st.name for st in event.score_types] == list(SCORE_NAMES)
        assert [st.worst for st in event.score_types] == [worst[n] for n in SCORE_NAMES]
        assert event.get_official_score_type(session).name == SCORE_NAMES[0]
        folds = sorted(event.cv_folds, key=lambda f: f.id)
        assert len(folds) == get_event_nb_folds(session, EVENT) == 2
        for fold, (train_is, test_is) in zip(folds, expected_folds(kit)):
            assert fold.type == "live"
            np.testing.assert_array_equal(fold.train_is, train_is)
            np.testing.assert_array_equal(fold.test_is, test_is)
            assert fold.train_is.dtype == train_is.dtype

        sub = get_submission_by_name(session, EVENT, "alice", "s1")
        assert sub.id == ids["s1"]
        assert get_submission_state(session, sub.id) == "new"
        assert sub.is_new and sub.is_not_sandbox and not sub.is_error
        assert sub.f_names == [f"{ELEMENT}.py"]
        assert sub.path == str(subs / f"submission_{sub.id:09d}")
        assert Path(sub.files[0].path).read_text() == GOOD
        assert len(sub.hash_) == 40
        assert [f.cv_fold_id for f in sub.on_cv_folds] == [f.id for f in folds]
        for fold in sub.on_cv_folds:
            assert fold.state == "new" and fold.error_msg == ""
            assert {s.name: s.valid_score for s in fold.scores} == worst
        assert {s.score_name: s.valid_score_cv_bag for s in sub.scores} == worst
        assert all(s.valid_score_cv_bags.item() is None for s in sub.scores)
        assert sub.official_score.score_name == SCORE_NAMES[0]
        scores = get_scores(session, sub.id)
        assert list(scores.columns) == list(SCORE_NAMES)
        assert scores[SCORE_NAMES[0]].tolist() == [worst[SCORE_NAMES[0]]] * 6
        assert math.isinf(scores[SCORE_NAMES[1]].iloc[0])
        assert get_time(session, sub.id).to_numpy().sum() == 0

        new = get_submissions(session, EVENT, "new")
        assert [name for _, name, _ in new] == [f"submission_{i:09d}" for i in range(1, 6)]
        assert sub.id in [i for i, _, _ in new]

        user = get_user_by_name(session, "alice")
        assert user.email == "alice@example.org"
        assert check_password(PASSWORDS["alice"], user.hashed_password)
        assert user.admined_teams[0].name == "alice"
        assert is_user_signed_up(session, EVENT, "alice")
        event_team = get_event_team_by_name(session, EVENT, "alice")
        assert event_team.id == ids["alice_et"]
        assert event_team.approved and event_team.is_active
        assert event_team.last_submission_name == "s1"
        assert event.new_leaderboard_html == get_leaderboard(session, "new", EVENT)
        assert event_team.new_leaderboard_html == get_leaderboard(session, "new", EVENT, "alice")
        assert "s1</a>" in event_team.new_leaderboard_html


def test_ramp_database_add_submission_on_our_event(
    engine: Engine, empty_db_url: str, kit: Path, tmp_path: Path
) -> None:
    """Mixed use: ramp-database submits to our event, then we submit again."""
    from ramp_database.tools.leaderboard import get_leaderboard
    from ramp_database.tools.submission import add_submission, set_submission_state

    subs = tmp_path / "subs"
    build_ours(engine, kit, subs, tmp_path)
    with RampSession(empty_db_url) as session:
        sub = add_submission(session, EVENT, "bob", "b3", str(source(tmp_path, "b3")))
        assert len(sub.on_cv_folds) == 2 and len(sub.scores) == 2
        assert (Path(sub.path) / f"{ELEMENT}.py").read_text() == GOOD
        set_submission_state(session, sub.id, "sent_to_training")
        b3_id = sub.id
    with engine.begin() as conn:
        b4_id = admin.add_submission(conn, EVENT, "bob", "b4", source(tmp_path, "b4"))
        s = rs.submissions
        # Whole seconds on every row, and a queue position: pandas formats both.
        for sid, stamp in conn.execute(select(s.c.id, s.c.submission_timestamp)).all():
            conn.execute(
                update(s)
                .where(s.c.id == sid)
                .values(submission_timestamp=stamp.replace(microsecond=0))
            )
        conn.execute(update(s).where(s.c.id == b4_id).values(queue_position=3))
    assert b4_id == b3_id + 1
    with engine.connect() as conn:
        ours_event = admin.new_leaderboard_html(conn, 1)
        team_id = conn.execute(select(rs.teams.c.id).where(rs.teams.c.name == "bob")).scalar()
        ours_team = admin.new_leaderboard_html(conn, 1, team_id)
        n_submissions = conn.execute(select(rs.events.c.n_submissions)).scalar()
    with RampSession(empty_db_url) as session:
        assert ours_event == get_leaderboard(session, "new", EVENT)
        assert ours_team == get_leaderboard(session, "new", EVENT, "bob")
    assert "<td>#3</td>" in ours_team and "<td>sent_to_training</td>" in ours_team
    assert n_submissions == 5

    # A sign-up asked for on the frontend (not approved) is approved by ours.
    from ramp_database.tools.frontend import is_user_signed_up
    from ramp_database.tools.submission import get_submission_by_name
    from ramp_database.tools.team import ask_sign_up_team

    with engine.begin() as conn:
        admin.add_user(conn, "carol", "pw", "c@x.org")
    with RampSession(empty_db_url) as session:
        asked_id = ask_sign_up_team(session, EVENT, "carol")[2].id
        assert not is_user_signed_up(session, EVENT, "carol")
    with engine.begin() as conn:
        assert admin.sign_up_team(conn, EVENT, "carol") == asked_id
    with RampSession(empty_db_url) as session:
        assert is_user_signed_up(session, EVENT, "carol")
        assert get_submission_by_name(session, EVENT, "carol", "starting_kit").state == "new"


def test_deploy_event_and_force(engine: Engine, kit: Path, tmp_path: Path) -> None:
    ramp = RampConfig(
        problem_name="iris",
        event_name=EVENT,
        event_title="Iris",
        event_is_public=False,
        kit_dir=kit,
        data_dir=kit,
        submissions_dir=tmp_path / "events" / EVENT / "submissions",
        predictions_dir=tmp_path / "predictions",
        logs_dir=tmp_path / "logs",
        sandbox_name="starting_kit",
    )
    with engine.begin() as conn:
        event_id = admin.deploy_event(conn, ramp)
        admin.add_user(conn, "alice", "pw", "a@x.org")
        admin.sign_up_team(conn, EVENT, "alice")
    assert ramp.submissions_dir.is_dir()
    with engine.begin() as conn, pytest.raises(AdminError, match="exists already"):
        admin.deploy_event(conn, ramp)
    other = RampConfig(**{**ramp.__dict__, "data_dir": tmp_path / "elsewhere"})
    with engine.begin() as conn, pytest.raises(AdminError, match="force"):
        admin.deploy_event(conn, other)
    with engine.begin() as conn:
        if inspect(conn).has_table("dispatcher_runs"):  # a run of the sandbox
            from ramp_dispatcher.database.dispatcher_schema import runs

            conn.execute(
                runs.insert().values(
                    submission_id=1, event_id=event_id, attempt=1, worker_type="conda",
                    owner="test", status="collected", created_at=datetime.datetime(2024, 1, 1),
                )
            )
    with engine.begin() as conn:
        new_id = admin.deploy_event(conn, ramp, force=True)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(rs.events)).scalar() == 1
        assert conn.execute(select(func.count()).select_from(rs.submissions)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(rs.cv_folds)).scalar() == 2
        assert conn.execute(select(func.count()).select_from(rs.workflows)).scalar() == 1
        assert conn.execute(select(func.count()).select_from(rs.extensions)).scalar() == 4
    assert event_id >= 1 and new_id >= 1  # SQLite may reuse the deleted id
    with engine.begin() as conn:  # the team signs up again to the new event
        admin.sign_up_team(conn, EVENT, "alice")


def test_errors(engine: Engine, kit: Path, tmp_path: Path) -> None:
    subs = tmp_path / "subs"
    build_ours(engine, kit, subs, tmp_path)
    good = source(tmp_path, "s9")

    def fails(match: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        with engine.begin() as conn, pytest.raises(AdminError, match=match) as info:
            fn(conn, *args, **kwargs)
        assert isinstance(info.value, UserError)

    fails("unknown event 'nope'", admin.add_submission, "nope", "alice", "s9", good)
    fails("unknown team 'nobody'", admin.add_submission, EVENT, "nobody", "s9", good)
    fails("unknown event 'nope'", admin.sign_up_team, "nope", "alice")
    fails("unknown team 'nobody'", admin.sign_up_team, EVENT, "nobody")
    fails("already signed up", admin.sign_up_team, EVENT, "alice")
    fails("unknown problem 'nope'", admin.add_event, "nope", "nope_x", "t", "starting_kit", subs)
    fails("exists already", admin.add_event, "iris", EVENT, "t", "starting_kit", subs)
    fails("must start with", admin.add_event, "iris", "other", "t", "starting_kit", subs)
    fails("problem 'iris' exists already", admin.add_problem, "iris", kit, kit)
    fails("username 'alice' is already in use", admin.add_user, "alice", "pw", "new@x.org")
    fails("email 'bob@example.org' is", admin.add_user, "carol", "pw", "Bob@example.org")
    fails("access level", admin.add_user, "carol", "pw", "c@x.org", access_level="root")
    fails("longer than 20", admin.add_user, "c" * 21, "pw", "c@x.org")

    # A scored submission cannot be resubmitted; neither can the sandbox.
    with engine.begin() as conn:
        s = rs.submissions
        conn.execute(update(s).where(s.c.name == "b1").values(state="scored"))
    add = admin.add_submission
    fails("'b1' of team 'bob' .* exists already .*'scored'", add, EVENT, "bob", "b1", good)
    fails("'starting_kit' .* exists already", add, EVENT, "bob", "starting_kit", good)

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "estimator.py").write_text(GOOD)
    fails(f"no file for the workflow element '{ELEMENT}'", add, EVENT, "bob", "x", wrong)
    (wrong / f"{ELEMENT}.foo").write_text(GOOD)
    fails("unknown extension", admin.add_submission, EVENT, "bob", "x", wrong)
    (wrong / f"{ELEMENT}.csv").write_text(GOOD)
    fails("do not fit", admin.add_submission, EVENT, "bob", "x", wrong)
    fails("does not exist", admin.add_submission, EVENT, "bob", "x", tmp_path / "missing")
    fails("longer than 20", admin.add_submission, EVENT, "bob", "x" * 21, good)
    fails("unknown user", admin.add_submission, EVENT, "bob", "x", good, user_name="zed")

    # ramp-database's wait between submissions, on request only.
    fails("must wait", admin.add_submission, EVENT, "alice", "s2", good, ignore_wait=False)
    with engine.begin() as conn:  # bob is a RAMP admin: no wait
        admin.add_submission(conn, EVENT, "bob", "b5", good, ignore_wait=False)
        admin.add_submission(conn, EVENT, "alice", "s2", good, user_name="alice")
        user_name = conn.execute(
            select(rs.submissions.c.user_name).where(rs.submissions.c.name == "s2")
        ).scalar()
    assert user_name == "alice"

    # Resubmitting a failed submission from its own deployed folder keeps its files.
    fail_s1(engine)
    deployed = subs / "submission_000000003"
    with engine.begin() as conn:
        assert admin.add_submission(conn, EVENT, "alice", "s1", deployed) == 3
    assert (deployed / f"{ELEMENT}.py").read_text() == GOOD

    no_kit = tmp_path / "no-kit"
    no_kit.mkdir()
    fails("no problem.py", admin.add_problem, "other", no_kit, kit)
    (no_kit / "problem.py").write_text("raise RuntimeError('broken kit')\n")
    fails("broken kit", admin.add_problem, "other", no_kit, kit)

    # Failed commands left nothing behind.
    with engine.connect() as conn:
        names = conn.execute(select(rs.submissions.c.name).order_by(rs.submissions.c.id))
        assert names.scalars().all() == [
            "starting_kit", "starting_kit", "s1", "b1", "b2", "b5", "s2"
        ]
        assert conn.execute(select(func.count()).select_from(rs.users)).scalar() == 2


def test_cli(empty_db_url: str, kit: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    engine = make_engine(empty_db_url)
    create_schema(engine)
    engine.dispose()
    db = ["--url", empty_db_url]
    subs = tmp_path / "subs"
    ok = [
        ["add-problem", *db, "--problem", "iris", "--kit-dir", str(kit), "--data-dir", str(kit)],
        ["add-event", *db, "--problem", "iris", "--event", EVENT, "--submissions-dir", str(subs)],
        ["add-user", *db, "--name", "alice", "--password", "pw", "--email", "a@x.org"],
        ["sign-up-team", *db, "--event", EVENT, "--team", "alice"],
        ["add-submission", *db, "--event", EVENT, "--team", "alice", "--name", "s1",
         "--path", str(source(tmp_path, "s1"))],
    ]
    for argv in ok:
        assert main(["admin", *argv]) == 0, argv
    out = capsys.readouterr().out
    assert "submission 's1' added as submission_000000002" in out
    assert (subs / "submission_000000002" / f"{ELEMENT}.py").read_text() == GOOD

    argv = ["admin", "add-submission", *db, "--event", EVENT, "--team", "nobody", "--name", "s2",
            "--path", str(source(tmp_path, "s2"))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: unknown team 'nobody'" in err
    assert "Traceback" not in err
    assert main(["admin", "add-problem", *db, "--problem", "p", "--kit-dir", str(tmp_path),
                 "--data-dir", str(kit)]) == 2
    assert "no problem.py" in capsys.readouterr().err
