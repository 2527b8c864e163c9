"""Migrations: create, adopt, upgrade, downgrade, refuse; on SQLite and PostgreSQL.

The proof that our baseline *is* ramp-board 0.10.1 is a schema comparison
against a database made by ramp-database's own ``create_all``; the proof that
adoption is harmless is a row-for-row dump of a database built with
ramp-database's own tools, before and after ``upgrade`` and ``downgrade``.
"""

from __future__ import annotations

import select
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import Engine, create_engine, inspect, insert, text, update
from sqlalchemy.engine import make_url

from ramp_dispatcher.cli import main
from ramp_dispatcher.database import migrate, ramp_schema, revision
from ramp_dispatcher.database.dispatcher_schema import (
    NOTIFY_CHANNEL,
    OUR_INDEX_PREFIX,
    SUBMISSION_SCORES_INDEX,
    SUBMISSIONS_STATE_INDEX,
    daemons,
    runs,
)
from ramp_dispatcher.database.engine import make_engine, normalise_url
from ramp_dispatcher.errors import UserError
from rampboard import build_rampboard_db

OUR_TABLES = {migrate.VERSION_TABLE, migrate.MARKER_TABLE, runs.name, daemons.name}


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def engine(empty_db_url: str) -> Iterator[Engine]:
    eng = make_engine(empty_db_url)
    yield eng
    eng.dispose()


def plain_engine(url: str) -> Engine:
    """An engine as ramp-database would make one (no BEGIN IMMEDIATE), psycopg2 for PG."""
    return create_engine(normalise_url(url))


def table_names(eng: Engine) -> set[str]:
    return set(inspect(eng).get_table_names())


def describe(eng: Engine, tables: set[str] | None = None) -> dict[str, Any]:
    """Tables, columns, keys, constraints and indexes as SQLAlchemy reflects them.

    Our own additions (tables, the index on submissions) are left out so that
    ramp-board's part can be compared with ramp-database's.
    """
    insp = inspect(eng)
    names = sorted(tables if tables is not None else set(insp.get_table_names()) - OUR_TABLES)
    out: dict[str, Any] = {}
    for name in names:
        out[name] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                for c in insp.get_columns(name)
            ],
            "pk": (insp.get_pk_constraint(name)["constrained_columns"]),
            "unique": sorted(
                (u["name"] or "", tuple(u["column_names"]))
                for u in insp.get_unique_constraints(name)
            ),
            "fks": sorted(
                (
                    f["name"] or "",
                    tuple(f["constrained_columns"]),
                    f["referred_table"],
                    tuple(f["referred_columns"]),
                )
                for f in insp.get_foreign_keys(name)
            ),
            "indexes": sorted(
                (i["name"] or "", tuple(i["column_names"]), bool(i["unique"]))
                for i in insp.get_indexes(name)
                if not (i["name"] or "").startswith(OUR_INDEX_PREFIX)
            ),
        }
    if eng.dialect.name == "postgresql" and tables is None:
        out["(enums)"] = sorted((e["name"], tuple(e["labels"])) for e in insp.get_enums())
    return out


def dump(eng: Engine, tables: tuple[str, ...] = migrate.RAMP_BOARD_TABLES) -> dict[str, list]:
    """Every row of every table, raw (blobs as bytes), in a stable order."""
    out: dict[str, list] = {}
    with eng.connect() as conn:
        for name in tables:
            result = conn.exec_driver_sql(f'SELECT * FROM "{name}"')
            cols = tuple(result.keys())
            rows = [
                tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                for row in result
            ]
            out[name] = [cols, *sorted(rows, key=repr)]
    return out


def pg_objects(eng: Engine) -> dict[str, bool]:
    """Whether 0002's PostgreSQL trigger and function exist."""
    with eng.connect() as conn:
        trigger = conn.execute(
            text("SELECT count(*) FROM pg_trigger WHERE tgname = :n"), {"n": migrate.NOTIFY_TRIGGER}
        ).scalar_one()
        function = conn.execute(
            text("SELECT count(*) FROM pg_proc WHERE proname = :n"), {"n": migrate.NOTIFY_FUNCTION}
        ).scalar_one()
    return {"trigger": bool(trigger), "function": bool(function)}


