"""The admin's own leaderboard hook: ``leaderboard_command``, run off the loop.

The daemon refreshes ramp-board's cached leaderboards itself
(:mod:`ramp_dispatcher.leaderboards`); after a refresh that wrote results it
calls :meth:`LeaderboardRefresher.request`, and an admin-configured command
(anything else to do then: a static export, a notification) runs in a thread of its own,
coalesced: at most once per ``interval`` seconds, and requests that arrive
while it runs, or too soon after, fold into exactly one more run. A failing
command is logged with the tail of its stderr and never stops the daemon.

The command is an argv list, never a shell string: nothing is interpreted.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .configfile import ConfigError, Section

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_TIMEOUT",
    "LeaderboardRefresher",
    "LeaderboardSettings",
    "leaderboard_settings",
    "parse_command",
]

#: seconds between two runs of the command, at least
DEFAULT_INTERVAL = 60.0
#: a run that takes longer than this is killed (with its process group)
DEFAULT_TIMEOUT = 600.0
#: how much of a failing command's stderr goes to the log
STDERR_TAIL_LINES = 20
STDERR_TAIL_CHARS = 4000


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class LeaderboardSettings:
    command: tuple[str, ...] | None = None
    interval: float = DEFAULT_INTERVAL
    #: the built-in refresh (ramp_dispatcher.leaderboards); off only on request
    refresh: bool = True


def parse_command(value: Any, where: str) -> list[str] | None:
    """``leaderboard_command`` from YAML: a list of arguments, or a string split
    like a POSIX shell would split it (quotes respected, nothing expanded).

    ``where`` names the file and key in error messages.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:  # an unclosed quote
            raise ConfigError(f"{where}: cannot split {value!r}: {exc}") from None
    elif isinstance(value, list):
        bad = [v for v in value if not isinstance(v, (str, int, float)) or isinstance(v, bool)]
        if bad:
            raise ConfigError(
                f"{where} must be a list of strings, got {type(bad[0]).__name__} {bad[0]!r}"
            )
        argv = [str(v) for v in value]
    else:
        raise ConfigError(
            f"{where} must be a command (a string or a list of arguments), "
            f"got {type(value).__name__} {value!r}"
        )
    if not argv or not argv[0]:
        return None  # an empty string or list means "no command", as if unset
    return argv


def leaderboard_settings(section: Section) -> LeaderboardSettings:
    """Read ``leaderboard_refresh``, ``leaderboard_command`` and
    ``leaderboard_interval`` from a config section (the event config's
    ``dispatcher`` section)."""
    refresh = section.optional("leaderboard_refresh", bool, "true or false", True)
    command = parse_command(section.value("leaderboard_command"), section.where("leaderboard_command"))
    interval = section.optional(
        "leaderboard_interval", float, "a number of seconds", DEFAULT_INTERVAL
    )
    if interval < 0:
        raise ConfigError(f"{section.where('leaderboard_interval')} must not be negative")
    if command is not None and os.sep not in command[0] and shutil.which(command[0]) is None:
        # not fatal: PATH may differ at run time, and a failure is only logged anyway
        log.warning(
            "%s: %r is not on PATH; give its absolute path",
            section.where("leaderboard_command"),
            command[0],
        )
    return LeaderboardSettings(
        command=None if command is None else tuple(command),
        interval=float(interval),
        refresh=refresh,
    )


# --------------------------------------------------------------------------- refresher


