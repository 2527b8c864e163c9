"""The aws worker: :class:`AWSWorker`, the interface the dispatcher calls.

Each of its methods returns at once: a run's work happens in its own thread
(:mod:`.run`), and the reaper's in another (:mod:`.reaper`). The worker holds
what new runs start with (:class:`RunSettings`: config, keys, EC2 client, AMI
found last; a SIGHUP replaces it), each run's deadline check, and the runs in
progress by (submission id, attempt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import posixpath
import shutil
import socket
import threading
import time
import uuid
from typing import Any, Callable, Sequence

import paramiko

from .. import post_run
from ..base import FailureClass, Handle, RunOutcome, RunRequest, Wake, Worker
from . import reaper
from .config import AWSConfig
from .ec2 import TAG_ATTEMPT, TAG_DEPLOYMENT, TAG_EVENT, TAG_SUBMISSION, Ec2, Ec2Error, Image
from .network import Ec2InstanceNetwork, InstanceNetwork
from .run import _Run, staging_paths
from .ssh import JumpHost, known_hosts_fingerprints, load_private_key

log = logging.getLogger("ramp_dispatcher.workers.aws")

HANDLE_VERSION = 1
#: a found AMI is reused for this long (parallel boots ask once)
IMAGE_CACHE_S = 300.0


def jump_host(config: AWSConfig) -> JumpHost | None:
    """The bastion of ``ssh_proxy_jump``, its key loaded and host keys read."""
    jump = config.proxy_jump
    if jump is None or config.ssh_proxy_known_hosts_file is None:
        return None
    user, host, port = jump
    return JumpHost(
        user=user,
        host=host,
        port=port,
        key=load_private_key(config.ssh_proxy_key_path or config.key_path),
        trusted=known_hosts_fingerprints(config.ssh_proxy_known_hosts_file),
    )


def default_deployment_id(database: str | None, event: str) -> str:
    """A stable id for (database, event): two deployments with the same event
    name (production and a staging copy) in one account never share it.

    ``database`` is the database URL; only where it points counts (backend,
    host, port, database name or SQLite file), not the driver or the password.
    """
    where = ""
    if database:
        from sqlalchemy.engine import make_url

        url = make_url(str(database))
        name = url.database or ""
        if url.get_backend_name() == "sqlite" and name and name != ":memory:":
            name = os.path.abspath(name)
        where = f"{url.get_backend_name()}://{url.host or ''}:{url.port or ''}/{name}"
    digest = hashlib.sha256(f"{where}\0{event}".encode()).hexdigest()
    return f"rd-{digest[:16]}"


#: settings that say where this deployment's instances are: a reload keeps them
RESTART_KEYS = ("region_name", "endpoint_url", "deployment_id")


class RunSettings:
    """The settings a run starts with, and what is built from them (the key,
    the bastion, the EC2 client, the network, the AMI found last). A reload
    makes new ones; running runs keep theirs."""

    def __init__(self, config: AWSConfig, network: InstanceNetwork | None = None):
        self.config = config
        self.key = load_private_key(config.key_path)
        self.jump = jump_host(config)
        self._network = network
        self._ec2: Ec2 | None = None
        self._ec2_lock = threading.Lock()
        self._image: tuple[Image, float] | None = None
        self._image_lock = threading.Lock()

    @property
    def ec2(self) -> Ec2:
        # Built on first use, in a run's thread: building a client takes a while.
        with self._ec2_lock:
            if self._ec2 is None:
                self._ec2 = Ec2(self.config)
            return self._ec2

    @property
    def network(self) -> InstanceNetwork:
        if self._network is None:
            trusted = None
            if self.config.known_hosts_file is not None:
                trusted = known_hosts_fingerprints(self.config.known_hosts_file)
            self._network = Ec2InstanceNetwork(
                self.ec2, self.config.ssh_port, trusted, self.config.ssh_address
            )
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
        database: str | None = None,
        cv_folds: Callable[[int], Sequence[tuple[Any, Any]]] | None = None,
    ):
        if not event_name:
            raise ValueError("the aws worker needs the event name (it tags the instances)")
        self.config = config
        self.event = event_name
        self.daemon_id = daemon_id or f"{socket.gethostname()}:{os.getpid()}"
        self.deployment_id = config.deployment_id or default_deployment_id(database, event_name)
        log.info(
            "aws worker: deployment id %s (tag %s of its instances)%s",
            self.deployment_id,
            TAG_DEPLOYMENT,
            "" if config.deployment_id else ", derived from the database and the event",
        )
        self._injected_network = network  # the test seam survives reloads
        #: a submission's folds from the database (the instance re-scores on them)
        self.cv_folds = cv_folds
        self.folds_npz = post_run.FoldsNpz()  # the npz of the event's folds, made once
        self._old_secrets: set[str] = set()  # of reloaded-away credentials: still redacted
        self.settings = RunSettings(config, network)
        self.lock = threading.Lock()
        self.runs: dict[tuple[int, int], _Run] = {}
        self._reaper: threading.Thread | None = None
        #: AMI id -> why runs found it unusable: no more instances from it (until reload)
        self.broken_images: dict[str, str] = {}
        self.closed = threading.Event()
        #: (submission id, attempt) of runs another daemon took over (forget)
        self.forgotten: set[tuple[int, int]] = set()

    # -- what new runs start with (each run keeps the RunSettings it started with)
    @property
    def ec2(self) -> Ec2:
        return self.settings.ec2

    @property
    def ec2_client(self) -> Any:
        """The boto3 EC2 client (tests hook botocore events on it)."""
        return self.ec2.client

    @property
    def network(self) -> InstanceNetwork:
        return self.settings.network

    @property
    def key(self) -> paramiko.PKey:
        return self.settings.key

    @property
    def jump(self) -> JumpHost | None:
        return self.settings.jump

    def image(self) -> Image:
        return self.settings.image()

    def reconfigure(self, config: Any) -> None:
        """SIGHUP: new runs use the new settings (credentials, image, instance,
        key, SSH, limits); running runs keep theirs. ``region_name``,
        ``endpoint_url`` and ``deployment_id`` say where this deployment's
        instances are: they need a restart and keep their old values."""
        old = self.config
        fixed = [k for k in RESTART_KEYS if getattr(config, k) != getattr(old, k)]
        if fixed:
            log.error(
                "aws worker: reload: %s cannot change without a restart; keeping %s",
                ", ".join(f"worker.{k}" for k in fixed),
                ", ".join(f"{k}={getattr(old, k)!r}" for k in fixed),
            )
            config = dataclasses.replace(config, **{k: getattr(old, k) for k in fixed})
        try:
            settings = RunSettings(config, self._injected_network)
        except ValueError as exc:  # the key file changed under us since it was read
            log.error("aws worker: reload refused, keeping the running settings: %s", exc)
            return
        self._old_secrets.update(k for k in (old.access_key_id, old.secret_access_key) if k)
        self.config = config
        self.settings = settings
        self.broken_images.clear()  # the image or the config may be fixed now
        log.info("aws worker: reloaded; new runs use the new settings")

    def redact(self, text: str) -> str:
        """Belt and braces: no message we write may carry a credential."""
        for secret in (
            self.config.secret_access_key, self.config.access_key_id, *self._old_secrets
        ):
            if secret:
                text = text.replace(secret, "***")
        return text

    def run_tags(self, request: RunRequest) -> dict[str, str]:
        return {
            TAG_DEPLOYMENT: self.deployment_id,
            TAG_EVENT: self.event,
            TAG_SUBMISSION: str(request.submission_id),
            TAG_ATTEMPT: str(request.attempt),
        }

    def validate(self) -> None:
        """Check, before serving, what EC2 can tell: the credentials, the
        image, the key pair, the security group(s) and the subnet. A setting
        that cannot work raises ConfigError naming the file and the key (the
        private key file was checked when the config was read). An API that
        does not answer is only logged: the runs will retry it."""
        config = self.config
        if config.sandbox == "none":
            log.warning(
                "%s is 'none': submissions run on the instances WITHOUT a sandbox, as "
                "%r, with its files, the network and the instance's metadata (and role)",
                config.where("sandbox"),
                config.ami_user_name,
            )
        checks: list[tuple[str, Callable[[], Any]]] = [
            ("the image", self.image),
            ("the key pair", lambda: self.ec2.check_key_pair(config.key_name)),
            (
                "the security group",
                lambda: self.ec2.check_security_groups(
                    [config.security_group] if config.security_group else [],
                    config.security_group_ids,
                ),
            ),
        ]
        if config.subnet_id:
            checks.append(("the subnet", lambda: self.ec2.check_subnet(config.subnet_id or "")))
        for what, check in checks:
            try:
                check()
            except Ec2Error as exc:
                key = exc.config_key
                if key is None:
                    log.warning(
                        "aws worker: could not check %s at start-up: %s", what, self.redact(str(exc))
                    )
                    continue
                raise config.error(key, f"does not work: {self.redact(str(exc))}") from None
        log.info("aws worker: image, key pair, security group and subnet checked")

    # -- Worker interface (each returns at once)
    def start(self, request: RunRequest, wake: Wake) -> Handle:
        run_id = uuid.uuid4().hex[:16]
        created_at = time.time()
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
            "deployment": self.deployment_id,
            "timeout": float(self.config.timeout),
            "verify_scores": self.config.verify_scores,
            "created_at": created_at,
            # Fixed at creation and stored with the run: a restarted daemon and
            # a SIGHUP keep it; nothing on the instance can move it.
            "deadline": self.config.deadline_after(created_at),
        }
        self._spawn(_Run(self, request, handle, wake, resume=False))
        return handle

    def check(self, request: RunRequest, handle: Handle) -> RunOutcome | None:
        problem = _handle_problem(handle, self.event, request)
        if problem:
            return RunOutcome(FailureClass.INFRASTRUCTURE, f"invalid aws run handle: {problem}")
        key = (request.submission_id, request.attempt)
        with self.lock:
            self.forgotten.discard(key)  # checked: this daemon holds the run (again)
            run = self.runs.get(key)
        if run is None or run.handle.get("run") != handle["run"]:
            # A run started by an earlier daemon: find its instance and go on.
            log.info(
                "aws worker: re-attaching submission %s attempt %s (run %s)",
                request.submission_id,
                request.attempt,
                handle["run"],
            )
            run = _Run(self, request, dict(handle), None, resume=True)
            if self._overdue(handle) > 0:
                run.expire()  # its thread only finds and terminates the instance
            self._spawn(run)
            return None
        overdue = self._overdue(handle)
        if overdue > 0:
            run.expire()
            if overdue > self._expiry_grace() and not run.finished:
                return self._abandon(run)
        return run.poll()

    # -- the daemon's own deadline
    def _overdue(self, handle: Handle) -> float:
        """Seconds past the run's deadline (negative before it)."""
        deadline = handle.get("deadline")
        if not isinstance(deadline, (int, float)):  # a handle from before deadlines
            created = handle.get("created_at")
            timeout = handle.get("timeout")
            deadline = self.config.deadline_after(
                float(created) if isinstance(created, (int, float)) else time.time(),
                float(timeout) if isinstance(timeout, (int, float)) else None,
            )
        return time.time() - float(deadline)

    def _expiry_grace(self) -> float:
        """How long an expired run's thread has to stop and terminate its instance."""
        return 2 * self.config.ssh_command_timeout + self.config.terminate_timeout + 60.0

    def _abandon(self, run: _Run) -> RunOutcome:
        """The run's thread did not stop after its deadline: stop waiting for it."""
        log.error(
            "aws worker: %s: its thread did not stop after the deadline; terminating its "
            "instance by its tags",
            run.label,
        )
        threading.Thread(
            target=reaper.terminate_tagged,
            args=(self, run.request, run.handle["run"]),
            name=f"aws-abandon-{run.request.submission_id}-{run.request.attempt}",
            daemon=True,
        ).start()
        return run.deadline_outcome()

    def cleanup(self, request: RunRequest, handle: Handle) -> None:
        key = (request.submission_id, request.attempt)
        with self.lock:
            if key in self.forgotten:  # another daemon's now: its instance and files
                log.info(
                    "aws worker: submission %s attempt %s belongs to another daemon; "
                    "nothing cleaned up",
                    request.submission_id,
                    request.attempt,
                )
                return
            run = self.runs.pop(key, None)
        if run is not None:
            run.cancel()  # a no-op once its outcome is out: it terminated already
        else:
            # Not ours (the dispatcher gave up on it before a check): free it by tags.
            threading.Thread(
                target=reaper.terminate_tagged,
                args=(self, request),
                name=f"aws-cleanup-{request.submission_id}-{request.attempt}",
                daemon=True,
            ).start()
        for path in (request.output_dir, *staging_paths(self.config, request)):
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            except OSError as exc:
                log.warning("aws worker: cannot remove %s: %s", path, exc)

    def reap(self, active: set[tuple[int, int]]) -> None:
        snapshot = time.time()  # the instant ``active`` was true (or just after)
        with self.lock:
            if self._reaper is not None and self._reaper.is_alive():
                return
            self._reaper = threading.Thread(
                target=reaper.reap,
                args=(self, frozenset(active), snapshot),
                name="aws-reaper",
                daemon=True,
            )
            self._reaper.start()

    def close(self) -> None:
        """Stop our threads; instances keep running for the next daemon to re-attach."""
        self.closed.set()
        with self.lock:
            runs = list(self.runs.values())
        for run in runs:
            run.wakeup()

    # -- internals
    def _spawn(self, run: _Run) -> None:
        key = (run.request.submission_id, run.request.attempt)
        with self.lock:
            old = self.runs.get(key)
            self.runs[key] = run
        if old is not None and old.thread.is_alive():
            old.cancel()
        run.thread.start()

    def terminate_tagged(self, request: RunRequest, run_id: str | None = None) -> None:
        reaper.terminate_tagged(self, request, run_id)

    def discard(self, run: _Run) -> None:
        """A cancelled run's thread is done with it."""
        key = (run.request.submission_id, run.request.attempt)
        with self.lock:
            if self.runs.get(key) is run:
                del self.runs[key]

    def forget(self, request: RunRequest, handle: Handle) -> None:
        """Another daemon took the run over and serves its instance now: our
        thread stops watching it without stopping or terminating anything, and
        until this daemon takes the run up again (a :meth:`check`), our
        :meth:`cleanup` leaves it alone; our reaper spares it as the active
        run it is in the database."""
        key = (request.submission_id, request.attempt)
        with self.lock:
            self.forgotten.add(key)
            run = self.runs.get(key)
            # An empty handle (never recorded) names the attempt's run, whichever it is.
            if run is not None and handle.get("run") in (None, run.handle.get("run")):
                del self.runs[key]
            else:
                run = None
        if run is not None and not run.detach():
            log.warning(
                "aws worker: %s was taken over after it ended here; its instance is "
                "being terminated (the new owner will retry the run)",
                run.label,
            )


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
