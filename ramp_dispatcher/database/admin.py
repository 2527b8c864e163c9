"""Admin set-up of a ramp-board database without ramp-database installed.

Each function writes the rows ramp-database 0.10.1's own tool of the same name
writes (same tables, same values, same insert order, hence the same ids on a
fresh database), so ramp-board's frontend and ramp-database read them as their
own. The facts reproduced, all from ramp-database 0.10.1's source:

- ``add_problem``: ramp-utils' ``deploy_ramp_event`` first registers the file
  types and extensions (``setup_files_extension_type``); ramp-database's
  ``add_workflow`` then adds the workflow (named after the workflow class), one
  ``workflow_element_types`` row per element (file type inferred from the
  extension, ``py`` when there is none) and one ``workflow_elements`` row.
- ``add_event``: the ``events`` row with the model's Python defaults, mails
  off, ``official_score_name`` = first score type; one ``cv_folds`` row per
  fold of ``get_cv`` (type ``live``); per score type, a ``score_types`` row that
  ramp-database fills with a random uuid4 name, ``True, 0, 1`` (sic: the real
  bounds live in ``problem.py``) and the ``event_score_types`` row. Nothing else.
- ``add_user``: the user (bcrypt hash, email lower-cased, empty profile
  strings) and its individual team of the same name; no ``user_teams`` row.
- ``sign_up_team``: an ``event_teams`` row, then the sandbox submission from
  ``<kit>/submissions/<sandbox>``, then ``approved = True``.
- ``add_submission``: the submission, its scores, folds and fold scores at the
  "worst" value of each score type (taken from ``problem.py``), its files; the
  files copied to ``submission_%09d``; ``events.n_submissions``,
  ``event_teams.last_submission_name`` and the "new submissions" leaderboard
  HTML of the event and of the team.

All functions take a Connection inside a transaction; the caller commits.
ramp-workflow (through the kit's ``problem.py``) is imported lazily, here only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Sequence

from sqlalchemy import Connection, delete, func, insert, inspect, or_, select, update

from ..config import RampConfig
from ..errors import UserError
from . import dispatcher_schema as ds
from . import ramp_schema as rs
from ..leaderboards.update import new_leaderboard_html, update_new_leaderboards  # noqa: F401 (re-exported)


class AdminError(UserError):
    """An admin command cannot be carried out; the message says what to fix."""


# ramp_database.testing.setup_files_extension_type, which ramp-utils' deploy
# runs before adding a problem: add_workflow refuses extensions not listed here.
DEFAULT_EXTENSIONS: tuple[str, ...] = ("py", "R", "txt", "csv")
DEFAULT_FILE_TYPES: tuple[tuple[str, bool, int], ...] = (
    ("code", True, 10**5),
    ("text", True, 10**5),
    ("data", False, 10**8),
)
DEFAULT_TYPE_EXTENSIONS: tuple[tuple[str, str], ...] = (
    ("code", "py"),
    ("code", "R"),
    ("text", "txt"),
    ("data", "csv"),
)

# ramp-database's Event model defaults (Python-side; the DDL has none).
EVENT_DEFAULTS: dict[str, Any] = {
    "max_members_per_team": 1,
    "max_n_ensemble": 80,
    "is_controled_signup": True,
    "is_competitive": False,
    "min_duration_between_submissions": 15 * 60,
    "opening_timestamp": dt.datetime(2000, 1, 1),
    "public_opening_timestamp": dt.datetime(2100, 1, 1),
    "closing_timestamp": dt.datetime(2100, 1, 1),
    "combined_combined_valid_score": None,
    "combined_combined_test_score": None,
    "combined_foldwise_valid_score": None,
    "combined_foldwise_test_score": None,
    "n_submissions": 0,
    "public_leaderboard_html_no_links": None,
    "public_leaderboard_html_with_links": None,
    "private_leaderboard_html": None,
    "failed_leaderboard_html": None,
    "new_leaderboard_html": None,
    "public_competition_leaderboard_html": None,
    "private_competition_leaderboard_html": None,
}

USER_ACCESS_LEVELS = ("admin", "user", "asked", "not_confirmed")
# String(20) columns: PostgreSQL rejects longer values, SQLite would keep them.
MAX_NAME_LENGTH = 20


def _utcnow() -> dt.datetime:
    # ramp-board stores naive UTC timestamps (datetime.utcnow()).
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _abspath(path: str | os.PathLike[str]) -> str:
    # The frontend and the workers run from other folders than the admin's
    # shell: a relative path in the database would point elsewhere for them.
    return os.path.abspath(os.fspath(path))


def _known(conn: Connection, column: Any) -> str:
    names = sorted(conn.execute(select(column)).scalars())
    if not names:
        return "none in the database"
    shown = ", ".join(repr(n) for n in names[:10])
    return f"known: {shown}" + (", ..." if len(names) > 10 else "")


# --------------------------------------------------------------------------- kit


def load_problem_module(kit_dir: str | os.PathLike[str]) -> ModuleType:
    """Import ``<kit_dir>/problem.py`` from source, as ramp-database does."""
    path = Path(kit_dir) / "problem.py"
    if not path.is_file():
        raise AdminError(f"no problem.py in the kit folder {kit_dir} (looked for {path})")
    spec = importlib.util.spec_from_file_location("problem", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the kit's own code: any error is the kit's
        raise AdminError(
            f"{path}: cannot import the kit's problem.py: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _kit_attr(module: ModuleType, name: str) -> Any:
    try:
        return getattr(module, name)
    except AttributeError:
        raise AdminError(f"{module.__file__}: problem.py does not define '{name}'") from None


def _score_types(module: ModuleType) -> list[Any]:
    score_types = list(_kit_attr(module, "score_types"))
    if not score_types:
        raise AdminError(f"{module.__file__}: 'score_types' is empty")
    names = [st.name for st in score_types]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise AdminError(f"{module.__file__}: score type names repeated: {', '.join(duplicates)}")
    return score_types


def _split_element_name(element_name: str) -> tuple[str, str]:
    # ramp-database: "name.ext" -> (name, ext); no extension means Python code.
    tokens = element_name.split(".")
    return tokens[0], ".".join(tokens[1:]) if len(tokens) > 1 else "py"


# --------------------------------------------------------------------------- file types


def ensure_file_types(conn: Connection) -> None:
    """Register ramp-board's default extensions and file types when absent."""
    for name in DEFAULT_EXTENSIONS:
        if _extension_id(conn, name) is None:
            conn.execute(insert(rs.extensions).values(name=name))
    for name, is_editable, max_size in DEFAULT_FILE_TYPES:
        if _file_type_id(conn, name) is None:
            conn.execute(
                insert(rs.submission_file_types).values(
                    name=name, is_editable=is_editable, max_size=max_size
                )
            )
    t = rs.submission_file_type_extensions
    for type_name, ext_name in DEFAULT_TYPE_EXTENSIONS:
        type_id, ext_id = _file_type_id(conn, type_name), _extension_id(conn, ext_name)
        exists = conn.execute(
            select(t.c.id).where(t.c.type_id == type_id, t.c.extension_id == ext_id)
        ).first()
        if exists is None:
            conn.execute(insert(t).values(type_id=type_id, extension_id=ext_id))


