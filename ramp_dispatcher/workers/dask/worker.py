"""``worker_type: dask``: runs go to the Dask workers of an existing scheduler.

The daemon's side. Nothing here waits on the cluster in the daemon's loop:
:meth:`DaskWorker.start` returns the run's handle (its task key) at once and a
background job connects, publishes the kit and data trees, and submits;
when the future ends, its callback hands the run to a background job that
fetches the result, lays it out locally exactly as the conda worker leaves
it (``training_output`` in the submission's folder, the log at
``<logs_dir>/<submission>/log``) and wakes the loop, whose
:meth:`DaskWorker.check` then finds the outcome.

Each task is published on the scheduler under its key, so it outlives the
daemon: a restarted daemon finds it with ``get_dataset`` and collects it.
Each run holds one ``ramp`` worker resource, so a Dask worker started with
``--resources ramp=1`` never runs two.

About 700 lines: the Worker interface and the background jobs it hands
work to share one state (``_Run``); the start-up checks and the task's
side live in ``checks`` and ``remote``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import shutil
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import post_run, sandbox
from ..base import (
    FailureClass,
    Handle,
    RunOutcome,
    RunRequest,
    TryLater,
    Wake,
    Worker,
    WorkerConfigError,
    WorkerError,
)
from ..outcome import outcome_from_status
from . import cache, checks, files, remote, stub
from .config import RESOURCE, DaskConfig

log = logging.getLogger(__name__)

#: the log's last bytes that come back from the Dask worker
LOG_TAIL_BYTES = 256 * 1024
#: background jobs (connect, submit, fetch, release) run on this many threads
N_JOBS = 4
#: seconds a finished run's result may take to come back
RESULT_TIMEOUT_S = 600.0
#: re-attachments of one run after lost links before it counts as lost
MAX_ATTACH = 5
#: seconds between two "cluster unreachable" warnings
WARN_EVERY_S = 60.0
#: seconds before a run whose folds were out of reach (database outage) is
#: submitted again
TRY_LATER_PAUSE_S = 2.0
#: the Dask client's periodic work made rare (see DaskWorker._connect)
CLIENT_SETTINGS = {
    "distributed.client.scheduler-info-interval": "300s",
    "distributed.client.heartbeat": "300s",
}


@dataclass
class _Run:
    """The daemon-side state of one run (one task key)."""

    key: str
    request: RunRequest
    wake: Wake | None = None
    future: Any = None
    outcome: RunOutcome | None = None
    busy: bool = False  # a background job is working on it
    released: bool = False
    attaches: int = 0
    #: the run was submitted with verify_scores (its handle says so after a restart)
    verify: bool = False


def code_digest(cloudpickle_version: str) -> str:
    """The name of the run's code on the scheduler (stub.py): its modules'
    sources, this Python's version and cloudpickle's (what the pickle holds)."""
    h = hashlib.sha256(f"{sys.version}\0{cloudpickle_version}\0".encode())
    for module in (stub, remote, cache, files, sandbox, post_run):
        h.update(Path(module.__file__ or "").read_bytes() + b"\0")
    return h.hexdigest()[:32]


def run_key(event_name: str, request: RunRequest) -> str:
    """The task key of one attempt: stable, so a restarted daemon can find it.

    The deployment (its submissions folder) is part of it: two deployments
    with the same event name may share a scheduler.
    """
    where = hashlib.sha256(str(Path(os.path.abspath(request.submissions_dir))).encode()).hexdigest()[:8]
    return f"ramp-run-{event_name}-{where}-{request.submission_id}-{request.attempt}"


class _Jobs:
    """Daemon threads taking jobs from a queue: a stuck cluster call never
    holds up the daemon's exit (a ThreadPoolExecutor would be joined)."""

    def __init__(self, n: int) -> None:
        self._queue: queue.Queue[Callable[[], None]] = queue.Queue()
        for i in range(n):
            threading.Thread(target=self._loop, name=f"dask-worker-{i}", daemon=True).start()

    def submit(self, job: Callable[[], None]) -> None:
        self._queue.put(job)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job()
            except Exception:
                log.exception("dask worker: background job failed")


