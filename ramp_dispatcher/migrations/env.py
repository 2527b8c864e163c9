"""Alembic environment for ramp-dispatcher.

There is no alembic.ini: :mod:`ramp_dispatcher.database.migrate` builds the
Config in code and hands over an open connection, already inside the
transaction it wants everything to happen in (so an upgrade is all or nothing,
and adoption checks, stamping and migrating see one consistent database).
"""

from __future__ import annotations

from alembic import context

from ramp_dispatcher.database.migrate import VERSION_TABLE

config = context.config

if context.is_offline_mode():
    # Offline SQL scripts would skip the adoption checks migrate.py makes.
    raise RuntimeError("migrations run online only: use `ramp-dispatcher db upgrade`")

connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "ramp-dispatcher migrations are run by ramp_dispatcher.database.migrate, "
        "which passes the connection in config.attributes['connection']"
    )

context.configure(
    connection=connection,
    # our own name, so we never touch another tool's alembic_version table
    version_table=VERSION_TABLE,
    target_metadata=None,
    on_version_apply=config.attributes.get("on_version_apply"),
)

with context.begin_transaction():
    context.run_migrations()
