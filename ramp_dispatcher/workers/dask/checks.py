"""The dask worker's start-up checks (``ramp-dispatcher run`` before it serves).

:func:`check_tls_files` refuses TLS files that cannot be read or loaded
(a :class:`WorkerConfigError` naming the key: ``run`` exits 2);
:func:`look_at_workers` only warns: Dask workers come and go, and a run on
one that cannot start the sandbox fails as the platform's failure, retried.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from ..base import WorkerConfigError
from . import remote
from .config import RESOURCE, DaskConfig

log = logging.getLogger(__name__)


def check_tls_files(cfg: DaskConfig) -> None:
    """Each file readable; the CA, and the certificate with its key, load."""
    for key in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        path = getattr(cfg, key)
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise WorkerConfigError(key, f"cannot read {str(path)!r}: {exc.strerror}") from None
    try:
        context = ssl.create_default_context(cafile=str(cfg.tls_ca_file))
    except (ssl.SSLError, ValueError) as exc:
        raise WorkerConfigError(
            "tls_ca_file", f"{str(cfg.tls_ca_file)!r} is not a PEM CA certificate ({exc})"
        ) from None
    try:
        context.load_cert_chain(str(cfg.tls_client_cert), str(cfg.tls_client_key))
    except (ssl.SSLError, ValueError) as exc:
        raise WorkerConfigError(
            "tls_client_cert",
            f"{str(cfg.tls_client_cert)!r} with tls_client_key {str(cfg.tls_client_key)!r} "
            f"is not a PEM certificate and its key ({exc})",
        ) from None


def look_at_workers(client: Any, cfg: DaskConfig) -> None:
    """Warn when no Dask worker has a ``ramp`` slot yet, and name each one
    that cannot start the configured sandbox."""
    try:
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
        slots = [a for a, w in workers.items() if (w.get("resources") or {}).get(RESOURCE)]
        if not slots:
            log.warning(
                "dask worker: no Dask worker of %s has the '%s' resource yet: runs wait for "
                "one (start them with --resources %s=1)",
                cfg.dask_scheduler, RESOURCE, RESOURCE,
            )  # fmt: skip
            return
        if cfg.sandbox == "none":
            return
        said = client.run(remote.sandbox_problem, cfg.allow_network, workers=slots, on_error="return")
        for address, problem in sorted(said.items()):
            if problem is not None:
                log.warning(
                    "%s: the Dask worker %s cannot start the sandbox (%s): its runs fail as "
                    "platform failures", cfg.where("sandbox"), address, problem,
                )  # fmt: skip
    except Exception as exc:  # the cluster is there; the runs will tell more
        log.warning("dask worker: could not look at the Dask workers at start-up: %s", exc)
