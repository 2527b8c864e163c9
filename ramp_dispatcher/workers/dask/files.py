"""A run's small folders in transit: the submission to the Dask worker, its
``training_output`` back to the daemon.

A folder travels as a list of entries, ``(relative path, data)`` with data
``None`` for a folder, rather than as a tar archive: no compression (the
folders are small, and the link is the cluster's), and writing them back is
a few system calls per file instead of tarfile's members and its ``data``
filter (4 ms of the daemon's CPU per run for an iris output of 25 files).
Only folders and regular files travel; links and special files are left out.

Writing is as strict as the ``data`` filter: :func:`write_files` takes the
entries as untrusted (the output comes from a Dask worker that ran a
participant's code): every path is relative, made of plain names (no ``..``,
``.``, empty part, NUL or ``/`` at either end), under a fresh folder where
nothing but what is written here exists, each file created new
(``O_EXCL | O_NOFOLLOW``: a second entry of one name fails), with plain modes
(0644, 0755 for a folder); an optional bound on the total size.

Standard library only: shipped to the Dask workers by value.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Optional, Tuple

#: names never sent: caches Python and ramp-test write into a folder
SKIPPED = frozenset({"__pycache__", "training_output", ".ipynb_checkpoints"})
#: one entry: (path relative to the folder, with "/"; the file's bytes or None for a folder)
Entry = Tuple[str, Optional[bytes]]


class BadEntries(ValueError):
    """Entries that would not stay a plain folder under their destination."""


def read_files(root: Path) -> list[Entry]:
    """The folder's folders and regular files (links and the rest left out),
    without :data:`SKIPPED` names and ``.pyc`` files; never follows a link."""
    entries: list[Entry] = []
    for folder, dirs, names in os.walk(root, followlinks=False):
        rel = os.path.relpath(folder, root)
        prefix = "" if rel == "." else rel + "/"
        kept = []
        for name in sorted(dirs):
            if name in SKIPPED or os.path.islink(os.path.join(folder, name)):
                continue
            kept.append(name)
            entries.append((prefix + name, None))
        dirs[:] = kept
        for name in sorted(names):
            if name in SKIPPED or name.endswith(".pyc"):
                continue
            path = os.path.join(folder, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:  # a link (ELOOP), or gone
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                with os.fdopen(fd, "rb", closefd=False) as f:
                    entries.append((prefix + name, f.read()))
            finally:
                os.close(fd)
    return entries


def _parts(path: Any) -> list[str]:
    if not isinstance(path, str) or not path or "\0" in path:
        raise BadEntries(f"bad path {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BadEntries(f"path {path!r} is not a plain relative path")
    return parts


def write_files(entries: Any, dest: Path, max_bytes: int | None = None) -> None:
    """Write :func:`read_files`' entries under ``dest``, which must not exist
    yet (created here). Raises :class:`BadEntries` (``dest`` may then hold
    part of them: the caller removes it)."""
    if not isinstance(entries, (list, tuple)):
        raise BadEntries(f"entries are a {type(entries).__name__}, not a list")
    for entry in entries:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            raise BadEntries(f"bad entry {entry!r:.80}")
        if not (entry[1] is None or isinstance(entry[1], (bytes, bytearray))):
            raise BadEntries(f"bad data for {entry[0]!r:.80}")
    if max_bytes is not None:
        total = sum(len(data) for _, data in entries if data is not None)
        if total > max_bytes:
            raise BadEntries(f"{total} bytes, over the {max_bytes} allowed")
    os.makedirs(dest.parent, exist_ok=True)
    os.mkdir(dest, 0o755)  # fresh: no link in it but what we make (we make none)
    made = {""}
    for path, data in entries:
        parts = _parts(path)
        for i in range(1, len(parts)):  # parents first, as plain folders
            parent = "/".join(parts[:i])
            if parent not in made:
                try:
                    os.mkdir(os.path.join(dest, parent), 0o755)
                except FileExistsError:
                    raise BadEntries(f"{parent!r} is already a file") from None
                made.add(parent)
        target = os.path.join(dest, path)
        if data is None:
            if path not in made:
                try:
                    os.mkdir(target, 0o755)
                except FileExistsError:
                    raise BadEntries(f"{path!r} twice") from None
                made.add(path)
            continue
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except (FileExistsError, IsADirectoryError):
            raise BadEntries(f"{path!r} twice") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
