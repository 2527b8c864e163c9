"""Compute ramp-board's cached leaderboards and write them, as ramp-database's
``update_leaderboards`` and ``update_user_leaderboards`` do.

Event columns: ``public_leaderboard_html_with_links``,
``public_leaderboard_html_no_links``, ``private_leaderboard_html``,
``failed_leaderboard_html``, ``new_leaderboard_html``,
``public_competition_leaderboard_html``, ``private_competition_leaderboard_html``.
Team columns (``event_teams``): ``leaderboard_html`` (the public table of the
team's submissions), ``failed_leaderboard_html``, ``new_leaderboard_html``.
An empty table is NULL. ``new_only`` recomputes only the "new" columns.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from sqlalchemy import Connection, select

from ..database import ramp_schema as rs
from . import data, tables
from .data import EventFacts, FileNames, SubmissionRow

log = logging.getLogger(__name__)

EVENT_COLUMNS = (
    "private_leaderboard_html",
    "public_leaderboard_html_with_links",
    "public_leaderboard_html_no_links",
    "failed_leaderboard_html",
    "public_competition_leaderboard_html",
    "private_competition_leaderboard_html",
    "new_leaderboard_html",
)
TEAM_COLUMNS = ("leaderboard_html", "failed_leaderboard_html", "new_leaderboard_html")


# --------------------------------------------------------------------------- score direction


_directions: dict[tuple[str, str], bool] = {}
_directions_lock = threading.Lock()


def lower_is_better(conn: Connection, event: EventFacts) -> bool:
    """Whether the official score is better when lower.

    ramp-board keeps this only in the kit's ``problem.py`` (its ``score_types``
    table holds placeholders), so it is read there, once per kit and score, as
    ramp-database does. Without ramp-workflow importable here, it is inferred
    from the "worst" value ramp-database stores for submissions not yet scored:
    a positive worst (e.g. ``inf``) is a maximum, so lower is better.
    Asked only when a table of scores must be sorted.
    """
    key = (event.kit_dir, event.official_score_name)
    with _directions_lock:
        if key in _directions:
            return _directions[key]
    value = _from_problem(event)
    if value is None:
        value = _from_worst(conn, event)
    with _directions_lock:
        _directions[key] = value
    return value


#: run in a child process: the kit's problem.py imports ramp-workflow and its
#: dependencies, a second of CPU and tens of MB the daemon need not keep
_PROBE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("problem", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
for score_type in module.score_types:
    if score_type.name == sys.argv[2]:
        print("lower" if score_type.is_lower_the_better else "higher")
        break
else:
    sys.exit("no score type %r in %s" % (sys.argv[2], sys.argv[1]))
"""
PROBE_TIMEOUT = 120.0


def _from_problem(event: EventFacts) -> bool | None:
    path = Path(event.kit_dir) / "problem.py"
    try:
        done = subprocess.run(
            # -B: no __pycache__ written into the kit
            [sys.executable, "-B", "-c", _PROBE, str(path), event.official_score_name],
            cwd=path.parent if path.parent.is_dir() else None,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=PROBE_TIMEOUT,
        )
        answer = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
        if answer in (["lower"], ["higher"]):
            return answer == ["lower"]
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    except (OSError, subprocess.SubprocessError) as exc:  # no kit here, a hung kit
        why = f"{type(exc).__name__}: {exc}"
    log.warning(
        "event %r: cannot read the direction of score %r from %s (%s); inferring it "
        "from the stored worst score", event.name, event.official_score_name, path, why,
    )
    return None


def _from_worst(conn: Connection, event: EventFacts) -> bool:
    s, ss, est, et = rs.submissions, rs.submission_scores, rs.event_score_types, rs.event_teams
    worst = conn.execute(
        select(ss.c.valid_score_cv_bag)
        .join(s, s.c.id == ss.c.submission_id)
        .join(est, est.c.id == ss.c.event_score_type_id)
        .join(et, et.c.id == s.c.event_team_id)
        .where(
            et.c.event_id == event.id,
            est.c.name == event.official_score_name,
            s.c.name == event.sandbox_name,  # never trained: holds the worst score
        )
        .limit(1)
    ).scalar()
    return worst is not None and not math.isnan(worst) and worst > 0


# --------------------------------------------------------------------------- computing


