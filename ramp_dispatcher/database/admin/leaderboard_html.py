"""The "new submissions" leaderboard HTML that ramp-database writes after a submission."""

from __future__ import annotations

import datetime as dt
from typing import Sequence

from sqlalchemy import Connection, select, update

from .. import ramp_schema as rs

# Submissions in these states are on the "new submissions" leaderboard
# (ramp-database's Submission.is_new).
_NEW_STATES = ("new", "training", "sent_to_training")


_NEW_COLUMNS = ("team", "submission", "submitted at (UTC)", "state", "waiting list")


def _pandas_datetimes(values: Sequence[dt.datetime]) -> list[str]:
    """Format a datetime column the way pandas' ``to_html`` does."""
    if all(v.time() == dt.time(0) for v in values):
        fmt = "%Y-%m-%d"
    elif any(v.microsecond for v in values):
        fmt = "%Y-%m-%d %H:%M:%S.%f"
    else:
        fmt = "%Y-%m-%d %H:%M:%S"
    return [v.strftime(fmt) for v in values]


def new_leaderboard_html(
    conn: Connection, event_id: int, team_id: int | None = None
) -> str | None:
    """ramp-database's "new submissions" leaderboard HTML, or None when empty.

    Same text as ``get_leaderboard(session, "new", event, team)`` renders with
    pandas (a ``<thead>...</tbody>`` fragment), built without pandas.
    """
    s, et, t, e = rs.submissions, rs.event_teams, rs.teams, rs.events
    query = (
        select(
            s.c.id,
            s.c.name,
            s.c.hash_,
            s.c.submission_timestamp,
            s.c.state,
            s.c.queue_position,
            t.c.name.label("team"),
        )
        .join(et, et.c.id == s.c.event_team_id)
        .join(t, t.c.id == et.c.team_id)
        .join(e, e.c.id == et.c.event_id)
        .where(e.c.id == event_id, s.c.state.in_(_NEW_STATES), s.c.name != e.c.ramp_sandbox_name)
        .order_by(s.c.id)
    )
    if team_id is not None:
        query = query.where(t.c.id == team_id)
    rows = conn.execute(query).all()
    if not rows:
        return None
    stamps = _pandas_datetimes([r.submission_timestamp for r in rows])
    body = []
    for row, stamp in zip(rows, stamps):
        link = f"/{row.hash_}/{_first_file_name(conn, row.id)}"
        waiting = f"#{row.queue_position}" if row.queue_position != -1 else ""
        cells = (row.team, f"<a href={link}>{row.name[:20]}</a>", stamp, row.state, waiting)
        body.append("    <tr>\n" + "".join(f"      <td>{c}</td>\n" for c in cells) + "    </tr>\n")
    head = "".join(f"      <th>{c}</th>\n" for c in _NEW_COLUMNS)
    return (
        '<thead> \n    <tr style="text-align: left;">\n'
        + head
        + "    </tr>\n  </thead>\n  <tbody>\n"
        + "".join(body)
        + "   </tbody>"
    )


def _first_file_name(conn: Connection, submission_id: int) -> str:
    sf, we, wet, fte, ext = (
        rs.submission_files,
        rs.workflow_elements,
        rs.workflow_element_types,
        rs.submission_file_type_extensions,
        rs.extensions,
    )
    row = conn.execute(
        select(wet.c.name.label("stem"), ext.c.name.label("ext"))
        .select_from(sf)
        .join(we, we.c.id == sf.c.workflow_element_id)
        .join(wet, wet.c.id == we.c.workflow_element_type_id)
        .join(fte, fte.c.id == sf.c.submission_file_type_extension_id)
        .join(ext, ext.c.id == fte.c.extension_id)
        .where(sf.c.submission_id == submission_id)
        .order_by(sf.c.id)
        .limit(1)
    ).first()
    return "" if row is None else f"{row.stem}.{row.ext}"


def update_new_leaderboards(conn: Connection, event_id: int, team_id: int) -> None:
    """Refresh the event's and the team's "new submissions" HTML, as ramp-database
    does after each submission (``update_leaderboards(new_only=True)`` and
    ``update_user_leaderboards(new_only=True)``)."""
    conn.execute(
        update(rs.events)
        .where(rs.events.c.id == event_id)
        .values(new_leaderboard_html=new_leaderboard_html(conn, event_id))
    )
    et = rs.event_teams
    conn.execute(
        update(et)
        .where(et.c.event_id == event_id, et.c.team_id == team_id)
        .values(new_leaderboard_html=new_leaderboard_html(conn, event_id, team_id))
    )
