"""Our leaderboards equal ramp-database 0.10.1's, column by column, on one database.

For each backend and each direction of the official score: ramp-database's
own ``update_leaderboards`` and ``update_user_leaderboards`` write every
column, we save what they wrote, reset the columns, run ours, and compare.

The only normalisation is for ramp-database's own nondeterminism: its query
for a leaderboard's submissions has no ORDER BY, so

- the "new" and "failed" tables, which it never sorts, list rows in whatever
  order the database returned them: compared as sorted lists of rows;
- the public and private tables are sorted with numpy's quicksort, which is not
  stable: rows whose sort key is equal come out in an order that depends on the
  database's order. Compared with each run of equal keys as a sorted group, so
  the order of the keys themselves is still checked.

The competition tables are ranked (unique ranks) and compared as they are.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.exc import SAWarning
from sqlalchemy.orm import Session

from ramp_dispatcher.database import ramp_schema as rs
from ramp_dispatcher.database.engine import make_engine, normalise_url
from ramp_dispatcher.leaderboards import data, update as boards

from leaderboard_event import EVENT, PLAN, TEAMS, build_event

EVENT_COLUMNS = boards.EVENT_COLUMNS
TEAM_COLUMNS = boards.TEAM_COLUMNS
STALE = "stale: not refreshed"


def _read(url: str) -> dict[str, Any]:
    engine = make_engine(url)
    e, et, t = rs.events, rs.event_teams, rs.teams
    with engine.connect() as conn:
        event = conn.execute(select(*[e.c[c] for c in EVENT_COLUMNS]).where(e.c.name == EVENT)).one()
        teams = {
            r.name: dict(zip(TEAM_COLUMNS, r[1:]))
            for r in conn.execute(
                select(t.c.name, *[et.c[c] for c in TEAM_COLUMNS]).join(t, t.c.id == et.c.team_id)
            )
        }
    engine.dispose()
    return {"event": dict(zip(EVENT_COLUMNS, event)), "teams": teams}


def _reset(url: str, value: str | None) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(update(rs.events).values({c: value for c in EVENT_COLUMNS}))
        conn.execute(update(rs.event_teams).values({c: value for c in TEAM_COLUMNS}))
    engine.dispose()


def _theirs(url: str, new_only: bool) -> None:
    from ramp_database.tools.leaderboard import update_leaderboards, update_user_leaderboards

    engine = create_engine(normalise_url(url))
    with warnings.catch_warnings(), Session(engine) as session:
        warnings.filterwarnings("ignore", category=SAWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        update_leaderboards(session, EVENT, new_only=new_only)
        for team in TEAMS:
            update_user_leaderboards(session, EVENT, team, new_only=new_only)
    engine.dispose()


def _ours(url: str, new_only: bool) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        event_id = data.event_id_by_name(conn, EVENT)
        ctx = boards.Context.load(conn, event_id)
        boards.update_event_leaderboards(conn, event_id, new_only=new_only, ctx=ctx)
        boards.update_team_leaderboards(
            conn, event_id, data.event_team_ids(conn, event_id), new_only=new_only, ctx=ctx
        )
    engine.dispose()


_ROW = re.compile(r"    <tr>\n.*?    </tr>\n", re.S)


def _split(html: str) -> tuple[str, list[str], str]:
    head, _, rest = html.partition("  <tbody>\n")
    rows = _ROW.findall(rest)
    assert "".join(rows) + "   </tbody>" == rest, "unexpected table layout"
    return head, rows, rest


def _cells(row: str) -> list[str]:
    return re.findall(r"<td>(.*?)</td>", row)


def normalise(column: str, html: str | None, key_name: str) -> Any:
    """See the module docstring: only ramp-database's unordered parts are relaxed."""
    if html is None or html == STALE:
        return html
    head, rows, _ = _split(html)
    if "new" in column or "failed" in column:
        return head, sorted(rows)
    if "competition" in column:
        return head, rows
    names = re.findall(r"<th>(.*?)</th>", head)
    key = names.index(key_name) if key_name in names else names.index("bag private " + key_name)
    groups: list[list[str]] = []
    for row in rows:
        if groups and _cells(groups[-1][0])[key] == _cells(row)[key]:
            groups[-1].append(row)
        else:
            groups.append([row])
    return head, [sorted(g) for g in groups]


@pytest.mark.parametrize(
    "official, contributivity", [("acc", False), ("nll", True)], ids=["higher", "lower"]
)
def test_same_html_as_ramp_database(
    empty_db_url: str, tmp_path: Path, official: str, contributivity: bool
) -> None:
    facts = build_event(empty_db_url, tmp_path, official=official, contributivity=contributivity)

    for new_only in (False, True):
        _reset(empty_db_url, STALE)
        _theirs(empty_db_url, new_only)
        theirs = _read(empty_db_url)
        _reset(empty_db_url, STALE)
        _ours(empty_db_url, new_only)
        ours = _read(empty_db_url)

        for column in EVENT_COLUMNS:
            a, b = theirs["event"][column], ours["event"][column]
            assert normalise(column, b, official) == normalise(column, a, official), (
                f"event column {column} (new_only={new_only}) differs:\n--- ramp-database\n{a}\n"
                f"--- ours\n{b}"
            )
        for team in TEAMS:
            for column in TEAM_COLUMNS:
                a, b = theirs["teams"][team][column], ours["teams"][team][column]
                assert normalise(column, b, official) == normalise(column, a, official), (
                    f"team {team} column {column} (new_only={new_only}) differs:\n"
                    f"--- ramp-database\n{a}\n--- ours\n{b}"
                )

    # The comparison is not vacuous: every table of the full refresh has its rows.
    _reset(empty_db_url, None)
    _ours(empty_db_url, new_only=False)
    ours = _read(empty_db_url)
    event = ours["event"]
    scored = [n for _, n, st in PLAN if st == "scored" and n != "a_invalid"]
    for name in scored:
        assert f">{name}</a>" in event["public_leaderboard_html_with_links"]
        assert f"<td>{name}</td>" in event["public_leaderboard_html_no_links"]
        assert f">{name}</a>" in event["private_leaderboard_html"]
    assert "a_invalid" not in event["public_leaderboard_html_with_links"]
    assert event["public_leaderboard_html_with_links"].count("<tr>") == len(scored)
    for _, name, state in PLAN:
        if "error" in state:
            assert f">{name}</a>" in event["failed_leaderboard_html"]
            assert f">{state}</a>" in event["failed_leaderboard_html"]
        if state in ("new", "sent_to_training", "training"):
            assert f">{name}</a>" in event["new_leaderboard_html"]
    assert "#1" in event["new_leaderboard_html"] and "#2" in event["new_leaderboard_html"]
    assert "b_nocomp" not in event["public_competition_leaderboard_html"]
    assert "move" in event["private_competition_leaderboard_html"]
    assert ("contributivity" in event["private_leaderboard_html"]) == contributivity
    assert "None" in event["public_leaderboard_html_with_links"]  # c_noram's max RAM
    assert facts["scores"][0] == official
    for team, name, state in PLAN:
        tables = ours["teams"][team]
        if state == "scored" and name != "a_invalid":
            assert f">{name}</a>" in tables["leaderboard_html"]
        if "error" in state:
            assert f">{name}</a>" in tables["failed_leaderboard_html"]
    assert ours["teams"]["erin"]["new_leaderboard_html"] is None  # nothing waiting
