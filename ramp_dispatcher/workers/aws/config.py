"""The aws worker's settings: :class:`AWSConfig`, read from the event config's
``worker`` section by :func:`from_section` and checked once, in the dataclass
(the private key and ``known_hosts_file`` are read here, so a bad file stops
start-up rather than a run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
import re
from typing import Any

from ...configfile import ConfigError, InvalidSetting, Section
from ..conda import verify_scores_setting
from .ssh import known_hosts_fingerprints, load_private_key


_PROXY_JUMP = re.compile(r"([A-Za-z0-9._][A-Za-z0-9._-]*)@([A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(?::(\d{1,5}))?")
_DEPLOYMENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
SANDBOX_CHOICES = ("bwrap", "none")


class AWSConfigError(InvalidSetting):
    """One setting is wrong; ``key`` names it for the config file's error."""


@dataclass(frozen=True)
class AWSConfig:
    """The ``worker`` section of an event's config for ``worker_type: aws``."""

    region_name: str
    ami_image_name: str  # EC2 name filter: wildcards pick the newest match
    ami_user_name: str
    instance_type: str
    key_name: str  # the EC2 key pair installed on the instance
    key_path: Path  # its private key, readable by this user only
    remote_ramp_kit_folder: str
    local_predictions_folder: Path
    local_log_folder: Path
    security_group: str | None = None  # a name (default VPC)
    security_group_ids: tuple[str, ...] = ()
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    profile_name: str | None = None
    endpoint_url: str | None = None
    ami_owners: tuple[str, ...] = ("self",)
    subnet_id: str | None = None
    iam_instance_profile: str | None = None  # a name, or an ARN
    root_volume_size_gb: int | None = None
    use_spot_instance: bool = False
    remote_ramp_data_folder: str | None = None  # default: the kit folder
    remote_python_env: str | None = None  # an env prefix on the image; default: the login shell's
    memory_profiling: bool = False
    #: "bwrap": ramp-test runs in the conda worker's bubblewrap sandbox on the
    #: instance (no network, so no instance metadata; no home, no SSH keys);
    #: "none": as the login user, with its files, the network and the
    #: instance role's credentials (warned at start)
    sandbox: str = "bwrap"
    #: as the conda worker's: after a clean exit the instance scores the saved
    #: predictions again, outside the sandbox, on the event's folds
    verify_scores: bool = True
    #: bound of a run's log on the instance (the supervisor keeps head and tail)
    #: and of what is downloaded of it
    max_log_mb: float = 5.0
    timeout: float = 7200.0
    boot_timeout: float = 600.0
    ssh_port: int = 22
    ssh_connect_timeout: float = 20.0
    ssh_command_timeout: float = 120.0
    unreachable_timeout: float = 600.0
    known_hosts_file: Path | None = None
    #: which address of the instance SSH goes to: "public" (this server is
    #: outside the instances' VPC) or "private" (inside it, or through a bastion)
    ssh_address: str = "public"
    #: a bastion, ``user@host[:port]``, reached with its own key and host key
    ssh_proxy_jump: str | None = None
    ssh_proxy_key_path: Path | None = None  # default: key_path
    ssh_proxy_known_hosts_file: Path | None = None  # required with ssh_proxy_jump
    poll_interval: float = 5.0
    terminate_timeout: float = 300.0
    reap_min_age: float = 600.0
    #: the event config file it was read from (named in start-up errors)
    source: Path | None = field(default=None, compare=False, repr=False)
    #: tags every instance; the reaper touches only this deployment's instances.
    #: Default: derived from the database and the event (AWSWorker.deployment_id)
    deployment_id: str | None = None
    #: the daemon's own deadline of a run is its creation + boot_timeout +
    #: timeout + this (upload, start, download, terminate), whatever the
    #: instance's files say
    deadline_margin: float = 900.0

    def __post_init__(self) -> None:
        for key in ("region_name", "ami_image_name", "ami_user_name", "instance_type", "key_name"):
            if not str(getattr(self, key) or "").strip():
                raise AWSConfigError(key, "must be a non-empty string")
        if not self.security_group and not self.security_group_ids:
            raise AWSConfigError("security_group", "is required (or give security_group_ids)")
        if bool(self.access_key_id) != bool(self.secret_access_key):
            raise AWSConfigError(
                "secret_access_key" if self.access_key_id else "access_key_id",
                "must be given together with the other key (or neither)",
            )
        if self.access_key_id and self.profile_name:
            raise AWSConfigError("profile_name", "cannot be combined with access keys")
        if not self.ami_owners:
            raise AWSConfigError("ami_owners", "must name at least one owner")
        for key in ("remote_ramp_kit_folder", "remote_ramp_data_folder", "remote_python_env"):
            value = getattr(self, key)
            if value is not None and (not value.startswith("/") or "\0" in value):
                raise AWSConfigError(key, f"must be an absolute path on the image, got {value!r}")
        for key in (
            "timeout", "boot_timeout", "ssh_connect_timeout", "ssh_command_timeout",
            "unreachable_timeout", "poll_interval", "terminate_timeout", "deadline_margin",
        ):  # fmt: skip
            if not getattr(self, key) > 0:
                raise AWSConfigError(
                    key, f"must be a positive number of seconds, got {getattr(self, key)!r}"
                )
        if self.deployment_id is not None and not _DEPLOYMENT_ID.fullmatch(self.deployment_id):
            raise AWSConfigError(
                "deployment_id",
                "must be 1-64 letters, digits or the characters . _ : - "
                f"got {self.deployment_id!r}",
            )
        if self.sandbox not in SANDBOX_CHOICES:
            raise AWSConfigError(
                "sandbox", f"must be one of {', '.join(SANDBOX_CHOICES)}, got {self.sandbox!r}"
            )
        if not self.max_log_mb > 0:
            raise AWSConfigError("max_log_mb", f"must be positive, got {self.max_log_mb!r}")
        if self.reap_min_age < 0:
            raise AWSConfigError("reap_min_age", "must not be negative")
        if not 0 < self.ssh_port < 65536:
            raise AWSConfigError("ssh_port", f"must be a TCP port, got {self.ssh_port!r}")
        if self.root_volume_size_gb is not None and self.root_volume_size_gb < 1:
            raise AWSConfigError("root_volume_size_gb", "must be at least 1")
        check_private_key_file(self.key_path)
        if self.ssh_address not in ("public", "private"):
            raise AWSConfigError(
                "ssh_address", f"must be 'public' or 'private', got {self.ssh_address!r}"
            )
        if self.ssh_proxy_jump is not None:
            self.proxy_jump  # parses, or raises naming the key
            if self.ssh_proxy_known_hosts_file is None:
                raise AWSConfigError(
                    "ssh_proxy_known_hosts_file",
                    "is required with ssh_proxy_jump (the bastion's host key, pinned)",
                )
            _check_known_hosts("ssh_proxy_known_hosts_file", self.ssh_proxy_known_hosts_file)
            if self.ssh_proxy_key_path is not None:
                check_private_key_file(self.ssh_proxy_key_path, "ssh_proxy_key_path")
        elif self.ssh_proxy_key_path or self.ssh_proxy_known_hosts_file:
            raise AWSConfigError(
                "ssh_proxy_jump", "is required by ssh_proxy_key_path / ssh_proxy_known_hosts_file"
            )
        if self.known_hosts_file is not None:
            _check_known_hosts("known_hosts_file", self.known_hosts_file)

    @property
    def proxy_jump(self) -> tuple[str, str, int] | None:
        """(user, host, port) of ``ssh_proxy_jump``."""
        if self.ssh_proxy_jump is None:
            return None
        match = _PROXY_JUMP.fullmatch(self.ssh_proxy_jump)
        if match is None or not 0 < int(match.group(3) or 22) < 65536:
            raise AWSConfigError(
                "ssh_proxy_jump", f"must be user@host or user@host:port, got {self.ssh_proxy_jump!r}"
            )
        return match.group(1), match.group(2).strip("[]"), int(match.group(3) or 22)

    @property
    def remote_data_folder(self) -> str:
        return self.remote_ramp_data_folder or self.remote_ramp_kit_folder

    def where(self, key: str) -> str:
        """The file (when known) and the key, as errors and warnings name them."""
        return f"{self.source}: key 'worker.{key}'" if self.source else f"key 'worker.{key}'"

    def error(self, key: str, message: str) -> ConfigError:
        """A start-up error naming the file (when known) and the key."""
        return ConfigError(f"{self.where(key)} {message}")

    def deadline_after(self, created_at: float, timeout: float | None = None) -> float:
        """The daemon-side deadline (epoch s) of a run created at ``created_at``."""
        limit = self.timeout if timeout is None else timeout
        return created_at + self.boot_timeout + limit + self.deadline_margin


