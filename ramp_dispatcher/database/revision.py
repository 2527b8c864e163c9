"""Which schema revision a database is at, read without Alembic.

The daemon checks the revision at every start. Importing Alembic for that one
SELECT costs a fifth of a second of CPU, so this module reads our version table
with plain SQL; :mod:`.migrate` (which does need Alembic) builds on it, and a
test keeps :data:`REVISIONS` equal to the migration scripts' history.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Connection, Engine, inspect, text

from ..errors import UserError

#: Our migrations, oldest first (linear history).
REVISIONS: tuple[str, ...] = (
    "0001_ramp_board_baseline",
    "0002_dispatcher_runs",
    "0003_cancel_requests",
    "0004_lookup_indexes",
    "0005_waiting_index",
    "0006_runs_cascade",
    "0007_dispatcher_daemons",
)
#: Revision that stands for ramp-board 0.10.1's schema as ramp-database creates it.
BASELINE = REVISIONS[0]
#: Latest revision; the daemon refuses to start on anything else.
HEAD = REVISIONS[-1]
#: Our own version table: never collides with another tool's ``alembic_version``.
VERSION_TABLE = "ramp_dispatcher_alembic_version"


def read(conn: Connection) -> str | None:
    """The revision recorded in our version table, or None if we do not manage it."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    heads = [row[0] for row in conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))]
    if len(heads) > 1:  # our history is linear; several rows means hand edits
        raise UserError(f"{VERSION_TABLE} holds several revisions {sorted(heads)}: fix it by hand")
    return heads[0] if heads else None


def current(engine: Engine) -> str | None:
    """:func:`read` in a read-only transaction of its own."""
    with engine.connect() as conn:
        # read-only: lets SQLite readers skip BEGIN IMMEDIATE's write lock
        conn.execution_options(sqlite_readonly=True)
        with conn.begin():
            return read(conn)


def require_head(engine: Engine, config_path: str | Path | None = None) -> None:
    """Raise :class:`UserError` unless the schema is at :data:`HEAD` (daemon start-up)."""
    cur = current(engine)
    if cur == HEAD:
        return
    if cur is not None and cur not in REVISIONS:
        raise UserError(
            f"database schema is at {cur}, which this ramp-dispatcher does not know "
            f"(a newer ramp-dispatcher migrated it; this one needs {HEAD}): "
            "upgrade ramp-dispatcher"
        )
    where = "none (not managed by ramp-dispatcher)" if cur is None else cur
    config = str(config_path) if config_path is not None else "<server config.yml>"
    raise UserError(
        f"database schema is at {where}, ramp-dispatcher needs {HEAD}: "
        f"run `ramp-dispatcher db upgrade --config {config}`"
    )
