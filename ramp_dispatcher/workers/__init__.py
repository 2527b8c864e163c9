"""Worker types, by the ``worker_type`` value of the event config.

The registry of types is :mod:`.registry`; each type lives in its own module.
Importing this package loads none of them (nor YAML or SQLAlchemy).
"""

from __future__ import annotations

from typing import Any, Callable

from .base import Worker
from .registry import WORKER_TYPES, WorkerContext, create_worker, worker_config_from_section

__all__ = ["WORKER_TYPES", "make_worker", "worker_config_from_section"]


def make_worker(
    worker_type: str,
    config: Any,
    *,
    event_name: str | None = None,
    daemon_id: str | None = None,
    database: str | None = None,
    cv_folds: Callable[[int], list[tuple[Any, Any]]] | None = None,
) -> Worker:
    """Build the worker; ``event_name`` is required by the aws worker (instance tags),
    ``database`` (the URL) names the deployment with it; ``cv_folds`` reads a
    submission's folds from the database (the conda worker's re-scoring)."""
    return create_worker(
        worker_type, config, WorkerContext(event_name, daemon_id, database, cv_folds)
    )
