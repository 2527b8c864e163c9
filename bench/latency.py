"""Latency: a submission inserted as ``new`` to its state ``training``.

The real daemon runs as a subprocess with 4 workers and the stand-in ramp-test
(runs take milliseconds, so a free slot is always there). Submissions are added
one at a time with ``admin.add_submission`` (ramp-database's rows, in one
transaction), each at a random moment, and the bench waits until the daemon has
moved it to ``training``.

- PostgreSQL: ``poll_interval: 60``, so only the NOTIFY trigger can explain a
  fast start. Target p50 <= 100 ms.
- SQLite: polling only, ``poll_interval: 1``. Target p50 <= poll + 100 ms.

The figure is from the commit of the insert (taken by the bench right after
COMMIT returns) to the row's ``training_timestamp`` (written by the daemon when
the worker has started the run); both are UTC epoch readings of this machine's
clock, with microseconds. Also shown: the row's own ``training_timestamp -
submission_timestamp``, which adds the time ``add_submission`` spends before
its commit (the row is invisible meanwhile), and commit -> seen, measured by
polling the row every 5 ms.
"""

from __future__ import annotations

import random
import time

from sqlalchemy import func, select

from .common import (
    Daemon,
    Deployment,
    Row,
    backends_to_run,
    percentile,
    say,
    scratch_dir,
    settle,
    temp_database,
    utc_seconds,
    write_standin_env,
)

N_WORKERS = 4
POLL = {"postgresql": 60.0, "sqlite": 1.0}
TRIVIAL = "from sklearn.dummy import DummyClassifier\n\n\ndef get_estimator():\n    return DummyClassifier()\n"
IN_FLIGHT = ("sent_to_training", "training", "tested")


def run(quick: bool, backends: list[str]) -> list[Row]:
    n = 20 if quick else 50
    rows: list[Row] = []
    for backend in backends_to_run(backends):
        rows += run_backend(backend, n)
    return rows


def run_backend(backend: str, n: int) -> list[Row]:
    from ramp_dispatcher.database.ramp_schema import submissions as S

    poll = POLL[backend]
    rng = random.Random(7)
    with scratch_dir(f"latency-{backend}") as root, temp_database(backend, root) as url:
        env = write_standin_env(root / "standin-env")
        dep = Deployment(
            root / "deployment", url,
            dispatcher={"n_workers": N_WORKERS, "poll_interval": poll, "time_between_collection": 1,
                        "hunger_policy": None},
            worker={"conda_env": str(env)},
        )  # fmt: skip

        def state(sid: int) -> str:
            with dep.engine.connect().execution_options(sqlite_readonly=True) as conn:
                return conn.execute(select(S.c.state).where(S.c.id == sid)).scalar_one()

        def in_flight() -> int:
            with dep.engine.connect().execution_options(sqlite_readonly=True) as conn:
                return conn.execute(
                    select(func.count()).select_from(S).where(S.c.state.in_(IN_FLIGHT))
                ).scalar_one()

        limit = poll + 30.0
        settle()
        daemon = Daemon(dep.daemon_command(), root / "daemon.log").start()
        try:
            # Warm-up: the daemon is up, listening, and has run something.
            for i in range(2):
                sid, _ = dep.add_submission(f"warmup_{i}", TRIVIAL)
                _wait(lambda: state(sid) == "scored", limit, daemon, f"warm-up {sid} scored")
            ids: list[int] = []
            seen: dict[int, float] = {}
            committed: dict[int, float] = {}
            say(f"  [{backend}] {n} submissions, poll_interval {poll:g} s, n_workers {N_WORKERS} ...")
            for i in range(n):
                # A random moment, so submissions do not line up with the poll phase.
                time.sleep(rng.uniform(0, poll if backend == "sqlite" else 0.1))
                _wait(lambda: in_flight() < N_WORKERS - 1, limit, daemon, "a free worker slot")
                sid, committed[sid] = dep.add_submission(f"lat_{i:03d}", TRIVIAL)
                _wait(lambda: state(sid) not in ("new", "sent_to_training"), limit, daemon,
                      f"submission {sid} training")  # fmt: skip
                seen[sid] = time.time()
                ids.append(sid)
                if backend == "postgresql" and i >= 2 and seen[sid] - committed[sid] > 5:
                    raise RuntimeError("NOTIFY wake-up is not working: a start took > 5 s")
            # let the last runs finish: a stopped daemon leaves its runs going
            _wait(lambda: in_flight() == 0, limit, daemon, "the last runs")
        finally:
            daemon.stop()
        with dep.engine.connect() as conn:
            stamps = {
                r.id: r
                for r in conn.execute(
                    select(S.c.id, S.c.submission_timestamp, S.c.sent_to_training_timestamp,
                           S.c.training_timestamp).where(S.c.id.in_(ids))  # fmt: skip
                )
            }
        dep.close()

    def ms(values: list[float]) -> list[float]:
        return [1000 * v for v in values]

    training = {i: utc_seconds(stamps[i].training_timestamp) for i in ids}
    claimed = {i: utc_seconds(stamps[i].sent_to_training_timestamp) for i in ids}
    submitted = {i: utc_seconds(stamps[i].submission_timestamp) for i in ids}
    main = ms([training[i] - committed[i] for i in ids])
    whole_row = ms([training[i] - submitted[i] for i in ids])
    insert = ms([committed[i] - submitted[i] for i in ids])
    to_claim = ms([claimed[i] - committed[i] for i in ids])
    to_start = ms([training[i] - claimed[i] for i in ids])
    client = ms([seen[i] - committed[i] for i in ids])
    p50, p95 = percentile(main, 50), percentile(main, 95)

    def p(values: list[float]) -> str:
        return f"p50 {percentile(values, 50):.0f} / p95 {percentile(values, 95):.0f} ms"

    say(f"  [{backend}] inserted (commit) -> training: {p(main)}, max {max(main):.0f} ms, n={len(ids)}")
    say(f"  [{backend}]   of which commit -> claimed (sent_to_training) {p(to_claim)}, "
        f"claimed -> training (worker start) {p(to_start)}")  # fmt: skip
    say(f"  [{backend}] row submission_timestamp -> training_timestamp {p(whole_row)} "
        f"(add_submission before its commit: {p(insert)})")  # fmt: skip
    say(f"  [{backend}] commit -> seen training (client polling every 5 ms) {p(client)}")
    target_ms = 100.0 if backend == "postgresql" else 1000 * poll + 100
    how = "NOTIFY" if backend == "postgresql" else f"polling {poll:g} s"
    b = f"latency[{backend}]"
    return [
        Row(b, f"new -> training p50 ({how})", f"{p50:.0f} ms", f"<= {target_ms:.0f} ms",
            p50 <= target_ms),  # fmt: skip
        Row(b, f"new -> training p95 (n={len(ids)})", f"{p95:.0f} ms"),
        Row(b, "  commit -> claimed p50", f"{percentile(to_claim, 50):.0f} ms"),
        Row(b, "  claimed -> training p50", f"{percentile(to_start, 50):.0f} ms"),
        Row(b, "row submission_ts -> training_ts p50", f"{percentile(whole_row, 50):.0f} ms"),
    ]


def _wait(predicate, timeout: float, daemon: Daemon, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if not daemon.alive():
            raise RuntimeError(f"the daemon died while waiting for {what}:\n{daemon.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}:\n{daemon.tail()}")
        time.sleep(0.005)
