"""The numbers and the order of each of ramp-board's leaderboards.

What ramp-database 0.10.1 computes with pandas (``tools/leaderboard.py``), redone
on plain rows, with the arithmetic pandas uses so the printed digits agree:

- scores are rounded to their score type's precision like numpy's ``round``
  (scale, round half to even, unscale), bags and fold scores alike;
- per-step means and sums add with Kahan compensation and standard deviations
  use Welford's update, as pandas' grouped reductions do; a single fold's
  standard deviation is 0 (ramp-database fills the NaN);
- the public and private tables are ordered by the official score with
  ``DataFrame.sort_values``' default, numpy's (unstable) quicksort, called the
  same way, so ties come out in the same order for the same input order;
- the competition tables keep each team's best public score (earliest on ties)
  and rank with a stable sort on (score, submission time).
"""

from __future__ import annotations

import datetime as dt
import math
import pickle
import threading
from collections import OrderedDict
from dataclasses import dataclass
from itertools import product
from typing import Any, Callable, Sequence

import numpy as np

from . import html
from .data import EventFacts, SubmissionRow

STEPS_SHOWN = {"valid": "public", "test": "private"}
TIME_NAMES = ("train time [s]", "validation time [s]", "test time [s]")


# --------------------------------------------------------------------------- arithmetic


def np_round(value: float | None, decimals: int | None) -> float:
    """numpy's ``round(value, decimals)`` on one float (None reads as NaN)."""
    if value is None:
        return math.nan
    x = float(value)
    if decimals is None or not math.isfinite(x):
        return x
    if decimals >= 0:
        f = 10.0**decimals
        y = x * f
        if not math.isfinite(y):
            return x
        return _rint(y) / f
    f = 10.0 ** (-decimals)
    return _rint(x / f) * f


def _rint(y: float) -> float:
    r = float(round(y))  # round half to even, like rint
    return math.copysign(r, y) if r == 0.0 else r


def kahan_sum(values: Sequence[float]) -> tuple[float, int]:
    """pandas' grouped sum: compensated, NaN skipped; also the count."""
    total, comp, n = 0.0, 0.0, 0
    for v in values:
        if math.isnan(v):
            continue
        n += 1
        y = v - comp
        t = total + y
        comp = t - total - y
        if comp != comp:  # an infinity: no compensation
            comp = 0.0
        total = t
    return total, n


def mean(values: Sequence[float]) -> float:
    total, n = kahan_sum(values)
    return total / n if n else math.nan


def std(values: Sequence[float]) -> float:
    """pandas' grouped ``std`` (ddof=1), Welford's update."""
    n, avg, m2 = 0, 0.0, 0.0
    for v in values:
        if math.isnan(v):
            continue
        n += 1
        old = avg
        avg += (v - old) / n
        m2 += (v - avg) * (v - old)
    return math.sqrt(m2 / (n - 1)) if n > 1 else math.nan


def pandas_sort_order(values: Sequence[float], ascending: bool) -> list[int]:
    """Row order of ``DataFrame.sort_values(col, ascending)`` on a float column
    (pandas' ``nargsort``: numpy quicksort, NaN last)."""
    arr = np.asarray(values, dtype=float)
    mask = np.isnan(arr)
    idx = np.arange(len(arr))
    non_nans, non_nan_idx = arr[~mask], idx[~mask]
    if not ascending:
        non_nans, non_nan_idx = non_nans[::-1], non_nan_idx[::-1]
    indexer = non_nan_idx[non_nans.argsort(kind="quicksort")]
    if not ascending:
        indexer = indexer[::-1]
    return [int(i) for i in indexer] + [int(i) for i in np.nonzero(mask)[0]]


# --------------------------------------------------------------------------- rows


def _link(sub: SubmissionRow) -> str:
    return f"/{sub.hash_}/{sub.first_file}"


def name_with_link(sub: SubmissionRow) -> str:
    return f"<a href={_link(sub)}>{sub.name[:20]}</a>"


def state_with_link(sub: SubmissionRow) -> str:
    return f"<a href=/{sub.hash_}/error.txt>{sub.state}</a>"


@dataclass
class ScoredRow:
    """One submission's line of the public/private table, before ordering."""

    sub: SubmissionRow
    #: (stat, set, score name) -> value, e.g. ("bag", "public", "acc")
    scores: dict[tuple[str, str, str], float]
    times: tuple[float, float, float]  # train, valid, test sums over folds


