"""Read what ``ramp-test --save-output`` (ramp-workflow 0.7.0) leaves behind.

The layout, under ``training_output/``::

    bagged_scores.csv        step,n_bag,<scores...>   (steps valid and test)
    fold_<i>/scores.csv      step,<scores...>,time    (steps train, valid, test)
    fold_<i>/train_time      one bare float, no newline (``str(float)``)
    fold_<i>/valid_time
    fold_<i>/test_time
    fold_<i>/state.txt       e.g. ``scored`` or ``training_error``, no newline
    fold_<i>/error.txt       the participant's traceback, only on failure

The CSV files are written by pandas ``DataFrame.to_csv``, which writes a NaN
as an *empty* cell, so an empty score cell reads back as ``float('nan')``.

Everything here is pure: the only I/O is reading files under the folder we
are given, and every problem with the folder becomes a :class:`ResultsError`
that names the offending file relative to that folder.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .messages import read_log_tail

__all__ = [
    "BaggedScores",
    "FoldResult",
    "ResultsError",
    "TrainingResults",
    "parse_training_output",
    "read_fold_error",
]

FOLD_STEPS: tuple[str, ...] = ("train", "valid", "test")
BAGGED_STEPS: tuple[str, ...] = ("valid", "test")
BAGGED_SCORES_FILE = "bagged_scores.csv"
SCORES_FILE = "scores.csv"
ERROR_FILE = "error.txt"

# Only canonical names: rampwf writes ``fold_{i}``, so ``fold_01`` is not ours.
_FOLD_DIR_RE = re.compile(r"fold_(0|[1-9][0-9]*)")


class ResultsError(Exception):
    """The output folder is unusable. str(e) names the file and what is wrong."""


@dataclass(frozen=True)
class FoldResult:
    """One CV fold: its timings and its scores."""

    index: int  # i of fold_<i>
    train_time: float
    valid_time: float
    test_time: float
    scores: dict[str, dict[str, float]]  # scores[score_name][step]


@dataclass(frozen=True)
class BaggedScores:
    """Scores of the predictions averaged over the first n_bag+1 folds."""

    # scores[score_name][step] for step in ('valid', 'test'): value at the
    # largest n_bag for that step (what ramp-board shows on the leaderboard).
    last: dict[str, dict[str, float]]
    # Per step, the list over n_bag in increasing n_bag order (the bagging
    # learning curve).
    all_bags: dict[str, dict[str, list[float]]]


@dataclass(frozen=True)
class TrainingResults:
    folds: list[FoldResult]  # ordered by fold index 0..n-1
    bagged: BaggedScores

    def time_stats(self) -> dict[str, tuple[float, float]]:
        """``{'train': (mean, std), 'valid': ..., 'test': ...}`` over folds.

        std is the population std (ddof=0), as numpy's default computes it;
        in floats (``statistics.pstdev`` works in exact fractions: a tenth of
        a millisecond per result for digits no column keeps).
        """
        if not self.folds:
            raise ValueError("no folds: time statistics are undefined")
        stats: dict[str, tuple[float, float]] = {}
        for step in FOLD_STEPS:
            times = [getattr(fold, f"{step}_time") for fold in self.folds]
            mean = math.fsum(times) / len(times)
            stats[step] = (mean, math.sqrt(math.fsum((t - mean) ** 2 for t in times) / len(times)))
        return stats


# --------------------------------------------------------------------------
# Low-level readers


def _rel(path: Path, root: Path) -> str:
    """The path as shown in messages: relative to the output folder."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # not under root: show it whole
        return str(path)


def _read_text(path: Path, root: Path) -> str:
    # the relative name only for messages: pathlib's relative_to is costly per file
    if not path.is_file():
        what = "is not a file" if path.exists() else "is missing"
        raise ResultsError(f"{_rel(path, root)}: {what}")
    try:
        # utf-8-sig drops a UTF-8 BOM if an editor or tool added one.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ResultsError(f"{_rel(path, root)}: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise ResultsError(f"{_rel(path, root)}: cannot be read ({exc.strerror or exc})") from exc