@dataclass
class Context:
    """What several refreshes share: the event's facts, the score direction
    (read when first needed), and the submissions' file names."""

    event: EventFacts
    files: FileNames = field(default_factory=FileNames)
    #: a scored submission's scores and times, by id, with the run they came from
    scores: dict[int, tuple[object, tables.ScoredRow]] = field(default_factory=dict)

    @classmethod
    def load(cls, conn: Connection, event_id: int, files: FileNames | None = None) -> Context:
        return cls(data.load_event_facts(conn, event_id), files or FileNames())

    def lower_is_better(self, conn: Connection) -> bool:
        return lower_is_better(conn, self.event)

    def forget(self, submission_ids: Iterable[int]) -> None:
        """These submissions changed: read their scores again (their files do
        not change, and ``submission_files`` can only be scanned)."""
        for sid in submission_ids:
            self.scores.pop(sid, None)

    def scored_rows(
        self, conn: Connection, scored: Sequence[SubmissionRow]
    ) -> list[tables.ScoredRow]:
        """The scored submissions' lines; scores read only for those not met
        before (or run again since: the key holds the run's start time)."""
        misses = [
            s for s in scored
            if s.id not in self.scores or self.scores[s.id][0] != _score_key(s)
        ]
        if misses:
            data.fill_scores(conn, misses)
            precision = _precision(self.event)
            for s in misses:
                self.scores[s.id] = (_score_key(s), tables.scored_row(s, precision))
        return [
            tables.ScoredRow(s, self.scores[s.id][1].scores, self.scores[s.id][1].times)
            for s in scored
        ]


def _score_key(sub: SubmissionRow) -> object:
    return sub.training_timestamp


def _precision(event: EventFacts) -> dict[str, int | None]:
    return {s.name: s.precision for s in event.scores}


def _html(board: tuple[list[str], list[list], list[str]]) -> str | None:
    return tables.to_html(board) if board[1] else None


def compute_tables(
    conn: Connection, ctx: Context, subs: Sequence[SubmissionRow], *, event_level: bool,
    new_only: bool = False,
) -> dict[str, str | None]:
    """The tables of a set of submissions (the event's or one team's)."""
    new = [s for s in subs if s.is_new]
    ctx.files.fill(conn, new)
    out: dict[str, str | None] = {"new_leaderboard_html": _html(tables.listing_board(new, "new"))}
    if new_only:
        return out
    failed = [s for s in subs if s.is_error]
    scored = [s for s in subs if s.is_on_leaderboard]
    ctx.files.fill(conn, failed + scored)
    if event_level:  # what is not scored any more leaves the cache
        keep = {s.id for s in scored}
        for sid in [sid for sid in ctx.scores if sid not in keep]:
            del ctx.scores[sid]
    rows = ctx.scored_rows(conn, scored)
    failed_html = _html(tables.listing_board(failed, "failed"))
    lower = ctx.lower_is_better(conn) if rows else False
    if not event_level:
        out["leaderboard_html"] = (
            _html(tables.score_board(ctx.event, rows, "public", lower)) if rows else None
        )
        out["failed_leaderboard_html"] = failed_html
        return out
    out["failed_leaderboard_html"] = failed_html
    if rows:
        out["private_leaderboard_html"] = _html(tables.score_board(ctx.event, rows, "private", lower))
        out["public_leaderboard_html_with_links"] = _html(
            tables.score_board(ctx.event, rows, "public", lower)
        )
        out["public_leaderboard_html_no_links"] = _html(
            tables.score_board(ctx.event, rows, "public", lower, with_links=False)
        )
    else:
        out["private_leaderboard_html"] = None
        out["public_leaderboard_html_with_links"] = None
        out["public_leaderboard_html_no_links"] = None
    competing = [r for r in rows if r.sub.is_in_competition]
    for kind in ("public", "private"):
        out[f"{kind}_competition_leaderboard_html"] = (
            _html(tables.competition_board(ctx.event, competing, kind, lower)) if competing else None
        )
    return out


def event_tables(conn: Connection, ctx: Context, new_only: bool = False) -> dict[str, str | None]:
    subs = data.event_submissions(conn, ctx.event, new_only=new_only)
    return compute_tables(conn, ctx, subs, event_level=True, new_only=new_only)


def team_tables(
    conn: Connection, ctx: Context, event_team_id: int, new_only: bool = False,
    subs: Sequence[SubmissionRow] | None = None,
) -> dict[str, str | None]:
    """One team's tables; ``subs``: its submissions when already read with the event's."""
    if subs is None:
        subs = data.team_submissions(conn, ctx.event, event_team_id, new_only=new_only)
    return compute_tables(conn, ctx, subs, event_level=False, new_only=new_only)


