"""One team's refresh reads only its own rows, through indexes: its cost does
not grow with the event (``bench/leaderboards.py`` measures it; this checks
the reason). SQLite's EXPLAIN QUERY PLAN shows every table reached by a
SEARCH, none by a SCAN, once the daemon's migrations have added their indexes."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from sqlalchemy import event as sa_event

from ramp_dispatcher.database import migrate
from ramp_dispatcher.database.engine import make_engine
from ramp_dispatcher.leaderboards import data, update as boards

from leaderboard_event import EVENT, build_event


def test_a_team_refresh_reads_through_indexes_only(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ramp.sqlite'}"
    build_event(url, tmp_path)
    engine = make_engine(url)
    with contextlib.redirect_stdout(io.StringIO()):
        migrate.upgrade(engine)  # adopt ramp-board's database, as `db upgrade` does
    with engine.connect() as conn:
        event_id = data.event_id_by_name(conn, EVENT)
        ctx = boards.Context.load(conn, event_id)
        boards.event_tables(conn, ctx)  # the daemon's start-up refresh
        team = data.event_team_ids(conn, event_id)[0]
        subs = data.team_submissions(conn, ctx.event, team)
        assert len([s for s in subs if s.state == "scored"]) >= 3
        ctx.forget(s.id for s in subs)  # as after results of all of them

        statements: list[tuple[str, object]] = []

        def record(_c, _cursor, statement, parameters, _context, _many) -> None:
            statements.append((statement, parameters))

        sa_event.listen(engine, "before_cursor_execute", record)
        try:
            tables = boards.team_tables(conn, ctx, team)
        finally:
            sa_event.remove(engine, "before_cursor_execute", record)
        assert tables["leaderboard_html"] and tables["new_leaderboard_html"]
        assert len(statements) >= 4  # submissions, scores, folds, fold scores
        for statement, parameters in statements:
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
            scans = [step for step in plan if step.startswith("SCAN")]
            assert not scans, f"{' '.join(statement.split())[:120]}...: {plan}"
    engine.dispose()


def test_a_table_is_rendered_again_only_for_other_cells(monkeypatch) -> None:
    """A refresh renders each table it did not change again: the same cells
    (values and their types) give the stored HTML without rendering, and any
    other cell is rendered, down to -0.0 for 0.0, 1 for 1.0 or "1" for 1."""
    from ramp_dispatcher.leaderboards import tables

    renders: list[object] = []
    render = tables._render

    def counted(names, table, kinds):
        renders.append(table)
        return render(names, table, kinds)

    monkeypatch.setattr(tables, "_render", counted)
    monkeypatch.setattr(tables, "_RENDERED", tables._Rendered(size=4))

    def board(score: object, text: object = "a") -> tuple[list[str], list[list[object]], list[str]]:
        return ["team", "score"], [[text, 0.25], ["b", score]], ["text", "float"]

    first = tables.to_html(board(0.0))
    assert first == render(*board(0.0))
    assert tables.to_html(board(0.0)) == first and len(renders) == 1
    negative = tables.to_html(board(-0.0))
    assert len(renders) == 2 and negative != first and "-0.0" in negative
    assert tables.to_html(board(0.0)) == first and len(renders) == 2  # still kept
    as_text = [tables.to_html(board(0.5, text)) for text in ("1", 1, 1.0, True)]
    assert len(renders) == 6  # each rendered: equal values of other types are other cells
    assert as_text == [render(*board(0.5, text)) for text in ("1", 1, 1.0, True)]
    for score in (0.1, 0.2, 0.3, 0.4, 0.6):  # more than it keeps: the oldest goes
        tables.to_html(board(score))
    tables.to_html(board(0.0))
    assert len(renders) == 12