def _extension_id(conn: Connection, name: str) -> int | None:
    return conn.execute(select(rs.extensions.c.id).where(rs.extensions.c.name == name)).scalar()


def _file_type_id(conn: Connection, name: str) -> int | None:
    t = rs.submission_file_types
    return conn.execute(select(t.c.id).where(t.c.name == name)).scalar()


def _add_workflow(conn: Connection, workflow_object: Any) -> int:
    """ramp-database's add_workflow: reuse what exists, add what is missing."""
    name = type(workflow_object).__name__
    w = rs.workflows
    workflow_id = conn.execute(select(w.c.id).where(w.c.name == name)).scalar()
    try:
        element_names = list(workflow_object.element_names)
    except (AttributeError, TypeError):
        raise AdminError(f"workflow {name} of the kit has no 'element_names'") from None
    # Check every element before writing anything.
    resolved = []
    for element_name in element_names:
        type_name, ext_name = _split_element_name(element_name)
        ext_id = _extension_id(conn, ext_name)
        if ext_id is None:
            raise AdminError(
                f"workflow {name}: element {element_name!r} has the unknown extension "
                f"{ext_name!r} (known: {', '.join(DEFAULT_EXTENSIONS)})"
            )
        fte = rs.submission_file_type_extensions
        file_type_ids = conn.execute(select(fte.c.type_id).where(fte.c.extension_id == ext_id))
        file_type_ids = list(file_type_ids.scalars())
        if len(file_type_ids) != 1:
            raise AdminError(
                f"workflow {name}: extension {ext_name!r} of element {element_name!r} "
                f"belongs to {len(file_type_ids)} file types, expected one"
            )
        resolved.append((type_name, file_type_ids[0]))
    if workflow_id is None:
        workflow_id = conn.execute(insert(w).values(name=name)).inserted_primary_key[0]
    wet, we = rs.workflow_element_types, rs.workflow_elements
    for type_name, file_type_id in resolved:
        # Element types are global (unique name): an existing one is reused as is.
        type_id = conn.execute(select(wet.c.id).where(wet.c.name == type_name)).scalar()
        if type_id is None:
            type_id = conn.execute(
                insert(wet).values(name=type_name, type_id=file_type_id)
            ).inserted_primary_key[0]
        exists = conn.execute(
            select(we.c.id).where(
                we.c.workflow_id == workflow_id, we.c.workflow_element_type_id == type_id
            )
        ).first()
        if exists is None:
            conn.execute(
                insert(we).values(
                    name=type_name, workflow_id=workflow_id, workflow_element_type_id=type_id
                )
            )
    return workflow_id


