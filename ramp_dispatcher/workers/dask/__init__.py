"""``worker_type: dask``: runs on the Dask workers of an existing scheduler.

- :mod:`.config`: the event config's ``worker`` section (:class:`DaskConfig`);
- :mod:`.worker`: the daemon's side (:class:`DaskWorker`, the Worker interface);
- :mod:`.remote`: the task that runs on a Dask worker, through the supervisor;
- :mod:`.stub`: what each run ships: it loads :mod:`.remote`, published once;
- :mod:`.cache`: the content-addressed kit/data copies on the Dask workers;
- :mod:`.files`: a run's submission and ``training_output`` in transit.

Importing this package does not import ``distributed`` (an optional extra);
building the worker does. The registry's entry points are ``from_section``
and ``create_worker``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import DaskConfig

if TYPE_CHECKING:
    from ...configfile import Section
    from ..registry import WorkerContext
    from .worker import DaskWorker

__all__ = ["DaskConfig", "create_worker", "from_section"]


def from_section(section: Section) -> DaskConfig:
    return DaskConfig.from_section(section)


def create_worker(config: DaskConfig, context: WorkerContext) -> DaskWorker:
    from .worker import DaskWorker

    return DaskWorker(
        config, event_name=context.event_name, daemon_id=context.daemon_id, cv_folds=context.cv_folds
    )