def scored_row(sub: SubmissionRow, precision: dict[str, int | None]) -> ScoredRow:
    scores: dict[tuple[str, str, str], float] = {}
    highest = max((len(v) - 1 for step in sub.bags.values() for v in step.values()), default=-1)
    for step, shown in STEPS_SHOWN.items():
        for name, bags in sub.bags.get(step, {}).items():
            value = bags[highest] if 0 <= highest < len(bags) else math.nan
            scores[("bag", shown, name)] = np_round(value, precision.get(name))
    for step, shown in STEPS_SHOWN.items():
        names = {n for fold in sub.fold_scores for n in fold[step]}
        for name in names:
            values = [np_round(fold[step].get(name), precision.get(name)) for fold in sub.fold_scores]
            scores[("mean", shown, name)] = mean(values)
            sd = std(values)
            scores[("std", shown, name)] = 0.0 if math.isnan(sd) else sd
    times = tuple(
        kahan_sum([math.nan if t[i] is None else float(t[i]) for t in sub.fold_times])[0]
        for i in range(3)
    )
    return ScoredRow(sub, scores, times)  # type: ignore[arg-type]


def score_order(event: EventFacts) -> list[str]:
    official = event.official_score_name
    return [official] + [s.name for s in event.scores if s.name != official]


def _seconds(ts: dt.datetime) -> dt.datetime:
    return ts.replace(microsecond=0)


def score_board(
    event: EventFacts,
    rows: Sequence[ScoredRow],
    kind: str,
    lower_is_better: bool,
    with_links: bool = True,
) -> tuple[list[str], list[list[Any]], list[str]]:
    """ramp-database's ``_compute_leaderboard``: column names, rows (sorted)
    and each column's kind ("text", "float", "int", "datetime")."""
    private = kind == "private"
    stats = ["bag", "mean", "std"] if private else ["bag"]
    sets = ["public", "private"] if private else ["public"]
    order = score_order(event)
    score_keys = [(stat, dset, score) for dset, score, stat in product(sets, order, stats)]
    time_names = list(TIME_NAMES if private else TIME_NAMES[:2])
    names = (
        ["team", "submission"]
        + [" ".join(k) for k in score_keys]
        + ["contributivity", "historical contributivity"]
        + time_names
        + ["max RAM [MB]", "submitted at (UTC)"]
    )
    kinds = (
        ["text", "text"]
        + ["float"] * len(score_keys)
        + ["int", "int"]
        + ["float"] * len(time_names)
        + ["float", "datetime"]
    )
    if private:
        names.insert(0, "submission ID")
        kinds.insert(0, "text")
    table = []
    for r in rows:
        sub = r.sub
        line: list[Any] = [
            sub.team,
            name_with_link(sub) if with_links else sub.name,
            *[r.scores.get(k, math.nan) for k in score_keys],
            int(round(100 * sub.contributivity)) if sub.contributivity is not None else None,
            int(round(100 * sub.historical_contributivity))
            if sub.historical_contributivity is not None
            else None,
            *r.times[: len(time_names)],
            sub.max_ram,
            _seconds(sub.submitted_at),
        ]
        if private:
            line.insert(0, f"{sub.id:09d}")
        table.append(line)
    c0 = names.index("contributivity")
    if all(line[c0] == 0 and line[c0 + 1] == 0 for line in table):
        names = names[:c0] + names[c0 + 2 :]
        kinds = kinds[:c0] + kinds[c0 + 2 :]
        table = [line[:c0] + line[c0 + 2 :] for line in table]
    key = names.index(f"bag {kind} {event.official_score_name}")
    table = [table[i] for i in pandas_sort_order([line[key] for line in table], lower_is_better)]
    if not private:  # "bag public acc" -> "acc"
        renamed = {" ".join(k): k[2] for k in score_keys}
        names = [renamed.get(n, n) for n in names]
    return names, table, kinds


