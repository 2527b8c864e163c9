"""Worker types, by the ``worker_type`` value of the event config."""

from __future__ import annotations

from typing import Any

from ..config import ConfigError, Section
from .base import Worker

WORKER_TYPES = ("conda",)


def load_worker_config(worker_type: str, section: Section) -> Any:
    """Read the ``worker`` section for ``worker_type`` into its config dataclass."""
    if worker_type == "conda":
        from .conda import CondaConfig

        timeout = section.optional("timeout", float, "a number of seconds", 7200.0)
        memory = section.optional("memory_limit_mb", float, "a number of megabytes", None)
        if timeout <= 0:
            raise ConfigError(f"{section.path}: key 'worker.timeout' must be positive")
        if memory is not None and memory <= 0:
            raise ConfigError(f"{section.path}: key 'worker.memory_limit_mb' must be positive")
        return CondaConfig(
            conda_env=section.required("conda_env", str, "a string"),
            timeout=float(timeout),
            memory_limit_mb=memory,
        )
    known = ", ".join(WORKER_TYPES)
    raise ConfigError(
        f"{section.path}: key 'worker.worker_type': unknown worker type {worker_type!r} "
        f"(known: {known})"
    )


def make_worker(worker_type: str, config: Any) -> Worker:
    if worker_type == "conda":
        from .conda import CondaWorker

        return CondaWorker(config)
    raise ValueError(f"unknown worker type {worker_type!r}")
