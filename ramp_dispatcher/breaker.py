"""The circuit breaker: a broken platform stops the queue, not the participants.

When runs of several different submissions fail in a row for infrastructure
reasons (a missing environment, a cloud outage), more claims would only turn
the whole queue into failures. The breaker then *opens*: the daemon claims
nothing, the queue waits, and the failures met meanwhile do not use up any
submission's attempts. After a delay it lets one run through as a probe
(*half-open*); the probe failing opens it again with a longer delay (doubled,
capped), and any run that does not fail for the platform's reasons closes it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

#: infrastructure failures in a row, of different submissions, that open it
THRESHOLD = 3
#: seconds before the first probe; doubled after each failed probe, up to the cap
FIRST_PROBE_S = 10.0
MAX_PROBE_S = 600.0


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
            self.opened_at = now
            self._open(now, self.first_probe_s)
            return True
        return False

    def succeeded(self, started_at: float | None = None) -> bool:
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
        return True

    def _open(self, now: float, delay: float) -> None:
        self.state = BreakerState.OPEN
        self.probe_delay_s = delay
        self.probe_at = now + delay

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
