"""The EC2 worker: each run on its own instance booted from the event's AMI.

Lifecycle of one run, all of it in a thread of its own so the daemon's loop
never waits on AWS or SSH: find the newest AMI called ``ami_image_name`` among
``ami_owners``; launch an instance (spot first when asked, on demand when spot
has no capacity), tagged at creation with the event, submission, attempt, run
id and daemon, with a ClientToken so that a retried call never launches
twice; wait (at most ``boot_timeout``) until SSH answers with a host key the
instance published; ship the launcher, the supervisor and the sandbox module
and ask the image whether it can run the run (an image that cannot is a
configuration error, see :meth:`.run._Run._prepare`); upload the submission
over SFTP; start the run detached (``setsid nohup``, pid file, exit-code
file: see :mod:`.remote`): ramp-test under the conda worker's supervisor
(time limit, tree kill, log bounded to ``max_log_mb``, peak memory), in its
bubblewrap sandbox unless ``sandbox: none`` (see :mod:`.launch`), and after
a clean exit, with ``verify_scores``, the conda worker's post-run checks and
re-scoring on the instance, outside the sandbox, on the event's folds (read
from the database before the launch, shipped with the tools); then one
status command per :meth:`AWSWorker.check`; once ramp-test exited, download
the end of the log (at most ``max_log_mb``), ``training_output``, the
recomputed scores and the peak memory; terminate the instance and confirm it is shutting down before
reporting the outcome. ``memory_profiling`` decides whether the peak is
reported.

Failures: a non-zero exit is the participant's; ``timeout`` exceeded stops the
remote process group (TIMEOUT); a spot interruption notice, an instance that
is gone, SSH lost for longer than ``unreachable_timeout``, failed transfers
and every AWS error are INFRASTRUCTURE (requeued by the dispatcher). The
instance is terminated on every path except :meth:`AWSWorker.close`, which
leaves runs for the next daemon to re-attach, and :meth:`AWSWorker.forget`,
which leaves one run to the daemon that took it over.

Files on this machine: downloads land first in ``local_predictions_folder``
and ``local_log_folder`` (under ``.downloads/<submission>-attempt-<n>``), and
only a complete download is moved to where the dispatcher reads: the log to
``request.log_path`` and ``training_output`` to ``request.output_dir``, also
after a failure, where the dispatcher takes the traceback from it.

The handle (stored before the instance exists) holds the run id, the remote
run folder and the time limit; the instance is found again by its tags. A
worker that gets :meth:`~AWSWorker.check` for a run it does not know (after a
restart) re-attaches: instance running and ramp-test started -> status checks
resume; run finished -> collected; never started -> uploaded and started once
(the remote run folder is the lock); instance gone -> INFRASTRUCTURE.

Test seam: ``AWSWorker(..., network=...)`` takes an
:class:`~.network.InstanceNetwork` (address, host keys, metadata URL of an
instance). The default reads the instance's IP and the host keys cloud-init
prints on its console; tests map every instance to a local sshd and its key.

The package, one job per module:

- :mod:`.config`: :class:`AWSConfig`, read and checked from the ``worker`` section;
- :mod:`.ec2`: the EC2 API calls and the instance tags;
- :mod:`.network`: how an instance is reached (address, trusted host keys);
- :mod:`.ssh`: one SSH connection (commands, SFTP);
- :mod:`.remote`: the run protocol on the instance (tools, check, start, status, kill);
- :mod:`.launch`: the instance side of a run (shipped by value, run there);
- :mod:`.run`: one run's lifecycle, in its own thread;
- :mod:`.reaper`: terminating instances no run owns;
- :mod:`.worker`: :class:`AWSWorker`, the :class:`~..base.Worker` the daemon calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import AWSConfig, AWSConfigError, from_section
from .worker import AWSWorker

if TYPE_CHECKING:
    from ..registry import WorkerContext

__all__ = ["AWSConfig", "AWSConfigError", "AWSWorker", "create_worker", "from_section"]


def create_worker(config: AWSConfig, context: WorkerContext) -> AWSWorker:
    """The registry's entry point (``from_section`` is the other)."""
    if not context.event_name:
        raise ValueError("make_worker: the aws worker needs event_name (it tags its instances)")
    return AWSWorker(
        config, context.event_name, daemon_id=context.daemon_id, database=context.database,
        cv_folds=context.cv_folds,
    )
