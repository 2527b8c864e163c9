"""One run's lifecycle on its own EC2 instance, driven by a thread of its own.

Launch (or, on re-attach, find by tags) -> connect when SSH answers with a
trusted host key -> ship the tools and check the image, upload and start
ramp-test (unless already started) -> one status command per check ->
download (with the scores recomputed on the instance) -> terminate. Every exit path goes through :meth:`_Run._finish`,
which terminates the instance; only the worker's ``close`` (the daemon stops:
the next one re-attaches) and ``forget`` (another daemon took the run over)
leave it running.

About 900 lines, over the usual 600: one class whose steps share one
thread's state (instance, connection, trusted keys, deadline, detachment,
outcome), read best top to bottom; the protocol, SSH and EC2 calls it drives
live in their own modules, and what runs on the instance in :mod:`.launch`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import posixpath
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .. import post_run
from ..base import FailureClass, Handle, RunOutcome, RunRequest, TryLater, Wake
from .ec2 import (
    GONE_STATES,
    HOST_KEYS_HINT,
    NO_HOST_KEYS,
    LIVE_STATES,
    SPOT_FALLBACK_CODES,
    SPOT_MARKET,
    TAG_DAEMON,
    TAG_EVENT,
    TAG_RUN,
    Ec2Error,
    Instance,
    client_token,
    launch_params,
)
from .remote import (
    KILL_GRACE_S,
    RemoteRun,
    RemoteStatus,
    RemoteTools,
    check_command,
    install_tools,
    kill_command,
    parse_check,
    parse_status,
    run_spec,
    start_command,
    status_command,
)
from .ssh import BastionKeyMismatch, HostKeyMismatch, SshConnection, SshError

if TYPE_CHECKING:
    from .config import AWSConfig
    from .worker import AWSWorker

log = logging.getLogger("ramp_dispatcher.workers.aws")

#: after the start command, how long the run may take to write its pid file
START_GRACE_S = 60.0
#: why a running instance is not connected to yet: its host keys are unknown
NO_KEYS_YET = "its host keys are not published yet"
#: attempts at one upload or download, reconnecting in between
TRANSFER_TRIES = 2
#: seconds between two reads of the event's folds while the database is out of reach
TRY_LATER_PAUSE_S = 2.0


class _Stop(Exception):
    """Unwinds a run's thread: ``outcome`` set means finish (and terminate)."""

    def __init__(self, outcome: RunOutcome | None = None, kill: bool = False):
        super().__init__(outcome.message if outcome else "detached")
        self.outcome = outcome
        self.kill = kill  # stop the remote process group first


def _infra(message: str) -> _Stop:
    return _Stop(RunOutcome(FailureClass.INFRASTRUCTURE, message))


