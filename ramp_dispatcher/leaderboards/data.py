"""Read what ramp-board's leaderboards show, straight from its tables.

Two scopes, the same rows: the whole event (``event_id``) or one team
(``event_team_id``). A team's statements reach its submissions through the
``(event_team_id, name)`` unique index ramp-board creates and the per-submission
rows through their own indexes (``sc_constraint``, ``ss_constraint``, our
``ix_dispatcher_submission_scores_submission``), so one team costs the same
however large the event.

ramp-database reads the same facts through its ORM; the order it meets
relationship rows in is the table's id order, reproduced here with ORDER BY.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Iterable, Sequence

from sqlalchemy import (
    CompoundSelect, Connection, Integer, Select, Update, bindparam, func, null, select, union_all,
)

from ..database import ramp_schema as rs

#: ramp-database's ``Submission.is_new``
NEW_STATES = ("new", "training", "sent_to_training")


@dataclass(frozen=True)
class ScoreColumn:
    """One of the event's score types, in ramp-database's ``event.score_types`` order."""

    name: str
    precision: int | None


@dataclass(frozen=True)
class EventFacts:
    id: int
    name: str
    sandbox_name: str
    official_score_name: str
    kit_dir: str
    scores: tuple[ScoreColumn, ...]


@dataclass
class SubmissionRow:
    """A submission as the leaderboards see it."""

    id: int
    event_team_id: int
    team: str
    name: str
    hash_: str
    submitted_at: dt.datetime
    state: str
    queue_position: int | None
    is_valid: bool
    is_in_competition: bool
    contributivity: float | None
    historical_contributivity: float | None
    max_ram: float | None
    #: when its last run started (set at each run): part of its scores' cache key
    training_timestamp: dt.datetime | None = None
    #: "<element>.<ext>" of the submission's first file (its link), "" if none
    first_file: str = ""
    #: scored submissions only: step ("valid"/"test") -> score name -> bag scores
    bags: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    #: scored submissions only: per fold (by id), step -> score name -> value
    fold_scores: list[dict[str, dict[str, float | None]]] = field(default_factory=list)
    #: scored submissions only: per fold (by id), (train, valid, test) times
    fold_times: list[tuple[float | None, float | None, float | None]] = field(
        default_factory=list
    )

    @property
    def is_new(self) -> bool:
        return self.state in NEW_STATES

    @property
    def is_error(self) -> bool:
        return "error" in (self.state or "")

    @property
    def is_on_leaderboard(self) -> bool:
        """ramp-database's ``is_public_leaderboard`` (== ``is_private_leaderboard``)."""
        return bool(self.is_valid) and self.state == "scored"


def load_event_facts(conn: Connection, event_id: int) -> EventFacts:
    e, p = rs.events, rs.problems
    row = conn.execute(
        select(
            e.c.id, e.c.name, e.c.ramp_sandbox_name, e.c.official_score_name,
            p.c.path_ramp_kit,
        )
        .join(p, p.c.id == e.c.problem_id)
        .where(e.c.id == event_id)
    ).one()
    est = rs.event_score_types
    # ramp-database lists the score columns in the order its ORM loads
    # ``event.score_types``: this very query, without ORDER BY. SQLite answers
    # it from the (event_id, name) index, by name; PostgreSQL usually in table
    # order. The same statement on the same database gives the same order.
    scores = tuple(
        ScoreColumn(r.name, r.precision)
        for r in conn.execute(select(est.c.name, est.c.precision).where(est.c.event_id == event_id))
    )
    return EventFacts(
        row.id, row.name, row.ramp_sandbox_name, row.official_score_name or "",
        row.path_ramp_kit or "", scores,
    )


def event_id_by_name(conn: Connection, name: str) -> int:
    return conn.execute(select(rs.events.c.id).where(rs.events.c.name == name)).scalar_one()


