"""ramp-board's server and event ``config.yml`` files, loaded into typed objects.

The formats and path defaults are ramp-board's (ramp-utils 0.10.1), so an
existing deployment's files work unchanged. A missing or ill-typed required key
raises :class:`ConfigError` naming the file and the key; an unknown key is
logged as a warning naming both.

The ``worker`` section belongs to the worker type it names: the registry
(:mod:`.workers.registry`) finds the type's module, which parses the rest.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.engine import URL

from .configfile import ConfigError, InvalidSetting, Section, read_yaml
from .database.engine import normalise_url, url_from_sqlalchemy_section
from .leaderboard import leaderboard_settings
from .workers.registry import worker_config_from_section

__all__ = [  # the file machinery is re-exported: callers know it from here
    "ConfigError",
    "DispatcherConfig",
    "EventConfig",
    "InvalidSetting",
    "RampConfig",
    "Section",
    "ServerConfig",
    "load_event_config",
    "load_server_config",
    "read_yaml",
    "resolve_n_workers",
    "server_config_for_url",
]

log = logging.getLogger(__name__)

# Sections of the server config that belong to other ramp-board components.
_FOREIGN_SERVER_SECTIONS = {"flask"}


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class ServerConfig:
    path: Path
    database_url: URL

    @property
    def deployment_dir(self) -> Path:
        """ramp-board's default paths are relative to the server config's folder."""
        return self.path.parent


def load_server_config(path: str | os.PathLike[str]) -> ServerConfig:
    path = Path(path).absolute()
    data = read_yaml(path)
    section = Section(path, "sqlalchemy", data.get("sqlalchemy"))
    values = {
        "drivername": section.required("drivername", str, "a string"),
        "username": section.optional("username", str, "a string", None),
        "password": section.optional("password", str, "a string", None),
        "host": section.optional("host", str, "a string", None),
        "port": section.optional("port", int, "an integer", None),
        "database": section.required("database", str, "a string"),
    }
    section.warn_unknown()
    for name in data:
        if name not in {"sqlalchemy"} | _FOREIGN_SERVER_SECTIONS:
            log.warning("%s: unknown section '%s' (ignored)", path, name)
    try:
        url = url_from_sqlalchemy_section(values, path.parent)
    except Exception as exc:  # an unknown driver name, for instance
        raise ConfigError(f"{path}: key 'sqlalchemy.drivername': {exc}") from None
    return ServerConfig(path=path, database_url=url)


def server_config_for_url(url: str) -> ServerConfig:
    """A server config for a database given by URL on the command line."""
    return ServerConfig(path=Path.cwd() / "config.yml", database_url=normalise_url(url))


# --------------------------------------------------------------------------- event


@dataclass(frozen=True)
class RampConfig:
    problem_name: str
    event_name: str
    event_title: str
    event_is_public: bool
    kit_dir: Path
    data_dir: Path
    submissions_dir: Path
    predictions_dir: Path
    logs_dir: Path
    sandbox_name: str


HungerPolicy = Literal["sleep", "exit"] | None


@dataclass(frozen=True)
class DispatcherConfig:
    n_workers: int = 1
    n_threads: int | None = None
    hunger_policy: HungerPolicy = None
    #: seconds between two status checks of one run (ramp-board's meaning)
    time_between_collection: float = 1.0
    #: seconds between two looks at the database when nothing wakes us
    poll_interval: float = 5.0
    #: runs of one submission before an infrastructure failure is final
    max_attempts: int = 3
    #: seconds before the first retry of an infrastructure failure (doubles each time)
    retry_delay: float = 30.0
    #: an extra command run after the built-in refresh wrote results (coalesced)
    leaderboard_command: tuple[str, ...] | None = None
    #: seconds between two runs of leaderboard_command, at least
    leaderboard_interval: float = 60.0
    #: refresh ramp-board's cached leaderboards after each change (built in)
    leaderboard_refresh: bool = True
    #: serve Prometheus metrics on 127.0.0.1:<port>
    metrics_port: int | None = None


@dataclass(frozen=True)
class EventConfig:
    path: Path
    ramp: RampConfig
    worker_type: str
    worker: Any  # the worker type's own config dataclass
    dispatcher: DispatcherConfig = field(default_factory=DispatcherConfig)


def resolve_n_workers(n: int) -> int:
    """ramp-board's rule: a negative n means ``cpu_count + 1 + n`` (-1: one per CPU).

    The result may be 0 or less (an explicit 0, or -n beyond the CPU count):
    the config loader refuses that rather than serve nothing or guess.
    """
    return (os.cpu_count() or 1) + 1 + n if n < 0 else n


def _load_ramp(section: Section, deployment_dir: Path) -> RampConfig:
    problem = section.required("problem_name", str, "a string")
    event = section.required("event_name", str, "a string")
    events_dir = deployment_dir / "events" / event
    ramp = RampConfig(
        problem_name=problem,
        event_name=event,
        event_title=section.required("event_title", str, "a string"),
        event_is_public=section.required("event_is_public", bool, "true or false"),
        kit_dir=section.path_key("kit_dir", deployment_dir / "ramp-kits" / problem, deployment_dir),
        data_dir=section.path_key(
            "data_dir", deployment_dir / "ramp-data" / problem, deployment_dir
        ),
        submissions_dir=section.path_key(
            "submissions_dir", events_dir / "submissions", deployment_dir
        ),
        predictions_dir=section.path_key(
            "predictions_dir", events_dir / "predictions", deployment_dir
        ),
        logs_dir=section.path_key("logs_dir", events_dir / "logs", deployment_dir),
        sandbox_name=section.optional("sandbox_dir", str, "a string", "starting_kit"),
    )
    # ramp-board also accepts ``event`` (seen in its AWS notes); it is unused.
    section.warn_unknown()
    return ramp


def _load_dispatcher(section: Section) -> DispatcherConfig:
    n_workers = section.optional("n_workers", int, "an integer", 1)
    if resolve_n_workers(n_workers) < 1:
        # Serving with no slot would claim nothing, silently.
        cpus = os.cpu_count() or 1
        raise ConfigError(
            f"{section.where('n_workers')} must give at least one worker: got {n_workers}"
            + (f" (cpu_count + 1 + n = {cpus + 1 + n_workers} on this {cpus}-CPU host)"
               if n_workers < 0 else "")
        )
    n_threads = section.optional("n_threads", int, "an integer", None)
    if n_threads is not None and n_threads < 1:
        raise ConfigError(f"{section.where('n_threads')} must be a positive integer")
    policy = section.choice("hunger_policy", (None, "sleep", "exit"), None)
    tbc = section.optional("time_between_collection", float, "a number of seconds", 1.0)
    poll = section.optional("poll_interval", float, "a number of seconds", 5.0)
    attempts = section.optional("max_attempts", int, "an integer", 3)
    retry_delay = section.optional("retry_delay", float, "a number of seconds", 30.0)
    if retry_delay < 0:
        raise ConfigError(f"{section.where('retry_delay')} must not be negative")
    board = leaderboard_settings(section)
    metrics_port = section.optional("metrics_port", int, "an integer", None)
    if metrics_port is not None and not 0 < metrics_port < 65536:
        raise ConfigError(f"{section.where('metrics_port')} must be a TCP port (1-65535)")
    for key, value in (("time_between_collection", tbc), ("poll_interval", poll)):
        if value <= 0:
            raise ConfigError(f"{section.where(key)} must be positive")
    if attempts < 1:
        raise ConfigError(f"{section.where('max_attempts')} must be at least 1")
    section.warn_unknown()
    return DispatcherConfig(
        n_workers=resolve_n_workers(n_workers),
        n_threads=n_threads,
        hunger_policy=policy,
        time_between_collection=float(tbc),
        poll_interval=float(poll),
        max_attempts=attempts,
        retry_delay=float(retry_delay),
        leaderboard_command=board.command,
        leaderboard_interval=board.interval,
        leaderboard_refresh=board.refresh,
        metrics_port=metrics_port,
    )


def load_event_config(path: str | os.PathLike[str], server: ServerConfig) -> EventConfig:
    path = Path(path).absolute()
    data = read_yaml(path)
    ramp = _load_ramp(Section(path, "ramp", data.get("ramp")), server.deployment_dir)
    worker_section = Section(path, "worker", data.get("worker"))
    worker_type = worker_section.required("worker_type", str, "a string")
    worker = worker_config_from_section(worker_type, worker_section)
    worker_section.warn_unknown()
    dispatcher = _load_dispatcher(
        Section(path, "dispatcher", data.get("dispatcher"), required=False)
    )
    for name in data:
        if name not in ("ramp", "worker", "dispatcher"):
            log.warning("%s: unknown section '%s' (ignored)", path, name)
    return EventConfig(
        path=path, ramp=ramp, worker_type=worker_type, worker=worker, dispatcher=dispatcher
    )