def assert_our_objects(eng: Engine, present: bool) -> None:
    assert (runs.name in table_names(eng)) is present
    assert (daemons.name in table_names(eng)) is present
    indexes = {i["name"] for i in inspect(eng).get_indexes("submissions")}
    assert (SUBMISSIONS_STATE_INDEX in indexes) is present
    indexes = {i["name"] for i in inspect(eng).get_indexes("submission_scores")}
    assert (SUBMISSION_SCORES_INDEX in indexes) is present
    if eng.dialect.name == "postgresql":
        assert pg_objects(eng) == {"trigger": present, "function": present}


def insert_minimal_event(eng: Engine, n_events: int = 1) -> list[dict[str, int]]:
    """Raw rows for ``n_events`` events, each with one team signed up; returns their ids."""
    from datetime import datetime

    now = datetime(2024, 1, 1)
    out = []
    with eng.begin() as conn:
        wf = conn.execute(
            insert(ramp_schema.workflows).values(name="Classifier")
        ).inserted_primary_key[0]
        pb = conn.execute(
            insert(ramp_schema.problems).values(
                name="iris", workflow_id=wf, path_ramp_kit="/k", path_ramp_data="/d"
            )
        ).inserted_primary_key[0]
        for i in range(n_events):
            ev = conn.execute(
                insert(ramp_schema.events).values(
                    name=f"iris_{i}", title="t", problem_id=pb,
                    ramp_sandbox_name="starting_kit", path_ramp_submissions="/s",
                )
            ).inserted_primary_key[0]
            tm = conn.execute(
                insert(ramp_schema.teams).values(
                    name=f"team{i}", is_individual=True, creation_timestamp=now
                )
            ).inserted_primary_key[0]
            et = conn.execute(
                insert(ramp_schema.event_teams).values(
                    event_id=ev, team_id=tm, signup_timestamp=now
                )
            ).inserted_primary_key[0]
            out.append({"event_id": ev, "event_team_id": et})
    return out


# --------------------------------------------------------------------------- a) create


def test_upgrade_empty_database_creates_everything_then_is_a_no_op(engine: Engine) -> None:
    lines = migrate.upgrade(engine)
    assert any("empty database" in line for line in lines)
    assert any(f"applied {migrate.BASELINE}" in line for line in lines)
    assert any(f"applied {migrate.HEAD}" in line for line in lines)

    names = table_names(engine)
    assert set(migrate.RAMP_BOARD_TABLES) <= names
    assert len(migrate.RAMP_BOARD_TABLES) == 26
    assert runs.name in names
    assert names == set(migrate.RAMP_BOARD_TABLES) | OUR_TABLES
    assert_our_objects(engine, present=True)
    assert migrate.current(engine) == migrate.HEAD
    migrate.require_head(engine)  # does not raise

    before = describe(engine, table_names(engine))
    again = migrate.upgrade(engine)
    assert again == [f"database schema already at {migrate.HEAD} (head): nothing to do"]
    assert describe(engine, table_names(engine)) == before
    assert migrate.current(engine) == migrate.HEAD


def test_upgrade_in_steps_and_downgrade_to_baseline(engine: Engine) -> None:
    migrate.upgrade(engine, "baseline")
    assert migrate.current(engine) == migrate.BASELINE
    assert runs.name not in table_names(engine)
    with pytest.raises(UserError, match="db upgrade"):
        migrate.require_head(engine)

    lines = migrate.upgrade(engine)
    assert lines[-1] == f"database schema now at {migrate.HEAD} (head)"
    assert_our_objects(engine, present=True)

    lines = migrate.downgrade(engine)
    assert any(f"reverted {migrate.HEAD}" in line for line in lines)
    assert migrate.current(engine) == migrate.BASELINE
    assert_our_objects(engine, present=False)
    assert set(migrate.RAMP_BOARD_TABLES) <= table_names(engine)
    assert "nothing to do" in migrate.downgrade(engine)[0]


def test_revision_constants_match_the_scripts() -> None:
    from alembic.script import ScriptDirectory
    from ramp_database.model import Model

    script = ScriptDirectory.from_config(migrate._alembic_config(None, []))
    assert script.get_current_head() == migrate.HEAD
    assert script.get_base() == migrate.BASELINE
    # the daemon's start-up check reads the revision without Alembic, from this list
    history = [rev.revision for rev in script.walk_revisions("base", "heads")]
    assert tuple(reversed(history)) == revision.REVISIONS
    # the frozen table and enum lists are ramp-database 0.10.1's
    assert set(migrate.RAMP_BOARD_TABLES) == set(Model.metadata.tables)
    enums = {
        col.type.name
        for t in Model.metadata.tables.values()
        for col in t.columns
        if getattr(col.type, "name", None) and hasattr(col.type, "enums")
    }
    assert set(migrate.RAMP_BOARD_ENUMS) == enums


