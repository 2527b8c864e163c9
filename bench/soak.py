"""Soak: hundreds of consecutive runs through one real daemon.

``ramp-dispatcher run`` as a subprocess (no hunger exit) with the stand-in
ramp-test (a run takes milliseconds of its own), fed with trivial submissions
through ``admin.add_submission`` so that its queue never runs dry. After a
warm-up, and again after all runs, with the daemon idle: its RSS (target:
growth <= 10 MB), open file descriptors, child processes and threads (target:
back to their starting count).

PostgreSQL by default (production's database, with the LISTEN thread); SQLite
if PostgreSQL is unavailable or not requested.
"""

from __future__ import annotations

import time

from sqlalchemy import func, select

from .common import (
    CpuWindow,
    Daemon,
    Deployment,
    Row,
    backends_to_run,
    children,
    n_fds,
    n_threads,
    rss_kib,
    say,
    scratch_dir,
    settle,
    temp_database,
    write_standin_env,
)

N_WORKERS = 4
TRIVIAL = "from sklearn.dummy import DummyClassifier\n\n\ndef get_estimator():\n    return DummyClassifier()\n"
FINAL = ("scored", "training_error", "checking_error")
#: how long the daemon must be idle before a snapshot (its waiter threads end)
SETTLE_S = 2.0


def run(quick: bool, backends: list[str]) -> list[Row]:
    available = backends_to_run(backends)
    if not available:
        return []
    backend = "postgresql" if "postgresql" in available else available[0]
    return run_backend(backend, warmup=10 if quick else 25, total=100 if quick else 500)


def _snapshot(pid: int) -> dict[str, int]:
    return {"rss_kib": rss_kib(pid), "fds": n_fds(pid), "children": len(children(pid)),
            "threads": n_threads(pid)}  # fmt: skip


