"""The supervisor's final status file (``supervise.py``) read as a RunOutcome.

One reading for every worker type that runs the supervisor (conda locally,
dask on a cluster's worker), so that the same end of ``ramp-test`` gets the
same class and the same words whichever worker ran it.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from .base import FailureClass, RunOutcome


def outcome_from_status(
    status: dict[str, Any],
    log_path: Path,
    output_dir: Path,
    *,
    time_limit: str,
    memory_limit: str,
    where: str = "",
    bwrap: bool = False,
    lost_ramp_test: bool = False,
) -> RunOutcome:
    """The outcome a final ``status`` says.

    ``time_limit`` and ``memory_limit`` are the caller's words for the limit
    that was reached (``the time limit of 60 s was reached``): the caller
    knows which limits the run had. ``where`` names the host for the
    platform's failures; ``bwrap``: ramp-test ran inside bubblewrap, which
    reports its command's death by signal N as exit code 128 + N;
    ``lost_ramp_test``: the environment has no ``bin/ramp-test`` any more, so a
    non-zero exit is the platform's doing, not the participant's.
    """
    reason = status.get("reason")
    exit_code, sig = status.get("exit_code"), status.get("signal")
    if bwrap and isinstance(exit_code, int) and exit_code > 128:
        sig, exit_code = exit_code - 128, None
    if exit_code is None and isinstance(sig, int):
        exit_code = -sig  # subprocess's convention for "killed by signal"
    try:
        duration: float | None = float(status["finished_at"]) - float(status["started_at"])
    except (KeyError, TypeError, ValueError):
        duration = None
    max_ram = status.get("max_ram_mb")
    common: dict[str, Any] = {
        "exit_code": exit_code,
        "max_ram_mb": float(max_ram) if isinstance(max_ram, (int, float)) else None,
        "log_path": log_path,
        "duration_s": duration,
    }
    at = f" {where}" if where else ""

    def infra(message: str) -> RunOutcome:
        return RunOutcome(FailureClass.INFRASTRUCTURE, message, **common)

    if reason == "exited":
        if exit_code == 0:
            # Whether the output is usable is the results parser's call: the
            # dispatcher may already have moved it before a crash.
            return RunOutcome(None, "", output_dir=output_dir, **common)
        if lost_ramp_test:
            # e.g. the sandbox could not exec it: the platform broke, not the code
            return infra("the environment lost its bin/ramp-test during the run")
        if isinstance(sig, int):
            hint = " (possibly by the system for lack of memory)" if sig == signal.SIGKILL else ""
            return RunOutcome(
                FailureClass.PARTICIPANT, f"ramp-test was killed by {signal_name(sig)}{hint}", **common
            )
        return RunOutcome(FailureClass.PARTICIPANT, f"ramp-test exited with code {exit_code}", **common)
    if reason == "timeout":
        return RunOutcome(FailureClass.TIMEOUT, f"Training stopped: {time_limit}.", **common)
    if reason == "memory":
        return RunOutcome(FailureClass.MEMORY, f"Training stopped: {memory_limit}.", **common)
    if reason == "worker_lost":  # written by the dask worker, not the supervisor
        return infra(str(status.get("message") or "the Dask worker running it was lost"))
    if reason == "spawn_error":
        return infra(f"could not start ramp-test{at}: {status.get('message', '')}")
    if reason == "killed":
        return infra(
            f"the run was stopped before it finished{at} "
            f"({status.get('message') or 'its supervisor was signalled'})"
        )
    return infra(f"unknown run status {reason!r}{at}")


def signal_name(sig: int) -> str:
    try:
        return f"{signal.Signals(sig).name} (signal {sig})"
    except ValueError:
        return f"signal {sig}"
