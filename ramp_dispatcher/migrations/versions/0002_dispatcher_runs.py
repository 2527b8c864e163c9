"""ramp-dispatcher's own objects: dispatcher_runs, an index on submissions.state, the NOTIFY trigger

Revision ID: 0002_dispatcher_runs
Revises: 0001_ramp_board_baseline
Create Date: 2025-01-01

Additive only: a new table, an index (no row or column of ramp-board changes),
and on PostgreSQL a trigger that wakes the daemon through LISTEN/NOTIFY when a
submission becomes ``new``. Frozen: everything is spelled out here rather than
taken from ``dispatcher_schema`` (which will keep evolving).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002_dispatcher_runs"
down_revision: str | None = "0001_ramp_board_baseline"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

_CHANNEL = "ramp_dispatcher_new_submission"
_FUNCTION = "ramp_dispatcher_notify_new_submission"
_TRIGGER = "ramp_dispatcher_new_submission"

# The payload is the event id so that a daemon (one per event) wakes only for
# its own event. AFTER trigger: the return value is ignored, NULL is fine.
_CREATE_FUNCTION = f"""
CREATE FUNCTION {_FUNCTION}() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        '{_CHANNEL}',
        (SELECT event_id FROM event_teams WHERE id = NEW.event_team_id)::text
    );
    RETURN NULL;
END;
$$
"""

# UPDATE OF state: ramp-database's ORM only lists changed columns in its
# UPDATEs, so edits of other columns of a 'new' submission do not wake anyone.
# EXECUTE PROCEDURE (not FUNCTION) keeps PostgreSQL < 11 servers working.
_CREATE_TRIGGER = f"""
CREATE TRIGGER {_TRIGGER}
AFTER INSERT OR UPDATE OF state ON submissions
FOR EACH ROW WHEN (NEW.state = 'new')
EXECUTE PROCEDURE {_FUNCTION}()
"""


def upgrade() -> None:
    op.create_table(
        "dispatcher_runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("submission_id", sa.Integer, sa.ForeignKey("submissions.id"), nullable=False),
        sa.Column("event_id", sa.Integer, sa.ForeignKey("events.id"), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("worker_type", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("handle", sa.JSON),
        sa.Column("outcome", sa.String(32)),
        sa.Column("failure_class", sa.String(32)),
        sa.Column("message", sa.Text),
        sa.Column("max_ram_mb", sa.Integer),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("collected_at", sa.DateTime),
        sa.Column("heartbeat_at", sa.DateTime),
        sa.Column("lease_expires_at", sa.DateTime),
        sa.Column("retry_after", sa.DateTime),
        sa.UniqueConstraint("submission_id", "attempt", name="uq_dispatcher_runs_attempt"),
    )
    op.create_index("ix_dispatcher_runs_event_status", "dispatcher_runs", ["event_id", "status"])
    # the claim and queue-position queries filter submissions on state
    op.create_index("ix_dispatcher_submissions_state", "submissions", ["state"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(sa.text(_CREATE_FUNCTION))
        op.execute(sa.text(_CREATE_TRIGGER))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(sa.text(f"DROP TRIGGER IF EXISTS {_TRIGGER} ON submissions"))
        op.execute(sa.text(f"DROP FUNCTION IF EXISTS {_FUNCTION}()"))
    op.drop_index("ix_dispatcher_submissions_state", table_name="submissions")
    op.drop_index("ix_dispatcher_runs_event_status", table_name="dispatcher_runs")
    op.drop_table("dispatcher_runs")
