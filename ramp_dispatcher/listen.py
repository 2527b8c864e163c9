"""Wake the dispatcher when PostgreSQL says a submission became ``new``.

The trigger installed by our migration NOTIFYs a channel with the event id. A
thread holds one dedicated connection that LISTENs, sleeps in ``select`` (no
CPU), and calls ``on_news`` for our event. If the connection drops it reconnects
with a backoff capped at a few seconds, so that wake-ups come back within
seconds of the database; polling in the dispatcher covers the gap.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Callable

from sqlalchemy import Engine

from .database.dispatcher_schema import NOTIFY_CHANNEL
from .messages import first_line

log = logging.getLogger(__name__)

#: seconds before the first reconnect; doubled per failure up to the cap
FIRST_RECONNECT_DELAY_S = 0.5
#: the longest wait between two reconnects: a returning database is heard
#: within this (one connection attempt every few seconds costs nothing)
MAX_RECONNECT_DELAY_S = 4.0


class NotifyListener:
    def __init__(self, engine: Engine, event_id: int, on_news: Callable[[], None]):
        self._engine = engine
        self._event_id = str(event_id)
        self._on_news = on_news
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="notify-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _run(self) -> None:
        delay = FIRST_RECONNECT_DELAY_S
        failures = 0
        while True:
            try:
                raw = self._engine.raw_connection()
            except Exception as exc:
                # once per outage at warning level; then quietly, every few seconds
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "LISTEN connection failed (%s); retrying in %.1f s", first_line(exc), delay)
                if self._sleep(delay):
                    return
                delay = min(delay * 2, MAX_RECONNECT_DELAY_S)
                continue
            if failures:
                log.info("LISTEN connection back after %d failed attempt(s)", failures)
                failures = 0
            try:
                dbapi = raw.driver_connection
                dbapi.autocommit = True
                with dbapi.cursor() as cur:
                    cur.execute(f"LISTEN {NOTIFY_CHANNEL}")
                log.debug("listening on %s", NOTIFY_CHANNEL)
                delay = FIRST_RECONNECT_DELAY_S
                # Anything that arrived while we were not listening: look once.
                self._on_news()
                if self._listen(dbapi):
                    return
            except Exception as exc:
                log.warning("LISTEN connection lost (%s); reconnecting", first_line(exc))
            finally:
                try:
                    raw.invalidate()  # never hand a LISTENing connection back to the pool
                except Exception:
                    pass
            if self._sleep(delay):
                return

    def _listen(self, dbapi) -> bool:
        """Serve notifications until stopped (True) or the connection fails (raises)."""
        while True:
            ready, _, _ = select.select([dbapi, self._stop_r], [], [])
            if self._stop_r in ready:
                return True
            dbapi.poll()
            news = False
            while dbapi.notifies:
                note = dbapi.notifies.pop(0)
                news = news or note.payload == self._event_id
            if news:
                self._on_news()

    def _sleep(self, seconds: float) -> bool:
        """Wait, or return True at once when asked to stop."""
        ready, _, _ = select.select([self._stop_r], [], [], seconds)
        return bool(ready)