def run_backend(backend: str, warmup: int, total: int) -> list[Row]:
    from ramp_dispatcher.database.ramp_schema import submissions as S

    with scratch_dir(f"soak-{backend}") as root, temp_database(backend, root) as url:
        env = write_standin_env(root / "standin-env")
        dep = Deployment(
            root / "deployment", url,
            dispatcher={"n_workers": N_WORKERS, "poll_interval": 5, "time_between_collection": 1,
                        "hunger_policy": None},
            worker={"conda_env": str(env)},
        )  # fmt: skip
        added = 0

        def counts() -> tuple[int, int]:
            """(submissions not yet in a final state, submissions in a final state)."""
            with dep.engine.connect().execution_options(sqlite_readonly=True) as conn:
                by_state = dict(
                    conn.execute(
                        select(S.c.state, func.count())
                        .where(S.c.name.like("soak_%"))
                        .group_by(S.c.state)
                    ).all()
                )
            done = sum(v for k, v in by_state.items() if k in FINAL)
            return sum(by_state.values()) - done, done

        def feed_until(target: int, daemon: Daemon, label: str, report_every: int) -> float:
            """Keep ~2 x n_workers waiting until ``target`` runs have finished."""
            nonlocal added
            t0 = time.monotonic()
            last_report = 0
            deadline = t0 + 60 + 2.0 * target
            while True:
                pending, done = counts()
                if done >= target:
                    return time.monotonic() - t0
                if not daemon.alive():
                    raise RuntimeError(f"the daemon died during the soak:\n{daemon.tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{label}: only {done} of {target} runs finished")
                while pending < 2 * N_WORKERS and added < target:
                    dep.add_submission(f"soak_{added:05d}", TRIVIAL)
                    added += 1
                    pending += 1
                if report_every and done - last_report >= report_every:
                    last_report = done - done % report_every
                    s = _snapshot(daemon.pid)
                    say(f"    {done:4d} runs: RSS {s['rss_kib'] / 1024:.1f} MB, fds {s['fds']}, "
                        f"threads {s['threads']}, children {s['children']}")  # fmt: skip
                time.sleep(0.02)

        settle()
        daemon = Daemon(dep.daemon_command(), root / "daemon.log").start()
        try:
            say(f"  [{backend}] warm-up: {warmup} runs (n_workers {N_WORKERS}) ...")
            feed_until(warmup, daemon, "warm-up", 0)
            time.sleep(SETTLE_S)
            before = _snapshot(daemon.pid)
            say(f"  [{backend}] after warm-up: RSS {before['rss_kib'] / 1024:.1f} MB, fds "
                f"{before['fds']}, threads {before['threads']}, children {before['children']}")  # fmt: skip
            daemon.sample()
            tree0, own0 = daemon.tree_cpu(), daemon.cpu_s
            with CpuWindow(live=daemon.tree_cpu) as window:
                seconds = feed_until(warmup + total, daemon, "soak", max(total // 5, 1))
            time.sleep(SETTLE_S)
            daemon.sample()
            per_run = (daemon.tree_cpu() - tree0) / total
            own_per_run = (daemon.cpu_s - own0) / total
            rate = total / seconds
            say(f"  [{backend}] {total} runs in {seconds:.1f} s: {rate:.1f} runs/s; CPU per run "
                f"{1000 * per_run:.0f} ms (daemon itself {1000 * own_per_run:.0f} ms, the rest its "
                f"supervisors and the stand-in ramp-test); {window.describe()}")  # fmt: skip
            after = _snapshot(daemon.pid)
            say(f"  [{backend}] after {total} runs: RSS {after['rss_kib'] / 1024:.1f} MB, fds "
                f"{after['fds']}, threads {after['threads']}, children {after['children']}")  # fmt: skip
            # An idle daemon (runs none, waits for news) should cost nothing.
            idle_s = 3.0 if total <= 100 else 15.0
            daemon.sample()
            cpu0 = daemon.cpu_s
            time.sleep(idle_s)
            daemon.sample()
            idle_share = (daemon.cpu_s - cpu0) / idle_s
            say(f"  [{backend}] idle for {idle_s:.0f} s: daemon CPU {1000 * (daemon.cpu_s - cpu0):.0f} ms "
                f"({100 * idle_share:.2f}%)")  # fmt: skip
            with dep.engine.connect() as conn:
                failed = conn.execute(
                    select(func.count()).select_from(S).where(
                        S.c.name.like("soak_%"), S.c.state != "scored"
                    )
                ).scalar_one()
        finally:
            code = daemon.stop()
        dep.close()
    if failed:
        say(f"  WARNING: {failed} soak submissions did not end scored")
    say(f"  [{backend}] daemon stopped on SIGTERM with exit code {code}")
    growth_mb = (after["rss_kib"] - before["rss_kib"]) / 1024
    b = f"soak[{backend}]"
    return [
        Row(b, f"RSS growth over {total} runs",
            f"{growth_mb:+.1f} MB ({before['rss_kib'] / 1024:.1f} -> {after['rss_kib'] / 1024:.1f})",
            "<= 10 MB", growth_mb <= 10),  # fmt: skip
        Row(b, "open fds before -> after", f"{before['fds']} -> {after['fds']}", "back to start",
            after["fds"] <= before["fds"]),  # fmt: skip
        Row(b, "child processes before -> after", f"{before['children']} -> {after['children']}",
            "back to start", after["children"] <= before["children"]),  # fmt: skip
        Row(b, "threads before -> after", f"{before['threads']} -> {after['threads']}",
            "back to start", after["threads"] <= before["threads"]),  # fmt: skip
        Row(b, "throughput (stand-in runs)", f"{rate:.1f} runs/s"),
        Row(b, "CPU per run: daemon / whole tree", f"{1000 * own_per_run:.0f} / {1000 * per_run:.0f} ms"),
        Row(b, "runs not scored", str(failed), "0", failed == 0),
        Row(b, "idle daemon CPU (poll_interval 5 s)", f"{100 * idle_share:.2f}%"),
    ]
