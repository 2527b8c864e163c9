"""Small helpers shared by the test files: waiting for a condition, a free local port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 20.0,
    what: str = "",
    interval: float = 0.05,
    *,
    limit: float | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Fails (AssertionError) after ``timeout`` seconds, naming ``what`` (or the
    predicate). ``limit`` is another name for ``timeout`` (the conda worker's
    tests call it so).
    """
    if limit is not None:
        timeout = limit
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def recording_listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP listener on 127.0.0.1: (its port, what reached it, recorded)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    got: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            got.append(conn.recv(100) or b"<connected>")
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], got
    finally:
        stop.set()
        t.join()
        srv.close()