# --------------------------------------------------------------------------- b) schema equality


def test_baseline_matches_ramp_database_create_all(
    empty_db_url: str, other_db_url: str
) -> None:
    from ramp_database.model import Model

    theirs = plain_engine(other_db_url)
    ours = make_engine(empty_db_url)
    try:
        Model.metadata.create_all(theirs)
        migrate.upgrade(ours)
        assert table_names(ours) - OUR_TABLES == set(Model.metadata.tables)
        expected, actual = describe(theirs), describe(ours)
        for name in expected:  # per table first: a readable diff on failure
            assert actual[name] == expected[name], name
        assert actual == expected
    finally:
        theirs.dispose()
        ours.dispose()


def test_migrations_match_dispatcher_schema(empty_db_url: str, other_db_url: str) -> None:
    """The frozen migrations, applied up to head, give the live ``runs`` Table.

    When this fails, dispatcher_schema changed: write the next migration.
    """
    live = plain_engine(other_db_url)
    ours = make_engine(empty_db_url)
    try:
        ramp_schema.metadata.create_all(live)  # ramp-board's tables and dispatcher_runs
        migrate.upgrade(ours)
        assert migrate.current(ours) == migrate.HEAD
        ours_ = {runs.name, daemons.name}
        assert describe(ours, ours_) == describe(live, ours_)
    finally:
        live.dispose()
        ours.dispose()


def test_migration_0003_adds_and_removes_cancel_requested_at(engine: Engine) -> None:
    """0003 on a database with runs: the column appears empty, and goes on downgrade
    with the rows kept."""
    from datetime import datetime

    migrate.upgrade(engine, "0002_dispatcher_runs")
    ids = insert_minimal_event(engine)[0]
    now = datetime(2024, 1, 1)
    with engine.begin() as conn:
        sub = conn.execute(
            insert(ramp_schema.submissions).values(
                event_team_id=ids["event_team_id"], name="s1", hash_="h1",
                submission_timestamp=now, **ramp_schema.SUBMISSION_DEFAULTS,
            )
        ).inserted_primary_key[0]
        conn.exec_driver_sql(
            "INSERT INTO dispatcher_runs (submission_id, event_id, attempt, worker_type, owner, "
            f"status, created_at) VALUES ({sub}, {ids['event_id']}, 1, 'conda', 'o', 'running', "
            "'2024-01-01 00:00:00')"
        )
    columns = lambda: [c["name"] for c in inspect(engine).get_columns(runs.name)]  # noqa: E731
    assert "cancel_requested_at" not in columns()

    lines = migrate.upgrade(engine)
    assert any("applied 0003_cancel_requests" in line for line in lines)
    assert columns()[-1] == "cancel_requested_at"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT attempt, cancel_requested_at FROM dispatcher_runs")).all() == [
            (1, None)
        ]

    lines = migrate.downgrade(engine, "0002_dispatcher_runs")
    assert any("reverted 0003_cancel_requests" in line for line in lines)
    assert "cancel_requested_at" not in columns()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT attempt, status FROM dispatcher_runs")).all() == [
            (1, "running")
        ]


def _run_rows(eng: Engine, submission_ids: list[int], event_id: int) -> None:
    with eng.begin() as conn:
        for sid in submission_ids:
            conn.execute(
                insert(runs).values(
                    submission_id=sid, event_id=event_id, attempt=1, worker_type="conda",
                    owner="h:1:x", status="collected", created_at=datetime(2024, 1, 1),
                )
            )


def _daemon_row(eng: Engine, event_id: int) -> None:
    with eng.begin() as conn:
        conn.execute(
            insert(daemons).values(
                owner="h:1:2:x", event_id=event_id, worker_type="conda",
                started_at=datetime(2024, 1, 1), heartbeat_at=datetime(2024, 1, 1),
                stale_after=datetime(2024, 1, 1, 0, 1), breaker_state="closed",
            )
        )


