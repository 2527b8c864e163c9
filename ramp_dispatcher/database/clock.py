"""The one clock of the database code: ramp-board's timestamps are naive UTC.

Separate from ``queries`` so that every module (queries, admin, control,
reports) can import it without importing the others.
"""

from __future__ import annotations

import datetime as dt


def utcnow() -> dt.datetime:
    """Now, as ramp-board stores it: naive UTC (ramp-database uses ``datetime.utcnow()``)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
