"""What every admin command shares: its error type and rows found by name.

A name that matches nothing gets an error listing the names that exist.
The underscore names are shared by the modules of this package only.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select

from ...errors import UserError
from .. import ramp_schema as rs


class AdminError(UserError):
    """An admin command cannot be carried out; the message says what to fix."""


# String(20) columns: PostgreSQL rejects longer values, SQLite would keep them.
MAX_NAME_LENGTH = 20


def _known(conn: Connection, column: Any) -> str:
    names = sorted(conn.execute(select(column)).scalars())
    if not names:
        return "none in the database"
    shown = ", ".join(repr(n) for n in names[:10])
    return f"known: {shown}" + (", ..." if len(names) > 10 else "")


def _problem_row(conn: Connection, name: str) -> Any:
    row = conn.execute(select(rs.problems).where(rs.problems.c.name == name)).one_or_none()
    if row is None:
        raise AdminError(f"unknown problem {name!r} ({_known(conn, rs.problems.c.name)})")
    return row


def _event_row(conn: Connection, name: str) -> Any:
    row = conn.execute(select(rs.events).where(rs.events.c.name == name)).one_or_none()
    if row is None:
        raise AdminError(f"unknown event {name!r} ({_known(conn, rs.events.c.name)})")
    return row


def _team_row(conn: Connection, name: str) -> Any:
    row = conn.execute(select(rs.teams).where(rs.teams.c.name == name)).one_or_none()
    if row is None:
        raise AdminError(f"unknown team {name!r} ({_known(conn, rs.teams.c.name)})")
    return row


def _event_team_id(conn: Connection, event_id: int, team_id: int) -> int | None:
    et = rs.event_teams
    return conn.execute(
        select(et.c.id).where(et.c.event_id == event_id, et.c.team_id == team_id)
    ).scalar()