def test_migration_0007_adds_and_removes_the_daemons_table(engine: Engine) -> None:
    """0007 on a database with runs: the table appears (empty) and goes on
    downgrade, the runs kept; on SQLite its trigger goes with it."""
    migrate.upgrade(engine, "0006_runs_cascade")
    ids = insert_minimal_event(engine)[0]
    assert daemons.name not in table_names(engine)
    lines = migrate.upgrade(engine)
    assert any("applied 0007_dispatcher_daemons" in line for line in lines)
    _daemon_row(engine, ids["event_id"])
    with engine.connect() as conn:
        assert conn.execute(text("SELECT owner, breaker_state FROM dispatcher_daemons")).all() == [
            ("h:1:2:x", "closed")
        ]
    lines = migrate.downgrade(engine, "0006_runs_cascade")
    assert any("reverted 0007_dispatcher_daemons" in line for line in lines)
    assert daemons.name not in table_names(engine) and runs.name in table_names(engine)
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            assert conn.execute(
                text("SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name LIKE '%daemons%'")
            ).scalar_one() == 0
        # ramp-database's DELETE of an event still works without the table
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM event_teams"))
            conn.execute(text("DELETE FROM events"))


def test_ramp_database_delete_event_takes_the_runs_along(empty_db_url: str, tmp_path: Path) -> None:
    """ramp-database 0.10.1's own delete_event on an event the dispatcher ran:
    before 0006 PostgreSQL refuses it (and SQLite keeps orphan runs); from 0006
    on, the event goes and so do its runs (and from 0007 its daemons' rows), on
    both backends and back again."""
    from ramp_database.tools.event import delete_event
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.orm import Session

    info = build_rampboard_db(empty_db_url, tmp_path)
    eng = make_engine(empty_db_url)
    theirs = plain_engine(empty_db_url)  # ramp-database's kind of connection
    try:
        migrate.upgrade(eng, "0005_waiting_index")
        _run_rows(eng, sorted(info["submissions"].values()), info["event_id"])
        if eng.dialect.name == "postgresql":
            with Session(theirs) as session, pytest.raises(IntegrityError, match="dispatcher_runs"):
                delete_event(session, info["event"])

        assert any("applied 0006_runs_cascade" in line for line in migrate.upgrade(eng))
        # down and up again: the downgrade restores 0005's constraints cleanly
        migrate.downgrade(eng, "0005_waiting_index")
        migrate.upgrade(eng)
        _daemon_row(eng, info["event_id"])  # 0007's table: its rows go with the event too
        with Session(theirs) as session:
            delete_event(session, info["event"])
        with eng.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM events")).scalar_one() == 0
            assert conn.execute(text("SELECT count(*) FROM submissions")).scalar_one() == 0
            assert conn.execute(text("SELECT count(*) FROM dispatcher_runs")).scalar_one() == 0
            assert conn.execute(text("SELECT count(*) FROM dispatcher_daemons")).scalar_one() == 0
        if eng.dialect.name == "postgresql":
            fks = inspect(eng).get_foreign_keys(runs.name)
            assert sorted((f["referred_table"], f["options"].get("ondelete")) for f in fks) == [
                ("events", "CASCADE"), ("submissions", "CASCADE")
            ]
    finally:
        theirs.dispose()
        eng.dispose()


# --------------------------------------------------------------------------- c) adoption


def test_adopt_rampboard_database_changes_no_row(empty_db_url: str, tmp_path: Path) -> None:
    info = build_rampboard_db(empty_db_url, tmp_path)
    eng = make_engine(empty_db_url)
    try:
        rows_before = dump(eng)
        schema_before = describe(eng)
        tables_before = table_names(eng)
        assert sum(len(rows) - 1 for rows in rows_before.values()) > 50  # really filled
        assert len(rows_before["submissions"]) - 1 == len(info["submissions"]) == 4
        assert migrate.current(eng) is None

        lines = migrate.upgrade(eng)
        assert any("adopting" in line for line in lines)
        assert any(line.startswith(f"stamped {migrate.BASELINE} (recorded as applied, not run)")
                   for line in lines)
        assert any(f"applied {migrate.HEAD}" in line for line in lines)
        assert not any(f"applied {migrate.BASELINE}" in line for line in lines)
        assert migrate.current(eng) == migrate.HEAD
        assert dump(eng) == rows_before
        assert describe(eng) == schema_before  # not one column or constraint changed
        assert table_names(eng) == tables_before | {migrate.VERSION_TABLE, runs.name, daemons.name}
        assert_our_objects(eng, present=True)
        assert "nothing to do" in migrate.upgrade(eng)[0]

        lines = migrate.downgrade(eng)
        assert migrate.current(eng) == migrate.BASELINE
        assert dump(eng) == rows_before
        assert describe(eng) == schema_before
        assert_our_objects(eng, present=False)

        # "base" on an adopted database un-adopts: ramp-board's tables are not ours
        lines = migrate.downgrade(eng, "base")
        assert any("not its to drop" in line for line in lines)
        assert any(line.startswith(f"unstamped {migrate.BASELINE}") for line in lines)
        assert migrate.current(eng) is None
        assert table_names(eng) == tables_before
        assert dump(eng) == rows_before
        assert describe(eng) == schema_before

        # and it can be adopted again
        migrate.upgrade(eng)
        assert migrate.current(eng) == migrate.HEAD
        assert dump(eng) == rows_before
    finally:
        eng.dispose()


