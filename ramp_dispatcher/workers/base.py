"""The one small interface every worker type implements.

The dispatcher loop only ever calls :meth:`Worker.start`, :meth:`Worker.check`
and :meth:`Worker.cleanup`, each of which must return quickly: anything slow
(booting an instance, uploading, waiting for a process) happens off the loop,
in the worker's own threads or processes. A worker calls the ``wake`` callback
it was given when something changed, so the loop need not poll fast.

A run's *handle* is a small JSON-serialisable dict the worker returns from
``start``; the dispatcher stores it in the runs table before anything slow
happens, so that a restarted daemon can find the run again.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

Handle = dict[str, Any]
Wake = Callable[[], None]


class FailureClass(str, enum.Enum):
    """Why a run did not produce results; decides state, message and retry."""

    PARTICIPANT = "participant"  # the submission's code failed: not retried
    TIMEOUT = "timeout"  # ran out of time: not retried
    MEMORY = "memory"  # ran out of memory: not retried
    INFRASTRUCTURE = "infrastructure"  # our side failed: retried, never charged
    CONFIGURATION = "configuration"  # the event's settings are wrong: not retried, never charged


@dataclass(frozen=True)
class RunRequest:
    """Everything a worker needs to run one submission once."""

    submission_id: int
    submission_name: str  # the on-disk name, ``submission_%09d``
    attempt: int
    kit_dir: Path
    data_dir: Path
    submissions_dir: Path  # holds ``<submission_name>/`` with the files
    logs_dir: Path  # the log goes to ``<logs_dir>/<submission_name>/log``
    predictions_dir: Path  # results are kept in ``<predictions_dir>/<submission_name>``
    n_threads: int | None = None

    @property
    def log_path(self) -> Path:
        return self.logs_dir / self.submission_name / "log"

    @property
    def output_dir(self) -> Path:
        """Where ``ramp-test --save-output`` writes, inside the submission."""
        return self.submissions_dir / self.submission_name / "training_output"


@dataclass(frozen=True)
class RunOutcome:
    """What a finished run produced, as seen by the worker.

    ``failure`` is None when ramp-test exited 0; then ``output_dir`` holds the
    ``training_output`` folder (on local disk) for the results parser.
    """

    failure: FailureClass | None
    message: str  # reason in one or two sentences; empty on success
    exit_code: int | None = None
    max_ram_mb: float | None = None
    output_dir: Path | None = None
    log_path: Path | None = None
    duration_s: float | None = None
    #: scores recomputed outside the run's sandbox (workers/rescore.py's JSON);
    #: when set, they replace what the run's own score files say
    trusted_scores: Path | None = None


class WorkerError(Exception):
    """An infrastructure failure while starting or checking a run."""


class TryLater(Exception):
    """What the worker asked of the daemon's side (the event's folds from the
    database) is out of reach for a passing reason (an outage): not the run's
    failure; the worker asks again later."""


class WorkerConfigError(WorkerError):
    """The worker's config cannot work on this host; ``key`` is the
    ``worker`` section's key to fix (raised by :meth:`Worker.validate`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"key 'worker.{key}': {message}")
        self.key = key
        self.message = message


class Worker(ABC):
    """One worker type. One instance serves all runs of one daemon."""

    #: the ``worker_type`` value in the event config
    type_name: str
    #: the worker type's own config dataclass
    config: Any

    def validate(self) -> None:
        """Check, once before serving, that runs can start on this host.

        Raise :class:`WorkerConfigError` naming the key to fix, or a
        :class:`~ramp_dispatcher.configfile.ConfigError` that already names the
        file and key (``run`` then exits 2). May be slow; the default checks
        nothing.
        """

    @abstractmethod
    def start(self, request: RunRequest, wake: Wake) -> Handle:
        """Start the run without waiting for it; return its handle.

        Raise :class:`WorkerError` when the run cannot be started because of
        the platform (environment missing, spawn failure, ...).
        """

    @abstractmethod
    def check(self, request: RunRequest, handle: Handle) -> RunOutcome | None:
        """Cheap status check: None while running, the outcome once finished."""

    def runs_on_this_host(self) -> bool:
        """Whether the runs live on the daemon's own host (processes, files), so
        that a daemon of another host can neither see nor stop them. Such a
        run is taken over by another host only after its lease lapsed for a
        grace period, and then requeued, not re-attached. Default: False."""
        return False

    def forget(self, request: RunRequest, handle: Handle) -> None:
        """Another daemon took this run over: stop watching it, release and
        stop nothing of it (the new holder collects it). Default: nothing."""

    def reports_end(self, request: RunRequest) -> bool:
        """Whether ``wake`` will be called the moment this run ends, so that the
        loop need not check it on the ``time_between_collection`` timer (it
        still does, rarely, as a safety net). The default, False, suits a
        worker that learns of the end only when ``check`` asks."""
        return False

    def recover(self, request: RunRequest) -> Handle | None:
        """The handle of a run that was started but never recorded (the daemon
        died in between), or None if it never started. Called on re-attach;
        the default knows no way to find such a run, and ``cleanup`` with an
        empty handle must then make sure nothing of it goes on."""
        return None

    @abstractmethod
    def cleanup(self, request: RunRequest, handle: Handle) -> None:
        """Release what the run holds (process, instance, temporary files)."""

    def reconfigure(self, config: Any) -> None:
        """A re-read config (SIGHUP) applies to the runs started from now on."""
        self.config = config

    def reap(self, active: set[tuple[int, int]]) -> None:
        """Release resources of runs that no daemon owns any more.

        Called periodically with the (submission_id, attempt) pairs of every
        unfinished run of the event (from the database). A worker whose runs
        hold external resources (an EC2 instance) frees those of any other run.
        """

    def close(self) -> None:
        """Called once when the daemon stops; runs are left to be re-attached."""
