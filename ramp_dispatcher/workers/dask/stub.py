"""The function each run's task calls on the Dask worker: a few lines that
load the run's code once per Dask worker process and call it.

The code (:mod:`.remote` and what it uses, pickled by value) is the same for
every run: the daemon pickles it once and publishes it on the scheduler, as
the kit and data trees, named by the digest of its modules' sources
(:data:`CODE_PREFIX`; pickles of the same code differ from one Python
process to the next, sources do not), so daemons of one version share it. Submitted
directly, each run carried it whole (~95 KB: about 3 ms of the daemon's CPU
to pickle, and the scheduler's and the Dask worker's to unpickle, per run);
this stub is what travels instead.

Standard library only, ``distributed`` imported inside the function: shipped
to the Dask workers by value.
"""

from __future__ import annotations

import pickle
from typing import Any

#: scheduler dataset names of published code start with this
CODE_PREFIX = "ramp-code-"
#: where a Dask worker process keeps the code it loaded: (digest, name) -> function
_LOADED = "_ramp_dispatcher_code"


def call(digest: str, name: str, *args: Any) -> Any:
    """Call the function ``name`` of the published code ``digest`` with ``args``."""
    from distributed import get_worker

    worker = get_worker()
    # kept on the worker object: this module is shipped by value with each
    # task, so its own globals do not last from one run to the next
    loaded = worker.__dict__.setdefault(_LOADED, {})
    function = loaded.get((digest, name))
    if function is None:
        functions = pickle.loads(fetch_published(worker, CODE_PREFIX + digest))  # cloudpickle's output: distributed brings cloudpickle
        for key, value in functions.items():
            loaded[(digest, key)] = value
        function = loaded[(digest, name)]
    return function(*args)


def fetch_published(worker: Any, name: str) -> bytes:
    """A published dataset's bytes (the code, a kit or data tree), asked of
    the scheduler with the worker's own connection (no client on the Dask
    worker)."""
    from distributed.protocol.serialize import Serialized, deserialize
    from distributed.utils import sync

    records = sync(worker.loop, worker.scheduler.publish_get, names=[name])
    record = records[0] if records else None
    if not record:
        raise RuntimeError(f"{name} is not published on the scheduler")
    data = record["data"]
    if isinstance(data, Serialized):
        data = deserialize(data.header, data.frames)
    if isinstance(data, tuple) and len(data) == 1:  # publish_dataset(*args)
        data = data[0]
    if not isinstance(data, (bytes, bytearray)):
        raise RuntimeError(f"{name} is published as {type(data).__name__}")
    return bytes(data)
