"""Tables as pandas' ``DataFrame.to_html`` writes them, without pandas.

ramp-database stores ``df.to_html(escape=False, index=False, justify="left")``
cut down to ``<thead> ... </tbody>``. What that output depends on, and what
:func:`render` reproduces:

- layout: two-space indents, ``<tr style="text-align: left;">`` in the head,
  every cell ``str(value).strip()`` with double spaces turned into
  ``&nbsp;&nbsp;``, nothing escaped;
- a float64 column: each value ``f"{v:.6f}"`` (NaN as ``NaN``), then trailing
  zeros cut equally from the whole column down to one decimal; the column
  switches to ``f"{v:.6e}"`` when a non-zero value is below 1e-6 in magnitude, or
  when a value is above 1e6 and a formatted one is longer than 12 characters;
- a float column holding ``None`` is an object column: ``None``, and each float
  ``f"{v: .6f}"`` with its own trailing zeros cut;
- an int64 column: ``f"{v:d}"``;
- a datetime column: ``%Y-%m-%d`` when every value is midnight, else
  ``%Y-%m-%d %H:%M:%S`` and ``.%f`` when any value has microseconds.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from typing import Sequence, Union

#: pandas' display.precision
DIGITS = 6
_DECIMAL_NUMBER = re.compile(r"^\s*[+-]?[0-9]+\.[0-9]*$")


@dataclass(frozen=True)
class Text:
    values: Sequence[str]


@dataclass(frozen=True)
class Float:
    values: Sequence[float | None]


@dataclass(frozen=True)
class Int:
    values: Sequence[int]


@dataclass(frozen=True)
class Datetime:
    values: Sequence[dt.datetime]


Column = Union[Text, Float, Int, Datetime]


def render(columns: Sequence[tuple[str, Column]]) -> str:
    """The ``<thead> ... </tbody>`` fragment ramp-database stores for a table."""
    cells = [_format(col) for _, col in columns]
    n_rows = len(cells[0]) if cells else 0
    head = "".join(f"      <th>{_cell(name)}</th>\n" for name, _ in columns)
    body = []
    for row in zip(*cells):
        tds = "".join([f"      <td>{c}</td>\n" for c in row])
        body.append(f"    <tr>\n{tds}    </tr>\n")
    assert len(body) == n_rows
    return (
        '<thead> \n    <tr style="text-align: left;">\n'
        + head
        + "    </tr>\n  </thead>\n  <tbody>\n"
        + "".join(body)
        + "   </tbody>"
    )


def _cell(value: str) -> str:
    return str(value).strip().replace("  ", "&nbsp;&nbsp;")


def _format(col: Column) -> list[str]:
    """A column's cells, as they appear between <td> and </td>."""
    if isinstance(col, Text):
        return [_cell(v) for v in col.values]
    if isinstance(col, Int):
        return [f"{v:d}" for v in col.values]
    if isinstance(col, Datetime):
        return pandas_datetimes(col.values)
    if any(v is None for v in col.values):
        return [_cell(_object_float(v)) for v in col.values]
    # numbers: nothing to strip, no double spaces
    return float_column([float(v) for v in col.values])  # type: ignore[arg-type]


def float_column(values: Sequence[float]) -> list[str]:
    """A float64 column's cells."""
    if all(map(math.isfinite, values)):
        return _finite_column(values)
    fixed = _trim_zeros([_fmt(v, f".{DIGITS}f") for v in values])
    too_long = max((len(x) for x in fixed), default=0) > DIGITS + 6
    large = any(abs(v) > 1e6 for v in values if not math.isnan(v))
    small = any(0 < abs(v) < 10.0**-DIGITS for v in values if not math.isnan(v))
    if small or (too_long and large):
        return _trim_zeros([_fmt(v, f".{DIGITS}e") for v in values])
    return fixed


def _finite_column(values: Sequence[float]) -> list[str]:
    """:func:`float_column` of a column without NaN or infinity (the usual
    one), without its per-cell tests: every fixed-point cell is then a
    decimal number with DIGITS decimals, and no cell is "NaN"."""
    fixed = [format(v, _FIXED) for v in values]
    cut = min((len(x) - len(x.rstrip("0")) for x in fixed), default=0)
    if cut:
        fixed = [x[:-cut] for x in fixed]
        if cut == DIGITS:  # "1." -> "1.0", as pandas leaves one decimal
            fixed = [x + "0" for x in fixed]
    too_long = max(map(len, fixed), default=0) > DIGITS + 6
    magnitudes = list(map(abs, values))
    large = max(magnitudes, default=0.0) > 1e6
    small = any(0 < m < 10.0**-DIGITS for m in magnitudes)
    if small or (too_long and large):
        return _trim_zeros([format(v, f".{DIGITS}e") for v in values])
    return fixed


_FIXED = f".{DIGITS}f"


def _fmt(v: float, spec: str) -> str:
    return "NaN" if math.isnan(v) else format(v, spec)


def _trim_zeros(cells: list[str]) -> list[str]:
    """pandas cuts one trailing zero at a time from every decimal number while
    all of them end in one; a number's zeros stop at its decimal point, so that
    is cutting the fewest trailing zeros any of them has."""
    is_number = [_DECIMAL_NUMBER.match(x) is not None for x in cells]
    if not any(is_number):
        return cells
    cut = min(len(x) - len(x.rstrip("0")) for x, n in zip(cells, is_number) if n)
    out = [x[: len(x) - cut] if n else x for x, n in zip(cells, is_number)] if cut else list(cells)
    return [x + "0" if n and x.endswith(".") else x for x, n in zip(out, is_number)]


def _object_float(v: float | None) -> str:
    if v is None:
        return "None"
    if math.isnan(v):
        return "NaN"
    text = f"{v: .{DIGITS}f}"
    if _DECIMAL_NUMBER.match(text):  # one number's own trailing zeros
        text = text.rstrip("0")
        if text.endswith("."):
            text += "0"
    return text


def pandas_datetimes(values: Sequence[dt.datetime]) -> list[str]:
    """Format a datetime column the way pandas' ``to_html`` does."""
    if all(v.time() == dt.time(0) for v in values):
        fmt = "%Y-%m-%d"
    elif any(v.microsecond for v in values):
        fmt = "%Y-%m-%d %H:%M:%S.%f"
    else:
        fmt = "%Y-%m-%d %H:%M:%S"
    return [v.strftime(fmt) for v in values]


__all__ = ["Column", "Datetime", "Float", "Int", "Text", "float_column", "pandas_datetimes", "render"]