# --------------------------------------------------------------------------- deletes


def _delete_events(conn: Connection, event_ids: Sequence[int]) -> None:
    """Delete events with everything ramp-database's ORM cascades delete.

    ``score_types`` rows stay (ramp-database leaves them orphaned too);
    submission folders on disk stay, as with ramp-database. Our own run
    history of those events goes too: its foreign keys would block the delete.
    """
    if not event_ids:
        return
    et = select(rs.event_teams.c.id).where(rs.event_teams.c.event_id.in_(event_ids))
    subs = select(rs.submissions.c.id).where(rs.submissions.c.event_team_id.in_(et))
    folds = select(rs.cv_folds.c.id).where(rs.cv_folds.c.event_id.in_(event_ids))
    ests = select(rs.event_score_types.c.id).where(
        rs.event_score_types.c.event_id.in_(event_ids)
    )
    socs = select(rs.submission_on_cv_folds.c.id).where(
        or_(
            rs.submission_on_cv_folds.c.submission_id.in_(subs),
            rs.submission_on_cv_folds.c.cv_fold_id.in_(folds),
        )
    )
    scores = select(rs.submission_scores.c.id).where(
        or_(
            rs.submission_scores.c.submission_id.in_(subs),
            rs.submission_scores.c.event_score_type_id.in_(ests),
        )
    )
    files = select(rs.submission_files.c.id).where(rs.submission_files.c.submission_id.in_(subs))
    ui = rs.user_interactions
    sim = rs.submission_similaritys
    sscf = rs.submission_score_on_cv_folds
    if inspect(conn).has_table(ds.runs.name):
        conn.execute(
            delete(ds.runs).where(
                or_(ds.runs.c.event_id.in_(event_ids), ds.runs.c.submission_id.in_(subs))
            )
        )
    # Children first, so that no foreign key points at a deleted row.
    for stmt in (
        delete(ui).where(
            or_(
                ui.c.event_team_id.in_(et),
                ui.c.submission_id.in_(subs),
                ui.c.submission_file_id.in_(files),
            )
        ),
        delete(sim).where(
            or_(sim.c.source_submission_id.in_(subs), sim.c.target_submission_id.in_(subs))
        ),
        delete(rs.historical_contributivity).where(
            rs.historical_contributivity.c.submission_id.in_(subs)
        ),
        delete(sscf).where(
            or_(sscf.c.submission_on_cv_fold_id.in_(socs), sscf.c.submission_score_id.in_(scores))
        ),
        delete(rs.submission_on_cv_folds).where(rs.submission_on_cv_folds.c.id.in_(socs)),
        delete(rs.submission_scores).where(rs.submission_scores.c.id.in_(scores)),
        delete(rs.submission_files).where(rs.submission_files.c.id.in_(files)),
        delete(rs.submissions).where(rs.submissions.c.id.in_(subs)),
        delete(rs.event_teams).where(rs.event_teams.c.event_id.in_(event_ids)),
        delete(rs.cv_folds).where(rs.cv_folds.c.event_id.in_(event_ids)),
        delete(rs.event_score_types).where(rs.event_score_types.c.event_id.in_(event_ids)),
        delete(rs.event_admins).where(rs.event_admins.c.event_id.in_(event_ids)),
        delete(rs.events).where(rs.events.c.id.in_(event_ids)),
    ):
        conn.execute(stmt)


def _delete_problem(conn: Connection, problem_id: int) -> None:
    event_ids = list(
        conn.execute(select(rs.events.c.id).where(rs.events.c.problem_id == problem_id)).scalars()
    )
    _delete_events(conn, event_ids)
    ui, pk = rs.user_interactions, rs.problem_keywords
    conn.execute(delete(ui).where(ui.c.problem_id == problem_id))
    conn.execute(delete(pk).where(pk.c.problem_id == problem_id))
    conn.execute(delete(rs.problems).where(rs.problems.c.id == problem_id))


# --------------------------------------------------------------------------- problem, event


def add_problem(
    conn: Connection, name: str, kit_dir: Path, data_dir: Path, force: bool = False
) -> int:
    """Add a problem (and its workflow) from a ramp kit; return its id.

    With ``force``, an existing problem of that name is deleted first, with its
    events and everything under them, like ramp-database does.
    """
    if not name:
        raise AdminError("the problem name is empty")
    if not Path(data_dir).is_dir():
        raise AdminError(f"data folder {data_dir} of problem {name!r} does not exist")
    module = load_problem_module(kit_dir)
    workflow_object = _kit_attr(module, "workflow")
    p = rs.problems
    existing = conn.execute(select(p.c.id).where(p.c.name == name)).scalar()
    if existing is not None:
        if not force:
            raise AdminError(
                f"problem {name!r} exists already; force it to replace the problem "
                "and delete all its events"
            )
        _delete_problem(conn, existing)
    ensure_file_types(conn)
    workflow_id = _add_workflow(conn, workflow_object)
    return conn.execute(
        insert(p).values(
            name=name,
            workflow_id=workflow_id,
            path_ramp_kit=_abspath(kit_dir),
            path_ramp_data=_abspath(data_dir),
        )
    ).inserted_primary_key[0]


