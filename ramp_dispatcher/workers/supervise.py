"""Supervise one ramp-test run: time and memory limits, cleanup, status file.

Run as (the conda worker starts it so; ``python -m
ramp_dispatcher.workers.supervise`` works as well)::

    python -I -S .../ramp_dispatcher/workers/supervise.py --log LOG --status STATUS \\
        --timeout SECONDS [--memory-limit-mb MB] [--max-log-mb MB] [--nice N] \\
        [--cwd DIR] [--clear-env] [--setenv NAME=VALUE ...] [--rlimit NAME=VALUE ...] \\
        [--cgroup DIR [--cgroup-set FILE=VALUE ...]] -- COMMAND [ARG ...]

or as a spare, ``python -I -S supervise.py --spare``, which waits for those
arguments on stdin (:func:`spare_main`; the Dask worker keeps one ready).

With ``--clear-env`` the command gets the ``--setenv`` variables only, none of
this process's (the sandboxed runs: the daemon's environment may hold
secrets). Each ``--rlimit`` (``NPROC``, ``NOFILE``, ``FSIZE``, ...) is set in
the command's process just before it starts, so the supervisor itself is not
bound by it.

With ``--cgroup`` (a child of a delegated cgroup v2, see
``ramp_dispatcher/workers/cgroups.py``) the command's whole tree runs in that
cgroup of its own: created here, each ``--cgroup-set`` written into it
(``pids.max=512``, ``memory.max=...``), entered by the command's process
before ``exec``, emptied (``cgroup.kill``) and removed after the run. The
kernel's OOM kill there (``memory.events``) is reported as the memory limit
it is; the times the run hit ``pids.max`` are said in the log.

The conda worker starts this program in its own session, so it outlives the
daemon that started it; the daemon (or a restarted one) learns the result
from the status file only. Standard library only, with no import from this
package: it must start fast, without site-packages. That is also why it is
one file of about 900 lines: it runs as a lone script, on this host and, shipped
by value, on Dask workers that have no ramp_dispatcher.

The command's output reaches the log through a pipe that this program reads,
so the log is bounded (``--max-log-mb``): the head (a quarter of the room,
more when the room passes 21 MiB) is written as it comes, the rest holds the
latest output, and a marker line says how much was dropped in between. Memory is counted as the tree's unique
memory (PSS, :func:`tree_memory_kib`).

The status file is JSON, always replaced atomically. Right after the command
is spawned it holds ``{"started_at", "supervisor_pid", "child_pid",
"child_start_time"}``; the final version adds ``reason`` (``exited``,
``timeout``, ``memory``, ``killed``, ``spawn_error``), ``exit_code``,
``signal``, ``max_ram_mb``, ``finished_at`` and ``message``. A status file
with a ``reason`` is final. With ``--bwrap`` (the command is bubblewrap), a
sandbox that never started (bwrap's ``--info-fd`` said no child: the
submission's code never ran) ends as ``spawn_error``, not as an exit.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import fcntl
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

# No dataclasses here: importing them (and inspect) is a fifth of this
# program's start-up, which every run waits for.

PR_SET_CHILD_SUBREAPER = 36
#: seconds between SIGTERM and SIGKILL when stopping the tree
TERM_GRACE_S = 5.0
#: seconds between two memory samples of the tree
SAMPLE_INTERVAL_S = 0.5
#: bytes asked of one read of the command's output
READ_CHUNK = 1 << 20
#: while output is being dropped, the log's tail on disk is refreshed this often
TAIL_FLUSH_INTERVAL_S = 2.0
#: how long the output pipe is drained after the tree is stopped
DRAIN_TIMEOUT_S = 2.0
#: longest stretch spent moving output before the limits are checked again
DRAIN_SLICE_S = 0.2
#: most of a bounded log's latest output held in memory (the rest is head)
TAIL_MEMORY_MAX = 16 << 20
#: bytes of a bounded log kept for the marker line
MARKER_ROOM = 256
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, spelled out for Python < 3.10


# ---------------------------------------------------------------- /proc helpers
class ProcInfo(NamedTuple):
    pid: int
    ppid: int
    pgid: int
    state: str
    start_time: int  # field 22 of /proc/<pid>/stat, clock ticks since boot


def read_stat(pid: int) -> ProcInfo | None:
    """Parse /proc/<pid>/stat; None when the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split at the last ')'.
    rest = data[data.rfind(")") + 2 :].split()
    try:
        return ProcInfo(pid, int(rest[1]), int(rest[2]), rest[0], int(rest[19]))
    except (IndexError, ValueError):
        return None


