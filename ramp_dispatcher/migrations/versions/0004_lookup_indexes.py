"""Indexes that keep the daemon's per-cycle statements flat at 100k submissions

Revision ID: 0004_lookup_indexes
Revises: 0003_cancel_requests
Create Date: 2026-11-24

bench/scale.py found two scans that grow with the event (bench/RESULTS.md):
writing a result looks up ``submission_scores`` by submission, which
ramp-board does not index, and the claim's retry-backoff test reads
``dispatcher_runs.retry_after``, NULL on almost every row. Additive: two
indexes, no row or column changes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004_lookup_indexes"
down_revision: str | None = "0003_cancel_requests"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_dispatcher_submission_scores_submission", "submission_scores", ["submission_id"]
    )
    # partial: only the few runs that wait out a backoff are indexed
    op.create_index(
        "ix_dispatcher_runs_retry_after",
        "dispatcher_runs",
        ["retry_after"],
        postgresql_where=sa.text("retry_after IS NOT NULL"),
        sqlite_where=sa.text("retry_after IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_dispatcher_runs_retry_after", table_name="dispatcher_runs")
    op.drop_index("ix_dispatcher_submission_scores_submission", table_name="submission_scores")
