"""The daemon's loop thread: a few periodic jobs, each of which can be woken early.

Jobs run one at a time on one thread, so they need no locks between them.
Between jobs the thread sleeps on a condition until the next job is due or
someone calls :meth:`JobLoop.wake` (a worker whose run ended, the LISTEN
thread, a freed slot): no busy loop, and no work when nothing is due. A job
that was woken or missed several times runs once (the runs coalesce), and its
next regular run is one interval after it started.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class _Job:
    name: str
    func: Callable[[], None]
    interval: float
    next_at: float


class JobLoop:
    def __init__(self, name: str = "dispatcher-loop"):
        self._jobs: dict[str, _Job] = {}  # in the order they were added: ties run in it
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def add(self, name: str, func: Callable[[], None], interval: float) -> None:
        """A job that runs at once when the loop starts, then every ``interval`` s."""
        with self._cond:
            self._jobs[name] = _Job(name, func, float(interval), 0.0)
            self._cond.notify()

    def reschedule(self, name: str, interval: float) -> None:
        """A new interval, counted from now."""
        with self._cond:
            job = self._jobs[name]
            job.interval = float(interval)
            job.next_at = time.monotonic() + job.interval
            self._cond.notify()

    def wake(self, name: str) -> None:
        """Run the job as soon as the loop is free (thread-safe)."""
        with self._cond:
            job = self._jobs.get(name)
            if job is not None:
                job.next_at = 0.0
                self._cond.notify()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Let the running job finish, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _due(self) -> list[_Job] | None:
        """Sleep until some jobs are due; None when stopping."""
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                due = [job for job in self._jobs.values() if job.next_at <= now]
                if due:
                    for job in due:
                        job.next_at = now + job.interval
                    return due
                soonest = min((job.next_at for job in self._jobs.values()), default=now + 3600)
                self._cond.wait(soonest - now)
            return None

    def _run(self) -> None:
        while (due := self._due()) is not None:
            for job in due:
                if self._stopping:
                    return
                try:
                    job.func()
                except Exception:  # the jobs guard themselves; this is the last net
                    log.exception("job %s failed; continuing", job.name)
