"""ramp-board 0.10.1 baseline: its 26 tables and PostgreSQL enum types

Revision ID: 0001_ramp_board_baseline
Revises:
Create Date: 2025-01-01

Runs only on an empty database. On a database ramp-database already created,
``ramp_dispatcher.database.migrate`` stamps this revision without running it
("adoption"). This revision therefore also creates a one-row marker table,
``ramp_dispatcher_baseline``: its presence is the record that *we* created
ramp-board's tables, which is the only case in which ``downgrade`` may drop them.

Using ``ramp_schema.metadata`` here (instead of spelling out op.create_table
for 26 tables) is deliberate: ramp_schema describes a frozen external version,
ramp-board 0.10.1, and is tested column for column against ramp-database's own
``create_all``; our own, evolving tables are never created from live metadata.
"""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

from ramp_dispatcher.database import ramp_schema
from ramp_dispatcher.database.migrate import (
    MARKER_TABLE,
    RAMP_BOARD_ENUMS,
    RAMP_BOARD_TABLES,
    RAMP_BOARD_VERSION,
)

revision: str = "0001_ramp_board_baseline"
down_revision: str | None = None
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def _ramp_tables() -> list[sa.Table]:
    # by name: ramp_schema.metadata also holds our own tables (dispatcher_runs)
    return [ramp_schema.metadata.tables[name] for name in RAMP_BOARD_TABLES]


def upgrade() -> None:
    bind = op.get_bind()
    # checkfirst=False: migrate.py only runs this on an empty database, and an
    # existing table here means something is wrong, not something to skip.
    ramp_schema.metadata.create_all(bind, tables=_ramp_tables(), checkfirst=False)
    marker = op.create_table(
        MARKER_TABLE,
        sa.Column("ramp_board_version", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.bulk_insert(
        marker,
        [
            {
                "ramp_board_version": RAMP_BOARD_VERSION,
                # naive UTC, like every timestamp ramp-board stores
                "created_at": datetime.now(timezone.utc).replace(tzinfo=None),
            }
        ],
    )


def downgrade() -> None:
    bind = op.get_bind()
    # Second line of defence behind migrate.downgrade's policy: never drop
    # ramp-board tables this revision did not create (an adopted database).
    if not sa.inspect(bind).has_table(MARKER_TABLE):
        raise RuntimeError(
            f"no {MARKER_TABLE} table: ramp-board's tables were adopted, not created "
            "by ramp-dispatcher, so its baseline downgrade will not drop them"
        )
    ramp_schema.metadata.drop_all(bind, tables=_ramp_tables(), checkfirst=False)
    if bind.dialect.name == "postgresql":
        # drop_all drops these with their tables already; IF EXISTS makes sure
        # nothing of ramp-board's is left behind whatever SQLAlchemy decides.
        for enum_name in RAMP_BOARD_ENUMS:
            op.execute(sa.text(f'DROP TYPE IF EXISTS "{enum_name}"'))
    op.drop_table(MARKER_TABLE)
