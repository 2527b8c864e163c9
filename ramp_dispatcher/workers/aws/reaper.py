"""The aws worker's reaper: terminates instances that no run owns any more.

Instances are found by their tags (:mod:`.ec2`); one that carries this
deployment's tag (``deployment_id``: database and event) but belongs to no unfinished run of the event (from the database), and
was launched long enough ago (``reap_min_age``) not to be a run claimed after
the database was read, is terminated. So are a finished run's instance that
its own thread could not terminate, and the instances of one run found by tags
when its launch reply was lost.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..base import RunRequest
from .ec2 import (
    NOT_TERMINATED,
    TAG_ATTEMPT,
    TAG_DEPLOYMENT,
    TAG_EVENT,
    TAG_RUN,
    TAG_SUBMISSION,
    Ec2Error,
)

if TYPE_CHECKING:
    from .worker import AWSWorker

log = logging.getLogger("ramp_dispatcher.workers.aws")


def terminate_tagged(worker: AWSWorker, request: RunRequest, run_id: str | None = None) -> None:
    """Terminate the instances carrying one run's tags (a lost launch reply, a
    run the dispatcher gave up on before this worker knew it)."""
    tags = worker.run_tags(request) | ({TAG_RUN: run_id} if run_id else {})
    try:
        found = worker.ec2.find(tags, NOT_TERMINATED)
        ids = [i.instance_id for i in found]
        if ids:
            log.warning(
                "aws worker: terminating %s left by submission %s attempt %s",
                ", ".join(ids),
                request.submission_id,
                request.attempt,
            )
            worker.ec2.terminate(ids)
    except Ec2Error as exc:
        log.error(
            "aws worker: cleanup of submission %s attempt %s: %s (the reaper retries)",
            request.submission_id,
            request.attempt,
            worker.redact(str(exc)),
        )


def reap(worker: AWSWorker, active: frozenset[tuple[int, int]], snapshot: float) -> None:
    """Terminate the event's instances that no active run owns.

    ``active`` holds the (submission_id, attempt) pairs of every unfinished
    run of the event as read from the database at ``snapshot`` (epoch s).
    """
    try:
        # This deployment's only: never another's, whatever its event name.
        scope = {TAG_DEPLOYMENT: worker.deployment_id, TAG_EVENT: worker.event}
        instances = worker.ec2.find(scope, NOT_TERMINATED)
    except Ec2Error as exc:
        log.error("aws reaper: cannot list instances: %s", worker.redact(str(exc)))
        return
    with worker.lock:
        runs = dict(worker.runs)
    doomed: dict[str, str] = {}
    for inst in instances:
        key = inst.run_key
        run = runs.get(key) if None not in key else None  # type: ignore[arg-type]
        if run is not None and run.owns(inst):
            if run.finished:
                doomed[inst.instance_id] = "its run is finished"
            continue  # a run of ours in progress
        if key in active:
            continue  # another daemon's run, or one about to be re-attached
        launched = inst.launch_time.timestamp() if inst.launch_time else 0.0
        if launched > snapshot - worker.config.reap_min_age:
            continue  # may belong to a run claimed after ``active`` was read
        doomed[inst.instance_id] = "no active run of the event has it"
    for instance_id, reason in doomed.items():
        inst = next(i for i in instances if i.instance_id == instance_id)
        log.warning(
            "aws reaper: terminating %s (event %s, submission %s, attempt %s, %s): %s",
            instance_id,
            worker.event,
            inst.tags.get(TAG_SUBMISSION),
            inst.tags.get(TAG_ATTEMPT),
            inst.state,
            reason,
        )
    if doomed:
        try:
            worker.ec2.terminate(list(doomed))
        except Ec2Error as exc:
            log.error("aws reaper: %s", worker.redact(str(exc)))
