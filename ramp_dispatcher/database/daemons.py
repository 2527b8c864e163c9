"""The daemons serving an event: one row each in ``dispatcher_daemons``.

``ramp-dispatcher status`` reads the database alone, so what lives only in a
daemon (its circuit breaker) is kept on the daemon's row. A daemon registers at
start, refreshes the row on its lease heartbeat (once per poll interval, in the
transaction that renews its runs' leases) and when its breaker changes, and
deletes it on a clean stop: nothing here runs per run. A row whose
``stale_after`` passed is a daemon that stopped without saying so (killed, its
host lost); ``status`` shows it as stale and the next daemon to start on the
event removes it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import cache
from typing import Any, Callable

from sqlalchemy import Connection, Delete, Insert, Update, bindparam, delete, insert, select, update

from ..breaker import BreakerSnapshot
from .clock import utcnow
from .dispatcher_schema import daemons


@dataclass(frozen=True)
class Presence:
    """What a daemon's row says of it besides its breaker."""

    owner: str
    event_id: int
    worker_type: str
    started_at: dt.datetime


def _breaker_values(breaker: BreakerSnapshot) -> dict[str, Any]:
    return {
        "new_breaker_state": breaker.state,
        "new_breaker_since": breaker.since,
        "new_breaker_cause": None if breaker.cause is None else breaker.cause[:2000],
        "new_breaker_failures": breaker.failures,
        "new_breaker_next_probe_at": breaker.next_probe_at,
    }


_BREAKER_COLUMNS = ("breaker_state", "breaker_since", "breaker_cause", "breaker_failures",
                    "breaker_next_probe_at")  # fmt: skip


@dataclass(frozen=True)
class _Statements:
    """``:daemon`` is the owner id of the row a statement is about."""

    #: a daemon's new row
    add: Insert
    #: heartbeat, stale time and breaker of ``:daemon``'s row
    heartbeat: Update
    #: the breaker of ``:daemon``'s row
    breaker: Update
    #: ``:daemon``'s row, gone
    remove: Delete


@cache
def _stmts() -> _Statements:
    mine = daemons.c.owner == bindparam("daemon")
    breaker = {c: bindparam(f"new_{c}") for c in _BREAKER_COLUMNS}
    return _Statements(
        add=insert(daemons).values(
            owner=bindparam("daemon"),
            event_id=bindparam("new_event_id"),
            worker_type=bindparam("new_worker_type"),
            started_at=bindparam("new_started_at"),
            heartbeat_at=bindparam("new_heartbeat_at"),
            stale_after=bindparam("new_stale_after"),
            **breaker,
        ),
        heartbeat=update(daemons)
        .where(mine)
        .values(heartbeat_at=bindparam("new_heartbeat_at"),
                stale_after=bindparam("new_stale_after"), **breaker),  # fmt: skip
        breaker=update(daemons).where(mine).values(**breaker),
        remove=delete(daemons).where(mine),
    )


def register(
    conn: Connection,
    me: Presence,
    lease: dt.timedelta,
    breaker: BreakerSnapshot,
    owner_is_dead: Callable[[str], bool],
) -> list[str]:
    """Our row (replacing any of ours), after removing the event's rows of
    daemons that are gone: stale, or of this host with their process gone.
    Returns the owners removed."""
    now = utcnow()
    gone = [
        owner
        for owner, stale_after in conn.execute(
            select(daemons.c.owner, daemons.c.stale_after).where(daemons.c.event_id == me.event_id)
        )
        if owner == me.owner or stale_after < now or owner_is_dead(owner)
    ]
    if gone:
        conn.execute(delete(daemons).where(daemons.c.owner.in_(gone)))
    _add(conn, me, lease, breaker, now)
    return [owner for owner in gone if owner != me.owner]


def _add(
    conn: Connection, me: Presence, lease: dt.timedelta, breaker: BreakerSnapshot, now: dt.datetime
) -> None:
    conn.execute(
        _stmts().add,
        {
            "daemon": me.owner,
            "new_event_id": me.event_id,
            "new_worker_type": me.worker_type,
            "new_started_at": me.started_at,
            "new_heartbeat_at": now,
            "new_stale_after": now + lease,
            **_breaker_values(breaker),
        },
    )


def heartbeat(
    conn: Connection, me: Presence, lease: dt.timedelta, breaker: BreakerSnapshot
) -> None:
    """Refresh our row; add it again if it is gone (a daemon starting during
    our database outage took it for stale and removed it)."""
    now = utcnow()
    params = {"daemon": me.owner, "new_heartbeat_at": now, "new_stale_after": now + lease,
              **_breaker_values(breaker)}  # fmt: skip
    if conn.execute(_stmts().heartbeat, params).rowcount == 0:
        _add(conn, me, lease, breaker, now)


def show_breaker(conn: Connection, owner: str, breaker: BreakerSnapshot) -> None:
    """The breaker changed: say so on our row."""
    conn.execute(_stmts().breaker, {"daemon": owner, **_breaker_values(breaker)})


def unregister(conn: Connection, owner: str) -> None:
    """A clean stop: our row goes."""
    conn.execute(_stmts().remove, {"daemon": owner})
