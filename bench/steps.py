"""Steps: where the daemon's CPU per run goes, step by step.

The running-daemon batch of ``cpu`` (ten mixed iris submissions released at
once to a daemon that has served one run), once, with the daemon's main
steps timed in thread CPU from inside (``steptrace/sitecustomize.py`` wraps
them; the list is there). Each step's CPU per run over the batch's window,
with its calls and the share of the daemon's own CPU (read from outside,
as ``cpu`` reads it; the wrapping adds about 10% to it). Steps run in
different threads (the loop, the leaderboards, the conda worker's waiters,
the slow-call pool), so the top-level ones add up to about the whole.

No target: this says where to cut to reach ``cpu``'s.
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path

from .batch import measure_service
from .common import Row, backends_to_run, say

TRACE_DIR = Path(__file__).resolve().parent / "steptrace"


def run(quick: bool, backends: list[str]) -> list[Row]:
    rows: list[Row] = []
    for backend in backends_to_run(backends):
        with tempfile.TemporaryDirectory(prefix="rdbench-steps-") as scratch:
            log = Path(scratch) / "steps.log"
            saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "RDBENCH_STEPS_LOG")}
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRACE_DIR), saved["PYTHONPATH"]]))
            os.environ["RDBENCH_STEPS_LOG"] = str(log)
            try:
                got = measure_service(backend, quick)
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
            steps = _per_step(log, got.released, got.last)
        if not steps:
            raise RuntimeError(f"the daemon wrote no step to {log}: was steptrace loaded?")
        total_ms = 1000 * got.cpu_s
        say(f"  [{backend}] daemon CPU {got.cpu_per_run_ms:.1f} ms per run (from outside, wrapped); "
            f"per run, by step (thread CPU):")  # fmt: skip
        for step, (calls, ms) in _ordered(steps):
            depth = step.count("/")
            name = "  " * depth + step.rsplit("/", 1)[-1]
            say(f"    {name:<28} {ms / got.n_runs:6.2f} ms  {calls / got.n_runs:5.1f} calls  "
                f"{100 * ms / total_ms:5.1f}%")  # fmt: skip
        top = max((s for s in steps if "/" not in s and not s.startswith("(")), key=lambda s: steps[s][1])
        rows.append(Row(f"steps[{backend}]", "costliest step per run (thread CPU)",
                        f"{top}: {steps[top][1] / got.n_runs:.1f} of {got.cpu_per_run_ms:.1f} ms"))  # fmt: skip
    return rows


def _per_step(log: Path, start: float, end: float) -> dict[str, tuple[int, float]]:
    """step -> (calls, thread CPU ms) of the calls that ended in [start, end]."""
    calls: dict[str, int] = defaultdict(int)
    spent: dict[str, float] = defaultdict(float)
    for line in log.read_text().splitlines():
        when, step, ms = line.split()
        if start <= float(when) <= end:
            step = step.replace("_", " ")
            calls[step] += 1
            spent[step] += float(ms)
    return {step: (calls[step], spent[step]) for step in calls}


def _ordered(steps: dict[str, tuple[int, float]]) -> list[tuple[str, tuple[int, float]]]:
    """Top-level steps by cost, each followed by its children by cost; the
    "(any)" ones, which cut across steps, last."""
    roots = {step: ms for step, (_, ms) in steps.items() if "/" not in step}

    def key(item: tuple[str, tuple[int, float]]) -> tuple:
        step, (_, ms) = item
        root = step.split("/")[0]
        return (root.startswith("("), -roots.get(root, 0.0), root, "/" in step, -ms)

    return sorted(steps.items(), key=key)
