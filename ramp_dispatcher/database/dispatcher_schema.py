"""The dispatcher's own objects, added beside ramp-board's tables.

Everything here is additive: a table of runs, a table of the daemons serving
each event, an index that keeps the claim query cheap on large events, and
(PostgreSQL only) a trigger that NOTIFYs the daemon when a submission becomes
``new``. ``db downgrade`` removes exactly these.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from .ramp_schema import metadata

#: PostgreSQL channel the trigger notifies; the payload is the event id.
NOTIFY_CHANNEL = "ramp_dispatcher_new_submission"

# Run lifecycle (``runs.status``): a row is written as ``starting`` before the
# worker is asked to do anything slow, ``running`` once the worker returned a
# handle, ``finished`` once its outcome is known, ``collected`` once the
# results (or the failure) are in ramp-board's tables.
RUN_STARTING = "starting"
RUN_RUNNING = "running"
RUN_FINISHED = "finished"
RUN_COLLECTED = "collected"
ACTIVE_RUN_STATUSES = (RUN_STARTING, RUN_RUNNING, RUN_FINISHED)

runs = Table(
    "dispatcher_runs",
    metadata,
    Column("id", Integer, primary_key=True),
    # Rows go with their submission or event when ramp-database deletes those
    # (migration 0006; on SQLite, where no connection enforces foreign keys,
    # its triggers do it).
    Column(
        "submission_id", Integer, ForeignKey("submissions.id", ondelete="CASCADE"), nullable=False
    ),
    Column("event_id", Integer, ForeignKey("events.id", ondelete="CASCADE"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("worker_type", String(32), nullable=False),
    Column("owner", String(200), nullable=False),
    Column("status", String(16), nullable=False),
    Column("handle", JSON),
    # the submission state this run ended in, and why it failed if it did
    Column("outcome", String(32)),
    Column("failure_class", String(32)),
    Column("message", Text),
    Column("max_ram_mb", Integer),
    Column("created_at", DateTime, nullable=False),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("collected_at", DateTime),
    Column("heartbeat_at", DateTime),
    Column("lease_expires_at", DateTime),
    # an infrastructure failure requeues the submission no earlier than this
    Column("retry_after", DateTime),
    # an admin asked to cancel this run (``ramp-dispatcher cancel``); the daemon
    # holding it stops it and closes it (migration 0003)
    Column("cancel_requested_at", DateTime),
    UniqueConstraint("submission_id", "attempt", name="uq_dispatcher_runs_attempt"),
    Index("ix_dispatcher_runs_event_status", "event_id", "status"),
    Index(
        "ix_dispatcher_runs_retry_after",
        "retry_after",
        postgresql_where=text("retry_after IS NOT NULL"),
        sqlite_where=text("retry_after IS NOT NULL"),
    ),
)

#: Added on ramp-board's ``submissions``: the claim and queue-position queries
#: filter on state and skip the sandbox by name; without it they scan every
#: submission of every event (migration 0005; 0002 indexed state alone).
SUBMISSIONS_STATE_INDEX = "ix_dispatcher_submissions_state_name"
#: Added on ramp-board's ``submission_scores``: writing a result finds a
#: submission's score rows (migration 0004).
SUBMISSION_SCORES_INDEX = "ix_dispatcher_submission_scores_submission"
#: Indexes we add to ramp-board's tables (all named ix_dispatcher_*).
OUR_INDEX_PREFIX = "ix_dispatcher_"

#: One row per serving daemon (migration 0007), so that ``status``, which reads
#: only the database, can show what lives in the daemon: its circuit breaker.
#: Written at start, on the lease heartbeat (once per poll interval) and when
#: the breaker changes, never per run; deleted on a clean stop. A row whose
#: ``stale_after`` passed (or whose process on this host is gone) is a daemon
#: that stopped without saying so: ``status`` shows it as stale.
daemons = Table(
    "dispatcher_daemons",
    metadata,
    Column("owner", String(200), primary_key=True),  # as on its runs: host:pid:start:random
    # goes with its event (PostgreSQL: the cascade; SQLite: 0007's trigger)
    Column("event_id", Integer, ForeignKey("events.id", ondelete="CASCADE"), nullable=False),
    Column("worker_type", String(32), nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("heartbeat_at", DateTime, nullable=False),
    Column("stale_after", DateTime, nullable=False),
    # the circuit breaker (breaker.BreakerSnapshot)
    Column("breaker_state", String(16), nullable=False),
    Column("breaker_since", DateTime),
    Column("breaker_cause", Text),
    Column("breaker_failures", Integer),
    Column("breaker_next_probe_at", DateTime),
)
