"""Schema migrations: create, adopt, upgrade and downgrade the database.

ramp-database has no migrations: it builds its schema with ``create_all``. So a
database we are pointed at is one of:

* empty: we create ramp-board 0.10.1's tables (revision :data:`BASELINE`), then
  ours;
* made by ramp-database (all of ramp-board's tables, no version table of ours):
  we *adopt* it: check the tables and columns the dispatcher uses, record the
  baseline as applied without running it (``alembic stamp``), then apply only
  our additive migrations; no existing row or column changes;
* already managed by us (``ramp_dispatcher_alembic_version`` has a revision):
  plain Alembic upgrade, or nothing if already there;
* anything else (part of ramp-board's tables, or unrelated tables): refused,
  since creating or stamping ramp-board's schema there would be a guess.

Downgrade removes only what we added. Going below the baseline ("base") is
where ramp-board's tables would be dropped, and they hold a challenge's users,
submissions and scores. Policy:

* adopted database (no :data:`MARKER_TABLE`, which only a *run* baseline
  creates): "base" un-adopts: our objects and our version table go, ramp-board's
  tables and rows stay exactly as they were, since they are not ours to drop;
* database created by our baseline: its tables are dropped only if every one of
  them is empty; otherwise refused (drop the database yourself if you mean it).

Every call runs in one transaction (PostgreSQL has transactional DDL; SQLite
runs DDL inside ``BEGIN IMMEDIATE`` from :func:`..engine.make_engine`), under a
PostgreSQL advisory lock, so two admins upgrading at once cannot interleave and
a failure leaves the database as it was.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, func, inspect, select, table, text

from ..errors import UserError
from . import ramp_schema
from .revision import BASELINE, HEAD, VERSION_TABLE, current, require_head
from .revision import read as read_revision

__all__ = [
    "BASELINE",
    "HEAD",
    "VERSION_TABLE",
    "MARKER_TABLE",
    "RAMP_BOARD_TABLES",
    "upgrade",
    "downgrade",
    "current",
    "require_head",
]

#: Created by the baseline only when it actually runs: "we created ramp-board's tables".
MARKER_TABLE = "ramp_dispatcher_baseline"
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

RAMP_BOARD_VERSION = "0.10.1"
#: Every table ramp-database 0.10.1 creates (frozen: this is what BASELINE means).
RAMP_BOARD_TABLES: tuple[str, ...] = (
    "extensions",
    "keywords",
    "score_types",
    "submission_file_types",
    "users",
    "workflows",
    "problems",
    "submission_file_type_extensions",
    "teams",
    "workflow_element_types",
    "events",
    "problem_keywords",
    "user_teams",
    "workflow_elements",
    "cv_folds",
    "event_admins",
    "event_score_types",
    "event_teams",
    "submissions",
    "historical_contributivity",
    "submission_files",
    "submission_on_cv_folds",
    "submission_scores",
    "submission_similaritys",
    "submission_score_on_cv_folds",
    "user_interactions",
)
#: Its PostgreSQL enum types, named as ramp-database names them.
RAMP_BOARD_ENUMS: tuple[str, ...] = (
    "access_level",
    "cv_fold_types",
    "status",
    "submission_similarity_type",
    "submission_states",
    "submission_types",
    "user_interaction_type",
)
#: Tables the dispatcher reads or writes; adoption checks each has every
#: column ramp_schema declares for it (our queries and inserts use them all).
DISPATCHER_TABLES: tuple[str, ...] = (
    "workflows",
    "problems",
    "events",
    "teams",
    "event_teams",
    "score_types",
    "event_score_types",
    "cv_folds",
    "submissions",
    "submission_on_cv_folds",
    "submission_scores",
    "submission_score_on_cv_folds",
)
#: Objects 0002 adds on PostgreSQL (for checks and messages; 0002 has its own frozen copy).
NOTIFY_FUNCTION = "ramp_dispatcher_notify_new_submission"
NOTIFY_TRIGGER = "ramp_dispatcher_new_submission"
RUNS_TABLE = "dispatcher_runs"
DAEMONS_TABLE = "dispatcher_daemons"

_OUR_TABLES = frozenset({VERSION_TABLE, MARKER_TABLE, RUNS_TABLE, DAEMONS_TABLE})
# Arbitrary constant key ("RDMG") for pg_advisory_xact_lock: serialises migrations.
_PG_LOCK_KEY = 0x52444D47


# --------------------------------------------------------------------------- public API


def upgrade(engine: Engine, revision: str = "head") -> list[str]:
    """Bring the schema to ``revision`` ("head", "baseline" or a revision id).

    Creates an empty database, adopts a ramp-database one, upgrades one we
    manage, or does nothing when already there. Returns what it did, one line
    per step, for the admin. Raises :class:`UserError` when the database is not
    something we may touch.
    """
    target = _alias(revision)
    if target == "base":
        raise UserError("`db upgrade base` makes no sense: use `ramp-dispatcher db downgrade base`")
    lines: list[str] = []
    with engine.begin() as conn:
        _lock(conn)
        cfg = _alembic_config(conn, lines)
        script = ScriptDirectory.from_config(cfg)
        target = _known_revision(script, target)
        cur = read_revision(conn)
        if cur is not None:
            _known_revision(script, cur, in_database=True)
            if cur == target:
                return [f"database schema already at {_describe(cur)}: nothing to do"]
            if target in _ancestors(script, cur):
                raise UserError(
                    f"database schema is at {_describe(cur)}, beyond {_describe(target)}: "
                    f"use `ramp-dispatcher db downgrade {target}` to go back"
                )
            lines.append(f"database schema at {_describe(cur)}: upgrading")
            _run(command.upgrade, cfg, target)
        else:
            kind, detail = _survey(conn)
            if kind == "empty":
                ours = ", then ramp-dispatcher's" if target != BASELINE else ""
                lines.append(
                    f"empty database: creating ramp-board {RAMP_BOARD_VERSION}'s tables{ours}"
                )
                _run(command.upgrade, cfg, target)
            else:  # "ramp-board": refusals were raised by _survey
                lines.append(
                    f"ramp-board database found ({len(RAMP_BOARD_TABLES)} tables): adopting it; "
                    "its tables, columns and rows are left as they are"
                )
                if detail:
                    lines.append(f"other tables left alone: {', '.join(detail)}")
                _run(command.stamp, cfg, BASELINE)
                if target != BASELINE:
                    _run(command.upgrade, cfg, target)
        lines.append(f"database schema now at {_describe(target)}")
    return lines


def downgrade(engine: Engine, revision: str = "baseline") -> list[str]:
    """Remove ramp-dispatcher's objects down to ``revision`` ("baseline" by default).

    "baseline" leaves ramp-board's schema exactly as ramp-database makes it.
    "base" also removes our version table; ramp-board's tables are dropped
    only if our baseline created them and they are all empty (see the module
    docstring), otherwise they stay (adopted) or the call is refused (data).
    """
    target = _alias(revision)
    lines: list[str] = []
    with engine.begin() as conn:
        _lock(conn)
        cfg = _alembic_config(conn, lines)
        script = ScriptDirectory.from_config(cfg)
        cur = read_revision(conn)
        if cur is None:
            return ["database is not managed by ramp-dispatcher: nothing to downgrade"]
        _known_revision(script, cur, in_database=True)
        had_runs = _count_rows(conn, RUNS_TABLE) if _has_table(conn, RUNS_TABLE) else None

        if target == "base":
            if _has_table(conn, MARKER_TABLE):
                non_empty = {
                    name: n for name in RAMP_BOARD_TABLES if (n := _count_rows(conn, name))
                }
                if non_empty:
                    counts = ", ".join(f"{name} ({n})" for name, n in non_empty.items())
                    raise UserError(
                        "refusing `db downgrade base`: it would drop ramp-board's tables, "
                        f"which hold rows: {counts}. To remove only ramp-dispatcher's "
                        "objects use `ramp-dispatcher db downgrade baseline`; to throw the "
                        "whole challenge away, drop the database yourself"
                    )
                _run(command.downgrade, cfg, "base")
                lines.append(
                    "dropped ramp-board's tables: ramp-dispatcher's baseline had created "
                    "them and they were empty"
                )
            else:
                if cur != BASELINE:
                    _run(command.downgrade, cfg, BASELINE)
                _run(command.stamp, cfg, "base")
                lines.append(
                    f"left ramp-board's {len(RAMP_BOARD_TABLES)} tables and their rows in place: "
                    "ramp-dispatcher adopted them from ramp-database, they are not its to drop"
                )
            # nothing of ours may remain: the database is as before our first upgrade
            conn.execute(text(f"DROP TABLE {VERSION_TABLE}"))
            final = f"dropped {VERSION_TABLE}: database no longer managed by ramp-dispatcher"
        else:
            target = _known_revision(script, target)
            if cur == target:
                return [f"database schema already at {_describe(cur)}: nothing to do"]
            if target not in _ancestors(script, cur):
                raise UserError(
                    f"database schema is at {_describe(cur)}, below {_describe(target)}: "
                    f"use `ramp-dispatcher db upgrade {target}`"
                )
            _run(command.downgrade, cfg, target)
            final = f"database schema now at {_describe(target)}"
        if had_runs is not None and not _has_table(conn, RUNS_TABLE):
            lines.append(f"dropped {RUNS_TABLE} with its {had_runs} run record(s)")
        lines.append(final)
    return lines


# --------------------------------------------------------------------------- internals


def _alias(revision: str) -> str:
    return {"head": HEAD, "heads": HEAD, "baseline": BASELINE}.get(revision, revision)


def _describe(rev: str) -> str:
    names = {HEAD: "head", BASELINE: "ramp-board baseline"}
    return f"{rev} ({names[rev]})" if rev in names else rev


def _alembic_config(conn: Connection | None, lines: list[str]) -> Config:
    """Alembic Config built in code: no alembic.ini to ship or to find."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = conn
    cfg.attributes["on_version_apply"] = partial(_record_step, lines)
    return cfg


