"""``ramp-dispatcher run``: one event's service process.

Start-up checks (the worker can run here, the database answers at our schema
revision, waited for while it is away), the signals (TERM/INT stop, HUP
re-reads the event config), then serve until stopped. The daemon itself is
:class:`~ramp_dispatcher.dispatcher.Dispatcher`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from .config import EventConfig, ServerConfig
from .database.engine import make_engine
from .database.failures import is_unavailable
from .dispatcher import Dispatcher
from .messages import first_line
from .sdnotify import SystemdNotifier
from .workers.base import Worker, WorkerError

log = logging.getLogger(__name__)

#: longest pause between two tries to reach the database at start-up
START_RETRY_MAX_S = 30.0


def validate_worker(worker: Worker, config: EventConfig) -> None:
    """The worker's own start-up check; a :class:`UserError` naming the file and key."""
    from .errors import UserError
    from .workers.base import WorkerConfigError

    try:
        worker.validate()
    except WorkerConfigError as exc:
        raise UserError(f"{config.path}: key 'worker.{exc.key}': {exc.message}") from None
    except WorkerError as exc:
        raise UserError(
            f"{config.path}: the {config.worker_type} worker cannot run here: {exc}"
        ) from None


def wait_for_database(
    engine: Engine,
    server: ServerConfig,
    notifier: SystemdNotifier,
    stopped: threading.Event,
    max_delay: float = START_RETRY_MAX_S,
) -> bool:
    """Check the schema revision, waiting for an unreachable database.

    Logged once, retried with backoff (1 s doubling up to ``max_delay``);
    systemd's STATUS says so, and EXTEND_TIMEOUT_USEC keeps the start from
    timing out while we wait. False when ``stopped`` was set meanwhile. A
    reachable database at the wrong revision raises :class:`UserError`.
    """
    from .database.revision import require_head

    delay = 1.0
    since: float | None = None
    while True:
        try:
            require_head(engine, server.path)
        except DBAPIError as exc:
            if not is_unavailable(exc):  # only connection-level errors are waited for
                raise
            now = time.monotonic()
            if since is None:
                since = now
                log.warning(
                    "database unavailable at start-up (%s); waiting for it, "
                    "retrying with backoff up to every %g s", first_line(exc), max_delay,
                )
            notifier.notify(
                f"EXTEND_TIMEOUT_USEC={int((delay + 30) * 1_000_000)}",
                f"STATUS=waiting for the database for {now - since:.0f} s: {first_line(exc)}",
            )
            if stopped.wait(delay):
                return False
            delay = min(delay * 2, max_delay)
            continue
        if since is not None:
            log.info("database reachable after %.0f s", time.monotonic() - since)
        return True


def run_daemon(server: ServerConfig, config: EventConfig) -> int:
    """``ramp-dispatcher run``: serve one event until a signal or hunger_policy exit."""
    from .config import load_event_config
    from .errors import UserError

    engine = make_engine(server.database_url)
    notifier = SystemdNotifier()
    dispatcher = Dispatcher.for_event(engine, config, notifier)
    try:
        validate_worker(dispatcher.worker, config)
    except UserError:
        dispatcher.worker.close()
        engine.dispose()
        raise

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        notifier.stopping()
        dispatcher.stopped.set()

    def on_hangup(_signum: int, _frame: Any) -> None:
        # Python runs this in the main thread (not in a C signal context), so
        # reading files here is safe.
        log.info("received SIGHUP: re-reading %s", config.path)
        notifier.reloading()
        try:
            dispatcher.reload(load_event_config(config.path, server))
        except UserError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
        notifier.ready()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    try:
        reached = wait_for_database(engine, server, notifier, dispatcher.stopped)
    except BaseException:
        dispatcher.worker.close()
        engine.dispose()
        notifier.close()
        raise
    if not reached:  # stopped while waiting: nothing was started
        dispatcher.worker.close()
        engine.dispose()
        notifier.close()
        return 0
    dispatcher.start()
    try:
        dispatcher.stopped.wait()
    finally:
        dispatcher.stop()
        engine.dispose()
        notifier.close()
    return 0
