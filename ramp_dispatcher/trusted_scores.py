"""Which scores a run gets: the ones recomputed outside its sandbox, when there are.

The worker may hand over a JSON file of scores that :mod:`.workers.rescore`
computed from the run's saved predictions with the kit's own score types
(``RunOutcome.trusted_scores``). The run's own ``scores.csv`` and
``bagged_scores.csv`` were written by the participant's process; where they
differ from the recomputed ones, the recomputed ones are kept and the
difference is reported in one line (for the daemon's log and the runs table).
Times still come from the run's files: nothing outside the run measured them.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from .results import (
    FOLD_STEPS,
    BaggedScores,
    FoldResult,
    ResultsError,
    TrainingResults,
    _read_time,
    parse_training_output,
)

__all__ = ["read_results", "load_trusted", "compare"]

#: relative tolerance of "the same score" (the CSV round-trips floats exactly)
REL_TOL = 1e-9
#: differences quoted in the note, at most
SHOWN = 3


def read_results(
    output_dir: Path, n_folds: int, score_names: Sequence[str], trusted: Path | None
) -> tuple[TrainingResults, str]:
    """The run's results and a note ("" when nothing was changed).

    Without ``trusted`` this is :func:`.results.parse_training_output`. With
    it, unusable score files of the run are no obstacle (the participant's
    process may have overwritten them): the recomputed scores are used.
    """
    if trusted is None:
        return parse_training_output(output_dir, n_folds, score_names), ""
    folds_scores, bagged = load_trusted(trusted, n_folds, score_names)
    try:
        reported: TrainingResults | None = parse_training_output(output_dir, n_folds, score_names)
        problem = ""
    except ResultsError as exc:
        reported, problem = None, str(exc)
    if reported is not None:
        folds = [replace(f, scores=s) for f, s in zip(reported.folds, folds_scores)]
        differences = compare(reported, folds_scores, bagged)
    else:
        folds = []
        for i, scores in enumerate(folds_scores):
            d = Path(output_dir) / f"fold_{i}"
            t = {step: _read_time(d / f"{step}_time", Path(output_dir)) for step in FOLD_STEPS}
            folds.append(FoldResult(i, t["train"], t["valid"], t["test"], scores))
        differences = [f"the run's own score files are unusable ({problem})"]
    results = TrainingResults(folds=folds, bagged=bagged)
    if not differences:
        return results, ""
    shown = "; ".join(differences[:SHOWN]) + (
        f"; and {len(differences) - SHOWN} more" if len(differences) > SHOWN else ""
    )
    return results, (
        "scores recomputed outside the sandbox differ from what the run reported; "
        f"the recomputed ones are stored: {shown}"
    )


def load_trusted(
    path: Path, n_folds: int, score_names: Sequence[str]
) -> tuple[list[dict[str, dict[str, float]]], BaggedScores]:
    """Per-fold scores (``[fold][score][step]``) and bagged scores from rescore.py's JSON."""
    try:
        data = json.loads(Path(path).read_text())
        raw_folds = data["folds"]
        raw_bagged = data["bagged"]
        if len(raw_folds) != n_folds:
            raise ResultsError(
                f"{path}: {len(raw_folds)} folds recomputed, the event has {n_folds}"
            )
        folds = [
            {name: {step: _float(fold[step][name]) for step in FOLD_STEPS} for name in score_names}
            for fold in raw_folds
        ]
        all_bags: dict[str, dict[str, list[float]]] = {name: {} for name in score_names}
        last: dict[str, dict[str, float]] = {name: {} for name in score_names}
        for step, per_name in raw_bagged.items():
            for name in score_names:
                curve = [_float(v) for v in per_name[name]]
                if curve:
                    all_bags[name][step] = curve
                    last[name][step] = curve[-1]
    except ResultsError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ResultsError(f"{path}: recomputed scores unreadable: {exc!r}") from None
    return folds, BaggedScores(last=last, all_bags=all_bags)


def _float(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def _same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12)


def compare(
    reported: TrainingResults,
    folds: list[dict[str, dict[str, float]]],
    bagged: BaggedScores,
) -> list[str]:
    """Human-readable differences, e.g. ``fold 0 valid acc: reported 1.0, recomputed 0.31``."""
    out = []  # the bagged scores first: the leaderboard shows them
    for name, steps in bagged.all_bags.items():
        for step, curve in steps.items():
            got_curve = reported.bagged.all_bags.get(name, {}).get(step, [])
            if len(got_curve) != len(curve) or not all(map(_same, got_curve, curve)):
                got = got_curve[-1] if got_curve else math.nan
                out.append(f"bagged {step} {name}: reported {got:g}, recomputed {curve[-1]:g}")
    for fold, trusted in zip(reported.folds, folds):
        for name, steps in trusted.items():
            for step, value in steps.items():
                got = fold.scores.get(name, {}).get(step, math.nan)
                if not _same(got, value):
                    out.append(f"fold {fold.index} {step} {name}: reported {got:g}, recomputed {value:g}")
    return out