def _parse_float(raw: str, *, empty_is_nan: bool) -> float | None:
    """``float`` of a cell, or None when it is not a number.

    Python's ``float`` also accepts 'nan', 'inf' and '1_0'; the underscore form
    is no number any tool writes, so it is refused.
    """
    text = raw.strip()
    if not text:
        return math.nan if empty_is_nan else None
    if "_" in text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _read_time(path: Path, root: Path) -> float:
    text = _read_text(path, root)
    if not text.strip():
        raise ResultsError(f"{_rel(path, root)}: empty file, expected a number of seconds")
    value = _parse_float(text, empty_is_nan=False)
    if value is None:
        raise ResultsError(f"{_rel(path, root)}: not a number: {_preview(text)}")
    # rampwf writes a difference of time.time() calls: never NaN or infinite.
    if not math.isfinite(value):
        raise ResultsError(f"{_rel(path, root)}: not a finite number of seconds: {_preview(text)}")
    return value


def _preview(text: str, limit: int = 40) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


@dataclass(frozen=True)
class _Table:
    """A parsed CSV: header names and data rows as name -> raw cell."""

    rel: str
    columns: list[str]
    rows: list[tuple[int, dict[str, str]]]  # (line number, row)


def _read_csv(path: Path, root: Path, required: Sequence[str]) -> _Table:
    text = _read_text(path, root)
    rel = _rel(path, root)
    # Blank lines carry nothing (a trailing newline, an editor's extra line).
    lines = [(no, line) for no, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise ResultsError(f"{rel}: empty file")
    try:
        records = list(csv.reader([line for _, line in lines], strict=True))
    except csv.Error as exc:
        raise ResultsError(f"{rel}: not valid CSV ({exc})") from exc
    columns = [name.strip() for name in records[0]]
    seen: set[str] = set()
    for name in columns:
        if name in seen:
            raise ResultsError(f"{rel}: duplicate column {name!r}")
        seen.add(name)
    for name in required:
        if name not in seen:
            raise ResultsError(f"{rel}: missing column {name!r}")
    if len(records) == 1:
        raise ResultsError(f"{rel}: header only, no data rows")
    rows = []
    for (line_no, _), record in zip(lines[1:], records[1:]):
        if len(record) != len(columns):
            raise ResultsError(
                f"{rel}: line {line_no} has {len(record)} fields, header has {len(columns)}"
            )
        rows.append((line_no, dict(zip(columns, record))))
    return _Table(rel, columns, rows)


def _score_value(table: _Table, line_no: int, row: dict[str, str], name: str) -> float:
    # Empty cell = NaN: that is how pandas' to_csv writes a NaN score.
    value = _parse_float(row[name], empty_is_nan=True)
    if value is None:
        raise ResultsError(
            f"{table.rel}: line {line_no}, column {name!r}: not a number: {_preview(row[name])}"
        )
    return value


# --------------------------------------------------------------------------
# The files


def _fold_dirs(output_dir: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for child in output_dir.iterdir():
        match = _FOLD_DIR_RE.fullmatch(child.name)
        if match and child.is_dir():
            found[int(match.group(1))] = child
    return found


def _parse_fold(index: int, fold_dir: Path, root: Path, score_names: Sequence[str]) -> FoldResult:
    # Times first: they are the files rampwf writes before scores.csv.
    times = {step: _read_time(fold_dir / f"{step}_time", root) for step in FOLD_STEPS}
    table = _read_csv(fold_dir / SCORES_FILE, root, required=["step", *score_names])
    by_step: dict[str, tuple[int, dict[str, str]]] = {}
    for line_no, row in table.rows:
        step = row["step"].strip()
        if step in by_step:
            raise ResultsError(f"{table.rel}: duplicate row for step {step!r}")
        by_step[step] = (line_no, row)
    scores: dict[str, dict[str, float]] = {name: {} for name in score_names}
    for step in FOLD_STEPS:
        if step not in by_step:
            raise ResultsError(f"{table.rel}: missing row for step {step!r}")
        line_no, row = by_step[step]
        for name in score_names:
            scores[name][step] = _score_value(table, line_no, row, name)
    return FoldResult(
        index=index,
        train_time=times["train"],
        valid_time=times["valid"],
        test_time=times["test"],
        scores=scores,
    )


def _parse_n_bag(table: _Table, line_no: int, raw: str) -> int:
    text = raw.strip()
    if re.fullmatch(r"[0-9]+", text):
        return int(text)
    raise ResultsError(
        f"{table.rel}: line {line_no}, column 'n_bag': not a non-negative integer: {_preview(raw)}"
    )


def _parse_bagged(path: Path, root: Path, score_names: Sequence[str]) -> BaggedScores:
    table = _read_csv(path, root, required=["step", "n_bag", *score_names])
    # step -> n_bag -> (line, row); other steps (none today) are ignored.
    per_step: dict[str, dict[int, tuple[int, dict[str, str]]]] = {}
    for line_no, row in table.rows:
        step = row["step"].strip()
        if step not in BAGGED_STEPS:
            continue
        n_bag = _parse_n_bag(table, line_no, row["n_bag"])
        bags = per_step.setdefault(step, {})
        if n_bag in bags:
            raise ResultsError(f"{table.rel}: duplicate row for step {step!r}, n_bag {n_bag}")
        bags[n_bag] = (line_no, row)
    last: dict[str, dict[str, float]] = {name: {} for name in score_names}
    all_bags: dict[str, dict[str, list[float]]] = {name: {} for name in score_names}
    # A step absent from the file stays absent: the caller decides (ramp-board
    # substitutes the score type's worst value).
    for step in BAGGED_STEPS:
        bags = per_step.get(step)
        if not bags:
            continue
        for name in score_names:
            curve = [_score_value(table, *bags[n], name) for n in sorted(bags)]
            all_bags[name][step] = curve
            last[name][step] = curve[-1]
    return BaggedScores(last=last, all_bags=all_bags)


def parse_training_output(
    output_dir: Path, n_folds: int, score_names: Sequence[str]
) -> TrainingResults:
    """Parse a ``training_output`` folder written by ``ramp-test --save-output``.

    ``n_folds`` is the event's number of CV folds: exactly ``fold_0`` ..
    ``fold_{n_folds-1}`` must be there. Every name in ``score_names`` must be a
    column of every scores file. Raises :class:`ResultsError` on any problem.
    """
    if n_folds < 1:
        raise ValueError(f"n_folds must be at least 1, got {n_folds}")
    if isinstance(score_names, str):  # a lone name would be split into letters
        raise TypeError("score_names must be a sequence of names, not a string")
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ResultsError(f"{output_dir}: training output folder is missing")
    found = _fold_dirs(output_dir)
    for index in range(n_folds):
        if index not in found:
            raise ResultsError(f"fold_{index}: missing fold folder (expected {n_folds} folds)")
    extra = sorted(i for i in found if i >= n_folds)
    if extra:
        names = ", ".join(f"fold_{i}" for i in extra)
        raise ResultsError(
            f"{names}: unexpected fold folder(s): the event has {n_folds} CV folds"
        )
    folds = [_parse_fold(i, found[i], output_dir, score_names) for i in range(n_folds)]
    bagged = _parse_bagged(output_dir / BAGGED_SCORES_FILE, output_dir, score_names)
    return TrainingResults(folds=folds, bagged=bagged)


def read_fold_error(output_dir: Path) -> str | None:
    """Content of the lowest-numbered ``fold_<i>/error.txt``, else None.

    rampwf stops at the first failing fold, so there is normally one at most.
    Only its end is read (the participant controls its size; the exception
    line is last). An unreadable file counts as absent: this runs while
    reporting a failure, which must not fail in turn.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    for index, fold_dir in sorted(_fold_dirs(output_dir).items()):
        path = fold_dir / ERROR_FILE
        if not path.is_file():
            continue
        try:
            # Tracebacks may quote the participant's non-UTF-8 bytes: decoded leniently.
            return read_log_tail(path).removeprefix("\ufeff")
        except OSError:
            continue
    return None
