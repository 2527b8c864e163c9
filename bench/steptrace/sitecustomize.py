"""Loaded by the daemon of ``python -m bench steps`` (this folder is put first
on its PYTHONPATH): each step below is wrapped so that every call writes
``<epoch s> <step> <thread CPU ms>`` to the file ``RDBENCH_STEPS_LOG`` names.

Thread CPU (``time.thread_time``), not wall: what the call cost the daemon,
not what it waited for. The wrapping costs about a microsecond per call;
the figures are about 10% over an unwrapped daemon's. A step names its parent
after a slash; a parent's figure includes its children's.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import threading
import time

#: (step, module, attribute path): the daemon's main steps, then what they hold
STEPS = (
    ("collect", "ramp_dispatcher.dispatcher", "Dispatcher.collect_cycle"),
    ("collect/record handle", "ramp_dispatcher.dispatcher", "Dispatcher._record_handle"),
    ("collect/status check", "ramp_dispatcher.dispatcher", "Dispatcher._check"),
    ("collect/record end", "ramp_dispatcher.dispatcher", "Dispatcher._record_end"),
    ("collect/read output", "ramp_dispatcher.dispatcher", "Dispatcher._output_kept"),
    ("collect/write back", "ramp_dispatcher.dispatcher", "Dispatcher._close"),
    ("claim", "ramp_dispatcher.dispatcher", "Dispatcher.claim_cycle"),
    ("claim/housekeeping", "ramp_dispatcher.dispatcher", "Dispatcher._housekeeping_and_claim"),
    ("claim/claim", "ramp_dispatcher.dispatcher", "Dispatcher._claim"),
    ("start", "ramp_dispatcher.dispatcher", "Dispatcher._start_run"),
    ("post-run checks", "ramp_dispatcher.workers.conda", "CondaWorker._do_post_run"),
    ("post-run checks/scoring", "ramp_dispatcher.workers.post_run", "Scorer.score"),
    ("leaderboards", "ramp_dispatcher.leaderboards.refresher", "LeaderboardService._refresh"),
    ("leaderboards/tables", "ramp_dispatcher.leaderboards.update", "compute_tables"),
    ("(any) statement", "sqlalchemy.engine.base", "Connection.execute"),
    ("(any) statement/driver", "sqlalchemy.engine.default", "DefaultDialect.do_execute"),
    ("(any) log line", "logging", "Logger._log"),
)


def _wrap(out, lock: threading.Lock, step: str, module: str, path: str) -> None:
    owner = importlib.import_module(module)
    *outer, name = path.split(".")
    for part in outer:
        owner = getattr(owner, part)
    real = getattr(owner, name)

    @functools.wraps(real)
    def timed(*args, **kwargs):
        started = time.thread_time()
        try:
            return real(*args, **kwargs)
        finally:
            spent = time.thread_time() - started
            with lock:
                out.write(f"{time.time():.3f} {step.replace(' ', '_')} {1000 * spent:.4f}\n")

    setattr(owner, name, timed)


def _install() -> None:
    out = open(os.environ["RDBENCH_STEPS_LOG"], "a", buffering=1)  # noqa: SIM115 (lives with the process)
    lock = threading.Lock()
    for step, module, path in STEPS:
        _wrap(out, lock, step, module, path)


# only the daemon (``ramp-dispatcher run``), not the other programs it starts
if os.environ.get("RDBENCH_STEPS_LOG") and os.path.basename(sys.argv[0]) == "ramp-dispatcher" and "run" in sys.argv:
    _install()