def _infra(message: str, **kw: Any) -> RunOutcome:
    return RunOutcome(FailureClass.INFRASTRUCTURE, message, **kw)


class DaskWorker(Worker):
    """Runs submissions on a Dask cluster; one instance per daemon."""

    type_name = "dask"

    def __init__(
        self, config: DaskConfig, event_name: str | None = None, daemon_id: str | None = None,
        cv_folds: Callable[[int], Sequence[tuple[Any, Any]]] | None = None,
    ) -> None:  # fmt: skip
        import cloudpickle

        # Shipped by value: the Dask workers need no ramp_dispatcher.
        cloudpickle.register_pickle_by_value(remote)
        cloudpickle.register_pickle_by_value(cache)
        cloudpickle.register_pickle_by_value(files)
        cloudpickle.register_pickle_by_value(stub)
        cloudpickle.register_pickle_by_value(sandbox)
        cloudpickle.register_pickle_by_value(post_run)
        self.config = config
        self.event_name = event_name or "event"
        self.daemon_id = daemon_id  # runs are named by event and deployment, not by daemon
        # the event's folds of a submission (the database's), for re-scoring
        self._cv_folds = cv_folds
        self._folds_npz = post_run.FoldsNpz()
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._client: Any = None
        self._client_lock = threading.Lock()  # held while (re)connecting
        self._unreachable_since: float | None = None  # monotonic; None while connected
        self._closed = threading.Event()
        self._jobs = _Jobs(N_JOBS)
        self._digests = cache.TreeDigests()
        self._trees: dict[Path, str] = {}  # folder -> digest we published
        self._trees_lock = threading.Lock()
        self._run_prefix: str | None = None  # this deployment's keys, for reap
        from .. import supervise

        source = Path(supervise.__file__).read_text()
        self._supervisor = (source, hashlib.sha256(source.encode()).hexdigest()[:16])
        source = post_run.RESCORE_SCRIPT.read_text()
        self._rescorer = (source, hashlib.sha256(source.encode()).hexdigest()[:16])
        # the run's code, pickled once and published (stub.py): not with each run
        self._code = cloudpickle.dumps({"run_submission": remote.run_submission})
        self._code_digest = code_digest(cloudpickle.__version__)
        if not config.uses_tls:
            log.warning(
                "dask worker: %s is not TLS: submissions and results travel unencrypted, and "
                "whoever reaches the scheduler can run code on the Dask workers; set "
                "tls_ca_file, tls_client_cert and tls_client_key",
                config.dask_scheduler,
            )
        if config.sandbox == "none":
            log.warning(
                "%s is 'none': submissions run WITHOUT a sandbox on the Dask workers, as "
                "their user, with their files, environment and network",
                config.where("sandbox"),
            )

    # ------------------------------------------------------------ connection
    def _security(self) -> Any:
        if not self.config.uses_tls:
            return None
        from distributed.security import Security

        return Security(
            tls_ca_file=str(self.config.tls_ca_file),
            tls_client_cert=str(self.config.tls_client_cert),
            tls_client_key=str(self.config.tls_client_key),
            require_encryption=True,
        )

    def _connect(self) -> Any:
        import dask
        from distributed import Client

        # The client's periodic work is for notebooks: it asks the scheduler for
        # its identity every 2 s and heartbeats every 5 s (0.5 ms of the daemon's
        # CPU per second, idle). Nothing here reads the cached identity (the
        # start-up check asks afresh), and the scheduler only notes the time of
        # a client's heartbeat (it drops no silent client; a lost link is seen
        # by the connection itself).
        with dask.config.set(CLIENT_SETTINGS):
            client = Client(
                self.config.dask_scheduler,
                security=self._security(),
                timeout=self.config.connect_timeout,
                set_as_default=False,
                name=f"ramp-dispatcher-{self.event_name}",
            )
        # ...and the scheduler answers each heartbeat by setting both back to 5 s
        handlers = getattr(client, "_stream_handlers", None)
        if isinstance(handlers, dict) and "adjust-heartbeat-interval" in handlers:
            handlers["adjust-heartbeat-interval"] = lambda **_: None
        return client

    def client(self) -> Any:
        """The connected client; waits (on a background thread) while the
        cluster is unreachable, up to ``unreachable_timeout`` counted from
        when it stopped answering. Raises WorkerError once that has passed
        (the run is then the platform's failure) or the worker is closed."""
        with self._client_lock:
            current = self._client
            if current is not None:
                deadline = time.monotonic() + self.config.connect_timeout
                while current.status == "connecting" and time.monotonic() < deadline:
                    time.sleep(0.1)  # it is reconnecting by itself
                if current.status == "running":
                    return current
                self._client = None
                try:
                    current.close(timeout=2)
                except Exception:
                    pass
            delay, last_warning = 0.5, 0.0
            while not self._closed.is_set():
                try:
                    client = self._connect()
                except Exception as exc:  # OSError, TimeoutError, TLS errors
                    now = time.monotonic()
                    if self._unreachable_since is None:
                        self._unreachable_since = now
                    down = now - self._unreachable_since
                    if down >= self.config.unreachable_timeout:
                        raise WorkerError(
                            f"the Dask scheduler {self.config.dask_scheduler} has not answered "
                            f"for {down:.0f} s ({exc})"
                        ) from None
                    if now - last_warning > WARN_EVERY_S:
                        last_warning = now
                        log.warning(
                            "dask worker: cannot reach the scheduler %s (%s); runs wait",
                            self.config.dask_scheduler, exc,
                        )
                    self._closed.wait(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                log.info("dask worker: connected to %s", self.config.dask_scheduler)
                self._unreachable_since = None
                self._client = client
                return client
            raise WorkerError("the dask worker is closed")

    # ------------------------------------------------------------ start-up check
    def validate(self) -> None:
        """Before serving: the TLS files load, the scheduler answers within
        ``connect_timeout``; a cluster without a ``ramp`` slot yet, or whose
        Dask workers cannot start the configured sandbox, is only warned about
        (Dask workers come and go; their runs fail and are retried)."""
        cfg = self.config
        if cfg.uses_tls:
            checks.check_tls_files(cfg)
        try:
            client = self._connect()
        except Exception as exc:
            raise WorkerConfigError(
                "dask_scheduler",
                f"the scheduler did not answer within {cfg.connect_timeout:g} s "
                f"({type(exc).__name__}: {exc})",
            ) from None
        with self._client_lock:
            if self._client is None:
                self._client = client
            else:
                client.close(timeout=2)
                client = self._client
        checks.look_at_workers(client, cfg)

    # ------------------------------------------------------------ Worker API
    def start(self, request: RunRequest, wake: Wake) -> Handle:
        key = run_key(self.event_name, request)
        self._run_prefix = key.rsplit("-", 2)[0] + "-"
        run = _Run(key, request, wake, busy=True, verify=self.config.verify_scores)
        with self._lock:
            self._runs[key] = run
        self._jobs.submit(lambda: self._launch(run))
        return {
            "key": key,
            "scheduler": self.config.dask_scheduler,
            "shared_filesystem": self.config.shared_filesystem,
            "timeout": float(self.config.timeout),
            "memory_limit_mb": self.config.memory_limit_mb,
            "verify_scores": self.config.verify_scores,
            "started_at": time.time(),
        }

    def reports_end(self, request: RunRequest) -> bool:
        # the future's callback fetches the result and wakes the loop; a
        # re-attached run has no wake and is checked on the timer
        with self._lock:
            run = self._runs.get(run_key(self.event_name, request))
            return run is not None and run.wake is not None

    def recover(self, request: RunRequest) -> Handle | None:
        # The key is deterministic: check() finds the task, or learns that
        # the scheduler never got it (then an infrastructure failure).
        return {"key": run_key(self.event_name, request), "recovered": True}

    def check(self, request: RunRequest, handle: Handle) -> RunOutcome | None:
        key = handle.get("key") if isinstance(handle, dict) else None
        if not isinstance(key, str):
            return _infra(f"invalid dask run handle: {handle!r}")
        with self._lock:
            run = self._runs.get(key)
            if run is None:  # a run of an earlier daemon: find it on the scheduler
                verify = bool(handle.get("verify_scores"))
                run = self._runs[key] = _Run(key, request, busy=True, verify=verify)
                self._run_prefix = key.rsplit("-", 2)[0] + "-"
                self._jobs.submit(lambda: self._attach(run))
                return None
            if run.outcome is not None:
                return run.outcome
            if not run.busy and run.future is not None and run.future.done():
                run.busy = True
                self._jobs.submit(lambda: self._collect(run))
        return None

    def cleanup(self, request: RunRequest, handle: Handle) -> None:
        key = handle.get("key") if isinstance(handle, dict) else None
        key = key if isinstance(key, str) else run_key(self.event_name, request)
        with self._lock:
            run = self._runs.pop(key, None)
            if run is not None:
                run.released = True
        finished = run is not None and run.future is not None and run.future.done()
        try:
            if request.output_dir.exists():  # a cancelled run's partial output
                shutil.rmtree(request.output_dir)
        except OSError as exc:
            log.warning("dask worker: cannot remove %s: %s", request.output_dir, exc)
        # a result we fetched through our one future of the task (never
        # re-attached): the task is over, dropping our hold frees it
        fetched = None
        if finished and run is not None and run.attaches == 0 and run.future.status == "finished":
            fetched = run.future
        self._jobs.submit(lambda: self._release(key, stop=not finished, future=fetched))

    def reap(self, active: set[tuple[int, int]]) -> None:
        prefix = self._run_prefix
        if prefix is None:
            return
        self._jobs.submit(lambda: self._reap(prefix, set(active)))

    def reconfigure(self, config: DaskConfig) -> None:
        """A reload applies to runs started from now on; another scheduler or
        other TLS files mean a new connection (runs the new scheduler does
        not know are then reported as platform failures and retried)."""
        old, self.config = self.config, config
        link = ("dask_scheduler", "tls_ca_file", "tls_client_cert", "tls_client_key")
        if any(getattr(old, k) != getattr(config, k) for k in link):
            client, self._client = self._client, None
            self._unreachable_since = None
            if client is not None:
                threading.Thread(target=lambda: client.close(timeout=5), daemon=True).start()

    def close(self) -> None:
        # Runs go on (published on the scheduler) for the next daemon.
        self._closed.set()
        client, self._client = self._client, None
        if client is not None:
            threading.Thread(target=lambda: client.close(timeout=5), daemon=True).start()

    # ------------------------------------------------------------ background jobs
    def _wake(self, run: _Run) -> None:
        if run.wake is not None:
            try:
                run.wake()
            except Exception:
                log.exception("dask worker: wake callback failed")

    def _watch(self, run: _Run, future: Any) -> None:
        run.future = future
        future.add_done_callback(lambda f: self._done(run, f))

    def _done(self, run: _Run, future: Any) -> None:
        """The task ended (or our link to it broke): fetch its result at once,
        rather than at the loop's next check; its end wakes the loop then."""
        with self._lock:
            if run.future is not future or run.busy or run.released or run.outcome is not None:
                return
            run.busy = True
        self._jobs.submit(lambda: self._collect(run))

    def _finish(self, run: _Run, outcome: RunOutcome) -> None:
        with self._lock:
            run.outcome = outcome
            run.busy = False
        self._wake(run)

    def _launch(self, run: _Run) -> None:
        try:
            folds = self._folds(run)
            client = self.client()
            with self._trees_lock:
                published = set(client.list_datasets())  # one round trip for the code and both trees
                if stub.CODE_PREFIX + self._code_digest not in published:  # new, or a restarted scheduler
                    client.publish_dataset(self._code, name=stub.CODE_PREFIX + self._code_digest, override=True)
                    published.add(stub.CODE_PREFIX + self._code_digest)
            spec, submission = self._spec(client, run, folds, published)
            if run.released:
                return
            future = client.submit(
                stub.call, self._code_digest, "run_submission", spec, submission, key=run.key,
                resources={RESOURCE: 1}, pure=False, retries=0,
            )  # fmt: skip
            # The named reference keeps the task alive without this client.
            client.publish_dataset(future, name=run.key, override=True)
        except TryLater as exc:  # the database is out of reach: not the run's failure
            self._launch_later(run, exc)
            return
        except Exception as exc:
            if not self._closed.is_set():
                log.warning("dask worker: %s not submitted: %s", run.key, exc)
            self._finish(run, _infra(f"could not submit the run to the Dask cluster: {exc}"))
            return
        with self._lock:
            self._watch(run, future)
            run.busy = False
        if run.released:  # cancelled while we submitted
            self._release(run.key, stop=True)

    def _folds(self, run: _Run) -> bytes | None:
        """The event's folds for the Dask worker's re-scoring, read before the
        run goes out (a database outage then delays it, never fails it)."""
        if not run.verify or self._cv_folds is None:
            return None
        return self._folds_npz(self._cv_folds(run.request.submission_id))

    def _launch_later(self, run: _Run, why: Exception) -> None:
        """Submit again after a pause, on a timer: the background jobs' threads
        stay free for other runs meanwhile."""
        if run.released or self._closed.is_set():
            return
        log.warning("dask worker: %s waits: %s", run.key, why)
        timer = threading.Timer(TRY_LATER_PAUSE_S, lambda: self._jobs.submit(lambda: self._launch(run)))
        timer.daemon = True
        timer.start()

    def _spec(
        self, client: Any, run: _Run, folds: bytes | None = None, published: set[str] | None = None
    ) -> tuple[dict[str, Any], list[files.Entry] | None]:
        request, cfg = run.request, self.config
        from ..conda import THREAD_VARIABLES

        env = {"PYTHONUNBUFFERED": "1"}
        if request.n_threads is not None:
            env.update({name: str(int(request.n_threads)) for name in THREAD_VARIABLES})
        env.update(cfg.run_env)
        box: dict[str, Any] | None = None
        if cfg.sandbox != "none":
            box = {
                "where": cfg.where("sandbox"),
                "allow_network": cfg.allow_network,
                "run_env": dict(cfg.run_env),
                "n_threads": request.n_threads,
                "limits": dataclasses.asdict(cfg.limits),
                "hidden": [],
            }
        source, digest = self._supervisor
        spec: dict[str, Any] = {
            "key": run.key,
            "submission_name": request.submission_name,
            "cache_dir": cfg.cache_dir,
            "conda_env": cfg.conda_env,
            "timeout": float(cfg.timeout),
            "memory_limit_mb": cfg.memory_limit_mb,
            "niceness": int(cfg.niceness),
            "max_log_mb": float(cfg.max_log_mb),
            "env": env,
            "supervisor_source": source,
            "supervisor_digest": digest,
            "log_tail_bytes": LOG_TAIL_BYTES,
            "shared": cfg.shared_filesystem,
            "sandbox": box,
            "rescore": None,
            "max_output_mb": cfg.limits.max_output_mb,
        }
        if run.verify:
            spec["rescore"] = {"source": self._rescorer[0], "digest": self._rescorer[1], "folds": folds}
        folder = request.submissions_dir / request.submission_name
        if cfg.shared_filesystem:
            spec.update(
                kit_dir=os.path.abspath(request.kit_dir),
                data_dir=os.path.abspath(request.data_dir),
                submissions_dir=os.path.abspath(request.submissions_dir),
                log_path=os.path.abspath(request.log_path),
                status_path=os.path.abspath(request.log_path.parent / f"run-{request.attempt}.json"),
            )
            if box is not None:  # the deployment is there: what the run must not see
                hidden = [request.submissions_dir, request.predictions_dir, request.logs_dir]
                hidden += [cfg.config_path] if cfg.config_path is not None else []
                box["hidden"] = [os.path.abspath(p) for p in hidden]
            return spec, None
        with self._trees_lock:
            if published is None:
                published = set(client.list_datasets())
            spec["kit_digest"] = self._publish_tree(client, Path(request.kit_dir), published)
            spec["data_digest"] = self._publish_tree(client, Path(request.data_dir), published)
        return spec, files.read_files(folder)

    def _publish_tree(self, client: Any, folder: Path, published: set[str]) -> str:
        """Publish the folder's contents on the scheduler once per digest
        (``published``: the scheduler's dataset names; hold ``_trees_lock``)."""
        digest = self._digests.digest(folder)
        name = cache.TREE_PREFIX + digest
        if name not in published:  # new, changed, or a restarted scheduler
            client.publish_dataset(cache.pack_tree(folder), name=name, override=True)
            published.add(name)
            log.info("dask worker: published %s as %s", folder, name)
        old = self._trees.get(folder)
        self._trees[folder] = digest
        if old is not None and old != digest and old not in self._trees.values():
            try:
                client.unpublish_dataset(cache.TREE_PREFIX + old)
            except KeyError:
                pass
            published.discard(cache.TREE_PREFIX + old)
        return digest

    def _attach(self, run: _Run) -> None:
        """Find the run's task on the scheduler (a restart, or a lost link)."""
        run.attaches += 1
        try:
            client = self.client()
            future = client.get_dataset(run.key)
        except KeyError:
            self._finish(run, _infra(
                "the Dask scheduler does not know this run (the scheduler restarted, "
                "or the run was never submitted)"
            ))  # fmt: skip
            return
        except Exception as exc:
            if self._closed.is_set():
                return
            self._finish(run, _infra(f"cannot find the run on the Dask cluster: {exc}"))
            return
        with self._lock:
            self._watch(run, future)
            run.busy = False  # a future done already is collected by its callback

    def _collect(self, run: _Run) -> None:
        future = run.future
        try:
            status = future.status
            if status == "finished":
                result = future.result(timeout=RESULT_TIMEOUT_S)
                self._finish(run, self._outcome(run, result))
                return
            if status == "error":
                exc = future.exception(timeout=RESULT_TIMEOUT_S)
                what = type(exc).__name__
                if what == "KilledWorker":
                    message = "the Dask workers running it kept dying"
                else:
                    message = f"the run failed on the Dask cluster: {what}: {exc}"
                self._finish(run, _infra(message))
                return
        except Exception as exc:  # the result was lost on the way
            log.warning("dask worker: %s: result not fetched (%s); looking again", run.key, exc)
        # cancelled or lost: our link to the scheduler broke; the task may
        # still be running, held by its published name
        if run.attaches >= MAX_ATTACH:
            self._finish(run, _infra("lost track of the run on the Dask cluster"))
            return
        self._attach(run)

    def _release(self, key: str, stop: bool, future: Any = None) -> None:
        """Forget the task on the scheduler; stop its ramp-test if it runs.
        ``future``: our finished future of it, released without a round trip
        (a cancel is one)."""
        try:
            client = self.client()
            if stop:
                record = client.get_metadata([remote.NS, key, "started"], default=None)
                if record and record.get("worker"):
                    try:
                        said = client.run(
                            remote.stop_run, self.config.cache_dir, key,
                            workers=[record["worker"]], nanny=False,
                        )  # fmt: skip
                        log.info("dask worker: %s: %s", key, said)
                    except Exception as exc:  # the worker is gone: its run too
                        log.info("dask worker: %s: stop not delivered (%s)", key, exc)
            try:
                client.unpublish_dataset(key)
            except KeyError:
                pass
            if future is not None:
                future.release()
                return
            from distributed import Future

            client.cancel([Future(key, client)], force=True)
        except WorkerError:
            pass  # closing, or the cluster gone: a later reap releases it
        except Exception as exc:
            log.warning("dask worker: could not release %s: %s", key, exc)

    def _reap(self, prefix: str, active: set[tuple[int, int]]) -> None:
        """Release published runs of this deployment that no daemon owns."""
        try:
            names = self.client().list_datasets()
        except Exception:
            return
        with self._lock:
            ours = set(self._runs)
        for name in names:
            if not name.startswith(prefix) or name in ours:
                continue
            try:
                sid, attempt = (int(x) for x in name[len(prefix):].split("-"))
            except ValueError:
                continue
            if (sid, attempt) not in active:
                log.warning("dask worker: releasing %s, which no daemon owns", name)
                self._release(name, stop=True)

    # ------------------------------------------------------------ outcome
    def _outcome(self, run: _Run, result: dict[str, Any]) -> RunOutcome:
        request, cfg = run.request, self.config
        status = result.get("status") or {}
        where = f"on {result.get('host')} ({result.get('worker')})"
        log_path = request.log_path
        if not cfg.shared_filesystem:
            tail = result.get("log_tail") or b""
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "wb") as f:
                size = int(result.get("log_size") or 0)
                if size > len(tail):
                    f.write(f"[ramp-dispatcher] the log's last {len(tail)} of {size} bytes\n".encode())
                f.write(tail)
            if request.output_dir.exists():
                shutil.rmtree(request.output_dir)
            output, limit = result.get("output"), cfg.limits.max_output_mb
            try:
                if isinstance(output, bytes):  # a task of a daemon before files.py (re-attached)
                    cache.unpack(output, request.output_dir)
                elif output is not None:
                    files.write_files(output, request.output_dir, None if limit is None else int(limit * 2**20))
            except (ValueError, OSError, tarfile.TarError) as exc:  # BadEntries is a ValueError
                shutil.rmtree(request.output_dir, ignore_errors=True)
                return _infra(f"the training_output sent back {where} was refused: {exc}")
        # The supervisor's own words name the limit the run had (a reload may
        # have changed the config since).
        memory = float(cfg.memory_limit_mb or 0)
        outcome = outcome_from_status(
            status, log_path, request.output_dir,
            time_limit=status.get("message") or f"the time limit of {cfg.timeout:g} s was reached",
            memory_limit=status.get("message") or f"the memory limit of {memory:g} MB was exceeded",
            where=where,
        )  # fmt: skip
        if outcome.failure is None and (run.verify or result.get("check") is not None):
            outcome = self._checked(run, outcome, result)
        return outcome

    def _checked(self, run: _Run, outcome: RunOutcome, result: dict[str, Any]) -> RunOutcome:
        """The post-run checks done on the Dask worker (size limit, re-scoring),
        applied as the conda worker applies its own; the scores go beside the
        run's log."""
        check = result.get("check")
        if not isinstance(check, dict):
            return dataclasses.replace(
                outcome, failure=FailureClass.INFRASTRUCTURE, output_dir=None,
                message="the Dask worker did not score the saved predictions again",
            )  # fmt: skip
        if check.get("removed"):
            log.warning(
                "dask worker: %s: removed links or special files from its output: %s",
                run.request.submission_name, ", ".join(check["removed"][:10]),
            )  # fmt: skip
        if check.get("failure") is not None:
            return dataclasses.replace(
                outcome, failure=FailureClass(check["failure"]), message=str(check.get("message")),
                output_dir=None,
            )  # fmt: skip
        scores = result.get("scores")
        if scores is None:
            return outcome  # no fold saved: nothing to score (the results parser says so)
        path = post_run.scores_path(run.request)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(scores))
        os.replace(tmp, path)
        return dataclasses.replace(outcome, trusted_scores=path)