def all_processes() -> list[ProcInfo]:
    procs = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = read_stat(int(name))
            if info is not None:
                procs.append(info)
    return procs


def descendants(root: int) -> list[ProcInfo]:
    """Every process below ``root`` (zombies included), found by ppid chains."""
    children: dict[int, list[ProcInfo]] = {}
    for info in all_processes():
        children.setdefault(info.ppid, []).append(info)
    found: list[ProcInfo] = []
    todo = [root]
    while todo:
        for info in children.get(todo.pop(), []):
            found.append(info)
            todo.append(info.pid)
    return found


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0  # gone, a zombie, or a kernel thread


def pss_kib(pid: int) -> int | None:
    """Proportional set size: each shared page counts 1/n in each of its n users.

    None when smaps_rollup cannot be read (kernel < 4.14, or /proc mounted
    with restrictions); 0 when the process is gone.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        return 0 if not os.path.exists(f"/proc/{pid}") else None
    except ProcessLookupError:
        return 0
    except (OSError, ValueError, IndexError):
        return None
    return None


def tree_memory_kib(pids: Sequence[int]) -> int:
    """The unique memory of a process tree, in KiB.

    Summing RSS counts a page shared by a forked child and its parent (or a
    file mapped by several workers) once per process; summing PSS counts it
    once in all. A process whose PSS cannot be read counts its RSS (an
    overestimate, never an underestimate).
    """
    total = 0
    for pid in pids:
        pss = pss_kib(pid)
        total += rss_kib(pid) if pss is None else pss
    return total


class LogCapture:
    """Writes the command's output to the log, keeping at most ``limit`` bytes.

    Until the output passes ``limit`` it is written as it comes. Past it, the
    file keeps the head (how the run started: a quarter of the room, more when
    the room is large), a marker line saying how much was dropped, and the
    latest output (the rest, at most TAIL_MEMORY_MAX), which is kept in
    memory in whole chunks and rewritten after the marker now and then (and
    at the end), so the file stays readable and bounded throughout.
    ``limit`` None keeps everything.
    """

    def __init__(self, fd: int, limit: int | None, limit_text: str = "") -> None:
        self.fd = fd
        self.limit = limit
        self.limit_text = limit_text
        # The tail is held in memory while output is dropped: three quarters
        # of the room, at most TAIL_MEMORY_MAX; the head (on disk) gets the
        # rest, less room for the marker line (about 150 bytes).
        room = 0 if limit is None else max(limit - MARKER_ROOM, 0)
        self.tail_room = min(room - room // 4, TAIL_MEMORY_MAX)
        self.head_room = room - self.tail_room
        self.total = 0  # bytes of output received
        self.head_end: int | None = None  # file offset where the head ends
        self.tail: collections.deque[bytes] = collections.deque()
        self.tail_bytes = 0
        self.capping = False
        self.dirty = False
        self.last_flush = 0.0
        if limit is not None and self.head_room == 0:
            self.head_end = os.lseek(fd, 0, os.SEEK_END)

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.limit is None:
            _write_all(self.fd, data)
            return
        before = self.total
        self.total += len(data)
        if before < self.head_room:  # (part of) this chunk is head
            head = data[: self.head_room - before]
            if not self.capping:
                _write_all(self.fd, head)
            data = data[len(head) :]
            if self.total >= self.head_room:
                self.head_end = os.lseek(self.fd, 0, os.SEEK_END)
        if not data:
            return
        # Output past the head: remembered (the latest tail_room bytes, in
        # whole chunks: no copying of what is kept) ...
        self.tail.append(data)
        self.tail_bytes += len(data)
        while self.tail_bytes - len(self.tail[0]) >= self.tail_room:
            self.tail_bytes -= len(self.tail.popleft())
        # ... and written as it comes, until the whole would pass the limit.
        if not self.capping and self.total <= self.limit:
            _write_all(self.fd, data)
            return
        self.capping = True
        self.dirty = True
        if time.monotonic() - self.last_flush >= TAIL_FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Rewrite what follows the head: the marker line, then the latest output."""
        if not self.dirty or self.head_end is None:
            return
        self.dirty = False
        self.last_flush = time.monotonic()
        tail = b"".join(self.tail)
        tail = tail[max(len(tail) - self.tail_room, 0) :]
        # Start the kept part on a line of its own when a line break is near.
        newline = tail.find(b"\n", 0, 4096)
        if newline >= 0:
            tail = tail[newline + 1 :]
        dropped = self.total - self.head_room - len(tail)
        marker = (
            f"\n[ramp-dispatcher] {_size(dropped)} of output dropped here; the log keeps "
            f"the first {_size(self.head_room)} and the last {_size(len(tail))}"
            f"{self.limit_text}.\n"
        ).encode()
        try:
            # O_APPEND: after the truncation, writes land at the head's end.
            os.ftruncate(self.fd, self.head_end)
        except OSError:
            return
        _write_all(self.fd, marker + tail)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except OSError:
            return  # disk full: losing log lines must not stop the run
        view = view[n:]