def test_downgrade_base_of_created_database_needs_empty_tables(engine: Engine) -> None:
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(insert(ramp_schema.extensions).values(name="py"))
    with pytest.raises(UserError, match=r"extensions \(1\)") as err:
        migrate.downgrade(engine, "base")
    assert "db downgrade baseline" in str(err.value)
    # refused as a whole: nothing was undone
    assert migrate.current(engine) == migrate.HEAD
    assert_our_objects(engine, present=True)

    with engine.begin() as conn:
        conn.execute(text("DELETE FROM extensions"))
    lines = migrate.downgrade(engine, "base")
    assert any("dropped ramp-board's tables" in line for line in lines)
    assert table_names(engine) == set()
    if engine.dialect.name == "postgresql":
        assert inspect(engine).get_enums() == []
    assert migrate.current(engine) is None
    # back to an empty database, which upgrade creates again
    migrate.upgrade(engine)
    assert migrate.current(engine) == migrate.HEAD


# --------------------------------------------------------------------------- d) NOTIFY


@pytest.mark.parametrize("backend", ["postgresql"])  # LISTEN/NOTIFY is PostgreSQL only
def test_trigger_notifies_new_submissions_with_event_id(engine: Engine) -> None:
    import psycopg2
    import psycopg2.extensions

    migrate.upgrade(engine)
    ids = insert_minimal_event(engine, n_events=2)[1]  # the 2nd event: id 2, not a lucky 1

    url = make_url(engine.url)
    listener = psycopg2.connect(
        host=url.host, port=url.port or 5432, user=url.username, dbname=url.database
    )
    listener.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    try:
        listener.cursor().execute(f"LISTEN {NOTIFY_CHANNEL}")

        def received(timeout: float) -> list[str]:
            got = []
            if select.select([listener], [], [], timeout)[0]:
                listener.poll()
                while listener.notifies:
                    n = listener.notifies.pop(0)
                    assert n.channel == NOTIFY_CHANNEL
                    got.append(n.payload)
            return got

        from datetime import datetime

        with engine.begin() as conn:
            sub_id = conn.execute(
                insert(ramp_schema.submissions).values(
                    event_team_id=ids["event_team_id"], name="s1", hash_="h1",
                    submission_timestamp=datetime(2024, 1, 1),
                    **ramp_schema.SUBMISSION_DEFAULTS,
                )
            ).inserted_primary_key[0]
        assert received(5) == [str(ids["event_id"])]

        s = ramp_schema.submissions
        with engine.begin() as conn:
            conn.execute(update(s).where(s.c.id == sub_id).values(state="training"))
        assert received(0.5) == []
        with engine.begin() as conn:
            conn.execute(update(s).where(s.c.id == sub_id).values(state="new"))
        assert received(5) == [str(ids["event_id"])]
        # an edit that does not touch state does not wake anyone
        with engine.begin() as conn:
            conn.execute(update(s).where(s.c.id == sub_id).values(error_msg="x"))
        assert received(0.5) == []
        # a submission inserted in another state does not either
        with engine.begin() as conn:
            conn.execute(
                insert(s).values(
                    event_team_id=ids["event_team_id"], name="s2", hash_="h2",
                    submission_timestamp=datetime(2024, 1, 1),
                    **{**ramp_schema.SUBMISSION_DEFAULTS, "state": "scored"},
                )
            )
        assert received(0.5) == []

        migrate.downgrade(engine)
        with engine.begin() as conn:
            conn.execute(update(s).where(s.c.id == sub_id).values(state="new"))
        assert received(0.5) == []
    finally:
        listener.close()


# --------------------------------------------------------------------------- e) refusals


def test_refuses_database_with_unrelated_tables(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount FLOAT)"))
    with pytest.raises(UserError, match="neither empty nor a ramp-board database.*invoices"):
        migrate.upgrade(engine)
    assert table_names(engine) == {"invoices"}


