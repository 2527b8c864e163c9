"""Small helpers shared by the test files: waiting for a condition, a free local port."""

from __future__ import annotations

import contextlib
import random
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


#: ports handed out by :func:`free_port` in this process (never twice)
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Taken below the kernel's ephemeral range (its low end, 32768 by default),
    where the kernel never picks a source port of its own: a port from bind(0)
    can be given to some client's outgoing connection before the test's server
    binds it, or, while a test has stopped its server, a client reconnecting
    to it can end up connected to itself (TCP simultaneous open) and hold it,
    so that the restarted server cannot listen. Random, so that the suite's
    two processes rarely try the same one; each tried by binding it.
    """
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free TCP port below the ephemeral range on 127.0.0.1")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


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