def event_team_ids(conn: Connection, event_id: int) -> list[int]:
    et = rs.event_teams
    return list(
        conn.execute(select(et.c.id).where(et.c.event_id == event_id).order_by(et.c.id)).scalars()
    )


def event_teams_of(conn: Connection, submission_ids: Iterable[int]) -> set[int]:
    """The event_team ids of some submissions (primary-key lookups)."""
    ids = sorted(set(submission_ids))
    if not ids:
        return set()
    s = rs.submissions
    return set(conn.execute(select(s.c.event_team_id).where(s.c.id.in_(ids))).scalars())


# --------------------------------------------------------------------------- submissions


def _submission_query():
    s, et, t = rs.submissions, rs.event_teams, rs.teams
    return (
        select(
            s.c.id, s.c.event_team_id, t.c.name.label("team"), s.c.name, s.c.hash_,
            s.c.submission_timestamp, s.c.state, s.c.queue_position, s.c.is_valid,
            s.c.is_in_competition, s.c.contributivity, s.c.historical_contributivity,
            s.c.max_ram, s.c.training_timestamp,
        )
        .join(et, et.c.id == s.c.event_team_id)
        .join(t, t.c.id == et.c.team_id)
        .order_by(s.c.id)
    )


def _submission_statements() -> dict[tuple[str, bool], Any]:
    """Built once (their cache keys are then computed once): by (scope, new_only)."""
    s, et = rs.submissions, rs.event_teams
    not_sandbox = s.c.name != bindparam("sandbox")
    scopes = {
        "event": _submission_query().where(et.c.event_id == bindparam("scope_id"), not_sandbox),
        "team": _submission_query().where(s.c.event_team_id == bindparam("scope_id"), not_sandbox),
    }
    return {
        (scope, new_only): query.where(s.c.state.in_(NEW_STATES)) if new_only else query
        for scope, query in scopes.items()
        for new_only in (False, True)
    }


_SUBMISSIONS = _submission_statements()


def _row(r: Any) -> SubmissionRow:
    return SubmissionRow(
        r.id, r.event_team_id, r.team, r.name, r.hash_, r.submission_timestamp, r.state,
        r.queue_position, r.is_valid, r.is_in_competition, r.contributivity,
        r.historical_contributivity, r.max_ram, r.training_timestamp,
    )


def event_submissions(
    conn: Connection, event: EventFacts, *, new_only: bool = False
) -> list[SubmissionRow]:
    """The event's submissions but the sandboxes; with ``new_only`` only those
    waiting or running (read through the state index)."""
    query = _SUBMISSIONS["event", new_only]
    return [_row(r) for r in conn.execute(query, {"scope_id": event.id, "sandbox": event.sandbox_name})]


def team_submissions(
    conn: Connection, event: EventFacts, event_team_id: int, *, new_only: bool = False
) -> list[SubmissionRow]:
    query = _SUBMISSIONS["team", new_only]
    return [_row(r) for r in conn.execute(query, {"scope_id": event_team_id, "sandbox": event.sandbox_name})]


class FileNames:
    """Each submission's first file name (its link), remembered: a submission's
    files are added with it and its first one never changes, and
    ``submission_files`` has no index on ``submission_id`` in ramp-board."""

    def __init__(self) -> None:
        self._known: dict[int, str] = {}

    def fill(self, conn: Connection, rows: Sequence[SubmissionRow]) -> None:
        missing = sorted({r.id for r in rows if r.id not in self._known})
        for start in range(0, len(missing), 500):
            chunk = missing[start : start + 500]
            self._known.update(_first_files(conn, chunk))
            for sid in chunk:  # a submission without files links to "/<hash>/"
                self._known.setdefault(sid, "")
        for r in rows:
            r.first_file = self._known[r.id]

    def forget(self, submission_ids: Iterable[int]) -> None:
        for sid in submission_ids:
            self._known.pop(sid, None)

    def clear(self) -> None:
        self._known.clear()