def _record_step(
    lines: list[str], ctx: MigrationContext, step: MigrationInfo, heads: Any, run_args: Any
) -> None:
    """Alembic's on_version_apply hook: one line per step, for the admin."""
    rev = step.up_revision
    doc = (rev.doc or "").strip().splitlines()[0] if rev is not None and rev.doc else ""
    if step.is_stamp:
        verb = "stamped" if step.is_upgrade else "unstamped"
        how = "recorded as applied, not run" if step.is_upgrade else "record removed, not reverted"
        lines.append(f"{verb} {step.up_revision_id} ({how}): {doc}")
    else:
        verb = "applied" if step.is_upgrade else "reverted"
        lines.append(f"{verb} {step.up_revision_id}: {doc}")


def _run(fn: Any, cfg: Config, revision: str) -> None:
    try:
        fn(cfg, revision)
    except CommandError as exc:  # e.g. an unknown revision
        raise UserError(f"migration failed: {exc}") from exc


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        # released at commit/rollback; SQLite is already serialised by BEGIN IMMEDIATE
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})


def _is_known(script: ScriptDirectory, rev: str) -> bool:
    try:
        return script.get_revision(rev) is not None
    except CommandError:  # unknown or ambiguous id
        return False


def _known_revision(script: ScriptDirectory, rev: str, in_database: bool = False) -> str:
    """The full revision id of ``rev``, or UserError."""
    if _is_known(script, rev):
        found = script.get_revision(rev)
        assert found is not None
        return found.revision
    if in_database:
        raise UserError(
            f"database schema is at {rev}, which this ramp-dispatcher does not know "
            "(a newer ramp-dispatcher migrated it): upgrade ramp-dispatcher"
        )
    known = ", ".join(s.revision for s in script.walk_revisions())
    raise UserError(f"unknown revision {rev!r}: use head, baseline, base or one of {known}")


