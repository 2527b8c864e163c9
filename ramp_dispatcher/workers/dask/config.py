"""The ``worker`` section of an event's config for ``worker_type: dask``.

Key names follow ramp-engine 0.10.1's Dask worker where it had one
(``dask_scheduler``, ``conda_env``, ``timeout``); the rest are ours.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from ...configfile import ConfigError, InvalidSetting
from .. import sandbox as sb
from ..conda import DEFAULT_SANDBOX, SANDBOX_CHOICES, sandbox_settings

if TYPE_CHECKING:
    from ...configfile import Section

#: the Dask worker resource one run holds (``dask worker --resources ramp=1``)
RESOURCE = "ramp"
_ADDRESS = re.compile(r"^(tcp|tls)://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-_]+):([0-9]{1,5})$")


@dataclass(frozen=True)
class DaskConfig:
    """How to reach the Dask scheduler and how runs go on its workers."""

    #: ``tcp://host:port`` or ``tls://host:port`` of the scheduler
    dask_scheduler: str
    #: ramp-test's environment on the Dask workers: a prefix path or a conda
    #: environment name; None means the Dask worker's own Python environment
    conda_env: str | None = None
    #: wall-clock limit of one run, seconds (enforced on the Dask worker)
    timeout: float = 7200.0
    #: limit on the run's process tree's unique memory (summed PSS), MB
    memory_limit_mb: float | None = None
    #: niceness increment of ramp-test on the Dask worker
    niceness: int = 5
    #: bound of a run's log (as the conda worker's): head and latest output kept
    max_log_mb: float = 5.0
    #: kit, data and submissions are at the same paths on every Dask worker:
    #: nothing is copied, ramp-test writes straight into the deployment
    shared_filesystem: bool = False
    #: the kit/data cache and the run folders on the Dask workers; None: the
    #: worker's $RAMP_DISPATCHER_CACHE, else <tmp>/ramp-dispatcher-cache-<uid>
    cache_dir: str | None = None
    #: TLS with client certificates (distributed.security.Security)
    tls_ca_file: Path | None = None
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None
    #: seconds one connection attempt to the scheduler may take
    connect_timeout: float = 10.0
    #: seconds a run waits for an unreachable scheduler before it is an
    #: infrastructure failure (retried; a streak opens the circuit breaker)
    unreachable_timeout: float = 120.0
    #: as the conda worker's: ``bwrap`` runs ramp-test in a bubblewrap sandbox
    #: on the Dask worker (a host without a usable bwrap fails the run as the
    #: platform's failure); ``none`` runs it as the Dask worker's user
    sandbox: str = DEFAULT_SANDBOX
    allow_network: bool = False
    run_env: Mapping[str, str] = field(default_factory=dict)
    #: processes, open files, file size and /tmp of one sandboxed run; the
    #: size of its output after a clean exit (checked on the Dask worker: an
    #: output over it fails the run and is never sent to the daemon)
    limits: sb.Limits = sb.DEFAULT_LIMITS
    #: as the conda worker's: after a clean exit the Dask worker scores the saved
    #: predictions again, outside the sandbox, on the event's folds
    verify_scores: bool = True
    #: the event config file, named in messages
    config_path: Path | None = None

    def __post_init__(self) -> None:
        if not _ADDRESS.match(self.dask_scheduler):
            raise InvalidSetting(
                "dask_scheduler", f"must be tcp://host:port or tls://host:port, got {self.dask_scheduler!r}"
            )
        if not self.timeout > 0:
            raise InvalidSetting("timeout", f"must be positive, got {self.timeout!r}")
        if self.memory_limit_mb is not None and not self.memory_limit_mb > 0:
            raise InvalidSetting("memory_limit_mb", f"must be positive, got {self.memory_limit_mb!r}")
        if not self.max_log_mb > 0:
            raise InvalidSetting("max_log_mb", f"must be positive, got {self.max_log_mb!r}")
        if not self.connect_timeout > 0:
            raise InvalidSetting("connect_timeout", f"must be positive, got {self.connect_timeout!r}")
        if not self.unreachable_timeout > 0:
            raise InvalidSetting(
                "unreachable_timeout", f"must be positive, got {self.unreachable_timeout!r}"
            )
        if self.sandbox not in SANDBOX_CHOICES:
            raise InvalidSetting(
                "sandbox", f"must be one of {', '.join(SANDBOX_CHOICES)}, got {self.sandbox!r}"
            )
        tls = (self.tls_ca_file, self.tls_client_cert, self.tls_client_key)
        if any(tls) and not all(tls):
            raise InvalidSetting(
                "tls_ca_file", "tls_ca_file, tls_client_cert and tls_client_key go together"
            )
        if all(tls) and not self.dask_scheduler.startswith("tls://"):
            raise InvalidSetting("dask_scheduler", "must start with tls:// when TLS files are given")
        if self.dask_scheduler.startswith("tls://") and not all(tls):
            raise InvalidSetting(
                "tls_ca_file", "a tls:// scheduler needs tls_ca_file, tls_client_cert and tls_client_key"
            )

    @property
    def uses_tls(self) -> bool:
        return self.tls_ca_file is not None

    def where(self, key: str) -> str:
        """``<event config>: key 'worker.<key>'`` for messages."""
        where = f"{self.config_path}: " if self.config_path else ""
        return f"{where}key 'worker.{key}'"

    @classmethod
    def from_section(cls, section: Section) -> DaskConfig:
        """Read and check the section; errors name the file and the key."""
        if importlib.util.find_spec("distributed") is None:
            raise ConfigError(
                f"{section.where('worker_type')}: the dask worker needs the 'dask' extra "
                "(pip install 'ramp-dispatcher[dask]')"
            )
        base = section.path.parent  # relative TLS files: next to the event config

        def local_file(key: str) -> Path | None:
            value = section.optional(key, str, "a path", None)
            if value is None:
                return None
            path = Path(os.path.expanduser(value))
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise ConfigError(f"{section.where(key)}: no such file {str(path)!r}")
            return path

        memory = section.optional("memory_limit_mb", float, "a number of megabytes", None)
        try:
            return cls(
                dask_scheduler=section.required("dask_scheduler", str, "a string"),
                conda_env=section.optional("conda_env", str, "a string", None),
                timeout=float(section.optional("timeout", float, "a number of seconds", 7200.0)),
                memory_limit_mb=None if memory is None else float(memory),
                niceness=section.optional("niceness", int, "an integer", 5),
                max_log_mb=float(
                    section.optional("max_log_mb", float, "a number of megabytes", 5.0)
                ),
                shared_filesystem=section.optional(
                    "shared_filesystem", bool, "true or false", False
                ),
                cache_dir=section.optional("cache_dir", str, "a path on the Dask workers", None),
                tls_ca_file=local_file("tls_ca_file"),
                tls_client_cert=local_file("tls_client_cert"),
                tls_client_key=local_file("tls_client_key"),
                connect_timeout=float(
                    section.optional("connect_timeout", float, "a number of seconds", 10.0)
                ),
                unreachable_timeout=float(
                    section.optional("unreachable_timeout", float, "a number of seconds", 120.0)
                ),
                **sandbox_settings(section),
            )
        except InvalidSetting as exc:
            raise section.invalid(exc) from None


