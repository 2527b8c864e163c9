"""Which database errors mean "the database is away", and which are bugs.

Only connection-level errors are an outage: the server is down or restarting,
the network dropped, the connection was closed under us, SQLite's file is
locked or cannot be opened. The daemon keeps its runs and tries again. Any
other error (an integrity, data or programming error) is a bug in a statement
or in the data it met: logged with what the statement was for, and the loop
goes on; it must never be reported as "database unavailable".
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError

#: SQLite's operational errors that say the file is away or busy (its others,
#: such as "no such table", are bugs)
_SQLITE_UNAVAILABLE = ("database is locked", "unable to open database", "disk i/o error", "database is busy")
#: PostgreSQL SQLSTATE classes of an outage: connection exception, operator
#: intervention (shutdown, restart), insufficient resources (too many connections)
_PG_UNAVAILABLE = ("08", "57P", "53")


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means the database cannot be reached right now."""
    if isinstance(exc, DisconnectionError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return True
    module = type(exc.orig).__module__ if exc.orig is not None else ""
    if module.startswith("sqlite3"):
        # SQLite says "busy" or "cannot open" in its message, whatever the class
        text = str(exc.orig).lower()
        return any(s in text for s in _SQLITE_UNAVAILABLE)
    if not isinstance(exc, OperationalError):
        return False  # IntegrityError, DataError, ProgrammingError, ...
    # psycopg2: OperationalError is the connection's class (server gone, refused,
    # admin shutdown, SSL drop); its subclasses for conflicts are not outages
    code = getattr(exc.orig, "pgcode", None)
    return code is None or str(code).startswith(_PG_UNAVAILABLE)


def statement_of(exc: BaseException) -> str:
    """The failing statement's first words, for a log line ('' when unknown)."""
    statement = getattr(exc, "statement", None) or ""
    words = " ".join(str(statement).split())
    return words if len(words) <= 120 else words[:117] + "..."
