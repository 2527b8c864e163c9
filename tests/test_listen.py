"""The LISTEN thread (listen.py) against a real PostgreSQL whose connection is cut.

The database "goes away" through a TCP relay on 127.0.0.1 that the test closes
and reopens: the server itself is shared and is never restarted here.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from typing import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from ramp_dispatcher.database.dispatcher_schema import NOTIFY_CHANNEL
from ramp_dispatcher.database.engine import make_engine
from ramp_dispatcher.listen import MAX_RECONNECT_DELAY_S, NotifyListener
from conftest import create_pg_database, drop_pg_database
from faults import wait_for

EVENT_ID = 7
#: how long the database stays away: long enough for the old schedule
#: (1, 2, 4, 8 ... 60 s) to wait 8 s between two tries
OUTAGE_S = 12.0


class Relay:
    """A TCP relay to PostgreSQL that can be cut (listener closed, every
    relayed connection dropped) and restored on the same port."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = 0
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.accepted = 0

    def open(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self.port = server.getsockname()[1]
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            conns, self._conns = self._conns, []
        if server is not None:
            try:
                server.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it
            except OSError:
                pass
            server.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._conns += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


def test_listen_reconnects_within_seconds_of_the_database_returning(pg_url: str, caplog) -> None:
    """The relay is cut for 12 s, then restored: the listener tried again every
    few seconds at most during the outage, is back listening soon after, and
    a NOTIFY sent then wakes it."""
    caplog.set_level(logging.DEBUG, logger="ramp_dispatcher.listen")
    real = make_url(pg_url)
    relay = Relay((real.host or "127.0.0.1", real.port or 5432))
    relay.open()
    via_relay = make_engine(real.set(host="127.0.0.1", port=relay.port))
    direct = make_engine(pg_url)
    news: list[float] = []
    listener = NotifyListener(via_relay, EVENT_ID, lambda: news.append(time.monotonic()))
    try:
        listener.start()
        wait_for(lambda: len(news) == 1, 30, "the first LISTEN (it looks once on connecting)")

        relay.cut()
        time.sleep(OUTAGE_S)
        relay.open()
        back = time.monotonic()
        wait_for(lambda: len(news) >= 2, 45, "the LISTEN connection to come back")
        reconnected_after = news[1] - back

        # listening again: a NOTIFY for our event wakes it
        heard = len(news)
        with direct.begin() as conn:
            conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": NOTIFY_CHANNEL, "p": str(EVENT_ID)})
        wait_for(lambda: len(news) > heard, 30, "the NOTIFY after the reconnect")
    finally:
        listener.stop()
        relay.cut()
        via_relay.dispose()
        direct.dispose()

    delays = [
        float(m.group(1))
        for r in caplog.records
        if (m := re.search(r"retrying in ([0-9.]+) s", r.getMessage()))
    ]
    assert delays, "the outage was never seen by the listener"
    assert max(delays) <= MAX_RECONNECT_DELAY_S <= 5.0, delays
    # tried all through the outage, not once or twice
    assert len(delays) >= OUTAGE_S / MAX_RECONNECT_DELAY_S, delays
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "failed" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once per outage, not every try
    print(f"reconnected {reconnected_after:.2f} s after the database came back; delays {delays}")