def _ancestors(script: ScriptDirectory, rev: str) -> set[str]:
    """Revisions strictly below ``rev``."""
    return {s.revision for s in script.iterate_revisions(rev, "base")} - {rev}


def _has_table(conn: Connection, name: str) -> bool:
    return inspect(conn).has_table(name)


def _count_rows(conn: Connection, name: str) -> int:
    return int(conn.execute(select(func.count()).select_from(table(name))).scalar_one())


def _survey(conn: Connection) -> tuple[str, list[str]]:
    """Classify an unmanaged database: ("empty", []) or ("ramp-board", other tables).

    Raises UserError for anything we must not touch, naming what is wrong.
    """
    insp = inspect(conn)
    names = set(insp.get_table_names())
    ramp = names & set(RAMP_BOARD_TABLES)
    ours = names & (_OUR_TABLES - {VERSION_TABLE})
    others = sorted(names - set(RAMP_BOARD_TABLES) - _OUR_TABLES)
    if ours:
        # our tables without a recorded revision: someone edited the version table
        raise UserError(
            f"database has ramp-dispatcher's {', '.join(sorted(ours))} but no revision in "
            f"{VERSION_TABLE}: it was edited by hand; refusing to guess its state"
        )
    if not ramp:
        if not others:
            return "empty", []
        raise UserError(
            "database is neither empty nor a ramp-board database: it holds "
            f"{_list(others)}. ramp-dispatcher creates ramp-board's schema only in an "
            "empty database and adopts only a database ramp-database created; "
            "point it at one of those"
        )
    missing = [t for t in RAMP_BOARD_TABLES if t not in ramp]
    if missing:
        raise UserError(
            f"database has only {len(ramp)} of ramp-board {RAMP_BOARD_VERSION}'s "
            f"{len(RAMP_BOARD_TABLES)} tables (missing: {', '.join(missing)}): it is not a "
            "database ramp-database created, or it is damaged; refusing to adopt it"
        )
    problems = []
    for name in DISPATCHER_TABLES:
        have = {c["name"] for c in insp.get_columns(name)}
        declared = ramp_schema.metadata.tables[name].c
        problems += [f"{name}.{c.name}" for c in declared if c.name not in have]
    if problems:
        raise UserError(
            f"ramp-board database lacks column(s) ramp-dispatcher uses: {_list(problems)} "
            f"(ramp-dispatcher needs ramp-board {RAMP_BOARD_VERSION}'s schema); "
            "refusing to adopt it"
        )
    return "ramp-board", others


def _list(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