def staging_paths(config: AWSConfig, request: RunRequest) -> tuple[Path, Path]:
    """Where downloads land before they are complete: (output folder, log)."""
    name = f"{request.submission_name}-attempt-{request.attempt}"
    return (
        config.local_predictions_folder / ".downloads" / name,
        config.local_log_folder / ".downloads" / f"{name}.log",
    )


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
        # What the run started with: a SIGHUP changes them for new runs only.
        self.settings = worker.settings
        self.config = self.settings.config
        self.key = self.settings.key
        self.jump = self.settings.jump
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
        #: re-scored on the instance (as the run was started: a reload changes new runs)
        self.verify = bool(handle.get("verify_scores"))
        self.folds: bytes | None = None  # the event's folds, read before the launch
        self.folds_read = False
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
        self.image_id: str | None = None  # the AMI this run launched
        self.expired = False  # past the daemon's deadline (set by the worker's check)
        self.remote_started = False  # ramp-test was started on the instance
        #: another daemon serves the run now (AWSWorker.forget): stop, touch nothing
        self.detached = False
        self.ending = False  # _finish decided to stop and terminate: too late to detach
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

    def detach(self) -> bool:
        """Another daemon took the run over: stop watching it, and never kill
        ramp-test nor terminate the instance. False when it is too late: this
        thread had already decided to end the run."""
        with self.cond:
            if not self.ending:
                self.detached = True
            self.cond.notify_all()
            return self.detached

    def expire(self) -> None:
        """The daemon's deadline passed: stop the run and terminate its instance."""
        with self.cond:
            if not self.expired:
                log.warning("aws worker: %s: past its deadline; stopping it", self.label)
            self.expired = True
            self.cond.notify_all()

    def deadline_outcome(self) -> RunOutcome:
        """A timeout once ramp-test was started, else the platform's failure."""
        if self.remote_started:
            return RunOutcome(
                FailureClass.TIMEOUT,
                f"Training stopped: the time limit of {self.timeout:g} s was reached "
                "(the run passed its deadline).",
            )
        return RunOutcome(
            FailureClass.INFRASTRUCTURE,
            f"the run did not start on its instance before its deadline "
            f"({self.config.boot_timeout:g} s to boot, {self.timeout:g} s to run, "
            f"{self.config.deadline_margin:g} s for transfers)",
        )

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
            if stop.outcome is None:  # close() or forget(): leave the instance running
                self._close_ssh()
                why = "taken over by another daemon" if self.detached else "the daemon stops"
                log.info("aws worker: %s detached (%s; instance left running)", self.label, why)
                return
            outcome, kill = stop.outcome, stop.kill
        except Exception as exc:  # a bug here must still free the instance
            log.error("aws worker: %s: unexpected error", self.label, exc_info=True)
            outcome = RunOutcome(
                FailureClass.INFRASTRUCTURE, f"aws worker error: {type(exc).__name__}: {exc}"
            )
        self._finish(outcome, kill)

    def _lifecycle(self) -> RunOutcome:
        if not self.resume:
            self._read_folds()  # before an instance bills for the wait
        self.instance = self._find_existing() if self.resume else self._launch()
        self._connect_when_ready()
        status = self._status()
        if status is None or not status.folder:
            if status is None:
                raise _infra(f"instance {self._iid()} stopped answering right after boot")
            tools = self._prepare()
            self._upload()
            self._start_remote(tools)
        elif self.resume:
            self.remote_started = True
            log.info("aws worker: %s: ramp-test already started on %s", self.label, self._iid())
        final = self._monitor()
        return self._collect(final)

    def _read_folds(self) -> None:
        """The event's folds for the re-scoring on the instance, once. The
        database out of reach delays the run (never fails it): the daemon's
        deadline still bounds the wait."""
        read = self.worker.cv_folds
        while self.verify and not self.folds_read and read is not None:
            try:
                self.folds = self.worker.folds_npz(read(self.request.submission_id))
                self.folds_read = True
            except TryLater as exc:
                log.warning("aws worker: %s waits: %s", self.label, exc)
                self._sleep(TRY_LATER_PAUSE_S)

    # -- checkpoints
    def _checkpoint(self) -> None:
        if self.worker.closed.is_set() or self.detached:
            raise _Stop()
        if self.cancelled:
            raise _Stop(RunOutcome(FailureClass.INFRASTRUCTURE, "the run was cancelled"), kill=True)
        if self.expired:
            raise _Stop(self.deadline_outcome(), kill=True)

    def _sleep(self, seconds: float) -> None:
        with self.cond:
            self.cond.wait_for(self._interrupted, seconds)
        self._checkpoint()

    def _interrupted(self) -> bool:
        return self.cancelled or self.expired or self.detached or self.worker.closed.is_set()

    def _iid(self) -> str:
        return self.instance.instance_id if self.instance else "(none)"

    def _ec2_call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Ec2Error as exc:
            raise self._ec2_failure(what, exc) from None

    def _ec2_failure(self, what: str, exc: Ec2Error) -> _Stop:
        """A wrong setting fails the run once (naming it); anything else is retried."""
        key = exc.config_key
        if key is None:
            return _infra(f"{what}: {exc}")
        return _Stop(
            RunOutcome(
                FailureClass.CONFIGURATION,
                f"{what}: {exc} (check the setting worker.{key} of the event config)",
            )
        )

    # -- launch / find
    def _launch(self) -> Instance:
        image = self._ec2_call("cannot find the AMI", self.settings.image)
        self._checkpoint()
        broken = self.worker.broken_images.get(image.image_id)
        if broken is not None:  # an earlier run found it unusable: launch nothing
            raise _Stop(
                RunOutcome(
                    FailureClass.CONFIGURATION,
                    f"not launched: an earlier run found image {image.image_id} unusable "
                    f"({broken}); fix the image or the config, then reload (SIGHUP)",
                )
            )
        self.image_id = image.image_id
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
                instance = self.settings.ec2.launch(
                    dict(params, **SPOT_MARKET, ClientToken=token("spot"))
                )
            except Ec2Error as exc:
                if exc.code not in SPOT_FALLBACK_CODES:
                    raise self._ec2_failure("cannot launch a spot instance", exc) from None
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
                "cannot launch an instance", lambda: self.settings.ec2.launch(on_demand)
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
                # By the run's own id (random): also finds an instance launched
                # before instances carried the deployment tag.
                lambda: self.settings.ec2.find(
                    {TAG_EVENT: self.worker.event, TAG_RUN: self.handle["run"]}
                ),
            )
            found = [x for x in found if x.tags.get(TAG_RUN) == self.handle["run"]]
            if found or i == 2:
                break
            self._sleep(self.config.poll_interval)
        live = [x for x in found if x.state in LIVE_STATES]
        if len(live) > 1:  # cannot happen with the ClientToken; free the extras anyway
            extra = [x.instance_id for x in live[1:]]
            log.warning("aws worker: %s: terminating duplicate instance(s) %s", self.label, extra)
            self._ec2_call("cannot terminate duplicates", lambda: self.settings.ec2.terminate(extra))
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
                "cannot describe the instance", lambda: self.settings.ec2.describe(self._iid())
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
                message = (
                    f"instance {self._iid()} not reachable over SSH within "
                    f"{self.config.boot_timeout:g} s ({why})"
                )
                if why == NO_KEYS_YET:
                    # A broken image, not an outage: another instance would not
                    # do better, so fail once and launch no more from it.
                    raise self._broken_image(f"{message}: {HOST_KEYS_HINT}")
                raise _infra(message)
            self._sleep(self.config.poll_interval)

    def _try_connect(self, inst: Instance) -> str | None:
        """Connect once; None on success, else why not (fatal problems raise)."""
        network = self.settings.network
        try:
            where = network.address(inst)
            if where is None:
                return "no address yet"
            if self.trusted is None:
                self.trusted = network.host_keys(inst)
                if not self.trusted:
                    self.trusted = None
                    return NO_KEYS_YET
        except Ec2Error as exc:
            if exc.code == NO_HOST_KEYS:
                raise self._broken_image(str(exc)) from None
            if exc.config_key is not None:
                raise self._ec2_failure("cannot reach the instance", exc) from None
            return str(exc)
        try:
            self.conn = SshConnection.open(
                where[0],
                where[1],
                self.config.ami_user_name,
                self.key,
                self.trusted,
                self.config.ssh_connect_timeout,
                self.config.ssh_command_timeout,
                jump=self.jump,
            )
        except BastionKeyMismatch as exc:
            raise _Stop(
                RunOutcome(
                    FailureClass.CONFIGURATION,
                    f"{exc} (check the setting worker.ssh_proxy_known_hosts_file)",
                )
            ) from None
        except HostKeyMismatch as exc:
            raise _infra(f"instance {inst.instance_id}: {exc}") from None
        except SshError as exc:
            return str(exc)
        return None

    def _broken_image(self, message: str) -> _Stop:
        if self.image_id is not None:
            self.worker.broken_images[self.image_id] = message
        return _Stop(RunOutcome(FailureClass.CONFIGURATION, message))

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
        return self.settings.network.metadata_url(self.instance)

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

    def _prepare(self) -> RemoteTools:
        """Ship the launcher, supervisor and sandbox, and ask the image whether
        it can run the run. An image that cannot (no bubblewrap while the
        sandbox is on, no ramp-test, a Python too old) is broken: the run
        fails as a configuration error, never the participant's, and no
        more instances are launched from that image until a reload."""
        env = self.config.remote_python_env
        python = posixpath.join(env, "bin", "python3") if env else "python3"
        self._read_folds()  # (a re-attached run that never started)
        tools = self._transfer(
            "installing the run's tools",
            lambda c: install_tools(c, self.remote, python, self.folds),
        )
        argv = check_command(tools, self._spec(tools))
        result = self._transfer("checking the image", lambda c: c.run(argv))
        try:
            problem = parse_check(result.stdout)
        except (SshError, ValueError, KeyError):
            raise self._broken_image(
                f"the image cannot run the run's launcher with {python} (exit code "
                f"{result.exit_code}: {result.stderr.strip()[-300:]}); check the setting "
                "worker.remote_python_env"
            ) from None
        if problem is not None:
            key, why = problem
            raise self._broken_image(
                f"instance {self._iid()}: {why} (check the setting worker.{key})"
            )
        return tools

    def _spec(self, tools: RemoteTools) -> dict[str, Any]:
        return run_spec(
            self.remote,
            tools,
            env_prefix=self.config.remote_python_env,
            sandboxed=self.config.sandbox == "bwrap",
            timeout=self.timeout,
            max_log_mb=self.config.max_log_mb,
            n_threads=self.request.n_threads,
            verify_scores=self.verify,
        )

    def _start_remote(self, tools: RemoteTools) -> None:
        argv = start_command(self.remote, tools, self._spec(tools))
        result = self._transfer("starting ramp-test", lambda c: c.run(argv))
        if (
            "ramp-dispatcher:started" not in result.stdout
            and "ramp-dispatcher:already-started" not in result.stdout
        ):
            raise _infra(
                f"could not start ramp-test on {self._iid()} (exit code {result.exit_code}: "
                f"{result.stderr.strip()[-300:]})"
            )
        self.remote_started = True
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
                self.cond.wait_for(lambda: self.probe_due or self._interrupted())
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
            # (a reason: ramp-test ended, the launcher re-scores; the daemon's deadline still holds)
            if not status.reason and status.elapsed is not None and status.elapsed >= self.timeout:
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
            inst = self.settings.ec2.describe(self._iid())
        except Ec2Error as exc:
            log.warning("aws worker: %s: %s", self.label, self.worker.redact(str(exc)))
            return  # the API is unsure: count it as unreachable only
        if inst is None or inst.state in GONE_STATES:
            state = inst.state if inst else "gone"
            raise _infra(f"instance {self._iid()} is {state}: the run was lost")

    # -- collect
    def _collect(self, status: RemoteStatus) -> RunOutcome:
        staged_out, staged_log = staging_paths(self.config, self.request)
        for path in (staged_out, staged_log):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

        def download(conn: SshConnection) -> tuple[bool, bool]:
            got_log = conn.download_tail(self.remote.log, staged_log, self._log_bytes())
            got_out = conn.download_tree(self.remote.output_dir, staged_out / "training_output")
            if self.verify and status.exit_code == 0:  # the re-scoring's result, if any
                for name in ("checked.json", "scores.json"):
                    conn.download_file(posixpath.join(self.remote.run_dir, name), staged_out / name)
            return got_log, got_out

        got_log, got_out = self._transfer("download of the results", download)
        checked = self._read_checked(staged_out)
        if self.detached:  # taken over meanwhile: the new owner's files are not ours
            raise _Stop()
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
        if status.reason == "timeout":  # the supervisor's own limit, on the instance
            return RunOutcome(
                FailureClass.TIMEOUT,
                f"Training stopped: the time limit of {self.timeout:g} s was reached.",
                **common,
            )
        if status.reason in ("spawn_error", "supervisor_failed", "killed"):
            return RunOutcome(
                FailureClass.INFRASTRUCTURE,
                f"the run's supervisor on {self._iid()} ended it ({status.reason}); see the log",
                **common,
            )
        if code == 0:
            if got_out and self.verify:
                return self._checked(checked, RunOutcome(None, "", output_dir=output_dir, **common))
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

    def _read_checked(self, staged: Path) -> tuple[dict[str, Any] | None, Any]:
        """The instance's post-run checks and recomputed scores, as downloaded."""
        found = []
        for name in ("checked.json", "scores.json"):
            try:
                found.append(json.loads((staged / name).read_text()))
            except (OSError, ValueError):
                found.append(None)
        checked, scores = found
        return (checked if isinstance(checked, dict) else None), scores

    def _checked(self, checked: tuple[dict[str, Any] | None, Any], outcome: RunOutcome) -> RunOutcome:
        """The re-scoring done on the instance, applied as the conda worker
        applies its post-run checks; the scores go beside the run's log."""
        check, scores = checked
        if check is None:
            return dataclasses.replace(
                outcome, failure=FailureClass.INFRASTRUCTURE, output_dir=None,
                message=f"instance {self._iid()} did not score the saved predictions again",
            )  # fmt: skip
        if check.get("removed"):
            log.warning(
                "aws worker: %s: removed links or special files from its output: %s",
                self.label, ", ".join(map(str, check["removed"][:10])),
            )  # fmt: skip
        if check.get("failure") in ("participant", "infrastructure"):
            return dataclasses.replace(
                outcome, failure=FailureClass(check["failure"]),
                message=str(check.get("message") or ""), output_dir=None,
            )  # fmt: skip
        if check.get("scores_path") is None:
            return outcome  # no fold saved: nothing to score (the results parser says so)
        if scores is None:
            return dataclasses.replace(
                outcome, failure=FailureClass.INFRASTRUCTURE, output_dir=None,
                message=f"the scores recomputed on instance {self._iid()} did not come back",
            )  # fmt: skip
        path = post_run.scores_path(self.request)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(scores))
            tmp.replace(path)
        except OSError as exc:
            raise _infra(f"cannot store the recomputed scores: {exc}") from None
        return dataclasses.replace(outcome, trusted_scores=path)

    # -- finish
    def _finish(self, outcome: RunOutcome, kill: bool) -> None:
        with self.cond:
            if self.detached:  # forget() came first: the new owner ends the run
                detached = True
            else:
                detached, self.ending = False, True
        if detached:
            self._close_ssh()
            log.info("aws worker: %s: taken over by another daemon; left running", self.label)
            return
        outcome = dataclasses.replace(outcome, message=self.worker.redact(outcome.message))
        if kill and self.conn is not None and self.conn.alive:
            try:
                self.conn.run(
                    kill_command(self.remote),
                    timeout=KILL_GRACE_S + self.config.ssh_command_timeout,
                )
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
            self.worker.discard(self)
        self._confirm_terminated()

    def _timeout_log(self, outcome: RunOutcome) -> RunOutcome:
        """Give the participant the log of a run stopped by the time limit."""
        _, staged_log = staging_paths(self.config, self.request)
        try:
            assert self.conn is not None
            if self.conn.download_tail(self.remote.log, staged_log, self._log_bytes()):
                with open(staged_log, "a") as f:
                    f.write(f"\n[ramp-dispatcher] {outcome.message}\n")
                self.request.log_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(staged_log), str(self.request.log_path))
                return dataclasses.replace(outcome, log_path=self.request.log_path)
        except (SshError, OSError) as exc:
            log.warning("aws worker: %s: could not fetch the log: %s", self.label, exc)
        return outcome

    def _log_bytes(self) -> int:
        """Most bytes of the log downloaded: the supervisor's bound, and a little
        room for the launcher's own lines; a run that wrote its log itself
        (no sandbox) cannot make it more."""
        return int(self.config.max_log_mb * 2**20) + 64 * 1024

    def _terminate(self) -> None:
        if self.instance is None:
            if self.launch_tried or self.resume:
                # RunInstances may have worked with its reply lost, or a
                # re-attached run stopped before finding its instance: by tags.
                self.worker.terminate_tagged(self.request, self.handle["run"])
            return
        iid = self.instance.instance_id
        deadline = time.monotonic() + self.config.terminate_timeout
        while True:
            try:
                state = self.settings.ec2.terminate([iid]).get(iid, "unknown")
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
            self.settings.ec2.wait_terminated(
                [self.instance.instance_id],
                self.config.terminate_timeout,
                self.config.poll_interval,
            )
        except Ec2Error as exc:
            log.warning("aws worker: %s: %s", self.label, self.worker.redact(str(exc)))
