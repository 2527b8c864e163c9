"""The EC2 worker: each run on its own instance booted from the event's AMI.

Lifecycle of one run, all of it in a thread of its own so the daemon's loop
never waits on AWS or SSH: find the newest AMI called ``ami_image_name`` among
``ami_owners``; launch an instance (spot first when asked, on demand when spot
has no capacity), tagged at creation with the event, submission, attempt, run
id and daemon, with a ClientToken so that a retried call never launches
twice; wait (at most ``boot_timeout``) until SSH answers with a host key the
instance published; upload the submission over SFTP; start ``ramp-test``
detached (``setsid nohup``, pid file, exit-code file: see :mod:`.aws_ssh`);
then one status command per :meth:`AWSWorker.check`; once ramp-test exited,
download the log, ``training_output`` and the peak memory; terminate the
instance and confirm it is shutting down before reporting the outcome.
With ``memory_profiling`` the image's ``python3`` runs ramp-test as a child
and records its ``ru_maxrss`` (no GNU time or memory_profiler needed).

Failures: a non-zero exit is the participant's; ``timeout`` exceeded stops the
remote process group (TIMEOUT); a spot interruption notice, an instance that
is gone, SSH lost for longer than ``unreachable_timeout``, failed transfers
and every AWS error are INFRASTRUCTURE (requeued by the dispatcher). The
instance is terminated on every path except :meth:`AWSWorker.close`, which
leaves runs for the next daemon to re-attach.

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
:class:`~.aws_ec2.InstanceNetwork` (address, host keys, metadata URL of an
instance). The default reads the instance's IP and the host keys cloud-init
prints on its console; tests map every instance to a local sshd and its key.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import posixpath
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .aws_ec2 import (
    GONE_STATES,
    LIVE_STATES,
    NOT_TERMINATED,
    SPOT_FALLBACK_CODES,
    SPOT_MARKET,
    TAG_ATTEMPT,
    TAG_DAEMON,
    TAG_EVENT,
    TAG_RUN,
    TAG_SUBMISSION,
    Ec2,
    Ec2Error,
    Ec2InstanceNetwork,
    Image,
    Instance,
    InstanceNetwork,
    client_token,
    launch_params,
)
from .aws_ssh import (
    HostKeyMismatch,
    RemoteRun,
    RemoteStatus,
    SshConnection,
    SshError,
    kill_command,
    known_hosts_fingerprints,
    load_private_key,
    parse_status,
    start_command,
    status_command,
)
from .base import FailureClass, Handle, RunOutcome, RunRequest, Wake, Worker

log = logging.getLogger(__name__)

HANDLE_VERSION = 1
#: a found AMI is reused for this long (parallel boots ask once)
IMAGE_CACHE_S = 300.0
#: after the start command, how long the run may take to write its pid file
START_GRACE_S = 60.0
#: attempts at one upload or download, reconnecting in between
TRANSFER_TRIES = 2


class AWSConfigError(ValueError):
    """One setting is wrong; ``key`` names it for the config file's error."""

    def __init__(self, key: str, message: str):
        super().__init__(f"'{key}' {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class AWSConfig:
    """The ``worker`` section of an event's config for ``worker_type: aws``."""

    region_name: str
    ami_image_name: str  # EC2 name filter: wildcards pick the newest match
    ami_user_name: str
    instance_type: str
    key_name: str  # the EC2 key pair installed on the instance
    key_path: Path  # its private key, readable by this user only
    remote_ramp_kit_folder: str
    local_predictions_folder: Path
    local_log_folder: Path
    security_group: str | None = None  # a name (default VPC)
    security_group_ids: tuple[str, ...] = ()
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    profile_name: str | None = None
    endpoint_url: str | None = None
    ami_owners: tuple[str, ...] = ("self",)
    subnet_id: str | None = None
    iam_instance_profile: str | None = None  # a name, or an ARN
    root_volume_size_gb: int | None = None
    use_spot_instance: bool = False
    remote_ramp_data_folder: str | None = None  # default: the kit folder
    remote_python_env: str | None = None  # an env prefix on the image; default: the login shell's
    memory_profiling: bool = False
    timeout: float = 7200.0
    boot_timeout: float = 600.0
    ssh_port: int = 22
    ssh_connect_timeout: float = 20.0
    ssh_command_timeout: float = 120.0
    unreachable_timeout: float = 600.0
    known_hosts_file: Path | None = None
    poll_interval: float = 5.0
    terminate_timeout: float = 300.0
    reap_min_age: float = 600.0

    def __post_init__(self) -> None:
        for key in ("region_name", "ami_image_name", "ami_user_name", "instance_type", "key_name"):
            if not str(getattr(self, key) or "").strip():
                raise AWSConfigError(key, "must be a non-empty string")
        if not self.security_group and not self.security_group_ids:
            raise AWSConfigError("security_group", "is required (or give security_group_ids)")
        if bool(self.access_key_id) != bool(self.secret_access_key):
            raise AWSConfigError(
                "secret_access_key" if self.access_key_id else "access_key_id",
                "must be given together with the other key (or neither)",
            )
        if self.access_key_id and self.profile_name:
            raise AWSConfigError("profile_name", "cannot be combined with access keys")
        if not self.ami_owners:
            raise AWSConfigError("ami_owners", "must name at least one owner")
        for key in ("remote_ramp_kit_folder", "remote_ramp_data_folder", "remote_python_env"):
            value = getattr(self, key)
            if value is not None and (not value.startswith("/") or "\0" in value):
                raise AWSConfigError(key, f"must be an absolute path on the image, got {value!r}")
        for key in (
            "timeout", "boot_timeout", "ssh_connect_timeout", "ssh_command_timeout",
            "unreachable_timeout", "poll_interval", "terminate_timeout",
        ):  # fmt: skip
            if not getattr(self, key) > 0:
                raise AWSConfigError(
                    key, f"must be a positive number of seconds, got {getattr(self, key)!r}"
                )
        if self.reap_min_age < 0:
            raise AWSConfigError("reap_min_age", "must not be negative")
        if not 0 < self.ssh_port < 65536:
            raise AWSConfigError("ssh_port", f"must be a TCP port, got {self.ssh_port!r}")
        if self.root_volume_size_gb is not None and self.root_volume_size_gb < 1:
            raise AWSConfigError("root_volume_size_gb", "must be at least 1")
        check_private_key_file(self.key_path)
        if self.known_hosts_file is not None:
            try:
                keys = known_hosts_fingerprints(self.known_hosts_file)
            except OSError as exc:
                raise AWSConfigError(
                    "known_hosts_file", f"{self.known_hosts_file}: {exc.strerror or exc}"
                ) from None
            if not keys:
                raise AWSConfigError(
                    "known_hosts_file", f"{self.known_hosts_file} lists no host key"
                )

    @property
    def remote_data_folder(self) -> str:
        return self.remote_ramp_data_folder or self.remote_ramp_kit_folder


def check_private_key_file(path: Path) -> None:
    """The key must exist, be ours alone, and be a key paramiko can use."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise AWSConfigError("key_path", f"{path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise AWSConfigError(
            "key_path",
            f"{path} is accessible by group or others (mode {mode & 0o777:o}): chmod 600 it",
        )
    try:
        load_private_key(path)
    except ValueError as exc:
        raise AWSConfigError("key_path", f"{path}: {exc}") from None


class _Stop(Exception):
    """Unwinds a run's thread: ``outcome`` set means finish (and terminate)."""

    def __init__(self, outcome: RunOutcome | None = None, kill: bool = False):
        super().__init__(outcome.message if outcome else "detached")
        self.outcome = outcome
        self.kill = kill  # stop the remote process group first


def _infra(message: str) -> _Stop:
    return _Stop(RunOutcome(FailureClass.INFRASTRUCTURE, message))


# ---------------------------------------------------------------------- worker
class AWSWorker(Worker):
    """Runs every submission of one event on its own EC2 instance."""

    type_name = "aws"

    def __init__(
        self,
        config: AWSConfig,
        event_name: str,
        *,
        daemon_id: str | None = None,
        network: InstanceNetwork | None = None,
    ):
        if not event_name:
            raise ValueError("the aws worker needs the event name (it tags the instances)")
        self.config = config
        self.event = event_name
        self.daemon_id = daemon_id or f"{socket.gethostname()}:{os.getpid()}"
        self.key = load_private_key(config.key_path)
        self._network = network
        self._lock = threading.Lock()
        self._runs: dict[tuple[int, int], _Run] = {}
        self._ec2: Ec2 | None = None
        self._ec2_lock = threading.Lock()
        self._image: tuple[Image, float] | None = None
        self._image_lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        self.closed = threading.Event()

    # -- shared resources (built on first use, off the loop)
    @property
    def ec2(self) -> Ec2:
        # Its own lock: building a client takes a while and check() must not wait.
        with self._ec2_lock:
            if self._ec2 is None:
                self._ec2 = Ec2(self.config)
            return self._ec2

    @property
    def ec2_client(self) -> Any:
        """The boto3 EC2 client (tests hook botocore events on it)."""
        return self.ec2.client

    @property
    def network(self) -> InstanceNetwork:
        if self._network is None:
            trusted = None
            if self.config.known_hosts_file is not None:
                trusted = known_hosts_fingerprints(self.config.known_hosts_file)
            self._network = Ec2InstanceNetwork(self.ec2, self.config.ssh_port, trusted)
        return self._network

    def image(self) -> Image:
        with self._image_lock:
            now = time.monotonic()
            if self._image is None or now > self._image[1]:
                found = self.ec2.find_image(self.config.ami_image_name, self.config.ami_owners)
                self._image = (found, now + IMAGE_CACHE_S)
                log.info(
                    "aws worker: using AMI %s (%r, owner %s, created %s)",
                    found.image_id,
                    found.name,
                    found.owner_id,
                    found.creation_date,
                )
            return self._image[0]

    def redact(self, text: str) -> str:
        """Belt and braces: no message we write may carry a credential."""
        for secret in (self.config.secret_access_key, self.config.access_key_id):
            if secret:
                text = text.replace(secret, "***")
        return text

    def run_tags(self, request: RunRequest) -> dict[str, str]:
        return {
            TAG_EVENT: self.event,
            TAG_SUBMISSION: str(request.submission_id),
            TAG_ATTEMPT: str(request.attempt),
        }

    # -- Worker interface (each returns at once)
    def start(self, request: RunRequest, wake: Wake) -> Handle:
        run_id = uuid.uuid4().hex[:16]
        kit = self.config.remote_ramp_kit_folder
        handle: Handle = {
            "worker": self.type_name,
            "version": HANDLE_VERSION,
            "event": self.event,
            "submission_id": request.submission_id,
            "attempt": request.attempt,
            "run": run_id,
            "region": self.config.region_name,
            "remote_kit_dir": kit,
            "remote_data_dir": self.config.remote_data_folder,
            "remote_run_dir": posixpath.join(
                kit,
                ".ramp-dispatcher",
                f"{request.submission_name}-attempt-{request.attempt}-{run_id}",
            ),
            "timeout": float(self.config.timeout),
            "created_at": time.time(),
        }
        self._spawn(_Run(self, request, handle, wake, resume=False))
        return handle

    def check(self, request: RunRequest, handle: Handle) -> RunOutcome | None:
        problem = _handle_problem(handle, self.event, request)
        if problem:
            return RunOutcome(FailureClass.INFRASTRUCTURE, f"invalid aws run handle: {problem}")
        key = (request.submission_id, request.attempt)
        with self._lock:
            run = self._runs.get(key)
        if run is None or run.handle.get("run") != handle["run"]:
            # A run started by an earlier daemon: find its instance and go on.
            log.info(
                "aws worker: re-attaching submission %s attempt %s (run %s)",
                request.submission_id,
                request.attempt,
                handle["run"],
            )
            self._spawn(_Run(self, request, dict(handle), None, resume=True))
            return None
        return run.poll()

    def cleanup(self, request: RunRequest, handle: Handle) -> None:
        key = (request.submission_id, request.attempt)
        with self._lock:
            run = self._runs.pop(key, None)
        if run is not None:
            run.cancel()  # a no-op once its outcome is out: it terminated already
        else:
            # Not ours (the dispatcher gave up on it before a check): free it by tags.
            threading.Thread(
                target=self._terminate_tagged,
                args=(request,),
                name=f"aws-cleanup-{request.submission_id}-{request.attempt}",
                daemon=True,
            ).start()
        for path in (request.output_dir, *_staging(self.config, request)):
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            except OSError as exc:
                log.warning("aws worker: cannot remove %s: %s", path, exc)

    def reap(self, active: set[tuple[int, int]]) -> None:
        snapshot = time.time()  # the instant ``active`` was true (or just after)
        with self._lock:
            if self._reaper is not None and self._reaper.is_alive():
                return
            self._reaper = threading.Thread(
                target=self._reap,
                args=(frozenset(active), snapshot),
                name="aws-reaper",
                daemon=True,
            )
            self._reaper.start()

    def close(self) -> None:
        """Stop our threads; instances keep running for the next daemon to re-attach."""
        self.closed.set()
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.wakeup()

    # -- internals
    def _spawn(self, run: _Run) -> None:
        key = (run.request.submission_id, run.request.attempt)
        with self._lock:
            old = self._runs.get(key)
            self._runs[key] = run
        if old is not None and old.thread.is_alive():
            old.cancel()
        run.thread.start()

    def forget(self, run: _Run) -> None:
        key = (run.request.submission_id, run.request.attempt)
        with self._lock:
            if self._runs.get(key) is run:
                del self._runs[key]

    def _terminate_tagged(self, request: RunRequest, run_id: str | None = None) -> None:
        tags = self.run_tags(request) | ({TAG_RUN: run_id} if run_id else {})
        try:
            found = self.ec2.find(tags, NOT_TERMINATED)
            ids = [i.instance_id for i in found]
            if ids:
                log.warning(
                    "aws worker: terminating %s left by submission %s attempt %s",
                    ", ".join(ids),
                    request.submission_id,
                    request.attempt,
                )
                self.ec2.terminate(ids)
        except Ec2Error as exc:
            log.error(
                "aws worker: cleanup of submission %s attempt %s: %s (the reaper retries)",
                request.submission_id,
                request.attempt,
                self.redact(str(exc)),
            )

    def _reap(self, active: frozenset[tuple[int, int]], snapshot: float) -> None:
        try:
            instances = self.ec2.find({TAG_EVENT: self.event}, NOT_TERMINATED)
        except Ec2Error as exc:
            log.error("aws reaper: cannot list instances: %s", self.redact(str(exc)))
            return
        with self._lock:
            runs = dict(self._runs)
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
            if launched > snapshot - self.config.reap_min_age:
                continue  # may belong to a run claimed after ``active`` was read
            doomed[inst.instance_id] = "no active run of the event has it"
        for instance_id, reason in doomed.items():
            inst = next(i for i in instances if i.instance_id == instance_id)
            log.warning(
                "aws reaper: terminating %s (event %s, submission %s, attempt %s, %s): %s",
                instance_id,
                self.event,
                inst.tags.get(TAG_SUBMISSION),
                inst.tags.get(TAG_ATTEMPT),
                inst.state,
                reason,
            )
        if doomed:
            try:
                self.ec2.terminate(list(doomed))
            except Ec2Error as exc:
                log.error("aws reaper: %s", self.redact(str(exc)))


def _handle_problem(handle: Handle, event: str, request: RunRequest) -> str | None:
    if not isinstance(handle, dict) or handle.get("worker") != "aws":
        return "not an aws handle"
    for key in ("run", "remote_run_dir", "remote_kit_dir", "remote_data_dir"):
        if not isinstance(handle.get(key), str) or not handle[key]:
            return f"missing {key!r}"
    if handle.get("event") != event:
        return f"it belongs to event {handle.get('event')!r}"
    if (handle.get("submission_id"), handle.get("attempt")) != (
        request.submission_id,
        request.attempt,
    ):
        return "it belongs to another run"
    return None


def _staging(config: AWSConfig, request: RunRequest) -> tuple[Path, Path]:
    """Where downloads land before they are complete: (output folder, log)."""
    name = f"{request.submission_name}-attempt-{request.attempt}"
    return (
        config.local_predictions_folder / ".downloads" / name,
        config.local_log_folder / ".downloads" / f"{name}.log",
    )


# ------------------------------------------------------------------------- run
class _Run:
    """One run's lifecycle, driven by its own thread."""

    def __init__(
        self,
        worker: AWSWorker,
        request: RunRequest,
        handle: Handle,
        wake: Wake | None,
        resume: bool,
    ):
        self.worker = worker
        self.config = worker.config
        self.request = request
        self.handle = handle
        self.wake = wake
        self.resume = resume
        self.remote = RemoteRun(
            kit_dir=handle["remote_kit_dir"],
            data_dir=handle["remote_data_dir"],
            submissions_dir=posixpath.join(handle["remote_kit_dir"], "submissions"),
            submission_name=request.submission_name,
            run_dir=handle["remote_run_dir"],
        )
        self.timeout = float(handle.get("timeout") or self.config.timeout)
        self.label = f"submission {request.submission_id} attempt {request.attempt}"
        self.cond = threading.Condition()
        self.outcome: RunOutcome | None = None
        self.probe_due = False
        self.cancelled = False
        self.monitoring = False
        self.instance: Instance | None = None
        self.conn: SshConnection | None = None
        self.trusted: frozenset[str] | None = None
        self.terminated = False
        self.launch_tried = False
        self.thread = threading.Thread(
            target=self._main,
            name=f"aws-run-{request.submission_id}-{request.attempt}",
            daemon=True,
        )

    # -- called from other threads
    def poll(self) -> RunOutcome | None:
        with self.cond:
            if self.outcome is not None:
                return self.outcome
            if self.monitoring:
                self.probe_due = True  # one status command per check, at most
                self.cond.notify_all()
            return None

    def cancel(self) -> None:
        with self.cond:
            self.cancelled = True
            self.cond.notify_all()

    def wakeup(self) -> None:
        with self.cond:
            self.cond.notify_all()

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def owns(self, inst: Instance) -> bool:
        if self.instance is not None:
            return inst.instance_id == self.instance.instance_id
        return inst.tags.get(TAG_RUN) == self.handle.get("run")

    # -- the thread
    def _main(self) -> None:
        kill = False
        try:
            outcome = self._lifecycle()
        except _Stop as stop:
            if stop.outcome is None:  # close(): leave the instance for re-attach
                self._close_ssh()
                log.info("aws worker: %s detached (instance left running)", self.label)
                return
            outcome, kill = stop.outcome, stop.kill
        except Exception as exc:  # a bug here must still free the instance
            log.error("aws worker: %s: unexpected error", self.label, exc_info=True)
            outcome = RunOutcome(
                FailureClass.INFRASTRUCTURE, f"aws worker error: {type(exc).__name__}: {exc}"
            )
        self._finish(outcome, kill)

    def _lifecycle(self) -> RunOutcome:
        self.instance = self._find_existing() if self.resume else self._launch()
        self._connect_when_ready()
        status = self._status()
        if status is None or not status.folder:
            if status is None:
                raise _infra(f"instance {self._iid()} stopped answering right after boot")
            self._upload()
            self._start_remote()
        elif self.resume:
            log.info("aws worker: %s: ramp-test already started on %s", self.label, self._iid())
        final = self._monitor()
        return self._collect(final)

    # -- checkpoints
    def _checkpoint(self) -> None:
        if self.worker.closed.is_set():
            raise _Stop()
        if self.cancelled:
            raise _Stop(RunOutcome(FailureClass.INFRASTRUCTURE, "the run was cancelled"), kill=True)

    def _sleep(self, seconds: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.cancelled or self.worker.closed.is_set(), seconds)
        self._checkpoint()

    def _iid(self) -> str:
        return self.instance.instance_id if self.instance else "(none)"

    def _ec2_call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Ec2Error as exc:
            raise _infra(f"{what}: {exc}") from None

    # -- launch / find
    def _launch(self) -> Instance:
        image = self._ec2_call("cannot find the AMI", self.worker.image)
        self._checkpoint()
        tags = {
            **self.worker.run_tags(self.request),
            TAG_RUN: self.handle["run"],
            TAG_DAEMON: self.worker.daemon_id,
            "Name": f"ramp {self.worker.event} {self.request.submission_name} "
            f"#{self.request.attempt}",
        }
        params = launch_params(self.config, image, tags)
        token = functools.partial(
            client_token,
            self.worker.event,
            self.request.submission_id,
            self.request.attempt,
            self.handle["run"],
        )
        instance: Instance | None = None
        self.launch_tried = True
        if self.config.use_spot_instance:
            try:
                instance = self.worker.ec2.launch(
                    dict(params, **SPOT_MARKET, ClientToken=token("spot"))
                )
            except Ec2Error as exc:
                if exc.code not in SPOT_FALLBACK_CODES:
                    raise _infra(f"cannot launch a spot instance: {exc}") from None
                log.warning(
                    "aws worker: %s: no spot capacity (%s); launching on demand",
                    self.label,
                    exc.code,
                )
        if instance is None:
            self._checkpoint()
            # Another token: EC2 refuses a token reused with other parameters.
            on_demand = dict(params, ClientToken=token("on-demand"))
            instance = self._ec2_call(
                "cannot launch an instance", lambda: self.worker.ec2.launch(on_demand)
            )
        log.info(
            "aws worker: %s: launched %s (%s, %s)",
            self.label,
            instance.instance_id,
            self.config.instance_type,
            instance.lifecycle or "on-demand",
        )
        return instance

    def _find_existing(self) -> Instance:
        """The instance an earlier daemon launched for this run (re-attach)."""
        found: list[Instance] = []
        for i in range(3):  # a just-launched instance can take a moment to be listed
            found = self._ec2_call(
                "cannot look for the run's instance",
                lambda: self.worker.ec2.find(self.worker.run_tags(self.request)),
            )
            found = [x for x in found if x.tags.get(TAG_RUN) == self.handle["run"]]
            if found or i == 2:
                break
            self._sleep(self.config.poll_interval)
        live = [x for x in found if x.state in LIVE_STATES]
        if len(live) > 1:  # cannot happen with the ClientToken; free the extras anyway
            extra = [x.instance_id for x in live[1:]]
            log.warning("aws worker: %s: terminating duplicate instance(s) %s", self.label, extra)
            self._ec2_call("cannot terminate duplicates", lambda: self.worker.ec2.terminate(extra))
        if live:
            log.info(
                "aws worker: %s: found %s (%s)", self.label, live[0].instance_id, live[0].state
            )
            return live[0]
        if found:
            self.instance = found[-1]
            raise _infra(f"instance {found[-1].instance_id} is {found[-1].state}: the run was lost")
        raise _infra(
            "no EC2 instance carries this run's tags (the daemon stopped before launching it?)"
        )

    # -- SSH
    def _connect_when_ready(self) -> None:
        deadline = time.monotonic() + self.config.boot_timeout
        why = "it was never running"
        while True:
            self._checkpoint()
            inst = self._ec2_call(
                "cannot describe the instance", lambda: self.worker.ec2.describe(self._iid())
            )
            if inst is None or inst.state in GONE_STATES:
                raise _infra(
                    f"instance {self._iid()} is {inst.state if inst else 'gone'} during boot"
                )
            self.instance = inst
            if inst.state == "running":
                why = self._try_connect(inst)
                if why is None:
                    return
            if time.monotonic() > deadline:
                raise _infra(
                    f"instance {self._iid()} not reachable over SSH within "
                    f"{self.config.boot_timeout:g} s ({why})"
                )
            self._sleep(self.config.poll_interval)

    def _try_connect(self, inst: Instance) -> str | None:
        """Connect once; None on success, else why not (fatal problems raise)."""
        network = self.worker.network
        try:
            where = network.address(inst)
            if where is None:
                return "no address yet"
            if self.trusted is None:
                self.trusted = network.host_keys(inst)
                if not self.trusted:
                    self.trusted = None
                    return "its host keys are not published yet"
        except Ec2Error as exc:
            return str(exc)
        try:
            self.conn = SshConnection.open(
                where[0],
                where[1],
                self.config.ami_user_name,
                self.worker.key,
                self.trusted,
                self.config.ssh_connect_timeout,
                self.config.ssh_command_timeout,
            )
        except HostKeyMismatch as exc:
            raise _infra(f"instance {inst.instance_id}: {exc}") from None
        except SshError as exc:
            return str(exc)
        return None

    def _reconnect(self) -> bool:
        self._close_ssh()
        return self.instance is not None and self._try_connect(self.instance) is None

    def _close_ssh(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _metadata_url(self) -> str | None:
        if self.instance is None or self.instance.lifecycle != "spot":
            return None
        return self.worker.network.metadata_url(self.instance)

    def _status(self) -> RemoteStatus | None:
        """One status command (reconnecting at most once); None when unreachable."""
        if self.conn is None or not self.conn.alive:
            if not self._reconnect():
                return None
        assert self.conn is not None
        try:
            result = self.conn.run(status_command(self.remote, self._metadata_url()))
            return parse_status(result.stdout)
        except SshError as exc:
            log.warning("aws worker: %s: status check failed: %s", self.label, exc)
            self._close_ssh()
            return None

    def _transfer(self, what: str, fn: Callable[[SshConnection], Any]) -> Any:
        error = ""
        for _ in range(TRANSFER_TRIES):
            self._checkpoint()
            if self.conn is None or not self.conn.alive:
                if not self._reconnect():
                    error = "the instance does not answer over SSH"
                    continue
            assert self.conn is not None
            try:
                return fn(self.conn)
            except SshError as exc:
                error = str(exc)
                self._close_ssh()
        raise _infra(f"{what} failed: {error}")

    def _upload(self) -> None:
        local = self.request.submissions_dir / self.request.submission_name
        if not local.is_dir():
            raise _infra(f"the submission's folder {local} does not exist")
        n = self._transfer(
            "upload of the submission", lambda c: c.upload_tree(local, self.remote.submission_dir)
        )
        log.info("aws worker: %s: uploaded %d file(s) to %s", self.label, n, self._iid())

    def _start_remote(self) -> None:
        argv = start_command(
            self.remote,
            self.config.remote_python_env,
            self.config.memory_profiling,
            self.request.n_threads,
        )
        result = self._transfer("starting ramp-test", lambda c: c.run(argv))
        if (
            "ramp-dispatcher:started" not in result.stdout
            and "ramp-dispatcher:already-started" not in result.stdout
        ):
            raise _infra(
                f"could not start ramp-test on {self._iid()} (exit code {result.exit_code}: "
                f"{result.stderr.strip()[-300:]})"
            )
        log.info("aws worker: %s: ramp-test started on %s", self.label, self._iid())

    # -- monitor
    def _monitor(self) -> RemoteStatus:
        started_at = time.monotonic()
        unreachable_since: float | None = None
        with self.cond:
            self.monitoring = True
            self.probe_due = True  # look once right away (a re-attached run may be done)
        while True:
            with self.cond:
                self.cond.wait_for(
                    lambda: self.probe_due or self.cancelled or self.worker.closed.is_set()
                )
                self.probe_due = False
            self._checkpoint()
            status = self._status()
            now = time.monotonic()
            if status is None:
                self._check_instance_alive()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.config.unreachable_timeout:
                    raise _infra(
                        f"instance {self._iid()} unreachable over SSH for "
                        f"{now - unreachable_since:.0f} s"
                    )
                continue
            if unreachable_since is not None:
                log.info(
                    "aws worker: %s: reachable again after %.0f s",
                    self.label,
                    now - unreachable_since,
                )
                unreachable_since = None
            if status.exit_code is not None:
                return status
            if status.spot_interruption:
                raise _Stop(
                    RunOutcome(
                        FailureClass.INFRASTRUCTURE,
                        f"spot instance {self._iid()} received an interruption notice",
                    ),
                    kill=True,
                )
            if not status.folder:
                raise _infra(f"the run folder vanished from instance {self._iid()}")
            if status.pid is None:
                if now - started_at > START_GRACE_S:
                    raise _infra(f"ramp-test never started on instance {self._iid()}")
                continue
            if not status.alive:
                raise _infra(
                    f"ramp-test stopped on instance {self._iid()} without an exit code "
                    "(killed, or the instance rebooted)"
                )
            if status.elapsed is not None and status.elapsed >= self.timeout:
                raise _Stop(
                    RunOutcome(
                        FailureClass.TIMEOUT,
                        f"Training stopped: the time limit of {self.timeout:g} s was reached.",
                        duration_s=status.elapsed,
                    ),
                    kill=True,
                )

    def _check_instance_alive(self) -> None:
        try:
            inst = self.worker.ec2.describe(self._iid())
        except Ec2Error as exc:
            log.warning("aws worker: %s: %s", self.label, self.worker.redact(str(exc)))
            return  # the API is unsure: count it as unreachable only
        if inst is None or inst.state in GONE_STATES:
            state = inst.state if inst else "gone"
            raise _infra(f"instance {self._iid()} is {state}: the run was lost")

    # -- collect
    def _collect(self, status: RemoteStatus) -> RunOutcome:
        staged_out, staged_log = _staging(self.config, self.request)
        for path in (staged_out, staged_log):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

        def download(conn: SshConnection) -> tuple[bool, bool]:
            got_log = conn.download_file(self.remote.log, staged_log)
            got_out = conn.download_tree(self.remote.output_dir, staged_out / "training_output")
            return got_log, got_out

        got_log, got_out = self._transfer("download of the results", download)
        log_path = self.request.log_path
        output_dir = self.request.output_dir
        try:
            if got_log:
                log_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(staged_log), str(log_path))
            if output_dir.exists():
                shutil.rmtree(output_dir)
            if got_out:
                output_dir.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(staged_out / "training_output"), str(output_dir))
                shutil.rmtree(staged_out, ignore_errors=True)
        except OSError as exc:
            raise _infra(f"cannot store the downloaded results: {exc}") from None
        code = status.exit_code
        common: dict[str, Any] = {
            "exit_code": code,
            "log_path": log_path if got_log else None,
            "duration_s": status.elapsed,
            "max_ram_mb": (
                round(status.maxrss_kib / 1024, 1)
                if self.config.memory_profiling and status.maxrss_kib
                else None
            ),
        }
        if code == 0:
            if got_out:
                return RunOutcome(None, "", output_dir=output_dir, **common)
            return RunOutcome(
                FailureClass.PARTICIPANT,
                "ramp-test exited 0 but wrote no training_output",
                **common,
            )
        if code in (126, 127):  # the shell's "cannot execute" / "not found"
            return RunOutcome(
                FailureClass.INFRASTRUCTURE,
                f"ramp-test could not be run on the image (exit code {code}); see the log",
                **common,
            )
        if code is not None and code > 128:
            hint = " (possibly by the system for lack of memory)" if code == 137 else ""
            return RunOutcome(
                FailureClass.PARTICIPANT,
                f"ramp-test was killed by signal {code - 128}{hint}",
                **common,
            )
        return RunOutcome(FailureClass.PARTICIPANT, f"ramp-test exited with code {code}", **common)

    # -- finish
    def _finish(self, outcome: RunOutcome, kill: bool) -> None:
        outcome = dataclasses.replace(outcome, message=self.worker.redact(outcome.message))
        if kill and self.conn is not None and self.conn.alive:
            try:
                self.conn.run(kill_command(self.remote))
            except SshError as exc:
                log.warning("aws worker: %s: could not stop ramp-test: %s", self.label, exc)
            if outcome.failure is FailureClass.TIMEOUT:
                outcome = self._timeout_log(outcome)
        self._close_ssh()
        self._terminate()
        with self.cond:
            self.outcome = outcome
            self.monitoring = False
            self.cond.notify_all()
        level = logging.INFO if outcome.failure is None else logging.WARNING
        log.log(level, "aws worker: %s: %s", self.label, outcome.message or "ramp-test succeeded")
        if self.wake is not None:
            try:
                self.wake()
            except Exception:
                log.error("aws worker: wake callback failed", exc_info=True)
        if self.cancelled:
            self.worker.forget(self)
        self._confirm_terminated()

    def _timeout_log(self, outcome: RunOutcome) -> RunOutcome:
        """Give the participant the log of a run stopped by the time limit."""
        _, staged_log = _staging(self.config, self.request)
        try:
            assert self.conn is not None
            if self.conn.download_file(self.remote.log, staged_log):
                with open(staged_log, "a") as f:
                    f.write(f"\n[ramp-dispatcher] {outcome.message}\n")
                self.request.log_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(staged_log), str(self.request.log_path))
                return dataclasses.replace(outcome, log_path=self.request.log_path)
        except (SshError, OSError) as exc:
            log.warning("aws worker: %s: could not fetch the log: %s", self.label, exc)
        return outcome

    def _terminate(self) -> None:
        if self.instance is None:
            if self.launch_tried:
                # RunInstances may have worked with its reply lost: look by tags.
                self.worker._terminate_tagged(self.request, self.handle["run"])
            return
        iid = self.instance.instance_id
        deadline = time.monotonic() + self.config.terminate_timeout
        while True:
            try:
                state = self.worker.ec2.terminate([iid]).get(iid, "unknown")
            except Ec2Error as exc:
                state, error = "unknown", self.worker.redact(str(exc))
            else:
                error = ""
            if state in ("shutting-down", "terminated"):
                # Billing stops at shutting-down: that is the confirmation that counts.
                self.terminated = True
                log.info("aws worker: %s: instance %s is %s", self.label, iid, state)
                return
            if time.monotonic() > deadline:
                log.error(
                    "aws worker: %s: instance %s not terminated (%s); the reaper will retry",
                    self.label,
                    iid,
                    error or state,
                )
                return
            time.sleep(min(self.config.poll_interval, 5.0))

    def _confirm_terminated(self) -> None:
        if self.instance is None or not self.terminated:
            return
        try:
            self.worker.ec2.wait_terminated(
                [self.instance.instance_id],
                self.config.terminate_timeout,
                self.config.poll_interval,
            )
        except Ec2Error as exc:
            log.warning("aws worker: %s: %s", self.label, self.worker.redact(str(exc)))
