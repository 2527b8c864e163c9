"""dispatcher_runs.cancel_requested_at: an admin's cancel of a running submission

Revision ID: 0003_cancel_requests
Revises: 0002_dispatcher_runs
Create Date: 2025-01-02

``ramp-dispatcher cancel`` cannot stop a run itself (it may run on another
host, under another daemon): it records the request on the run, and the
daemon that holds the run stops it and closes it. Additive: one nullable
column on our own table; ramp-board's tables are untouched.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003_cancel_requests"
down_revision: str | None = "0002_dispatcher_runs"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    op.add_column("dispatcher_runs", sa.Column("cancel_requested_at", sa.DateTime, nullable=True))


def downgrade() -> None:
    # SQLite >= 3.35 drops a column in place; the column has no index or constraint
    op.drop_column("dispatcher_runs", "cancel_requested_at")