class LeaderboardRefresher:
    """Run ``command`` off the caller's thread, at most once per ``interval`` seconds.

    ``request()`` only sets a flag under a lock and wakes the refresher thread:
    it never blocks on the command. With ``command=None`` everything is a no-op,
    so the dispatcher can call it unconditionally.
    """

    def __init__(
        self,
        command: Sequence[str] | None,
        interval: float = DEFAULT_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        cwd: str | os.PathLike[str] | None = None,
    ):
        self.command: list[str] | None = list(command) if command else None
        self.interval = max(float(interval), 0.0)
        self.timeout = float(timeout)
        # ramp-database resolves a relative SQLite path against its cwd: the
        # dispatcher passes the server config's folder, as an admin's shell would.
        self.cwd = None if cwd is None else Path(cwd)
        #: counters, for tests and metrics
        self.runs = 0
        self.failures = 0
        self.last_success: float | None = None  # time.time() of the last good run

        self._cond = threading.Condition()
        self._pending = False
        self._closed = False
        self._last_start = float("-inf")  # monotonic
        self._last_end = float("-inf")
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- public

    def request(self) -> None:
        """Ask for a refresh (thread-safe, cheap). Coalesced with other requests."""
        if self.command is None:
            return
        with self._cond:
            if self._closed:
                return
            self._pending = True
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="leaderboard-refresher", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def close(self, wait: float = 10.0) -> None:
        """Stop: a pending request is dropped, a running command gets ``wait``
        seconds to finish, then its process group is killed."""
        with self._cond:
            self._closed = True
            if self._pending:
                log.info("leaderboard refresh still pending at shutdown: skipped")
            self._pending = False
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return
        thread.join(max(wait, 0.0))
        if thread.is_alive():
            with self._cond:
                proc = self._proc
            if proc is not None:
                log.warning("leaderboard command still running after %.0f s: killing it", wait)
                _kill_group(proc)
            thread.join(5.0)

    @property
    def busy(self) -> bool:
        """True while a request is pending or the command runs."""
        with self._cond:
            return self._pending or self._proc is not None

    # ---------------------------------------------------------------- thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    if self._pending:
                        now = time.monotonic()
                        # start-to-start spacing, and never overlapping a run
                        due = max(self._last_start + self.interval, self._last_end)
                        if now >= due:
                            break
                        self._cond.wait(due - now)
                    else:
                        self._cond.wait()
                # Requests arriving from here on set _pending again: one more run.
                self._pending = False
                self._last_start = time.monotonic()
            try:
                self._run_once()
            except Exception:  # a bug here must not kill the thread
                log.exception("leaderboard refresh failed unexpectedly")
                self.failures += 1
            finally:
                with self._cond:
                    self._proc = None
                    self._last_end = time.monotonic()

    def _run_once(self) -> None:
        assert self.command is not None
        argv = self.command
        shown = shlex.join(argv)
        started = time.monotonic()
        self.runs += 1
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.cwd,
                close_fds=True,
                # its own group, so a timeout kills whatever it started too
                start_new_session=True,
            )
        except OSError as exc:  # missing executable, not executable, bad cwd
            self.failures += 1
            log.error("leaderboard command %s could not start: %s", shown, exc)
            return
        with self._cond:
            self._proc = proc
            closed = self._closed
        if closed:  # close() ran while we were starting: do not leave it behind
            _kill_group(proc)
        try:
            stdout, stderr = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            self.failures += 1
            log.error(
                "leaderboard command %s timed out after %.0f s and was killed%s",
                shown, self.timeout, _tail(stderr),
            )
            return
        elapsed = time.monotonic() - started
        if proc.returncode != 0:
            self.failures += 1
            how = (
                f"was killed by signal {-proc.returncode}"
                if proc.returncode < 0
                else f"exited with status {proc.returncode}"
            )
            log.error("leaderboard command %s %s after %.1f s%s", shown, how, elapsed, _tail(stderr))
            return
        self.last_success = time.time()
        log.info("leaderboards refreshed in %.1f s", elapsed)
        if stdout.strip():
            log.debug("leaderboard command output%s", _tail(stdout, "stdout"))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # session leader: pgid == pid
    except OSError:
        pass


def _tail(data: bytes | None, stream: str = "stderr") -> str:
    """The last lines of a command's output, for a log message ('' if none)."""
    if not data:
        return ""
    from .messages import strip_ansi

    text = strip_ansi(data.decode("utf-8", errors="replace"))
    lines = [ln for ln in text.splitlines() if ln.strip()][-STDERR_TAIL_LINES:]
    tail = "\n".join(lines)[-STDERR_TAIL_CHARS:]
    return f"; {stream} ends with:\n{tail}" if tail else ""
