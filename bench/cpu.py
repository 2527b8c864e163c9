"""CPU: the running daemon's own CPU per run, read from outside the process.

The running-daemon batch of ``batch`` (ten mixed iris submissions released at
once to a daemon that has served one run, ``n_workers: 2``), without the
standalone runs and the cold start, repeated: the daemon's utime + stime from
/proc/<pid>/stat before the release and after the last result, divided by the
number of runs. CPU time, not wall: other processes on a shared machine slow
the runs down but do not add to the daemon's CPU (they can add a little
through cache and scheduler effects, hence the repeats; the median is kept).

Target (issue 10): <= 10 ms per run on PostgreSQL.
"""

from __future__ import annotations

import os
from statistics import median

from .batch import measure_service
from .common import Row, backends_to_run, say

#: repeats per backend (RDBENCH_CPU_REPEAT overrides)
REPEAT = int(os.environ.get("RDBENCH_CPU_REPEAT", "3"))


def run(quick: bool, backends: list[str]) -> list[Row]:
    rows: list[Row] = []
    for backend in backends_to_run(backends):
        per_run = []
        for i in range(1 if quick else REPEAT):
            got = measure_service(backend, quick)
            per_run.append(got.cpu_per_run_ms)
        shown = ", ".join(f"{v:.1f}" for v in per_run)
        say(f"  [{backend}] daemon CPU per run: {shown} ms; median {median(per_run):.1f} ms")
        rows.append(Row(f"cpu[{backend}]", f"running daemon: own CPU per run (median of {len(per_run)})",
                        f"{median(per_run):.1f} ms (min {min(per_run):.1f})", "<= 10 ms",
                        median(per_run) <= 10))  # fmt: skip
    return rows