def test_refuses_database_with_part_of_rampboard_tables(engine: Engine) -> None:
    some = [ramp_schema.metadata.tables[n] for n in ("users", "teams", "workflows")]
    ramp_schema.metadata.create_all(engine, tables=some)
    with pytest.raises(UserError, match=r"only 3 of ramp-board 0.10.1's 26 tables.*submissions"):
        migrate.upgrade(engine)
    assert table_names(engine) == {"users", "teams", "workflows"}
    assert migrate.current(engine) is None


def test_refuses_rampboard_database_missing_a_column(engine: Engine) -> None:
    from ramp_database.model import Model

    Model.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE submissions DROP COLUMN max_ram"))
    with pytest.raises(UserError, match=r"lacks column.*submissions\.max_ram"):
        migrate.upgrade(engine)
    assert migrate.VERSION_TABLE not in table_names(engine)


def test_adopts_rampboard_database_beside_other_tables(engine: Engine) -> None:
    """Someone else's tables next to ramp-board's do not stop adoption; they are named."""
    from ramp_database.model import Model

    Model.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE invoices (id INTEGER PRIMARY KEY)"))
    lines = migrate.upgrade(engine)
    assert "other tables left alone: invoices" in lines
    assert migrate.current(engine) == migrate.HEAD
    assert "invoices" in table_names(engine)


def test_refuses_our_tables_without_a_revision(engine: Engine) -> None:
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text(f"DELETE FROM {migrate.VERSION_TABLE}"))
    with pytest.raises(UserError, match="edited by hand"):
        migrate.upgrade(engine)


def test_require_head_and_unknown_revisions(engine: Engine) -> None:
    with pytest.raises(UserError, match=rf"at none .*needs {migrate.HEAD}.*`ramp-dispatcher db upgrade --conf"):
        migrate.require_head(engine)
    with pytest.raises(UserError, match="db upgrade --config /etc/ramp/config.yml"):
        migrate.require_head(engine, "/etc/ramp/config.yml")
    with pytest.raises(UserError, match="unknown revision 'nope'"):
        migrate.upgrade(engine, "nope")
    assert "nothing to downgrade" in migrate.downgrade(engine)[0]
    assert table_names(engine) == set()

    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {migrate.VERSION_TABLE} SET version_num = '0099_future'"))
    with pytest.raises(UserError, match="newer ramp-dispatcher"):
        migrate.require_head(engine)
    with pytest.raises(UserError, match="newer ramp-dispatcher"):
        migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {migrate.VERSION_TABLE} VALUES ('{migrate.HEAD}')"))
    with pytest.raises(UserError, match="several revisions .*fix it by hand"):
        migrate.require_head(engine)


def test_concurrent_upgrades_do_not_collide(engine: Engine) -> None:
    """Two admins upgrading at once: one creates, the other then finds it done.

    (Alembic's context is process-global; the lock migrate takes before any
    Alembic code runs also serialises threads, which is what lets this test
    use threads instead of processes.)
    """
    results: list[list[str] | BaseException] = []

    def run() -> None:
        try:
            results.append(migrate.upgrade(engine))
        except BaseException as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(r, list) for r in results), results
    assert sorted("nothing to do" in r[0] for r in results) == [False, True]  # type: ignore[index]
    assert migrate.current(engine) == migrate.HEAD


# --------------------------------------------------------------------------- f) CLI


def test_cli_db_upgrade_current_downgrade(
    empty_db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "upgrade", "--url", empty_db_url]) == 0
    out = capsys.readouterr().out
    assert "empty database" in out and f"applied {migrate.HEAD}" in out

    assert main(["db", "current", "--url", empty_db_url]) == 0
    assert capsys.readouterr().out.strip() == migrate.HEAD

    assert main(["db", "upgrade", "--url", empty_db_url]) == 0
    assert "nothing to do" in capsys.readouterr().out

    assert main(["db", "downgrade", "--url", empty_db_url]) == 0
    assert f"reverted {migrate.HEAD}" in capsys.readouterr().out
    assert main(["db", "current", "--url", empty_db_url]) == 0
    assert capsys.readouterr().out.strip() == migrate.BASELINE


def test_cli_refusal_exits_2(empty_db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    eng = make_engine(empty_db_url)
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE invoices (id INTEGER PRIMARY KEY)"))
    eng.dispose()
    assert main(["db", "upgrade", "--url", empty_db_url]) == 2
    assert "invoices" in capsys.readouterr().err


def test_cli_bad_config_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-config.yml"
    assert main(["db", "upgrade", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err
