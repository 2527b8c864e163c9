"""Index the waiting submissions by (state, name), so the sandboxes are skipped

Revision ID: 0005_waiting_index
Revises: 0004_lookup_indexes
Create Date: 2026-12-01

Every team's sandbox submission stays in state ``new`` forever, so at 100k
submissions the claim and queue-position queries walked 5,000 sandbox rows
through the index on ``state`` alone (bench/RESULTS.md, scale). With ``name``
in the index they read only the waiting rows: the queries spell "not the
sandbox" as two ranges (``name < :sandbox OR name > :sandbox``), which both
PostgreSQL and SQLite take from the index. Replaces 0002's
``ix_dispatcher_submissions_state``, a prefix of the new one. Additive to
ramp-board's data: no row or column changes.
"""

from __future__ import annotations

from alembic import op

revision: str = "0005_waiting_index"
down_revision: str | None = "0004_lookup_indexes"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    op.create_index("ix_dispatcher_submissions_state_name", "submissions", ["state", "name"])
    op.drop_index("ix_dispatcher_submissions_state", table_name="submissions")


def downgrade() -> None:
    op.create_index("ix_dispatcher_submissions_state", "submissions", ["state"])
    op.drop_index("ix_dispatcher_submissions_state_name", table_name="submissions")
