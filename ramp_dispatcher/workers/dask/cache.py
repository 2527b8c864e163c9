"""Content-addressed copies of the kit and the data on the Dask workers.

The daemon names a folder by the digest of its contents (:func:`tree_digest`)
and publishes it once, packed, on the scheduler under that name. A Dask
worker unpacks a digest it has not seen into ``<cache>/trees/<digest>`` and
reuses it for every later run; an edited kit or data folder has a new digest,
so it is fetched again, and old copies are pruned when unused.

Standard library only: the worker-side half (:func:`install_tree`) is shipped
to the Dask workers by value with the run, which need no ramp_dispatcher.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import time
import uuid
from pathlib import Path
from typing import Callable

#: names never part of a tree: caches Python and ramp-test write into a kit
SKIPPED = frozenset({"__pycache__", "training_output", ".ipynb_checkpoints"})
#: scheduler dataset names of published trees start with this
TREE_PREFIX = "ramp-tree-"
#: a cached tree unused this long may be removed (unless among the newest)
PRUNE_AFTER_S = 24 * 3600.0
KEEP_NEWEST = 4
_COMPLETE = ".ramp-dispatcher-complete"


# ------------------------------------------------------------ daemon side
def _files(root: Path) -> list[tuple[str, os.stat_result]]:
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED)
        for name in sorted(names):
            if name.endswith(".pyc"):
                continue
            path = os.path.join(folder, name)
            found.append((os.path.relpath(path, root), os.lstat(path)))
    return found


class TreeDigests:
    """Digests of folders, recomputed only when a file's size, mtime or inode changed."""

    def __init__(self) -> None:
        self._memo: dict[Path, tuple[tuple, str]] = {}

    def digest(self, root: Path) -> str:
        root = Path(os.path.abspath(root))
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder")
        files = _files(root)
        signature = tuple((rel, st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode) for rel, st in files)
        memo = self._memo.get(root)
        if memo is not None and memo[0] == signature:
            return memo[1]
        h = hashlib.sha256()
        for rel, st in files:
            path = root / rel
            h.update(rel.encode("utf-8", "surrogateescape") + b"\0")
            if os.path.islink(path):
                h.update(b"L" + os.readlink(path).encode("utf-8", "surrogateescape"))
            else:
                h.update(b"F%d\0" % (st.st_mode & 0o111 != 0))
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            h.update(b"\0")
        value = h.hexdigest()[:32]
        self._memo[root] = (signature, value)
        return value


def pack_tree(root: Path) -> bytes:
    """The folder as a gzipped tar (in memory), without :data:`SKIPPED` names."""

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if any(p in SKIPPED for p in parts) or info.name.endswith(".pyc"):
            return None
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        tar.add(str(root), arcname=".", filter=keep)
    return buf.getvalue()


# ------------------------------------------------------------ Dask worker side
def unpack(data: bytes, dest: Path) -> None:
    """Unpack a :func:`pack_tree` archive into ``dest`` (no path leaves it)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        try:
            tar.extractall(dest, filter="data")
        except TypeError:  # Python without extraction filters
            for member in tar.getmembers():
                target = os.path.realpath(os.path.join(dest, member.name))
                if not target.startswith(os.path.realpath(dest) + os.sep) and target != os.path.realpath(dest):
                    raise ValueError(f"archive member {member.name!r} leaves the folder")
            tar.extractall(dest)


def install_tree(cache_root: Path, digest: str, fetch: Callable[[], bytes]) -> tuple[Path, bool]:
    """``<cache>/trees/<digest>``, fetched and unpacked if absent; (path, fetched).

    Safe with several Dask workers sharing one cache: each unpacks into a
    private folder and renames it into place; the first rename wins.
    """
    trees = cache_root / "trees"
    target = trees / digest
    marker = target / _COMPLETE
    if marker.exists():
        os.utime(marker)  # recently used: kept by prune
        return target, False
    data = fetch()
    trees.mkdir(parents=True, exist_ok=True)
    tmp = trees / f".{digest}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        unpack(data, tmp)
        (tmp / _COMPLETE).touch()
        if target.exists():  # an incomplete leftover of a crash
            if not marker.exists():
                shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not marker.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, True


def prune(cache_root: Path, in_use: set[str], now: float | None = None) -> list[str]:
    """Remove trees unused for :data:`PRUNE_AFTER_S`, keeping the newest few."""
    trees = cache_root / "trees"
    now = time.time() if now is None else now
    entries = []
    for child in trees.iterdir() if trees.is_dir() else []:
        try:
            used = (child / _COMPLETE).stat().st_mtime
        except OSError:
            continue
        entries.append((used, child))
    entries.sort(reverse=True)
    removed = []
    for used, child in entries[KEEP_NEWEST:]:
        if child.name not in in_use and now - used > PRUNE_AFTER_S:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed
