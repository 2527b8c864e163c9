"""``python -m bench [names...] [--quick] [--backend B]``: run the benchmarks, print one table.

Each benchmark prints its figures as it goes; the table at the end collects
them with their targets. A benchmark that crashes is reported in the table and
does not stop the others.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from .common import BACKENDS, QUIET_WAIT, Row, format_table, say

NAMES = ("batch", "cpu", "steps", "latency", "scale", "soak", "leaderboards", "sandbox", "dask")


def _machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kib = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
    except (OSError, StopIteration, ValueError):
        mem_kib = 0
    try:
        commit = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent.parent), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
    except OSError:
        commit = "?"
    return (
        f"{os.cpu_count()} CPU(s), {model}, {mem_kib / 1024 / 1024:.1f} GiB RAM, "
        f"Python {platform.python_version()}, commit {commit or '?'}"
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", choices=[[], *NAMES], metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(NAMES)})")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smaller counts (< 3 minutes)")
    parser.add_argument("--backend", action="append", choices=BACKENDS,
                        help="only this database backend (repeatable; default: both)")  # fmt: skip
    parser.add_argument("--quiet-wait", type=float, default=None, metavar="S",
                        help="before each sensitive measurement, wait up to S seconds for other "
                        "processes to leave the CPUs idle (default: 30, 0 with --quick)")  # fmt: skip
    args = parser.parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so every benchmark's clean-up still runs.
    signal.signal(signal.SIGTERM, _interrupt)
    QUIET_WAIT[0] = args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 30.0)
    names = args.names or list(NAMES)
    backends = args.backend or list(BACKENDS)
    say(f"machine: {_machine()}")
    say(f"mode: {'quick' if args.quick else 'full'}; benchmarks: {', '.join(names)}; "
        f"backends: {', '.join(backends)}")  # fmt: skip
    rows: list[Row] = []
    started = time.monotonic()
    for name in names:
        say(f"\n== {name} ==")
        t0 = time.monotonic()
        try:
            module = importlib.import_module(f".{name}", __package__)
            rows += module.run(args.quick, backends)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0]
            rows.append(Row(name, "crashed", f"{type(exc).__name__}: {first}"[:100], met=False))
        say(f"  ({name}: {time.monotonic() - t0:.0f} s)")
    say(f"\n== results ({time.monotonic() - started:.0f} s in all) ==")
    say(format_table(rows))
    return 1 if any(r.figure == "crashed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
