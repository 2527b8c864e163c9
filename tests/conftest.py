"""Shared fixtures: fresh databases on SQLite and on a real PostgreSQL.

Every database test runs once per backend. PostgreSQL is the server on
127.0.0.1:5432 (override with RAMP_DISPATCHER_TEST_PG, a URL to a maintenance
database); each test gets its own database, dropped afterwards. If the server
is unreachable the PostgreSQL variants are skipped with the reason, unless
RAMP_DISPATCHER_REQUIRE_PG=1 (CI), where they fail.
"""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PG_ADMIN_URL = os.environ.get(
    "RAMP_DISPATCHER_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
_counter = itertools.count()
_pg_problem: list[str] = []


def _pg_reachable() -> str | None:
    """None when PostgreSQL answers, else why not (checked once)."""
    if not _pg_problem:
        try:
            engine = create_engine(PG_ADMIN_URL)
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
            _pg_problem.append("")
        except Exception as exc:  # any reason: refused, auth, missing driver
            _pg_problem.append(f"PostgreSQL at {PG_ADMIN_URL} unreachable: {exc}".splitlines()[0])
    return _pg_problem[0] or None


def create_pg_database() -> str:
    """Create an empty PostgreSQL database; return its URL."""
    problem = _pg_reachable()
    if problem:
        if os.environ.get("RAMP_DISPATCHER_REQUIRE_PG") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    name = f"rdtest_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    name = make_url(url).database
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :n AND pid <> pg_backend_pid()"
            ),
            {"n": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    engine.dispose()


#: test modules that run no real ramp-test, daemon, Dask cluster or instance:
#: the inner loop's subset (``./dev test --quick``, a minute or two)
QUICK_MODULES = {
    "test_admin", "test_aws_policy", "test_config", "test_dask_files", "test_imports",
    "test_leaderboards_equal", "test_leaderboards_flat", "test_listen", "test_metrics", "test_migrations",
    "test_rampboard_compat", "test_runs", "test_sdnotify",
}  # fmt: skip


#: the modules that take longest (longest first, as read on a whole run of
#: the suite here) go first: ``--dist loadfile`` hands out whole files in
#: collection order, and one of these handed out last keeps one process busy
#: for minutes after the other ran out of work
LONGEST_FIRST = (
    "test_reliability", "test_dask_worker", "test_slow_calls", "test_dispatcher", "test_aws_worker",
    "test_control", "test_hostile", "test_leaderboards_daemon", "test_breaker",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__ in QUICK_MODULES:
            item.add_marker(pytest.mark.quick)

    def rank(item: pytest.Item) -> int:
        name = item.module.__name__ if item.module is not None else ""
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Each phase's report kept on the item (``item.rep_call``), for fixtures
    that add what they know to a failure (the Dask cluster's logs)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def _fresh_db(backend: str, sqlite_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{sqlite_path}"
        return
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
def empty_db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, empty database on the parametrized backend."""
    yield from _fresh_db(backend, tmp_path / "ramp.sqlite")


@pytest.fixture
def other_db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A second fresh database on the same backend, for side-by-side comparisons."""
    yield from _fresh_db(backend, tmp_path / "other.sqlite")
