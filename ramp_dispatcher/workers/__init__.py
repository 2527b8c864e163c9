"""Worker types, by the ``worker_type`` value of the event config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Worker

if TYPE_CHECKING:
    from ..config import Section

# Config imports are deferred: importing this package (as `python -m
# ramp_dispatcher.workers.supervise` does) must not pay for SQLAlchemy and
# YAML, about 0.4 s of CPU. The conda worker runs the supervisor as a script.

WORKER_TYPES = ("conda", "aws", "dask")


def load_worker_config(worker_type: str, section: Section) -> Any:
    """Read the ``worker`` section for ``worker_type`` into its config dataclass."""
    from ..config import ConfigError

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
    if worker_type == "aws":
        return _load_aws(section)
    if worker_type == "dask":
        from .dask import DaskConfig

        return DaskConfig.from_section(section)
    known = ", ".join(WORKER_TYPES)
    raise ConfigError(
        f"{section.path}: key 'worker.worker_type': unknown worker type {worker_type!r} "
        f"(known: {known})"
    )


def _load_aws(section: Section) -> Any:
    from ..config import ConfigError

    try:
        from .aws import AWSConfig, AWSConfigError
    except ImportError as exc:  # boto3 / paramiko are an optional extra
        raise ConfigError(
            f"{section.path}: key 'worker.worker_type': the aws worker needs the 'aws' extra "
            f"(pip install 'ramp-dispatcher[aws]'): {exc}"
        ) from None
    base = section.path.parent  # relative local paths: next to the event config

    def where(key: str) -> str:
        return f"{section.path}: key 'worker.{key}'"

    def secret(key: str) -> str | None:
        # Read raw: Section's type errors quote the value, which must not be.
        value = section.optional(key, lambda v: v, "a string", None)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where(key)} must be a string (value not shown)")
        return value

    def text(key: str, default: Any = None, required: bool = False) -> Any:
        if required:
            return section.required(key, str, "a string")
        return section.optional(key, str, "a string", default)

    def local_path(key: str, required: bool = False) -> Path | None:
        value = text(key, required=required)
        if value is None:
            return None
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else base / path

    def names(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = section.optional(key, lambda v: v, "a list of strings", None)
        if value is None:
            return default
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
            raise ConfigError(f"{where(key)} must be a string or a list of strings")
        return tuple(items)

    def seconds(key: str, default: float) -> float:
        return float(section.optional(key, float, "a number of seconds", default))

    try:
        return AWSConfig(
            access_key_id=secret("access_key_id"),
            secret_access_key=secret("secret_access_key"),
            profile_name=text("profile_name"),
            region_name=text("region_name", required=True),
            endpoint_url=text("endpoint_url"),
            ami_image_name=text("ami_image_name", required=True),
            ami_owners=names("ami_owners", ("self",)),
            ami_user_name=text("ami_user_name", required=True),
            instance_type=text("instance_type", required=True),
            key_name=text("key_name", required=True),
            key_path=local_path("key_path", required=True),
            security_group=text("security_group"),
            security_group_ids=names("security_group_ids", ()),
            subnet_id=text("subnet_id"),
            iam_instance_profile=text("iam_instance_profile"),
            root_volume_size_gb=section.optional("root_volume_size_gb", int, "an integer", None),
            use_spot_instance=section.optional("use_spot_instance", bool, "true or false", False),
            remote_ramp_kit_folder=text("remote_ramp_kit_folder", required=True),
            remote_ramp_data_folder=text("remote_ramp_data_folder"),
            remote_python_env=text("remote_python_env"),
            local_predictions_folder=local_path("local_predictions_folder", required=True),
            local_log_folder=local_path("local_log_folder", required=True),
            memory_profiling=section.optional("memory_profiling", bool, "true or false", False),
            timeout=seconds("timeout", 7200.0),
            boot_timeout=seconds("boot_timeout", 600.0),
            ssh_port=section.optional("ssh_port", int, "an integer", 22),
            ssh_connect_timeout=seconds("ssh_connect_timeout", 20.0),
            ssh_command_timeout=seconds("ssh_command_timeout", 120.0),
            unreachable_timeout=seconds("unreachable_timeout", 600.0),
            known_hosts_file=local_path("known_hosts_file"),
            poll_interval=seconds("poll_interval", 5.0),
            terminate_timeout=seconds("terminate_timeout", 300.0),
            reap_min_age=seconds("reap_min_age", 600.0),
        )
    except AWSConfigError as exc:
        raise ConfigError(f"{where(exc.key)} {exc.message}") from None


def make_worker(
    worker_type: str, config: Any, *, event_name: str | None = None, daemon_id: str | None = None
) -> Worker:
    """Build the worker; ``event_name`` is required by the aws worker (instance tags)."""
    if worker_type == "conda":
        from .conda import CondaWorker

        return CondaWorker(config)
    if worker_type == "aws":
        from .aws import AWSWorker

        if not event_name:
            raise ValueError("make_worker: the aws worker needs event_name (it tags its instances)")
        return AWSWorker(config, event_name, daemon_id=daemon_id)
    if worker_type == "dask":
        from .dask import DaskWorker

        return DaskWorker(config, event_name=event_name, daemon_id=daemon_id)
    raise ValueError(f"unknown worker type {worker_type!r}")
