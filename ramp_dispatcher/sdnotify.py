"""The sd_notify protocol, spoken directly: tell systemd we are ready, alive, busy.

systemd passes a datagram socket in ``NOTIFY_SOCKET`` to a ``Type=notify``
service; each datagram is newline-separated ``KEY=VALUE`` assignments
(``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``). With
``WatchdogSec=`` it also sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``): a
service that does not send ``WATCHDOG=1`` within that time is killed and,
with ``Restart=on-failure``, restarted.

The protocol is twenty lines of socket code, so we do not depend on
python-systemd (a C extension that is not on PyPI as a wheel). Outside systemd
(no ``NOTIFY_SOCKET``) every call is a cheap no-op. A failed send is logged at
debug level and never raised: losing a status line must not stop the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Mapping

log = logging.getLogger(__name__)

__all__ = ["SystemdNotifier"]


class SystemdNotifier:
    """Send sd_notify messages to the socket named in the environment."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        self.address: str | None = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec: int | None = _watchdog_usec(env)
        self._sock: socket.socket | None = None
        # sendto on one datagram socket is atomic per message; the lock only
        # guards the lazy creation and close() against concurrent sends.
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """True when started by systemd as a notify service."""
        return self.address is not None

    # ------------------------------------------------------------- messages

    def ready(self, status: str | None = None) -> bool:
        """Start-up is over: systemd reports the unit as active (started)."""
        return self.notify("READY=1", *self._status_lines(status))

    def status(self, text: str) -> bool:
        """One line shown by ``systemctl status`` (newlines would end the value)."""
        return self.notify(*self._status_lines(text))

    def watchdog(self) -> bool:
        """Keep-alive: call at least every :meth:`watchdog_interval` seconds,
        and only from the loop whose health it vouches for."""
        if self._watchdog_usec is None:
            return False
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began: systemd stops expecting watchdog pings."""
        return self.notify("STOPPING=1", *self._status_lines(status))

    def reloading(self, status: str | None = None) -> bool:
        """A configuration reload began (SIGHUP); send :meth:`ready` when done.

        MONOTONIC_USEC lets ``Type=notify-reload`` (systemd >= 253) match the
        reload to this message; older systemd ignores it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *self._status_lines(status))

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the watchdog timeout, as sd_watchdog_enabled(3)
        advises; None when systemd expects no pings from us."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    # ------------------------------------------------------------- transport

    def notify(self, *assignments: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True if it was sent."""
        if self.address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8", errors="replace")
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    # never block the loop on a full socket buffer
                    self._sock.setblocking(False)
                self._sock.sendto(payload, self.address)
            return True
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", self.address, exc)
            return False

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    @staticmethod
    def _status_lines(text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        return ("STATUS=" + " ".join(text.split("\n")).strip(),)


def _socket_address(value: str) -> str | None:
    """A filesystem path, or ``@name`` for Linux's abstract namespace (leading NUL)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value:
        # e.g. "vsock:..." (systemd >= 254, for VMs): not needed on a host service
        log.debug("NOTIFY_SOCKET=%r is not a unix socket address: sd_notify disabled", value)
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC if it is meant for this process (WATCHDOG_PID, when set,
    names the one process that must ping; a child inheriting the variables
    must not)."""
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None
