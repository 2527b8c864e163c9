"""Alembic scripts for ramp-dispatcher's schema; run them through
:mod:`ramp_dispatcher.database.migrate` (``ramp-dispatcher db upgrade``), which
decides whether a database is created, adopted or already up to date."""