def _size(n: int) -> str:
    if n < 10 * 1024:
        return f"{n} bytes"
    if n < 10 * 1024 * 1024:
        return f"{n / 1024:.0f} KiB"
    return f"{n / (1024 * 1024):.0f} MiB"


# ------------------------------------------------------------------ run cgroup
class RunCgroup:
    """The run's own cgroup v2: created, limited, entered by the command, removed."""

    def __init__(self, path: Path, settings: dict[str, str]) -> None:
        self.path = path
        self.settings = settings
        self.procs_fd = -1

    def create(self) -> None:
        """Make the cgroup and write its limits (OSError when it cannot be done)."""
        try:
            self.path.mkdir()
        except FileExistsError:
            if self.populated():  # a lost supervisor's run of the same attempt
                self.kill()
        for name, value in self.settings.items():
            with open(self.path / name, "w") as f:
                f.write(value)
        # Opened before the fork: the child only writes "0" (itself) into it.
        self.procs_fd = os.open(self.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)

    def enter(self) -> None:
        """In the command's process, before exec: so its whole tree is inside."""
        os.write(self.procs_fd, b"0")

    def close_fd(self) -> None:
        if self.procs_fd >= 0:
            os.close(self.procs_fd)
            self.procs_fd = -1

    def counters(self, name: str) -> dict[str, int]:
        """A flat-keyed file such as memory.events or pids.events; {} when absent."""
        found = {}
        try:
            with open(self.path / name) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if value.strip().isdigit():
                        found[key] = int(value)
        except OSError:
            pass
        return found

    def populated(self) -> bool:
        return self.counters("cgroup.events").get("populated", 0) == 1

    def kill(self) -> None:
        """SIGKILL everything in it at once (a fork between scan and kill included)."""
        try:
            with open(self.path / "cgroup.kill", "w") as f:
                f.write("1")
        except OSError:  # kernel < 5.14: signal what is listed, a few times
            for _ in range(20):
                try:
                    pids = (self.path / "cgroup.procs").read_text().split()
                except OSError:
                    return
                if not pids:
                    return
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (OSError, ValueError):
                        pass
                time.sleep(0.05)

    def remove(self) -> bool:
        """Empty and remove it; False when it could not be removed."""
        self.close_fd()
        for attempt in range(100):
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if attempt == 0:
                    self.kill()
                time.sleep(0.02)  # killed tasks leave it asynchronously
        return False


