"""Who a daemon is: the owner id it writes on its runs, and whether it lives.

An owner id is ``host:pid:start:random``. The process start time (from
/proc, in clock ticks since boot) tells a reused pid apart, so a daemon can
see that the owner of a run on its own host is gone without waiting for the
run's lease to lapse. Another host's daemon is judged by its lease alone.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from .workers.supervise import read_stat


@dataclass(frozen=True)
class Owner:
    host: str
    pid: str
    start: str

    @classmethod
    def parse(cls, owner: str) -> Owner:
        host, pid, start, *_ = (owner.split(":") + ["", "", ""])[:4]
        return cls(host, pid, start)


def new_owner_id() -> str:
    """A fresh id for this process (a new random part per call)."""
    me = read_stat(os.getpid())
    start = str(me.start_time) if me is not None else "0"
    return f"{socket.gethostname()}:{os.getpid()}:{start}:{uuid.uuid4().hex[:8]}"


def is_local(owner: str) -> bool:
    """Whether the owner is a daemon of this host."""
    return Owner.parse(owner).host == socket.gethostname()


def owner_is_dead(owner: str) -> bool:
    """True for a daemon of this host whose process is gone (killed, crashed)."""
    who = Owner.parse(owner)
    if who.host != socket.gethostname() or not who.pid.isdigit():
        return False  # another host: only its lease tells
    proc = read_stat(int(who.pid))
    return proc is None or proc.state == "Z" or str(proc.start_time) != who.start