def _check_known_hosts(key: str, path: Path) -> None:
    try:
        keys = known_hosts_fingerprints(path)
    except OSError as exc:
        raise AWSConfigError(key, f"{path}: {exc.strerror or exc}") from None
    if not keys:
        raise AWSConfigError(key, f"{path} lists no host key")


def check_private_key_file(path: Path, key: str = "key_path") -> None:
    """The key must exist, be ours alone, and be a key paramiko can use."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise AWSConfigError(key, f"{path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise AWSConfigError(
            key,
            f"{path} is accessible by group or others (mode {mode & 0o777:o}): chmod 600 it",
        )
    try:
        load_private_key(path)
    except ValueError as exc:
        raise AWSConfigError(key, f"{path}: {exc}") from None


def from_section(section: Section) -> AWSConfig:
    """The ``worker`` section of an event config (``worker_type: aws``)."""
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
            sandbox=section.choice("sandbox", SANDBOX_CHOICES, "bwrap"),
            verify_scores=verify_scores_setting(section),
            max_log_mb=float(section.optional("max_log_mb", float, "a number of megabytes", 5.0)),
            timeout=seconds("timeout", 7200.0),
            boot_timeout=seconds("boot_timeout", 600.0),
            ssh_port=section.optional("ssh_port", int, "an integer", 22),
            ssh_connect_timeout=seconds("ssh_connect_timeout", 20.0),
            ssh_command_timeout=seconds("ssh_command_timeout", 120.0),
            unreachable_timeout=seconds("unreachable_timeout", 600.0),
            known_hosts_file=local_path("known_hosts_file"),
            ssh_address=section.choice("ssh_address", ("public", "private"), "public"),
            ssh_proxy_jump=text("ssh_proxy_jump"),
            ssh_proxy_key_path=local_path("ssh_proxy_key_path"),
            ssh_proxy_known_hosts_file=local_path("ssh_proxy_known_hosts_file"),
            poll_interval=seconds("poll_interval", 5.0),
            terminate_timeout=seconds("terminate_timeout", 300.0),
            reap_min_age=seconds("reap_min_age", 600.0),
            deadline_margin=seconds("deadline_margin", 900.0),
            deployment_id=text("deployment_id"),
            source=section.path,
        )
    except AWSConfigError as exc:
        raise section.invalid(exc) from None
