"""dispatcher_daemons: the daemons serving each event, with their circuit breaker

Revision ID: 0007_dispatcher_daemons
Revises: 0006_runs_cascade
Create Date: 2026-12-01

The circuit breaker's state lived only in the daemon, so ``ramp-dispatcher
status`` (which reads the database alone) could not show it. Each daemon now
keeps one row here: when it started, its last heartbeat and when the row is to
be taken as stale, and its breaker's state, cause, since and next probe.

Additive: a new table of ours. Its row goes with its event when ramp-database
deletes one: ``ON DELETE CASCADE`` on PostgreSQL, an ``AFTER DELETE`` trigger on
SQLite (whose connections do not enforce foreign keys; see 0006). Frozen:
names are spelled out here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007_dispatcher_daemons"
down_revision: str | None = "0006_runs_cascade"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

_TABLE = "dispatcher_daemons"
_SQLITE_TRIGGER = "ramp_dispatcher_daemons_of_deleted_event"


def upgrade() -> None:
    op.create_table(
        _TABLE,
        sa.Column("owner", sa.String(200), primary_key=True),
        sa.Column(
            "event_id", sa.Integer, sa.ForeignKey("events.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("worker_type", sa.String(32), nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("heartbeat_at", sa.DateTime, nullable=False),
        sa.Column("stale_after", sa.DateTime, nullable=False),
        sa.Column("breaker_state", sa.String(16), nullable=False),
        sa.Column("breaker_since", sa.DateTime),
        sa.Column("breaker_cause", sa.Text),
        sa.Column("breaker_failures", sa.Integer),
        sa.Column("breaker_next_probe_at", sa.DateTime),
    )
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            sa.text(
                f"CREATE TRIGGER {_SQLITE_TRIGGER} AFTER DELETE ON events FOR EACH ROW "
                f"BEGIN DELETE FROM {_TABLE} WHERE event_id = OLD.id; END"
            )
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute(sa.text(f"DROP TRIGGER IF EXISTS {_SQLITE_TRIGGER}"))
    op.drop_table(_TABLE)