def _problem_row(conn: Connection, name: str) -> Any:
    row = conn.execute(select(rs.problems).where(rs.problems.c.name == name)).one_or_none()
    if row is None:
        raise AdminError(f"unknown problem {name!r} ({_known(conn, rs.problems.c.name)})")
    return row


def add_event(
    conn: Connection,
    problem_name: str,
    event_name: str,
    event_title: str,
    sandbox_name: str,
    submissions_dir: Path,
    is_public: bool = False,
    force: bool = False,
) -> int:
    """Add an event of a problem, with its cv folds and score types; return its id.

    The folds are ``get_cv(*get_train_data(path=<problem's data folder>))`` in
    the order ``get_cv`` yields them (fold ids follow that order).
    """
    problem = _problem_row(conn, problem_name)
    e = rs.events
    existing = conn.execute(select(e.c.id).where(e.c.name == event_name)).scalar()
    if existing is not None and not force:
        raise AdminError(f"event {event_name!r} exists already; force it to replace the event")
    # ramp-database's rule (the frontend derives the problem from the name).
    if not event_name.startswith(problem_name + "_"):
        raise AdminError(
            f"the event name {event_name!r} must start with the problem name and an "
            f"underscore: {problem_name + '_'!r}"
        )
    if not sandbox_name:
        raise AdminError("the sandbox submission name is empty")
    module = load_problem_module(problem.path_ramp_kit)
    score_types = _score_types(module)
    folds = _compute_folds(module, problem.path_ramp_data)
    if existing is not None:
        _delete_events(conn, [existing])

    event_id = conn.execute(
        insert(e).values(
            name=event_name,
            title=event_title,
            problem_id=problem.id,
            is_send_trained_mails=False,
            is_send_submitted_mails=False,
            is_public=bool(is_public),
            official_score_name=score_types[0].name,
            ramp_sandbox_name=sandbox_name,
            path_ramp_submissions=_abspath(submissions_dir),
            **EVENT_DEFAULTS,
        )
    ).inserted_primary_key[0]
    # One statement per row: ids must follow the kit's order, which a
    # multi-row insert does not promise on every backend.
    for train_is, test_is in folds:
        conn.execute(
            insert(rs.cv_folds).values(
                type="live", train_is=train_is, test_is=test_is, event_id=event_id
            )
        )
    for score_type in score_types:
        # ramp-database stores a placeholder score type per event score type
        # (uuid name, True, 0, 1); the real bounds are read from problem.py.
        score_type_id = conn.execute(
            insert(rs.score_types).values(
                name=str(uuid.uuid4()), is_lower_the_better=True, minimum=0.0, maximum=1.0
            )
        ).inserted_primary_key[0]
        conn.execute(
            insert(rs.event_score_types).values(
                name=score_type.name,
                event_id=event_id,
                score_type_id=score_type_id,
                precision=score_type.precision,
            )
        )
    return event_id