def _first_files(conn: Connection, submission_ids: Sequence[int]) -> dict[int, str]:
    sf, we, wet, fte, ext = (
        rs.submission_files,
        rs.workflow_elements,
        rs.workflow_element_types,
        rs.submission_file_type_extensions,
        rs.extensions,
    )
    first = (
        select(sf.c.submission_id, func.min(sf.c.id).label("id"))
        .where(sf.c.submission_id.in_(submission_ids))
        .group_by(sf.c.submission_id)
        .subquery()
    )
    rows = conn.execute(
        select(first.c.submission_id, wet.c.name.label("stem"), ext.c.name.label("ext"))
        .select_from(first)
        .join(sf, sf.c.id == first.c.id)
        .join(we, we.c.id == sf.c.workflow_element_id)
        .join(wet, wet.c.id == we.c.workflow_element_type_id)
        .join(fte, fte.c.id == sf.c.submission_file_type_extension_id)
        .join(ext, ext.c.id == fte.c.extension_id)
    )
    return {r.submission_id: f"{r.stem}.{r.ext}" for r in rows}


# --------------------------------------------------------------------------- scores


def fill_scores(conn: Connection, rows: Sequence[SubmissionRow], chunk: int = 500) -> None:
    """Load bags, fold scores and fold times of the scored rows (in chunks of ids)."""
    by_id = {r.id: r for r in rows if r.is_on_leaderboard}
    ids = sorted(by_id)
    for start in range(0, len(ids), chunk):
        _fill_chunk(conn, by_id, ids[start : start + chunk])


@dataclass(frozen=True)
class _ScoreStatements:
    """What :func:`fill_scores` reads for the submissions ``:ids`` (an
    expanding list): built once, as the daemon's other statements."""

    #: (score row id, submission id, score name, valid bags, test bags)
    bags: Select[Any]
    #: (fold row id, submission id, train/valid/test times)
    folds: Select[Any]
    #: (fold row id, score row id, train/valid/test scores)
    fold_scores: Select[Any]


@cache
def _score_stmts() -> _ScoreStatements:
    ss, est = rs.submission_scores, rs.event_score_types
    sof, sscf = rs.submission_on_cv_folds, rs.submission_score_on_cv_folds
    ids = bindparam("ids", expanding=True)
    return _ScoreStatements(
        bags=select(
            ss.c.id, ss.c.submission_id, est.c.name, ss.c.valid_score_cv_bags, ss.c.test_score_cv_bags,
        )
        .join(est, est.c.id == ss.c.event_score_type_id)
        .where(ss.c.submission_id.in_(ids))
        .order_by(ss.c.id),
        folds=select(sof.c.id, sof.c.submission_id, sof.c.train_time, sof.c.valid_time, sof.c.test_time)
        .where(sof.c.submission_id.in_(ids))
        .order_by(sof.c.id),
        fold_scores=select(
            sscf.c.submission_on_cv_fold_id, sscf.c.submission_score_id, sscf.c.train_score,
            sscf.c.valid_score, sscf.c.test_score,
        )
        .join(sof, sof.c.id == sscf.c.submission_on_cv_fold_id)
        .where(sof.c.submission_id.in_(ids))
        .order_by(sscf.c.id),
    )


