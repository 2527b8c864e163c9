"""Signing a team up to an event."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Connection, insert, select, update

from .. import ramp_schema as rs
from ..clock import utcnow
from .lookup import AdminError, _event_row, _event_team_id, _team_row
from .submissions import add_submission


def sign_up_team(conn: Connection, event_name: str, team_name: str) -> int:
    """Sign a team up to an event, approved, with the sandbox submitted; return the event_team id.

    As ramp-database: an existing (not yet approved) sign-up is reused; the
    event's sandbox ``<kit>/submissions/<ramp_sandbox_name>`` is submitted for
    the team, then the sign-up is approved.
    """
    event = _event_row(conn, event_name)
    team = _team_row(conn, team_name)
    et = rs.event_teams
    event_team_id = _event_team_id(conn, event.id, team.id)
    if event_team_id is None:
        event_team_id = conn.execute(
            insert(et).values(
                event_id=event.id,
                team_id=team.id,
                is_active=True,
                last_submission_name=None,
                signup_timestamp=utcnow(),
                approved=False,
                leaderboard_html=None,
                failed_leaderboard_html=None,
                new_leaderboard_html=None,
            )
        ).inserted_primary_key[0]
    else:
        s = rs.submissions
        has_sandbox = conn.execute(
            select(s.c.id).where(
                s.c.event_team_id == event_team_id, s.c.name == event.ramp_sandbox_name
            )
        ).first()
        if has_sandbox is not None:
            raise AdminError(f"team {team_name!r} is already signed up to event {event_name!r}")
    kit_dir = conn.execute(
        select(rs.problems.c.path_ramp_kit).where(rs.problems.c.id == event.problem_id)
    ).scalar_one()
    sandbox_dir = Path(kit_dir) / "submissions" / event.ramp_sandbox_name
    add_submission(conn, event_name, team_name, event.ramp_sandbox_name, sandbox_dir)
    conn.execute(update(et).where(et.c.id == event_team_id).values(approved=True))
    return event_team_id
