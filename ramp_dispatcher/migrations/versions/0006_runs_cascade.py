"""dispatcher_runs rows go with their submission or event (ramp-database's delete_event)

Revision ID: 0006_runs_cascade
Revises: 0005_waiting_index
Create Date: 2026-12-01

ramp-database deletes an event (``tools.event.delete_event``) or a submission
through its ORM, which knows nothing of our runs table: on PostgreSQL the
foreign keys of ``dispatcher_runs`` refused the DELETE, and on SQLite (where
neither ramp-database nor we turn foreign keys on) the runs were left behind,
pointing at ids that SQLite may hand out again.

- PostgreSQL: both foreign keys are re-created with ``ON DELETE CASCADE``.
- SQLite: a foreign key clause only acts with ``PRAGMA foreign_keys=ON``, which
  no ramp-board connection sets, so two ``AFTER DELETE`` triggers (on
  ``submissions`` and ``events``) delete the runs instead; they act whatever
  the connection's settings.

Only our table's constraints and our own triggers change; ramp-board's rows and
columns are untouched. Frozen: names are spelled out here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006_runs_cascade"
down_revision: str | None = "0005_waiting_index"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

_TABLE = "dispatcher_runs"
#: (our column, the referred table), and the names PostgreSQL gave 0002's
#: unnamed constraints (``<table>_<column>_fkey``)
_FKS = (
    ("submission_id", "submissions", "dispatcher_runs_submission_id_fkey"),
    ("event_id", "events", "dispatcher_runs_event_id_fkey"),
)
#: SQLite triggers: (name, the table whose row is deleted, our column)
_SQLITE_TRIGGERS = (
    ("ramp_dispatcher_runs_of_deleted_submission", "submissions", "submission_id"),
    ("ramp_dispatcher_runs_of_deleted_event", "events", "event_id"),
)


def _pg_fk_name(column: str, default: str) -> str:
    """The constraint's actual name (0002 left the naming to the server)."""
    for fk in sa.inspect(op.get_bind()).get_foreign_keys(_TABLE):
        if fk["constrained_columns"] == [column]:
            return fk["name"] or default
    return default


def _recreate_pg_fks(ondelete: str | None) -> None:
    for column, referred, default in _FKS:
        name = _pg_fk_name(column, default)
        op.drop_constraint(name, _TABLE, type_="foreignkey")
        op.create_foreign_key(name, _TABLE, referred, [column], ["id"], ondelete=ondelete)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _recreate_pg_fks("CASCADE")
        return
    for name, table, column in _SQLITE_TRIGGERS:
        op.execute(
            sa.text(
                f"CREATE TRIGGER {name} AFTER DELETE ON {table} FOR EACH ROW "
                f"BEGIN DELETE FROM {_TABLE} WHERE {column} = OLD.id; END"
            )
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _recreate_pg_fks(None)
        return
    for name, _table, _column in _SQLITE_TRIGGERS:
        op.execute(sa.text(f"DROP TRIGGER IF EXISTS {name}"))