def by_team(subs: Iterable[SubmissionRow]) -> dict[int, list[SubmissionRow]]:
    """Submissions grouped by event team, each group in the given (id) order."""
    teams: dict[int, list[SubmissionRow]] = {}
    for s in subs:
        teams.setdefault(s.event_team_id, []).append(s)
    return teams


def new_tables_by_team(
    conn: Connection, ctx: Context, event_subs: Sequence[SubmissionRow] | None = None
) -> tuple[str | None, dict[int, str | None]]:
    """Every "new" table of the event from one read of its waiting and running
    submissions (through the state index; or picked from ``event_subs``, the
    event's submissions read by this refresh already): the event's, and each
    team's that has any (the other teams' are empty)."""
    if event_subs is None:
        subs = data.event_submissions(conn, ctx.event, new_only=True)
    else:
        subs = [s for s in event_subs if s.is_new]
    ctx.files.fill(conn, subs)
    event_html = _html(tables.listing_board(subs, "new"))
    return event_html, {
        et: _html(tables.listing_board(rows, "new")) for et, rows in by_team(subs).items()
    }


# --------------------------------------------------------------------------- writing


def update_event_leaderboards(
    conn: Connection, event_id: int, new_only: bool = False, ctx: Context | None = None
) -> dict[str, str | None]:
    """ramp-database's ``update_leaderboards(session, event, new_only)``."""
    ctx = ctx or Context.load(conn, event_id)
    values = event_tables(conn, ctx, new_only)
    data.write_event(conn, event_id, values)
    return values


def update_team_leaderboards(
    conn: Connection,
    event_id: int,
    event_team_ids: Iterable[int],
    new_only: bool = False,
    ctx: Context | None = None,
) -> dict[int, dict[str, str | None]]:
    """ramp-database's ``update_user_leaderboards(session, event, team, new_only)``
    for each of the event teams."""
    ctx = ctx or Context.load(conn, event_id)
    values = {et: team_tables(conn, ctx, et, new_only) for et in sorted(set(event_team_ids))}
    data.write_teams(conn, values)
    return values


def update_all_leaderboards(conn: Connection, event_id: int, ctx: Context | None = None) -> None:
    """The event's tables and every team's (what ramp-engine refreshed after each result)."""
    ctx = ctx or Context.load(conn, event_id)
    update_event_leaderboards(conn, event_id, ctx=ctx)
    update_team_leaderboards(conn, event_id, data.event_team_ids(conn, event_id), ctx=ctx)


def update_new_leaderboards(conn: Connection, event_id: int, team_id: int) -> None:
    """Refresh the event's and one team's "new submissions" HTML, as ramp-database
    does after each submission (``update_leaderboards(new_only=True)`` and
    ``update_user_leaderboards(new_only=True)``); ``team_id`` is a team's id."""
    et = rs.event_teams
    event_team_id = conn.execute(
        select(et.c.id).where(et.c.event_id == event_id, et.c.team_id == team_id)
    ).scalar_one()
    ctx = Context(data.load_event_facts(conn, event_id))
    update_event_leaderboards(conn, event_id, new_only=True, ctx=ctx)
    update_team_leaderboards(conn, event_id, [event_team_id], new_only=True, ctx=ctx)


def new_leaderboard_html(conn: Connection, event_id: int, team_id: int | None = None) -> str | None:
    """ramp-database's ``get_leaderboard(session, "new", event, team)``: the event's
    (or, with ``team_id``, a team's) "new submissions" HTML, None when empty."""
    ctx = Context(data.load_event_facts(conn, event_id))
    if team_id is None:
        return event_tables(conn, ctx, new_only=True)["new_leaderboard_html"]
    et = rs.event_teams
    event_team_id = conn.execute(
        select(et.c.id).where(et.c.event_id == event_id, et.c.team_id == team_id)
    ).scalar_one()
    return team_tables(conn, ctx, event_team_id, new_only=True)["new_leaderboard_html"]


__all__ = [
    "Context",
    "EVENT_COLUMNS",
    "TEAM_COLUMNS",
    "compute_tables",
    "event_tables",
    "lower_is_better",
    "new_leaderboard_html",
    "new_tables_by_team",
    "team_tables",
    "update_all_leaderboards",
    "update_event_leaderboards",
    "update_new_leaderboards",
    "update_team_leaderboards",
]