def competition_board(
    event: EventFacts, rows: Sequence[ScoredRow], kind: str, lower_is_better: bool
) -> tuple[list[str], list[list[Any]], list[str]]:
    """ramp-database's ``_compute_competition_leaderboard``."""
    score = event.official_score_name
    names, table, _ = score_board(event, rows, "private", lower_is_better, with_links=False)
    col = {n: i for i, n in enumerate(names)}
    time_names = list(TIME_NAMES if kind == "private" else TIME_NAMES[:2])
    picked = [
        {
            "team": line[col["team"]],
            "submission": line[col["submission"]],
            "private": line[col[f"bag private {score}"]],
            "public": line[col[f"bag public {score}"]],
            "times": [line[col[t]] for t in time_names],
            "ts": line[col["submitted at (UTC)"]],
        }
        for line in table
    ]
    better: Callable[..., Any] = min if lower_is_better else max
    best: dict[str, float] = {}
    for p in picked:
        if not math.isnan(p["public"]):
            best[p["team"]] = (
                p["public"] if p["team"] not in best else better(best[p["team"]], p["public"])
            )
    picked = [p for p in picked if p["team"] in best and p["public"] == best[p["team"]]]
    first: dict[str, dt.datetime] = {}
    for p in picked:
        first[p["team"]] = min(first.get(p["team"], p["ts"]), p["ts"])
    picked = [p for p in picked if p["ts"] == first[p["team"]]]

    def ranked(field: str) -> list[dict[str, Any]]:
        def key(p: dict[str, Any]) -> tuple[bool, float, dt.datetime]:
            v = p[field]
            nan = math.isnan(v)
            return (nan, 0.0 if nan else (v if lower_is_better else -v), p["ts"])

        return sorted(picked, key=key)  # stable, like np.lexsort

    picked = ranked("public")
    for rank, p in enumerate(picked, 1):
        p["public rank"] = rank
    picked = ranked("private")
    for rank, p in enumerate(picked, 1):
        p["private rank"] = rank
    for p in picked:
        move = p["public rank"] - p["private rank"]
        p["move"] = f"{move:+d}" if move != 0 else "-"
    picked.sort(key=lambda p: p[f"{kind} rank"])
    out_names = ["rank", "team", "submission", score, *time_names, "submitted at (UTC)"]
    kinds = ["int", "text", "text", "float", *["float"] * len(time_names), "datetime"]
    out = [
        [p[f"{kind} rank"], p["team"], p["submission"], p[kind], *p["times"], p["ts"]]
        for p in picked
    ]
    if kind == "private":
        out_names.insert(1, "move")
        kinds.insert(1, "text")
        for line, p in zip(out, picked):
            line.insert(1, p["move"])
    return out_names, out, kinds


def listing_board(subs: Sequence[SubmissionRow], kind: str) -> tuple[list[str], list[list[Any]], list[str]]:
    """The "new" and "failed" tables."""
    if kind == "new":
        names = ["team", "submission", "submitted at (UTC)", "state", "waiting list"]
        table = [
            [
                s.team, name_with_link(s), s.submitted_at, s.state,
                f"#{s.queue_position}" if s.queue_position != -1 else "",
            ]
            for s in subs
        ]
        return names, table, ["text", "text", "datetime", "text", "text"]
    names = ["team", "submission", "submitted at (UTC)", "error"]
    table = [[s.team, name_with_link(s), s.submitted_at, state_with_link(s)] for s in subs]
    return names, table, ["text", "text", "datetime", "text"]


class _Rendered:
    """Rendered tables by content (their cells, pickled), the last few.

    A refresh renders again what a result did not change (the score tables
    after a failure, the "failed" table after a success, each "new" table for
    the event and again for the sweep), and rendering was most of a refresh's
    CPU; the key costs a few percent of a rendering. Thread-safe.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._html: OrderedDict[bytes, str] = OrderedDict()

    def get(self, key: bytes, render: Callable[[], str]) -> str:
        with self._lock:
            found = self._html.get(key)
            if found is not None:
                self._html.move_to_end(key)
                return found
        html = render()
        with self._lock:
            self._html[key] = html
            while len(self._html) > self.size:
                self._html.popitem(last=False)
        return html


_RENDERED = _Rendered(size=32)


def to_html(board: tuple[list[str], list[list[Any]], list[str]]) -> str:
    """The table's HTML; a table rendered before from the same cells is not
    rendered again (:class:`_Rendered`)."""
    names, table, kinds = board
    try:
        # exact: floats by their bits (-0.0, NaN), every value with its type
        key = pickle.dumps((names, kinds, table), protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        return _render(names, table, kinds)
    return _RENDERED.get(key, lambda: _render(names, table, kinds))


def _render(names: Sequence[str], table: Sequence[Sequence[Any]], kinds: Sequence[str]) -> str:
    columns: list[tuple[str, html.Column]] = []
    for i, (name, kind) in enumerate(zip(names, kinds)):
        values = [line[i] for line in table]
        if kind == "text":
            columns.append((name, html.Text(values)))
        elif kind == "int":
            if any(v is None for v in values):
                columns.append((name, html.Float(values)))
            else:
                columns.append((name, html.Int(values)))
        elif kind == "datetime":
            columns.append((name, html.Datetime(values)))
        else:
            columns.append((name, html.Float(values)))
    return html.render(columns)