# ------------------------------------------------------------------ supervisor
class Supervisor:
    def __init__(
        self,
        command: list[str],
        log_path: Path,
        status_path: Path,
        timeout: float,
        memory_limit_mb: float | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        max_log_mb: float | None = None,
        clear_env: bool = False,
        rlimits: dict[int, int] | None = None,
        cgroup: RunCgroup | None = None,
        bwrap: bool = False,
    ):
        self.command = command
        self.log_path = log_path
        self.status_path = status_path
        self.timeout = timeout
        self.memory_limit_mb = memory_limit_mb
        self.cwd = cwd
        self.env = env or {}
        self.clear_env = clear_env
        self.rlimits = rlimits or {}
        self.cgroup = cgroup
        #: the command is bubblewrap: its --info-fd tells whether its sandbox started
        self.bwrap = bwrap
        self.info_fd = -1  # our end of that pipe
        self.stop_signal: int | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self.child_status: int | None = None  # raw wait status once reaped
        self.peak_tree_kib = 0
        self.started_at = 0.0
        self.log_fd = -1
        self.max_log_mb = max_log_mb
        self.capture: LogCapture | None = None
        self.out_fd = -1  # our end of the command's output pipe

    # -- small pieces
    def note(self, text: str) -> None:
        """Append a line to the run's log (participants read it)."""
        line = f"\n[ramp-dispatcher] {text}\n".encode()
        if self.capture is not None:
            self.capture.write(line)  # after the output, inside the kept tail
        elif self.log_fd >= 0:
            _write_all(self.log_fd, line)

    def drain(self, until_eof: bool = False) -> None:
        """Move what the command printed from the pipe to the log.

        Reads what is there now; with ``until_eof``, waits (at most
        DRAIN_TIMEOUT_S) for every writer to close the pipe, then closes it.
        """
        if self.out_fd < 0 or self.capture is None:
            return
        # Bounded even while output keeps coming: the limits are checked between.
        deadline = time.monotonic() + (DRAIN_TIMEOUT_S if until_eof else DRAIN_SLICE_S)
        while True:
            if not until_eof and time.monotonic() >= deadline:
                return
            try:
                data = os.read(self.out_fd, READ_CHUNK)
            except BlockingIOError:
                if not until_eof or time.monotonic() >= deadline:
                    return
                select.select([self.out_fd], [], [], max(deadline - time.monotonic(), 0))
                continue
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:  # every writer closed it
                os.close(self.out_fd)
                self.out_fd = -1
                return
            self.capture.write(data)

    def write_status(self, data: dict[str, Any]) -> None:
        self.status_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.status_path.with_name(self.status_path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        # A reader sees either the old or the new file, never half of one.
        os.replace(tmp, self.status_path)

    def _preexec(self) -> None:
        """In the child, before exec: join the run's cgroup, then lower soft and
        hard limits together, so the command cannot raise them again."""
        if self.cgroup is not None:
            self.cgroup.enter()
        for which, value in self.rlimits.items():
            soft, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, value))

    def on_signal(self, signum: int, _frame: object) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum

    def reap(self) -> None:
        """Collect every exited child; orphans re-parented to us included."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            if self.child is not None and pid == self.child.pid:
                self.child_status = status
                # Keep Popen consistent: we reaped it behind its back.
                self.child.returncode = os.waitstatus_to_exitcode(status)

    def live_descendants(self) -> list[ProcInfo]:
        """Descendants that can still run.

        Careful: a multi-threaded process whose main thread exited shows
        state Z while its other threads still run, and it cannot be reaped
        yet; so "all gone" must be judged with :meth:`remaining`.
        """
        return [p for p in descendants(os.getpid()) if p.state not in ("Z", "X")]

    def remaining(self) -> list[ProcInfo]:
        """Descendants not reaped yet, after reaping what can be."""
        self.reap()
        return descendants(os.getpid())

    def sample_memory(self) -> int:
        total = tree_memory_kib([p.pid for p in self.live_descendants()])
        self.peak_tree_kib = max(self.peak_tree_kib, total)
        return total

    def signal_tree(self, sig: int) -> None:
        if self.child is not None:
            try:
                os.killpg(self.child.pid, sig)
            except OSError:
                pass  # the group is empty
        for p in self.live_descendants():
            try:
                os.kill(p.pid, sig)
            except OSError:
                pass

    def stop_tree(self, grace: float) -> None:
        """SIGTERM everything below us, SIGKILL what is left after ``grace``."""
        self.signal_tree(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.remaining():
            self.drain()  # a process blocked on a full pipe could not stop
            time.sleep(0.05)
        # Loop because a process may fork between our scan and our kill.
        for _ in range(200):
            if not self.remaining():
                break
            self.signal_tree(signal.SIGKILL)
            time.sleep(0.05)
        if self.cgroup is not None and self.cgroup.populated():
            self.cgroup.kill()  # what left our tree (e.g. through a setuid helper)

    def wait_child(self, pidfd: int | None, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early when the child exits."""
        seconds = max(0.0, seconds)
        poller = select.poll()
        if self.out_fd >= 0:
            poller.register(self.out_fd, select.POLLIN)
        if pidfd is None:
            seconds = min(seconds, 0.1)
        else:
            poller.register(pidfd, select.POLLIN)
        poller.poll(seconds * 1000)

    # -- the run
    def run(self) -> int:
        self.started_at = time.time()
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            # O_APPEND: the worker may share this file as our stdout/stderr.
            self.log_fd = os.open(
                self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644
            )
            env = {} if self.clear_env else dict(os.environ)
            env.update(self.env)
            limit = None
            if self.max_log_mb is not None:
                limit = int(self.max_log_mb * 1024 * 1024)
            if self.cgroup is not None:
                try:
                    self.cgroup.create()
                except OSError as exc:
                    raise OSError(f"cannot set up the run's cgroup {self.cgroup.path}: {exc}") from None
            self.capture = LogCapture(self.log_fd, limit, f" (max_log_mb: {self.max_log_mb:g})"
                                      if self.max_log_mb is not None else "")
            # The output comes through us, so the log can be bounded.
            self.out_fd, out_w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(self.out_fd, False)  # our end only: the command's blocks
            try:
                fcntl.fcntl(self.out_fd, F_SETPIPE_SZ, READ_CHUNK)  # fewer wake-ups
            except OSError:
                pass
            command, keep = self.command, ()
            if self.bwrap:
                # bwrap writes its child's pid here once the namespaces exist
                self.info_fd, info_w = os.pipe2(os.O_CLOEXEC)
                os.set_blocking(self.info_fd, False)
                command, keep = [command[0], "--info-fd", str(info_w), *command[1:]], (info_w,)
            try:
                self.child = subprocess.Popen(
                    command,
                    pass_fds=keep,
                    stdin=subprocess.DEVNULL,
                    stdout=out_w,
                    stderr=out_w,
                    cwd=self.cwd,
                    env=env,
                    close_fds=True,
                    process_group=0,  # its own group: one killpg stops it all
                    preexec_fn=self._preexec if self.rlimits or self.cgroup else None,
                )
            finally:
                os.close(out_w)
                for fd in keep:
                    os.close(fd)
                if self.cgroup is not None:
                    self.cgroup.close_fd()
        except (OSError, subprocess.SubprocessError) as exc:  # the latter: a failed rlimit
            self.note(f"could not start ramp-test: {exc}")
            return self.finish("spawn_error", f"could not start {self.command[0]}: {exc}")

        child_info = read_stat(self.child.pid)
        self.write_status(
            {
                "started_at": self.started_at,
                "supervisor_pid": os.getpid(),
                "child_pid": self.child.pid,
                "child_start_time": child_info.start_time if child_info else None,
            }
        )
        try:
            pidfd: int | None = os.pidfd_open(self.child.pid)
        except (AttributeError, OSError):
            pidfd = None  # old kernel: fall back to short sleeps

        deadline = time.monotonic() + self.timeout
        limit_kib = None if self.memory_limit_mb is None else self.memory_limit_mb * 1024
        next_sample = 0.0
        reason = "exited"
        message = ""
        while True:
            self.drain()
            self.reap()
            if self.child_status is not None:
                break
            now = time.monotonic()
            if self.stop_signal is not None:
                reason = "killed"
                message = f"the supervisor received signal {self.stop_signal}"
                self.note(f"Training stopped: {message}.")
                break
            if now >= deadline:
                reason = "timeout"
                message = f"the time limit of {self.timeout:g} s was reached"
                self.note(f"Training stopped: {message}.")
                break
            if now >= next_sample:
                next_sample = now + SAMPLE_INTERVAL_S
                total = self.sample_memory()
                if limit_kib is not None and total > limit_kib:
                    reason = "memory"
                    message = (
                        f"the memory limit of {self.memory_limit_mb:g} MB was exceeded "
                        f"({total / 1024:.0f} MB in use)"
                    )
                    self.note(f"Training stopped: {message}.")
                    break
            self.wait_child(pidfd, min(deadline, next_sample) - now)
        if pidfd is not None:
            os.close(pidfd)
        # Also after a normal exit: a submission must leave no process behind.
        self.stop_tree(TERM_GRACE_S)
        self.drain(until_eof=True)
        if self.bwrap and reason == "exited" and not self.sandbox_started():
            reason, message = "spawn_error", f"the sandbox did not start ({self.last_output_line()})"
            self.note("The sandbox could not start: the platform's failure, not the submission's.")
        if self.cgroup is not None:
            reason, message = self.cgroup_verdict(reason, message)
        return self.finish(reason, message)

    def sandbox_started(self) -> bool:
        """Whether bwrap said its sandbox's pid (written before the command
        runs): without it, bwrap failed before the submission's code could run,
        e.g. no namespace for it (EAGAIN when another run of the same user took
        every process RLIMIT_NPROC allows), and its exit is not the run's."""
        try:
            return b"child-pid" in os.read(self.info_fd, 65536)
        except OSError:  # nothing written, and a writer still holds it
            return False
        finally:
            os.close(self.info_fd)
            self.info_fd = -1

    def last_output_line(self) -> str:
        """The log's last line (bwrap's error, when its sandbox did not start)."""
        if self.capture is not None:
            self.capture.flush()
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(f.seek(0, os.SEEK_END) - 1024, 0))
                lines = f.read().decode("utf-8", "replace").strip().splitlines()
        except OSError:
            lines = []
        return lines[-1][:300] if lines else "no message"

    def cgroup_verdict(self, reason: str, message: str) -> tuple[str, str]:
        """What the run's cgroup saw: the kernel's OOM kill at memory.max is the
        memory limit (memory grown between two samples); hitting pids.max is
        said in the log, since the forks that failed explain the run's errors."""
        assert self.cgroup is not None
        hits = self.cgroup.counters("pids.events").get("max", 0)
        if hits:
            bound = self.cgroup.settings.get("pids.max", "its bound")
            self.note(f"The run reached its process limit ({bound}) {hits} times: "
                      "starting a process or thread failed then.")
        ooms = self.cgroup.counters("memory.events")
        if reason == "exited" and (ooms.get("oom_kill", 0) or ooms.get("oom_group_kill", 0)):
            limit = self.memory_limit_mb
            reason = "memory"
            message = (
                f"the memory limit of {limit:g} MB was exceeded (the system stopped the run "
                "when its memory grew past the limit faster than it is sampled)"
                if limit is not None else "the run's cgroup ran out of memory"
            )
            self.note(f"Training stopped: {message}.")
        return reason, message

    def finish(self, reason: str, message: str) -> int:
        if self.cgroup is not None and not self.cgroup.remove():
            self.note(f"the run's cgroup {self.cgroup.path} could not be removed")
        if self.out_fd >= 0:  # a writer outside our tree holds the pipe: stop reading
            os.close(self.out_fd)
            self.out_fd = -1
        if self.capture is not None:
            self.capture.flush()
        exit_code: int | None = None
        sig: int | None = None
        if self.child_status is not None:
            if os.WIFEXITED(self.child_status):
                exit_code = os.WEXITSTATUS(self.child_status)
            elif os.WIFSIGNALED(self.child_status):
                sig = os.WTERMSIG(self.child_status)
        if reason == "exited" and not message:
            message = (
                f"exited with code {exit_code}" if sig is None else f"killed by signal {sig}"
            )
        # ru_maxrss (KiB) is the peak of the largest single reaped process;
        # the sampled tree sum can be larger when several processes work.
        peak_kib = max(
            self.peak_tree_kib, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        )
        self.write_status(
            {
                "reason": reason,
                "exit_code": exit_code,
                "signal": sig,
                "max_ram_mb": round(peak_kib / 1024, 1),
                "started_at": self.started_at,
                "finished_at": time.time(),
                "message": message,
                "supervisor_pid": os.getpid(),
                "child_pid": self.child.pid if self.child is not None else None,
            }
        )
        return 0


