"""Engines for PostgreSQL (ramp-board's production database) and SQLite.

SQLite gets WAL (readers never block the writer), a busy timeout, and
``BEGIN IMMEDIATE`` for every transaction: SQLite has one writer, so taking the
write lock up front is what makes a claim atomic between two daemons, and it
avoids the "database is locked" error of a deferred read upgraded to a write.
Read-only work can opt out with ``engine.connect().execution_options(sqlite_readonly=True)``.

Connections dropped by the server (a restart, a terminated backend) are
replaced before use when they have been idle a while (:data:`PING_AFTER_IDLE_S`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import URL, make_url

SQLITE_BUSY_TIMEOUT_MS = 30_000
#: A pooled connection unused for longer than this is pinged (``SELECT 1``)
#: when it is checked out, and replaced, with every other pooled connection,
#: if the server dropped it. SQLAlchemy's ``pool_pre_ping`` pings at every
#: checkout: one round trip more per transaction, a sixth of the daemon's
#: while runs come and go (bench/RESULTS.md). A connection used less than this
#: ago is handed out as is: if the server dropped it in that moment, the
#: transaction fails as a disconnect, SQLAlchemy invalidates the pool, and the
#: caller's next try (the loop's next cycle) gets a new connection.
PING_AFTER_IDLE_S = 2.0
#: ``ConnectionPoolEntry.info`` key: when the connection was last checked in
_LAST_USED = "ramp_dispatcher_last_used"


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
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine)
    else:
        # LIFO: the connection used last is used again, the others stay idle
        # (and are pinged when they are needed again)
        options: dict[str, Any] = {"pool_use_lifo": True}
        if url.get_driver_name() == "psycopg2":
            # a result's per-fold UPDATEs (executemany) in one round trip per
            # 100 rows (psycopg2's execute_batch), not one per row
            options["executemany_mode"] = "values_plus_batch"
        engine = create_engine(url, **{**options, **kwargs})
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection at checkout when it was idle for more than
    :data:`PING_AFTER_IDLE_S`; one the server dropped is replaced."""

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_conn: Any, record: Any) -> None:
        if dbapi_conn is not None:  # None: invalidated
            record.info[_LAST_USED] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        last = record.info.get(_LAST_USED)  # None: a new connection (info is cleared on reconnect)
        if last is None or time.monotonic() - last < PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as error:
            # the pool replaces this connection and every older one, as its
            # own pre-ping does, and checks out again
            raise exc.InvalidatePoolError(f"idle connection dropped by the server: {error}") from error


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