def _fill_chunk(conn: Connection, by_id: dict[int, SubmissionRow], ids: list[int]) -> None:
    stmts, which = _score_stmts(), {"ids": ids}
    for r in (by_id[i] for i in ids):
        r.bags, r.fold_scores, r.fold_times = {"test": {}, "valid": {}}, [], []
    score_names: dict[int, str] = {}
    for row in conn.execute(stmts.bags, which):
        score_names[row.id] = row.name
        sub = by_id[row.submission_id]
        for step, bags in (("test", row.test_score_cv_bags), ("valid", row.valid_score_cv_bags)):
            values = _bag_list(bags)
            if values is not None:
                sub.bags[step][row.name] = values
    folds: dict[int, dict[str, dict[str, float | None]]] = {}
    for row in conn.execute(stmts.folds, which):
        sub = by_id[row.submission_id]
        scores: dict[str, dict[str, float | None]] = {"train": {}, "valid": {}, "test": {}}
        folds[row.id] = scores
        sub.fold_scores.append(scores)
        sub.fold_times.append((row.train_time, row.valid_time, row.test_time))
    if not folds:
        return
    for row in conn.execute(stmts.fold_scores, which):
        name = score_names.get(row.submission_score_id)
        if name is None:
            continue
        scores = folds[row.submission_on_cv_fold_id]
        scores["train"][name] = row.train_score
        scores["valid"][name] = row.valid_score
        scores["test"][name] = row.test_score


def _bag_list(value: Any) -> list[float] | None:
    """A bag blob as floats; None for ramp-database's pickled None (no bags)."""
    if value is None:
        return None
    try:
        items = value.tolist() if hasattr(value, "tolist") else value
    except Exception:
        return None
    if items is None or not isinstance(items, (list, tuple)):
        return None
    return [math.nan if v is None else float(v) for v in items]


# --------------------------------------------------------------------------- writes


def write_event(conn: Connection, event_id: int, values: dict[str, str | None]) -> None:
    if values:
        columns = tuple(sorted(values))
        params = {"event_id": event_id, **{f"v_{c}": values[c] for c in columns}}
        conn.execute(_write_stmt("event", columns), params)


def write_teams(conn: Connection, values: dict[int, dict[str, str | None]]) -> None:
    """Write each event team's columns; teams with the same set of columns go
    in one executemany."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for event_team_id, cols in values.items():
        key = tuple(sorted(cols))
        groups.setdefault(key, []).append(
            {"et_id": event_team_id, **{f"v_{c}": cols[c] for c in key}}
        )
    for key, params in groups.items():
        conn.execute(_write_stmt("team", key), params)


@cache
def _write_stmt(scope: str, columns: tuple[str, ...]) -> Update:
    """The given leaderboard columns (``:v_<column>``) of the event
    ``:event_id`` or the event team ``:et_id``: built once per set of columns
    (a refresh writes the same few sets again and again)."""
    table, key = (rs.events, "event_id") if scope == "event" else (rs.event_teams, "et_id")
    return table.update().where(table.c.id == bindparam(key)).values({c: bindparam(f"v_{c}") for c in columns})


def stored_new_tables(conn: Connection, event_id: int) -> tuple[str | None, dict[int, str | None]]:
    """The event's and its teams' "new" HTML as stored now (one statement)."""
    event_html: str | None = None
    teams: dict[int, str | None] = {}
    for event_team_id, html in conn.execute(_stored_new_stmt(), {"event_id": event_id}):
        if event_team_id is None:
            event_html = html
        else:
            teams[event_team_id] = html
    return event_html, teams


@cache
def _stored_new_stmt() -> CompoundSelect:
    """(NULL, the event's "new" HTML), then (event team id, its "new" HTML)
    for each of ``:event_id``'s teams."""
    e, et = rs.events, rs.event_teams
    event_id = bindparam("event_id")
    return union_all(
        select(null().cast(Integer).label("event_team_id"), e.c.new_leaderboard_html).where(e.c.id == event_id),
        select(et.c.id, et.c.new_leaderboard_html).where(et.c.event_id == event_id),
    )


__all__ = [
    "EventFacts",
    "FileNames",
    "NEW_STATES",
    "ScoreColumn",
    "SubmissionRow",
    "event_id_by_name",
    "event_submissions",
    "event_team_ids",
    "event_teams_of",
    "fill_scores",
    "load_event_facts",
    "stored_new_tables",
    "team_submissions",
    "write_event",
    "write_teams",
]