def _compute_folds(module: ModuleType, data_dir: str) -> list[tuple[Any, Any]]:
    get_train_data = _kit_attr(module, "get_train_data")
    get_cv = _kit_attr(module, "get_cv")
    try:
        X_train, y_train = get_train_data(path=data_dir)
    except Exception as exc:  # the kit's own code
        raise AdminError(
            f"{module.__file__}: get_train_data(path={data_dir!r}) failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    try:
        folds = [(train_is, test_is) for train_is, test_is in get_cv(X_train, y_train)]
    except Exception as exc:
        raise AdminError(
            f"{module.__file__}: get_cv failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not folds:
        raise AdminError(f"{module.__file__}: get_cv gave no folds")
    return folds


def deploy_event(conn: Connection, ramp: RampConfig, force: bool = False) -> int:
    """The database part of ramp-utils' ``deploy_ramp_event``; return the event id.

    Adds the problem if absent (an existing one with other kit/data folders
    needs ``force``, which replaces it and its events), creates the
    submissions folder, adds the event. Cloning kits and the kit archive for
    the frontend's download are not done here.
    """
    ensure_file_types(conn)
    p = rs.problems
    problem = conn.execute(select(p).where(p.c.name == ramp.problem_name)).one_or_none()
    kit_dir, data_dir = _abspath(ramp.kit_dir), _abspath(ramp.data_dir)
    if problem is None:
        add_problem(conn, ramp.problem_name, Path(kit_dir), Path(data_dir))
    else:
        if (kit_dir, data_dir) != (problem.path_ramp_kit, problem.path_ramp_data) and not force:
            raise AdminError(
                f"problem {ramp.problem_name!r} exists with kit {problem.path_ramp_kit} and "
                f"data {problem.path_ramp_data}, not {kit_dir} and {data_dir}; force it to "
                "replace the problem and its events"
            )
        if force:
            add_problem(conn, ramp.problem_name, Path(kit_dir), Path(data_dir), force=True)
    try:
        Path(ramp.submissions_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AdminError(f"cannot create {ramp.submissions_dir}: {exc.strerror}") from None
    return add_event(
        conn,
        ramp.problem_name,
        ramp.event_name,
        ramp.event_title,
        ramp.sandbox_name,
        Path(ramp.submissions_dir),
        is_public=ramp.event_is_public,
        force=force,
    )


# --------------------------------------------------------------------------- users, teams


def hash_password(password: str) -> str:
    """bcrypt, as ramp-database: the frontend checks logins with bcrypt."""
    try:
        import bcrypt
    except ImportError:
        raise AdminError(
            "adding a user needs the 'bcrypt' package (ramp-board's frontend checks "
            "passwords with bcrypt): pip install bcrypt"
        ) from None
    encoded = password.encode("utf-8")
    if len(encoded) > 72:
        # bcrypt only reads 72 bytes (recent versions refuse longer input).
        raise AdminError("the password is longer than 72 bytes, which bcrypt cannot hash")
    return bcrypt.hashpw(encoded, bcrypt.gensalt()).decode()


def add_user(
    conn: Connection,
    name: str,
    password: str,
    email: str,
    access_level: str = "user",
    firstname: str = "",
    lastname: str = "",
) -> int:
    """Add a user and its individual team of the same name; return the user id."""
    if not name:
        raise AdminError("the user name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise AdminError(f"user name {name!r} is longer than {MAX_NAME_LENGTH} characters")
    if access_level not in USER_ACCESS_LEVELS:
        raise AdminError(
            f"access level {access_level!r} is not one of {', '.join(USER_ACCESS_LEVELS)}"
        )
    if not password:
        raise AdminError("the password is empty")
    email = email.lower()  # ramp-database stores emails lower-cased
    u, t = rs.users, rs.teams
    # ramp-database's NameClashError messages.
    clashes = []
    if conn.execute(select(u.c.id).where(u.c.name == name)).first() is not None:
        clashes.append(f"username {name!r} is already in use")
    elif conn.execute(select(t.c.id).where(t.c.name == name)).first() is not None:
        clashes.append(f"username {name!r} is already in use as a team name")
    if conn.execute(select(u.c.id).where(u.c.email == email)).first() is not None:
        clashes.append(f"email {email!r} is already in use")
    if clashes:
        raise AdminError(" and ".join(clashes))
    now = _utcnow()
    user_id = conn.execute(
        insert(u).values(
            name=name,
            hashed_password=hash_password(password),
            lastname=lastname,
            firstname=firstname,
            email=email,
            linkedin_url="",
            twitter_url="",
            facebook_url="",
            google_url="",
            github_url="",
            website_url="",
            hidden_notes="",
            bio="",
            is_want_news=True,
            access_level=access_level,
            signup_timestamp=now,
            is_authenticated=False,
        )
    ).inserted_primary_key[0]
    conn.execute(
        insert(t).values(name=name, admin_id=user_id, is_individual=True, creation_timestamp=now)
    )
    return user_id


def _event_row(conn: Connection, name: str) -> Any:
    row = conn.execute(select(rs.events).where(rs.events.c.name == name)).one_or_none()
    if row is None:
        raise AdminError(f"unknown event {name!r} ({_known(conn, rs.events.c.name)})")
    return row


def _team_row(conn: Connection, name: str) -> Any:
    row = conn.execute(select(rs.teams).where(rs.teams.c.name == name)).one_or_none()
    if row is None:
        raise AdminError(f"unknown team {name!r} ({_known(conn, rs.teams.c.name)})")
    return row


def _event_team_id(conn: Connection, event_id: int, team_id: int) -> int | None:
    et = rs.event_teams
    return conn.execute(
        select(et.c.id).where(et.c.event_id == event_id, et.c.team_id == team_id)
    ).scalar()


def sign_up_team(conn: Connection, event_name: str, team_name: str) -> int:
    """Sign a team up to an event, approved, with the sandbox submitted; return the event_team id.

    As ramp-database: an existing (not yet approved) sign-up is reused; the
    event's sandbox ``<kit>/submissions/<ramp_sandbox_name>`` is submitted for
    the team, then the sign-up is approved.
    """
    event = _event_row(conn, event_name)
    team = _team_row(conn, team_name)
    et = rs.event_teams
    event_team_id = _event_team_id(conn, event.id, team.id)
    if event_team_id is None:
        event_team_id = conn.execute(
            insert(et).values(
                event_id=event.id,
                team_id=team.id,
                is_active=True,
                last_submission_name=None,
                signup_timestamp=_utcnow(),
                approved=False,
                leaderboard_html=None,
                failed_leaderboard_html=None,
                new_leaderboard_html=None,
            )
        ).inserted_primary_key[0]
    else:
        s = rs.submissions
        has_sandbox = conn.execute(
            select(s.c.id).where(
                s.c.event_team_id == event_team_id, s.c.name == event.ramp_sandbox_name
            )
        ).first()
        if has_sandbox is not None:
            raise AdminError(f"team {team_name!r} is already signed up to event {event_name!r}")
    kit_dir = conn.execute(
        select(rs.problems.c.path_ramp_kit).where(rs.problems.c.id == event.problem_id)
    ).scalar_one()
    sandbox_dir = Path(kit_dir) / "submissions" / event.ramp_sandbox_name
    add_submission(conn, event_name, team_name, event.ramp_sandbox_name, sandbox_dir)
    conn.execute(update(et).where(et.c.id == event_team_id).values(approved=True))
    return event_team_id


# --------------------------------------------------------------------------- submissions


@dataclass(frozen=True)
class _ElementFile:
    element_id: int
    element_name: str
    type_name: str  # the file's stem on disk (ramp-database's SubmissionFile.type)
    extension: str
    type_extension_id: int

    @property
    def f_name(self) -> str:
        return f"{self.type_name}.{self.extension}"


def _match_files(
    conn: Connection, problem_id: int, source_dir: Path, what: str
) -> list[_ElementFile]:
    """The file of ``source_dir`` for each workflow element of the problem.

    Like ramp-database, a file matches an element when its name before the
    first dot is the element name; its extension must be registered. Where
    ramp-database takes the first registered extension in directory order and
    then fails if it does not fit the element's file type, we take the first
    (in sorted order) that fits.
    """
    if not source_dir.is_dir():
        raise AdminError(f"submission folder {source_dir} of {what} does not exist")
    on_disk = [
        tuple(f.split(".", 1)) for f in sorted(os.listdir(source_dir)) if len(f.split(".")) > 1
    ]
    we, wet, fte, ext = (
        rs.workflow_elements,
        rs.workflow_element_types,
        rs.submission_file_type_extensions,
        rs.extensions,
    )
    elements = conn.execute(
        select(we.c.id, we.c.name, wet.c.name.label("type_name"), wet.c.type_id)
        .join(wet, wet.c.id == we.c.workflow_element_type_id)
        .join(rs.problems, rs.problems.c.workflow_id == we.c.workflow_id)
        .where(rs.problems.c.id == problem_id)
        .order_by(we.c.id)
    ).all()
    matched = []
    for element in elements:
        extensions = [e for stem, e in on_disk if stem == element.name]
        if not extensions:
            raise AdminError(
                f"{source_dir}: no file for the workflow element {element.name!r} of {what} "
                f"(expected e.g. {element.name}.py)"
            )
        known = [e for e in extensions if _extension_id(conn, e) is not None]
        if not known:
            raise AdminError(
                f"{source_dir}: unknown extension(s) {', '.join(extensions)} for the workflow "
                f"element {element.name!r} of {what} ({_known(conn, ext.c.name)})"
            )
        fitting = conn.execute(
            select(fte.c.id, ext.c.name)
            .join(ext, ext.c.id == fte.c.extension_id)
            .where(fte.c.type_id == element.type_id, ext.c.name.in_(known))
        ).all()
        by_extension = {row.name: row.id for row in fitting}
        choice = next((e for e in known if e in by_extension), None)
        if choice is None:
            raise AdminError(
                f"{source_dir}: extension(s) {', '.join(known)} do not fit the file type of "
                f"the workflow element {element.name!r} of {what}"
            )
        matched.append(
            _ElementFile(element.id, element.name, element.type_name, choice, by_extension[choice])
        )
    return matched


def _worst_scores(conn: Connection, event: Any) -> list[tuple[int, float]]:
    """(event_score_type id, worst value) in id order.

    The worst value comes from the kit's score types, as ramp-database's
    ``EventScoreType.worst`` does (the ``score_types`` rows are placeholders).
    """
    kit_dir = conn.execute(
        select(rs.problems.c.path_ramp_kit).where(rs.problems.c.id == event.problem_id)
    ).scalar_one()
    by_name = {st.name: st for st in _score_types(load_problem_module(kit_dir))}
    est = rs.event_score_types
    result = []
    for row in conn.execute(
        select(est.c.id, est.c.name).where(est.c.event_id == event.id).order_by(est.c.id)
    ):
        if row.name not in by_name:
            raise AdminError(
                f"score type {row.name!r} of event {event.name!r} is not in the kit's "
                "problem.py any more"
            )
        result.append((row.id, float(by_name[row.name].worst)))
    return result


def _reset_fold_scores(conn: Connection, fold_row_id: int, worst: dict[int, float]) -> None:
    sscf = rs.submission_score_on_cv_folds
    for score in conn.execute(
        select(sscf.c.id, rs.submission_scores.c.event_score_type_id)
        .join(rs.submission_scores, rs.submission_scores.c.id == sscf.c.submission_score_id)
        .where(sscf.c.submission_on_cv_fold_id == fold_row_id)
        .order_by(sscf.c.id)
    ).all():
        value = worst[score.event_score_type_id]
        conn.execute(
            update(sscf)
            .where(sscf.c.id == score.id)
            .values(train_score=value, valid_score=value, test_score=value)
        )


def add_submission(
    conn: Connection,
    event_name: str,
    team_name: str,
    submission_name: str,
    source_dir: Path,
    user_name: str | None = None,
    *,
    ignore_wait: bool = True,
) -> int:
    """Add (or resubmit) a submission from a folder; return its id.

    The files, one per workflow element, are copied to
    ``<path_ramp_submissions>/submission_%09d``. A name already used by the
    team may be resubmitted only while it is ``new`` or failed (ramp-database's
    rule; the sandbox never). ``ignore_wait=False`` applies ramp-database's
    ``min_duration_between_submissions`` to teams whose admin is not a RAMP
    admin; admin commands skip it by default.
    """
    event = _event_row(conn, event_name)
    team = _team_row(conn, team_name)
    event_team_id = _event_team_id(conn, event.id, team.id)
    if event_team_id is None:
        raise AdminError(f"team {team_name!r} is not signed up to event {event_name!r}")
    if not submission_name:
        raise AdminError("the submission name is empty")
    if len(submission_name) > MAX_NAME_LENGTH:
        raise AdminError(
            f"submission name {submission_name!r} is longer than {MAX_NAME_LENGTH} characters"
        )
    if user_name is not None:
        if conn.execute(select(rs.users.c.id).where(rs.users.c.name == user_name)).first() is None:
            raise AdminError(f"unknown user {user_name!r}")
    s = rs.submissions
    existing = conn.execute(
        select(s.c.id, s.c.state).where(
            s.c.event_team_id == event_team_id, s.c.name == submission_name
        )
    ).one_or_none()
    if existing is not None:
        is_sandbox = submission_name == event.ramp_sandbox_name
        if is_sandbox or not (existing.state == "new" or "error" in existing.state):
            raise AdminError(
                f"submission {submission_name!r} of team {team_name!r} at event {event_name!r} "
                f"exists already (state {existing.state!r}); only a new or failed submission "
                "can be resubmitted"
            )
    # Check everything before writing anything.
    files = _match_files(
        conn, event.problem_id, Path(source_dir), f"submission {submission_name!r}"
    )
    worst = _worst_scores(conn, event)
    worst_by_id = dict(worst)
    now = _utcnow()

    if existing is not None:
        submission_id = existing.id
        _resubmit(conn, submission_id, now, worst_by_id)
    else:
        if not ignore_wait:
            _check_wait(conn, event, team, event_team_id, now)
        submission_id = _insert_submission(
            conn, event, team, event_team_id, submission_name, user_name, now, worst
        )
    # Resubmission keeps its file rows (ramp-database adds only missing ones).
    sf = rs.submission_files
    have = set(
        conn.execute(select(sf.c.workflow_element_id).where(sf.c.submission_id == submission_id))
        .scalars()
    )
    added_files = False
    for f in files:
        if f.element_id not in have:
            conn.execute(
                insert(sf).values(
                    submission_id=submission_id,
                    workflow_element_id=f.element_id,
                    submission_file_type_extension_id=f.type_extension_id,
                )
            )
            added_files = True
    if added_files:
        _set_n_submissions(conn, event.id)
    _copy_files(Path(event.path_ramp_submissions), submission_id, Path(source_dir), files)
    et = rs.event_teams
    # ramp-board shows this name in the team's sandbox view.
    conn.execute(
        update(et).where(et.c.id == event_team_id).values(last_submission_name=submission_name)
    )
    update_new_leaderboards(conn, event.id, team.id)
    return submission_id


def _check_wait(
    conn: Connection, event: Any, team: Any, event_team_id: int, now: dt.datetime
) -> None:
    admin_level = conn.execute(
        select(rs.users.c.access_level).where(rs.users.c.id == team.admin_id)
    ).scalar()
    if admin_level == "admin":
        return
    s = rs.submissions
    last = conn.execute(
        select(s.c.name, s.c.submission_timestamp)
        .where(s.c.event_team_id == event_team_id)
        .order_by(s.c.submission_timestamp.desc(), s.c.id.desc())
        .limit(1)
    ).first()
    if last is None or last.name == event.ramp_sandbox_name:
        return
    minimum = dt.timedelta(seconds=event.min_duration_between_submissions or 0)
    awaiting = int((minimum - (now - last.submission_timestamp)).total_seconds())
    if awaiting > 0:
        raise AdminError(
            f"team {team.name!r} must wait {awaiting} more seconds before its next submission "
            f"to event {event.name!r}"
        )


def submission_hash(event_name: str, team_name: str, submission_name: str) -> str:
    """ramp-database's ``hash_``: sha1 over event, team and submission names."""
    hasher = hashlib.sha1()
    for part in (event_name, team_name, submission_name):
        hasher.update(part.encode("utf-8"))
    return hasher.hexdigest()


def _insert_submission(
    conn: Connection,
    event: Any,
    team: Any,
    event_team_id: int,
    name: str,
    user_name: str | None,
    now: dt.datetime,
    worst: list[tuple[int, float]],
) -> int:
    s = rs.submissions
    hash_ = submission_hash(event.name, team.name, name)
    if conn.execute(select(s.c.id).where(s.c.hash_ == hash_)).first() is not None:
        raise AdminError(
            f"submission {name!r} of team {team.name!r} at event {event.name!r} has the same "
            "hash as an existing submission; choose another name"
        )
    submission_id = conn.execute(
        insert(s).values(
            event_team_id=event_team_id,
            name=name,
            hash_=hash_,
            submission_timestamp=now,
            sent_to_training_timestamp=None,
            training_timestamp=None,
            user_name=user_name,
            **rs.SUBMISSION_DEFAULTS,
        )
    ).inserted_primary_key[0]
    # Row order (hence ids) as ramp-database: scores by event score type,
    # then per fold its row and its scores, fold-major.
    score_ids = []
    for est_id, value in worst:
        score_ids.append(
            (
                conn.execute(
                    insert(rs.submission_scores).values(
                        submission_id=submission_id,
                        event_score_type_id=est_id,
                        valid_score_cv_bag=value,
                        test_score_cv_bag=value,
                        valid_score_cv_bags=None,
                        test_score_cv_bags=None,
                    )
                ).inserted_primary_key[0],
                value,
            )
        )
    cv = rs.cv_folds
    fold_ids = (
        conn.execute(select(cv.c.id).where(cv.c.event_id == event.id).order_by(cv.c.id))
        .scalars()
        .all()
    )
    for fold_id in fold_ids:
        soc_id = conn.execute(
            insert(rs.submission_on_cv_folds).values(
                submission_id=submission_id, cv_fold_id=fold_id, **rs.SUBMISSION_ON_CV_FOLD_DEFAULTS
            )
        ).inserted_primary_key[0]
        for score_id, value in score_ids:
            conn.execute(
                insert(rs.submission_score_on_cv_folds).values(
                    submission_on_cv_fold_id=soc_id,
                    submission_score_id=score_id,
                    train_score=value,
                    valid_score=value,
                    test_score=value,
                )
            )
    return submission_id


def _resubmit(
    conn: Connection, submission_id: int, now: dt.datetime, worst: dict[int, float]
) -> None:
    """ramp-database's resubmission: state back to new, folds reset.

    Exactly as ramp-database: the submission's own scores, error message and
    contributivity are left as they were (the next run overwrites them).
    """
    s, soc = rs.submissions, rs.submission_on_cv_folds
    conn.execute(
        update(s).where(s.c.id == submission_id).values(state="new", submission_timestamp=now)
    )
    fold_rows = conn.execute(
        select(soc.c.id).where(soc.c.submission_id == submission_id).order_by(soc.c.id)
    ).scalars().all()
    for fold_row_id in fold_rows:
        conn.execute(
            update(soc).where(soc.c.id == fold_row_id).values(**rs.SUBMISSION_ON_CV_FOLD_DEFAULTS)
        )
        _reset_fold_scores(conn, fold_row_id, worst)


def _set_n_submissions(conn: Connection, event_id: int) -> None:
    # ramp-database's Event.set_n_submissions: per team, its submissions minus
    # its sandbox.
    et, s = rs.event_teams, rs.submissions
    n_subs = conn.execute(
        select(func.count(s.c.id))
        .join(et, et.c.id == s.c.event_team_id)
        .where(et.c.event_id == event_id)
    ).scalar_one()
    n_teams = conn.execute(
        select(func.count(et.c.id)).where(et.c.event_id == event_id)
    ).scalar_one()
    e = rs.events
    conn.execute(update(e).where(e.c.id == event_id).values(n_submissions=n_subs - n_teams))


def _copy_files(
    submissions_dir: Path, submission_id: int, source_dir: Path, files: Iterable[_ElementFile]
) -> None:
    dest = submissions_dir / f"submission_{submission_id:09d}"
    if dest.exists() and dest.resolve() == source_dir.resolve():
        return  # resubmitted from its own deployed folder: the files are there
    try:
        # A stale folder (e.g. from a rolled-back transaction) is replaced.
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for f in files:
            shutil.copy2(source_dir / f.f_name, dest / f.f_name)
    except OSError as exc:
        raise AdminError(f"cannot copy the submission files to {dest}: {exc}") from None
