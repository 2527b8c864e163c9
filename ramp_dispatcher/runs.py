"""One run's life in the daemon, as one explicit state.

A run is claimed (a ``dispatcher_runs`` row exists, status ``starting``),
started by its worker, checked until it ends, and then written back. The
daemon keeps each run it serves as an :class:`ActiveRun`; its ``state`` says
which step comes next, and each transition below names what the dispatcher
writes to the database when it makes it::

    STARTING ──start*──> STARTED ──record_handle──> RUNNING
       │                    │                          │
       └──start failed*──> ENDED <────────check────────┘
                             │
                        record_end
                             v
                          FINISHED ──(move*)──close──> CLEANING ──cleanup*──> CLOSED
                                                                 (leaves the active set)

The steps marked * are slow calls (the worker's ``start``: a conda environment
lookup; moving a successful run's output to the predictions folder, which
may copy across devices; the worker's ``cleanup``, which may wait for a
process tree to exit): the dispatcher makes them on a slow-call thread, the
run waits in its state with :attr:`ActiveRun.slow` set, and the loop goes on.
Each is waited for at most a bound, so that a hung call cannot hold a slot
for ever. A CLEANING run keeps its slot, and its submission is not claimed
again, until its files are freed.

A run taken over by another daemon, or cancelled by an admin, or whose
submission an admin set back to ``new``, goes to CLOSED from any state
(``drop``; the last two after the worker stopped it). The database keeps its
own, coarser ``status`` per run (starting, running, finished, collected); a
restarted daemon re-attaches from it (:meth:`ActiveRun.reattached`).
"""

from __future__ import annotations

import enum
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .database.dispatcher_schema import RUN_STARTING
from .workers.base import FailureClass, Handle, RunOutcome, RunRequest


class RunState(enum.Enum):
    #: claimed; the worker has not started it yet
    STARTING = "starting"
    #: the worker started it; its handle is not in the runs table yet (a
    #: database outage delays it, or it was found again after a crash)
    STARTED = "started"
    #: its handle is recorded; waiting for the worker to report its end
    RUNNING = "running"
    #: the worker reported its outcome; the runs table does not say so yet
    ENDED = "ended"
    #: the runs table says it finished; the submission's rows are not written yet
    FINISHED = "finished"
    #: written back; the worker frees what the run held (files, process)
    CLEANING = "cleaning"
    #: done (or dropped, or stopped): it leaves the active set
    CLOSED = "closed"


#: states in which the worker is asked whether the run ended
CHECKED_STATES = (RunState.STARTED, RunState.RUNNING)


class TransitionError(RuntimeError):
    """A transition asked of a run in a state that does not allow it (a bug)."""


