"""``worker_type: dask``: runs on the Dask workers of an existing scheduler.

- :mod:`.config`: the event config's ``worker`` section (:class:`DaskConfig`);
- :mod:`.worker`: the daemon's side (:class:`DaskWorker`, the Worker interface);
- :mod:`.remote`: the task that runs on a Dask worker, through the supervisor;
- :mod:`.cache`: the content-addressed kit/data copies on the Dask workers.

Importing this package does not import ``distributed`` (an optional extra).
For the worker registry: ``TYPE_NAME``, ``Config.from_section(section)`` and
``Worker(config, event_name=..., daemon_id=...)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import DaskConfig

if TYPE_CHECKING:
    from .worker import DaskWorker

TYPE_NAME = "dask"
Config = DaskConfig

__all__ = ["TYPE_NAME", "Config", "DaskConfig", "DaskWorker", "Worker"]


def __getattr__(name: str) -> Any:
    if name in ("DaskWorker", "Worker"):
        from .worker import DaskWorker

        return DaskWorker
    raise AttributeError(name)
