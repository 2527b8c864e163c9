"""The Dask worker's per-run transfer of a folder (workers/dask/files.py):
the submission out, training_output back. The entries coming back are
untrusted (a participant's code ran on the Dask worker): nothing written may
leave the destination, replace a file, or be anything but a plain folder or
file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ramp_dispatcher.workers.dask.files import BadEntries, read_files, write_files


def _tree(root: Path) -> dict[str, bytes | None]:
    found: dict[str, bytes | None] = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in names:
            found[os.path.relpath(os.path.join(folder, name), root)] = Path(folder, name).read_bytes()
    return found


def test_a_folder_goes_and_comes_back_the_same(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "fold_0" / "deep" / "er").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "fold_0" / "y_pred_train.npz").write_bytes(os.urandom(5000))
    (src / "fold_0" / "deep" / "er" / "x.txt").write_text("x")
    (src / "bagged_scores.csv").write_text("score\n")
    (src / "estimator.py").write_text("pass\n")
    expected = _tree(src)
    # never sent: caches, links, special files
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "m.pyc").write_bytes(b"\0")
    (src / "stale.pyc").write_bytes(b"\0")
    (src / "link").symlink_to("/etc/passwd")
    (src / "dirlink").symlink_to(src / "fold_0")
    os.mkfifo(src / "fifo")

    entries = read_files(src)
    assert all(not p.startswith("/") and ".." not in p.split("/") for p, _ in entries)
    write_files(entries, tmp_path / "dest" / "training_output")
    assert _tree(tmp_path / "dest" / "training_output") == expected
    mode = os.stat(tmp_path / "dest" / "training_output" / "estimator.py").st_mode
    assert stat.S_IMODE(mode) & 0o022 == 0 and stat.S_ISREG(mode)


@pytest.mark.parametrize("path", [
    "../escaped", "/tmp/escaped", "a/../../escaped", "a/../b", "./a", "a//b", "a/", "", ".", "..",
    "a\0b", None, 3, b"bytes",
])  # fmt: skip
def test_a_path_that_is_not_plain_is_refused(tmp_path: Path, path: object) -> None:
    with pytest.raises(BadEntries):
        write_files([("ok", b"1"), (path, b"evil")], tmp_path / "dest")
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped").exists()
    assert set(os.listdir(tmp_path / "dest")) <= {"ok"}


@pytest.mark.parametrize("entries", [
    [("a", b"1"), ("a", b"2")],          # a file twice: never replaced
    [("a", b"1"), ("a/b", b"2")],        # a file taken for a folder
    [("a", None), ("a", b"2")],          # a folder taken for a file
    [("a", b"1"), ("a", None)],          # a file taken for a folder
])  # fmt: skip
def test_names_that_collide_are_refused(tmp_path: Path, entries: list) -> None:
    with pytest.raises(BadEntries):
        write_files(entries, tmp_path / "dest")
    assert (tmp_path / "dest" / "a").read_bytes() == b"1" if entries[0][1] else (tmp_path / "dest" / "a").is_dir()


@pytest.mark.parametrize("entries", [b"a tar archive", {"a": b"1"}, [("a",)], [("a", "text")], [("a", 1)], "a"])
def test_entries_of_another_shape_are_refused(tmp_path: Path, entries: object) -> None:
    with pytest.raises(BadEntries):
        write_files(entries, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_the_size_bound_is_checked_before_anything_is_written(tmp_path: Path) -> None:
    entries = [("a", b"x" * 600), ("b/c", b"y" * 600)]
    with pytest.raises(BadEntries, match="over the 1000 allowed"):
        write_files(entries, tmp_path / "dest", max_bytes=1000)
    assert not (tmp_path / "dest").exists()
    write_files(entries, tmp_path / "ok", max_bytes=1200)
    assert (tmp_path / "ok" / "b" / "c").read_bytes() == b"y" * 600


def test_the_destination_must_be_new(tmp_path: Path) -> None:
    # a destination that exists (or is a link to elsewhere) is never written into
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "dest").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        write_files([("a", b"1")], tmp_path / "dest")
    assert os.listdir(tmp_path / "elsewhere") == []
