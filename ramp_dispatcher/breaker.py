"""The circuit breaker: a broken platform stops the queue, not the participants.

When runs of several different submissions fail in a row for infrastructure
reasons (a missing environment, a cloud outage), more claims would only turn
the whole queue into failures. The breaker then *opens*: the daemon claims
nothing, the queue waits, and the failures met meanwhile do not use up any
submission's attempts. After a delay it lets one run through as a probe
(*half-open*); the probe failing opens it again with a longer delay (doubled,
capped), and any run that does not fail for the platform's reasons closes it.

Its state lives in the daemon; :meth:`CircuitBreaker.snapshot` gives it in
wall-clock time for the daemon's row in ``dispatcher_daemons``, which
``ramp-dispatcher status`` reads.
"""

from __future__ import annotations

import datetime as dt
import enum
import time
from dataclasses import dataclass, field

#: infrastructure failures in a row, of different submissions, that open it
THRESHOLD = 3
#: seconds before the first probe; doubled after each failed probe, up to the cap
FIRST_PROBE_S = 10.0
MAX_PROBE_S = 600.0


@dataclass(frozen=True)
class BreakerSnapshot:
    """The breaker as ``status`` shows it; times are naive UTC."""

    state: str  # a BreakerState value
    since: dt.datetime | None  # when it opened, or closed again (None: closed since start)
    cause: str | None  # the last infrastructure failure's message, while not closed
    failures: int | None  # the infrastructure failures in a row that opened it
    next_probe_at: dt.datetime | None  # open: when a probe run may be claimed


class BreakerState(enum.Enum):
    CLOSED = "closed"  # claiming as usual
    OPEN = "open"  # claiming nothing until the next probe
    HALF_OPEN = "half-open"  # one probe run in flight


@dataclass
class CircuitBreaker:
    threshold: int = THRESHOLD
    first_probe_s: float = FIRST_PROBE_S
    max_probe_s: float = MAX_PROBE_S
    state: BreakerState = BreakerState.CLOSED
    #: the submissions of the current streak of infrastructure failures
    streak: list[int] = field(default_factory=list)
    probe_delay_s: float = 0.0
    probe_at: float = 0.0  # monotonic
    opened_at: float = 0.0  # monotonic, when it last opened from closed
    #: monotonic, when it last opened from closed or closed again (None: never)
    since: float | None = None
    #: what the last failure said, for the log and the status line
    cause: str = ""

    @property
    def holding(self) -> bool:
        """Whether failures now are the platform's: they cost no attempt."""
        return self.state is not BreakerState.CLOSED

    def allowed_claims(self, free: int, now: float) -> int:
        """How many submissions may be claimed now (at most ``free``)."""
        if self.state is BreakerState.CLOSED:
            return free
        if self.state is BreakerState.OPEN and now >= self.probe_at and free > 0:
            self.state = BreakerState.HALF_OPEN
            return 1
        return 0

    def probe_not_claimed(self) -> None:
        """The probe :meth:`allowed_claims` let through found nothing to claim
        (an empty queue): still open, and the next claim cycle probes. Left
        half-open with no probe in flight, it would never claim again."""
        if self.state is BreakerState.HALF_OPEN:
            self.state = BreakerState.OPEN

    def failed(self, submission_id: int, cause: str, now: float) -> bool:
        """An infrastructure failure; True when it opens the breaker."""
        self.cause = cause
        if self.state is BreakerState.HALF_OPEN:  # the probe failed
            self._open(now, min(self.probe_delay_s * 2, self.max_probe_s))
            return False
        if self.state is BreakerState.OPEN:
            return False
        if submission_id not in self.streak:
            self.streak.append(submission_id)
        if len(self.streak) >= self.threshold:
            self.opened_at = self.since = now
            self._open(now, self.first_probe_s)
            return True
        return False

    def succeeded(self, started_at: float | None = None, now: float | None = None) -> bool:
        """A run the platform did not fail (claimed at monotonic ``started_at``);
        True when it closes the breaker. A run claimed before the breaker
        opened proves nothing about the platform now: it closes nothing."""
        if self.state is BreakerState.CLOSED:
            self.streak.clear()
            return False
        if started_at is not None and started_at < self.opened_at:
            return False
        self.streak.clear()
        self.state = BreakerState.CLOSED
        self.probe_delay_s = 0.0
        self.since = time.monotonic() if now is None else now
        return True

    def _open(self, now: float, delay: float) -> None:
        self.state = BreakerState.OPEN
        self.probe_delay_s = delay
        self.probe_at = now + delay

    def key(self) -> tuple:
        """What :meth:`snapshot` shows, on the monotonic clock: equal keys,
        equal snapshots (a closed breaker's streak is not shown)."""
        if self.state is BreakerState.CLOSED:
            return (self.state, self.since)
        return (self.state, self.since, self.probe_at, self.cause, len(self.streak))

    def snapshot(self, now: float, wall_now: dt.datetime) -> BreakerSnapshot:
        """The state in wall-clock time (``wall_now`` is the wall clock at
        monotonic ``now``), for other processes to read."""

        def wall(t: float | None) -> dt.datetime | None:
            return None if t is None else wall_now - dt.timedelta(seconds=now - t)

        closed = self.state is BreakerState.CLOSED
        return BreakerSnapshot(
            state=self.state.value,
            since=wall(self.since),
            cause=None if closed else self.cause,
            failures=None if closed else len(self.streak),
            next_probe_at=wall(self.probe_at) if self.state is BreakerState.OPEN else None,
        )

    def describe(self, now: float) -> str:
        """One line for the log and systemd's STATUS."""
        if self.state is BreakerState.CLOSED:
            return "circuit breaker closed"
        wait = max(self.probe_at - now, 0.0)
        probe = "probe run in flight" if self.state is BreakerState.HALF_OPEN else f"next probe in {wait:.0f} s"
        return (
            f"circuit breaker open after {len(self.streak)} infrastructure failures in a row "
            f"({self.cause}); queue held, {probe}"
        )