@dataclass
class ActiveRun:
    event_name: str
    run_id: int
    submission_id: int
    name: str  # the participant's name for the submission
    attempt: int
    request: RunRequest
    handle: Handle | None = None
    state: RunState = RunState.STARTING
    outcome: RunOutcome | None = None
    #: the attempt's rank since the submission was new or retried by an admin
    #: (read when an infrastructure failure, the only class retried, ends it)
    budget_attempt: int = 1
    #: monotonic time of the next status check; 0 asks for one at once
    check_at: float = 0.0
    #: steps in a row that raised (the dispatcher's per-run containment)
    errors: int = 0
    #: past the bound of errors: being closed as an infrastructure failure
    giving_up: bool = False
    #: monotonic time this daemon took it up (claim or re-attach)
    taken_at: float = field(default_factory=time.monotonic)
    #: taken over from another host: closed without touching its files
    keep_files: bool = False
    #: an admin cancelled it, or set its submission back to ``new``
    #: (:attr:`stop_reason`): the worker is stopping it off the loop thread
    stopping: Future[None] | None = None
    #: why it is being stopped: ``cancel`` or ``reset``
    stop_reason: str = ""
    #: a slow call of the current step in flight (see the module's doc); the
    #: run takes no other step until it is over or :attr:`slow_deadline` passed
    slow: Future[Any] | None = None
    #: monotonic time after which :attr:`slow` is given up on
    slow_deadline: float = 0.0
    #: FINISHED with success: the parsed output and the parser's note, read
    #: before the output is moved to the predictions folder
    results: Any = None
    #: FINISHED with success: the output is in the predictions folder
    moved: bool = False
    #: ramp-test exited 0 but its output was unusable: the submission's fault,
    #: not the platform's (the circuit breaker does not count it)
    output_unusable: bool = False

    def label(self) -> str:
        return (
            f"event {self.event_name}: submission {self.submission_id} ({self.name!r}) "
            f"attempt {self.attempt}"
        )

    def _move(self, allowed: tuple[RunState, ...], to: RunState) -> None:
        if self.state not in allowed:
            raise TransitionError(f"{self.label()}: cannot go from {self.state.name} to {to.name}")
        self.state = to

    # ---------------------------------------------------------------- transitions

    @classmethod
    def reattached(
        cls, event_name: str, run_id: int, submission_id: int, name: str, attempt: int,
        request: RunRequest, status: str, handle: Handle | None,
    ) -> ActiveRun:  # fmt: skip
        """A run of the runs table taken up by this daemon (restart, orphan).

        Writes nothing. ``starting`` or no handle: the daemon died between
        starting it and recording its handle; the caller asks the worker to
        find it (:meth:`started` or :meth:`end`). A ``finished`` row is checked
        again: the outcome was not kept, the worker's status tells it again.
        """
        run = cls(event_name, run_id, submission_id, name, attempt, request, handle=handle)
        if status != RUN_STARTING and handle is not None:
            run.state = RunState.RUNNING
        return run

    def started(self, handle: Handle) -> None:
        """STARTING -> STARTED: the worker started it. Writes nothing yet."""
        self._move((RunState.STARTING,), RunState.STARTED)
        self.handle = handle

    def recorded(self) -> None:
        """STARTED -> RUNNING. The dispatcher wrote the handle on the run's row
        (status ``running``) and set the submission ``training``."""
        self._move((RunState.STARTED,), RunState.RUNNING)

    def end(self, outcome: RunOutcome) -> None:
        """STARTING/STARTED/RUNNING -> ENDED: the worker's outcome (or the
        failure to start it). Writes nothing: :meth:`finished` follows."""
        self._move((RunState.STARTING, *CHECKED_STATES), RunState.ENDED)
        self.outcome = outcome

    def fail_to_start(self, message: str) -> None:
        """STARTING/STARTED -> ENDED as an infrastructure failure."""
        self.end(RunOutcome(FailureClass.INFRASTRUCTURE, message))

    def finished(self) -> None:
        """ENDED -> FINISHED. The dispatcher wrote the run's row ``finished``
        with the failure class and message (the submission ``tested`` on
        success): a crash from here on does not lose the outcome's class."""
        self._move((RunState.ENDED,), RunState.FINISHED)

    def replace_outcome(self, outcome: RunOutcome) -> None:
        """In ENDED or FINISHED: a successful run whose output turned out
        unusable is written back as an infrastructure failure instead."""
        if self.state not in (RunState.ENDED, RunState.FINISHED):
            raise TransitionError(f"{self.label()}: no outcome to replace in {self.state.name}")
        self.outcome = outcome

    def closed(self) -> None:
        """FINISHED -> CLEANING. The dispatcher wrote the result (``scored``), the
        final failure or the requeue, and closed the run's row (``collected``);
        or closed only the row (the submission was set back to ``new``)."""
        self._move((RunState.FINISHED,), RunState.CLEANING)

    def cleaned(self) -> None:
        """CLEANING -> CLOSED: the worker freed what the run held (or the
        dispatcher stopped waiting for it). Writes nothing."""
        self._move((RunState.CLEANING,), RunState.CLOSED)

    def offload(self, future: Future[Any], bound_s: float) -> None:
        """The current step's slow call is in flight on another thread."""
        self.slow = future
        self.slow_deadline = time.monotonic() + bound_s

    def drop(self) -> None:
        """any -> CLOSED without writing: another daemon holds the run now, or
        an admin's cancel or reset closed it (the dispatcher wrote
        ``write_cancelled`` or ``close_superseded``)."""
        self.state = RunState.CLOSED

    # ---------------------------------------------------------------- checks

    def check_due(self, now: float) -> bool:
        return self.state in CHECKED_STATES and now >= self.check_at

    def checked(self, now: float, interval: float) -> None:
        self.check_at = now + interval

    def wake(self) -> None:
        """The worker said something changed: check at the next cycle."""
        self.check_at = 0.0
