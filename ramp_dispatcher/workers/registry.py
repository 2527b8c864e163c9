"""The worker types, by the ``worker_type`` value of an event's config.

Each worker type is one module (or package) of :mod:`ramp_dispatcher.workers`
that owns its config dataclass, the parsing and validation of its ``worker``
section, and its :class:`~.base.Worker`. It provides two module-level names:

``from_section(section: Section) -> Config``
    read the ``worker`` section (``worker_type`` excepted) into the type's
    config dataclass; raise :class:`~ramp_dispatcher.configfile.ConfigError`
    naming the file and the key.
``create_worker(config, context: WorkerContext) -> Worker``
    build the worker serving every run of one daemon.

Adding a worker type is one entry in :data:`WORKER_TYPES` and its own module.
Modules are imported on first use: importing this package stays cheap, and a
type whose optional dependencies are missing fails only when it is chosen.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..configfile import ConfigError

if TYPE_CHECKING:
    from ..configfile import Section
    from .base import Worker


@dataclass(frozen=True)
class WorkerContext:
    """What the daemon tells a worker it builds, beyond the worker's config."""

    #: the event's name (the aws worker tags its instances with it)
    event_name: str | None = None
    #: this daemon's identity in the runs table (``host:pid:...``)
    daemon_id: str | None = None
    #: the database URL (password hidden): with the event, names the deployment
    database: str | None = None
    #: a submission's cv folds from the database, (train_is, test_is) in
    #: ramp-test's fold order: every worker type re-scores runs with them
    #: (raises TryLater while the database is out of reach); while they do not
    #: change, the same object is handed out again (``queries.FoldsCache``)
    cv_folds: Callable[[int], Sequence[tuple[Any, Any]]] | None = None


@dataclass(frozen=True)
class WorkerType:
    """One entry of the registry: where a worker type lives, imported lazily."""

    name: str
    #: absolute module path providing ``from_section`` and ``create_worker``
    module: str
    #: the ``pip install 'ramp-dispatcher[extra]'`` its imports need, if any
    extra: str | None = None

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


#: every worker type, by its ``worker_type`` value
WORKER_TYPES: dict[str, WorkerType] = {
    "conda": WorkerType("conda", "ramp_dispatcher.workers.conda"),
    "aws": WorkerType("aws", "ramp_dispatcher.workers.aws", extra="aws"),
    "dask": WorkerType("dask", "ramp_dispatcher.workers.dask", extra="dask"),
}


def worker_config_from_section(worker_type: str, section: Section) -> Any:
    """Read the ``worker`` section for ``worker_type`` into its config dataclass."""
    kind = WORKER_TYPES.get(worker_type)
    if kind is None:
        known = ", ".join(WORKER_TYPES)
        raise ConfigError(
            f"{section.where('worker_type')}: unknown worker type {worker_type!r} "
            f"(known: {known})"
        )
    try:
        module = kind.load()
    except ImportError as exc:
        if kind.extra is None:
            raise
        raise ConfigError(
            f"{section.where('worker_type')}: the {kind.name} worker needs the "
            f"'{kind.extra}' extra (pip install 'ramp-dispatcher[{kind.extra}]'): {exc}"
        ) from None
    return module.from_section(section)


def create_worker(worker_type: str, config: Any, context: WorkerContext) -> Worker:
    """Build the worker of ``worker_type`` from its config dataclass."""
    kind = WORKER_TYPES.get(worker_type)
    if kind is None:
        raise ValueError(f"unknown worker type {worker_type!r}")
    worker: Worker = kind.load().create_worker(config, context)
    return worker
