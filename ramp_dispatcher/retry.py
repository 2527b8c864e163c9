"""When a failed run is tried again, and when its failure is final.

Only infrastructure failures are retried: the participant's own errors, time-outs
and memory limits would fail the same way again. Retries back off exponentially
so that a broken environment or a cloud outage is not hammered.
"""

from __future__ import annotations

from dataclasses import dataclass

from .workers.base import FailureClass


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    base_delay_s: float = 30.0
    max_delay_s: float = 3600.0

    def should_retry(self, failure: FailureClass, attempt: int) -> bool:
        return failure is FailureClass.INFRASTRUCTURE and attempt < self.max_attempts

    def delay_s(self, attempt: int) -> float:
        """Wait before attempt ``attempt + 1``: base, 2x base, 4x base, ..."""
        return min(self.base_delay_s * 2 ** max(attempt - 1, 0), self.max_delay_s)
