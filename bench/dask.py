"""Dask: 20 real iris submissions on one scheduler and two single-slot Dask workers.

The cluster is a real ``dask scheduler`` and two ``dask worker --nthreads 1
--resources ramp=1`` processes on 127.0.0.1 (this environment's); the daemon
is ``ramp-dispatcher run`` in a subprocess with ``worker_type: dask`` and
``n_workers: 2``; kit and data go to the Dask workers through their cache
(no shared filesystem). As in batch's running-daemon measurement, the daemon
is up and has run one submission when the 20 turn ``new`` at once. Figures:

- wall / ideal: first claim to last result written, over the sum of the
  submissions' standalone ramp-test times / 2. Target <= 1.15.
- the daemon's own CPU / wall (its threads, Dask client included). Target <= 1 %.
- per-run overhead: (2 x wall - sum of standalone times) / 20, the slot time
  each run costs beyond ramp-test itself; the same batch through the conda
  worker gives the comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .batch import FAST, HOLD_STATE, SLOW, _ids, _span, run_standalone
from .common import (
    VENV_BIN,
    CpuWindow,
    Daemon,
    Deployment,
    Row,
    proc_stat,
    say,
    scratch_dir,
    settle,
    temp_database,
    wait_for,
)

N_WORKERS = 2
N_SUBMISSIONS = 20
DASK = VENV_BIN / "dask"
#: the lighter Dask settings deploy/dask-worker.service and deploy/README.md
#: (section 10) give the scheduler and the workers: Dask's per-process
#: monitors (a 20 ms event-loop tick, a 10 ms profiler, 100 ms and 500 ms
#: samplers) cost each idle process 1.5-2.5% of a core, taken from the runs
LIGHT_DASK = {
    "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "1s",
    "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL": "5s",
    "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL": "1s",
}


def submissions(n: int) -> dict[str, str]:
    """``n`` submissions, about one slow (fit sleeps) for three fast ones."""
    kinds = list(FAST.items()) + [list(SLOW.items())[0]]
    return {f"{name}_{i:02d}": src for i, (name, src) in
            ((i, kinds[i % len(kinds)]) for i in range(n))}  # fmt: skip


class Cluster:
    """A scheduler and two single-slot Dask workers, for one measurement."""

    def __init__(self, root: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _spawn(self, name: str, argv: list[str], ready: str) -> None:
        log_path = self.root / f"{name}.log"
        env = dict(os.environ, RAMP_DISPATCHER_CACHE=str(self.root / name / "cache"), **LIGHT_DASK)
        with open(log_path, "wb") as log:
            self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                               stderr=subprocess.STDOUT, env=env))  # fmt: skip
        wait_for(lambda: ready in log_path.read_text(errors="replace"), 60, 0.1, f"{name} to start")

    def __enter__(self) -> Cluster:
        self._spawn("scheduler", [str(DASK), "scheduler", "--host", "127.0.0.1", "--port",
                                  str(self.port), "--no-dashboard"], "Scheduler at")  # fmt: skip
        for name in ("w1", "w2"):
            self._spawn(name, [str(DASK), "worker", self.address, "--name", name, "--nthreads", "1",
                               "--resources", "ramp=1", "--no-nanny", "--no-dashboard",
                               "--host", "127.0.0.1",
                               "--local-directory", str(self.root / name)], "Registered to")  # fmt: skip
        return self

    def tree_cpu(self) -> float:
        """CPU s of the scheduler, the Dask workers and the runs they reaped."""
        total = 0.0
        for proc in self.procs:
            got = proc_stat(proc.pid)
            total += 0.0 if got is None else got[1] + got[2]
        return total

    def __exit__(self, *exc: Any) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def measure(dep: Deployment, names: list[str], label: str, total: float,
            cluster: Cluster | None = None) -> dict[str, float]:  # fmt: skip
    """The running-daemon measurement: warm up, release the batch, time it."""
    from ramp_dispatcher.database import queries

    ids = _ids(dep, names)
    batch_ids = list(ids.values())
    with dep.engine.begin() as conn:
        queries.set_state(conn, batch_ids, HOLD_STATE)
    daemon = Daemon(dep.daemon_command(), dep.root.parent / f"daemon-{label}.log").start()
    try:
        warm_up, _ = dep.add_submission("warm_up", FAST["tree"])
        wait_for(lambda: dep.states()[warm_up] == "scored", 180, 0.05, f"the {label} warm-up run")
        time.sleep(1.0)
        settle()
        say(f"  [{label}] releasing {len(batch_ids)} submissions at once ...")
        # the cluster's processes (and the runs on them) are ours too
        live = daemon.tree_cpu if cluster is None else (lambda: daemon.tree_cpu() + cluster.tree_cpu())
        with CpuWindow(live=live) as window:
            daemon.sample()
            cpu0 = daemon.cpu_s
            with dep.engine.begin() as conn:
                queries.set_state(conn, batch_ids, "new")
            released = time.time()

            def done() -> bool:
                states = dep.states()
                return all(states[i] in ("scored", "training_error") for i in batch_ids)

            wait_for(done, total * 3 + 180, 0.05, f"the {label} batch")
            daemon.sample()
            cpu = daemon.cpu_s - cpu0
    finally:
        daemon.stop()
    states = dep.states()
    bad = {n: states[i] for n, i in ids.items() if states[i] != "scored"}
    if bad:
        say(f"  [{label}] WARNING: not scored: {bad}")
    first, last = _span(dep, batch_ids)
    wall = last - first
    ideal = total / N_WORKERS
    result = {
        "wall": wall, "ideal": ideal, "ratio": wall / ideal, "cpu": cpu,
        "cpu_share": cpu / (last - released), "overhead": (N_WORKERS * wall - total) / len(batch_ids),
        "others": window.others_share,
    }  # fmt: skip
    say(f"  [{label}] {window.describe()}")
    say(f"  [{label}] first claimed -> last written {wall:.2f} s, ideal {ideal:.2f} s: "
        f"{result['ratio']:.3f}x; daemon CPU {cpu:.2f} s = {100 * result['cpu_share']:.2f}%; "
        f"per-run overhead {1000 * result['overhead']:.0f} ms")  # fmt: skip
    return result


def run(quick: bool, backends: list[str]) -> list[Row]:
    n = 6 if quick else N_SUBMISSIONS
    subs = submissions(n)
    # one backend: the first asked for (PostgreSQL when both are)
    backend = "postgresql" if "postgresql" in backends else backends[0]
    say(f"  database: {backend}")
    with scratch_dir("dask") as root, temp_database(backend, root) as url, \
            temp_database(backend, root / "conda") as conda_url:  # fmt: skip
        common = {"n_workers": N_WORKERS, "n_threads": 1, "hunger_policy": None,
                  "poll_interval": 5, "time_between_collection": 1}  # fmt: skip
        conda = Deployment(root / "conda" / "deployment", conda_url, submissions=subs,
                           dispatcher=common)  # fmt: skip
        ids = _ids(conda, list(subs))
        say(f"  standalone ramp-test runs ({n} submissions, sequential):")
        standalone = run_standalone(conda, ids, root / "standalone", retries=not quick)
        total = standalone.total
        with Cluster(root / "cluster") as cluster:
            dask = Deployment(
                root / "dask" / "deployment", url, submissions=subs, dispatcher=common,
                worker={"worker_type": "dask", "dask_scheduler": cluster.address,
                        "conda_env": sys.prefix},
            )  # fmt: skip
            on_dask = measure(dask, list(subs), "dask", total, cluster)
            trees = {w: sorted(p.name for p in (cluster.root / w / "cache" / "trees").glob("[!.]*"))
                     for w in ("w1", "w2")}  # fmt: skip
            say(f"  [dask] kit/data trees in each Dask worker's cache: {trees}")
        on_conda = measure(conda, list(subs), "conda", total)
        for d in (dask, conda):
            d.close()
    b = "dask"
    return [
        Row(b, f"wall / ideal ({n} subs, 2 single-slot Dask workers)",
            f"{on_dask['ratio']:.3f} ({on_dask['wall']:.1f} s / {on_dask['ideal']:.1f} s)",
            "<= 1.15", on_dask["ratio"] <= 1.15),  # fmt: skip
        Row(b, "daemon own CPU / wall", f"{100 * on_dask['cpu_share']:.2f}% ({on_dask['cpu']:.2f} s)",
            "<= 1%", on_dask["cpu_share"] <= 0.01),  # fmt: skip
        Row(b, "per-run overhead: dask / conda",
            f"{1000 * on_dask['overhead']:.0f} / {1000 * on_conda['overhead']:.0f} ms"),
        Row(b, "conda, same batch: wall / ideal", f"{on_conda['ratio']:.3f}"),
        Row(b, "other processes' CPU: dask / conda run",
            f"{100 * on_dask['others']:.0f}% / {100 * on_conda['others']:.0f}% of capacity"),
    ]