def _become_subreaper() -> bool:
    """Orphaned descendants (daemonised helpers) get re-parented to us."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _parse_setenv(items: Sequence[str], option: str = "--setenv") -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"{option} wants NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def _parse_rlimits(items: Sequence[str]) -> dict[int, int]:
    limits = {}
    for item in items:
        name, sep, value = item.partition("=")
        which = getattr(resource, f"RLIMIT_{name.upper()}", None)
        if not sep or which is None or not value.isdigit():
            raise argparse.ArgumentTypeError(
                f"--rlimit wants NAME=INTEGER with NAME one of NPROC, NOFILE, FSIZE, ...; got {item!r}"
            )
        limits[which] = int(value)
    return limits


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="supervise.py",
        description="Run one command under time/memory limits; write a JSON status file.",
    )
    parser.add_argument("--log", required=True, type=Path, help="the command's output (appended)")
    parser.add_argument("--status", required=True, type=Path, help="JSON status file")
    parser.add_argument("--timeout", required=True, type=float, help="seconds")
    parser.add_argument("--memory-limit-mb", type=float, default=None)
    parser.add_argument(
        "--max-log-mb", type=float, default=None, help="bound of the log (default: none)"
    )
    parser.add_argument("--nice", type=int, default=5, help="niceness increment")
    parser.add_argument("--cwd", default=None, help="the command's working directory")
    parser.add_argument("--setenv", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--clear-env", action="store_true", help="pass on --setenv variables only")
    parser.add_argument("--rlimit", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--cgroup", type=Path, default=None,
                        help="the run's own cgroup v2 (created and removed here)")
    parser.add_argument("--cgroup-set", action="append", default=[], metavar="FILE=VALUE",
                        help="a limit written into --cgroup (pids.max=512, memory.max=...)")
    parser.add_argument("--bwrap", action="store_true",
                        help="the command is bubblewrap: a sandbox that never started is a spawn_error")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("no command given")
    try:
        env = _parse_setenv(args.setenv)
        rlimits = _parse_rlimits(args.rlimit)
        settings = _parse_setenv(args.cgroup_set, "--cgroup-set")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if settings and args.cgroup is None:
        parser.error("--cgroup-set needs --cgroup")
    if any("/" in name or not name.startswith(("memory.", "pids.")) for name in settings):
        parser.error("--cgroup-set names a memory.* or pids.* file of the run's cgroup")

    sup = Supervisor(
        command=command,
        log_path=args.log,
        status_path=args.status,
        timeout=args.timeout,
        memory_limit_mb=args.memory_limit_mb,
        cwd=args.cwd,
        env=env,
        max_log_mb=args.max_log_mb,
        clear_env=args.clear_env,
        rlimits=rlimits,
        cgroup=None if args.cgroup is None else RunCgroup(args.cgroup, settings),
        bwrap=args.bwrap,
    )
    # Installed before spawning so an early cancel is not lost.
    signal.signal(signal.SIGTERM, sup.on_signal)
    signal.signal(signal.SIGINT, sup.on_signal)
    # No terminal and no pipe to the daemon: its death must not stop us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if args.nice:
        try:
            os.nice(args.nice)  # inherited by the command
        except OSError:
            pass
    if not _become_subreaper():
        print("supervise: could not become a child subreaper", file=sys.stderr)
    return sup.run()


def spare_main() -> int:
    """``supervise.py --spare``: started ahead of its run (by a Dask worker) and
    idle until the run's arguments come, so that the run does not wait for a
    Python start. Its stdin's first line is ``{"argv": [...], "output": LOG}``
    (JSON); this process's own output then goes to LOG, as a supervisor
    started for the run has it. End of input first: exit, unused."""
    line = sys.stdin.buffer.readline()
    if not line:
        return 0
    try:
        job = json.loads(line)
        argv, output = [str(a) for a in job["argv"]], str(job["output"])
    except (ValueError, KeyError, TypeError) as exc:
        print(f"supervise: bad spare job: {exc}", file=sys.stderr)
        return 2
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return main(argv)


if __name__ == "__main__":
    sys.exit(spare_main() if sys.argv[1:] == ["--spare"] else main())
