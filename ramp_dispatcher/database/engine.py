"""Engines for PostgreSQL (ramp-board's production database) and SQLite.

SQLite gets WAL (readers never block the writer), a busy timeout, and
``BEGIN IMMEDIATE`` for every transaction: SQLite has one writer, so taking the
write lock up front is what makes a claim atomic between two daemons, and it
avoids the "database is locked" error of a deferred read upgraded to a write.
Read-only work can opt out with ``engine.connect().execution_options(sqlite_readonly=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalise_url(url: str | URL) -> URL:
    """Plain ``postgresql`` means psycopg2 (SQLAlchemy 2.1 would pick psycopg 3)."""
    url = make_url(url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg2")
    return url


def url_from_sqlalchemy_section(section: dict[str, Any], base_dir: Path) -> URL:
    """Build a URL from ramp-board's ``sqlalchemy`` config section.

    A relative SQLite path is taken relative to the config file's folder, so
    that a service started from ``/`` finds the same file as an admin in a shell.
    """
    drivername = str(section["drivername"])
    database = section.get("database")
    if drivername.startswith("sqlite") and database and database != ":memory:":
        path = Path(str(database)).expanduser()
        database = str(path if path.is_absolute() else (base_dir / path).resolve())
    url = URL.create(
        drivername=drivername,
        username=section.get("username"),
        password=None if section.get("password") is None else str(section["password"]),
        host=section.get("host"),
        port=None if section.get("port") in (None, "") else int(section["port"]),
        database=None if database is None else str(database),
    )
    return normalise_url(url)


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    url = normalise_url(url)
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, pool_pre_ping=True, **kwargs)
        _configure_sqlite(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's own
        # implicit transactions would defer the lock).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        if engine.url.database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        readonly = conn.get_execution_options().get("sqlite_readonly", False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")
