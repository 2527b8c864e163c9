"""ramp-board's server and event ``config.yml`` files, loaded into typed objects.

The formats and path defaults are ramp-board's (ramp-utils 0.10.1), so an
existing deployment's files work unchanged. A missing or ill-typed required key
raises :class:`ConfigError` naming the file and the key; an unknown key is
logged as a warning naming both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import yaml
from sqlalchemy.engine import URL

from .database.engine import normalise_url, url_from_sqlalchemy_section
from .errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Sections of the server config that belong to other ramp-board components.
_FOREIGN_SERVER_SECTIONS = {"flask"}


class ConfigError(UserError):
    """A config file cannot be used; the message names the file and the key."""


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML{at}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


class Section:
    """Typed access to one section of a config file, tracking unknown keys."""

    def __init__(self, path: Path, name: str, data: Any, *, required: bool = True):
        self.path = path
        self.name = name
        if data is None and not required:
            data = {}
        if data is None:
            raise ConfigError(f"{path}: missing section '{name}'")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: section '{name}' must be a mapping")
        self.data: dict[str, Any] = data
        self._used: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.path}: key '{self.name}.{key}'"

    def _convert(self, key: str, value: Any, kind: Callable[[Any], T], type_name: str) -> T:
        ok = {
            bool: lambda v: isinstance(v, bool),
            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            str: lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
        }.get(kind, lambda v: True)(value)
        if not ok:
            raise ConfigError(
                f"{self.where(key)} must be {type_name}, got {type(value).__name__} {value!r}"
            )
        return kind(value)

    def value(self, key: str) -> Any:
        """The raw value (or None) of a key whose type the caller checks."""
        self._used.add(key)
        return self.data.get(key)

    def required(self, key: str, kind: Callable[[Any], T], type_name: str) -> T:
        self._used.add(key)
        if key not in self.data or self.data[key] is None:
            raise ConfigError(f"{self.where(key)} is required")
        return self._convert(key, self.data[key], kind, type_name)

    def optional(self, key: str, kind: Callable[[Any], T], type_name: str, default: T) -> T:
        self._used.add(key)
        if key not in self.data or self.data[key] is None:
            return default
        return self._convert(key, self.data[key], kind, type_name)

    def choice(self, key: str, choices: tuple[Any, ...], default: Any) -> Any:
        self._used.add(key)
        value = self.data.get(key, default)
        if value not in choices:
            shown = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{self.where(key)} must be one of {shown}, got {value!r}")
        return value

    def path_key(self, key: str, default: Path, base: Path) -> Path:
        value = self.optional(key, str, "a path", None)  # type: ignore[arg-type]
        if value is None:
            return default
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else base / path

    def warn_unknown(self, allowed: set[str] | None = None) -> None:
        known = self._used | (allowed or set())
        for key in self.data:
            if key not in known:
                log.warning("%s: unknown key '%s.%s' (ignored)", self.path, self.name, key)


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
    """ramp-board's rule: a negative n means ``cpu_count + 1 + n`` (at least 1)."""
    return max((os.cpu_count() or 1) + 1 + n, 1) if n < 0 else n


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
    from .leaderboard import leaderboard_settings

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
    from .workers import load_worker_config  # the registry of worker types

    path = Path(path).absolute()
    data = read_yaml(path)
    ramp = _load_ramp(Section(path, "ramp", data.get("ramp")), server.deployment_dir)
    worker_section = Section(path, "worker", data.get("worker"))
    worker_type = worker_section.required("worker_type", str, "a string")
    worker = load_worker_config(worker_type, worker_section)
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
