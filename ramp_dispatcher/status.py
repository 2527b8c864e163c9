"""``ramp-dispatcher status``: the event at a glance, as a table or as JSON.

It reads the database only (:mod:`.database.reports`), so it works from any
host that can reach the database, whether a daemon runs or not.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any, Sequence

from sqlalchemy import Connection, Engine

from .breaker import BreakerSnapshot
from .config import Section, read_yaml
from .database import reports
from .database.reports import DaemonReport, EventReport
from .errors import UserError

__all__ = ["format_report", "printable", "report_to_json", "resolve_event_name", "status_text"]

#: longest message shown in a table cell (the JSON has the whole first line)
MESSAGE_WIDTH = 80


# --------------------------------------------------------------------------- event


def event_name_from_config(path: str | Path) -> str:
    """``ramp.event_name`` of an event config (nothing else is read or checked:
    status needs no worker settings)."""
    path = Path(path).absolute()
    return Section(path, "ramp", read_yaml(path).get("ramp")).required(
        "event_name", str, "a string"
    )


def resolve_event_name(
    conn: Connection, event: str | None = None, event_config: str | Path | None = None
) -> str:
    """``--event``, else the event config's event, else the database's only event."""
    if event:
        return event
    if event_config:
        return event_name_from_config(event_config)
    names = reports.event_names(conn)
    if len(names) == 1:
        return names[0]
    if not names:
        raise UserError("the database has no event yet")
    raise UserError(
        f"the database has {len(names)} events ({', '.join(names)}): "
        "choose one with --event or --event-config"
    )


def status_text(
    engine: Engine,
    event: str | None = None,
    event_config: str | Path | None = None,
    as_json: bool = False,
    limit: int = 20,
) -> str:
    with reports.read_only(engine) as conn:
        report = reports.event_report(conn, resolve_event_name(conn, event, event_config), limit)
    if as_json:
        return json.dumps(report_to_json(report), indent=2)
    return format_report(report)


# --------------------------------------------------------------------------- JSON


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        # ramp-board's timestamps are naive UTC: say so in the output
        return value.replace(tzinfo=dt.timezone.utc).isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def report_to_json(report: EventReport) -> dict[str, Any]:
    c = report.counts
    data = dataclasses.asdict(report)
    data["counts"] = {
        "by_state": dict(sorted(c.by_state.items())),
        "waiting": c.waiting,
        "running": c.running,
        "done": c.done,
        "failed": c.failed,
        "total": c.total,
    }
    return _jsonable(data)


# --------------------------------------------------------------------------- table

# What must not reach the admin's terminal as is: C0/C1 controls (escape
# sequences, newlines, backspace), line/paragraph separators and the bidi
# overrides that reorder what a terminal shows.
_UNPRINTABLE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with control characters shown as Python-style escapes
    (``\\x1b``, ``\\n``), so a stored name cannot drive the terminal or
    break a table row. The JSON output keeps the exact text."""
    return _UNPRINTABLE_RE.sub(_escape, text)


def duration(seconds: float | None) -> str:
    """``45s``, ``5m 02s``, ``3h 07m``, ``2d 04h``."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[printable(str(c)) for c in row] for row in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    lines = ["  " + "  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return lines


def _clip(text: str, width: int = MESSAGE_WIDTH) -> str:
    text = printable(text)  # before cutting, so an escape is never cut in half
    return text if len(text) <= width else text[: width - 3] + "..."


def _time(value: dt.datetime | None) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S}"


def _ago(now: dt.datetime, then: dt.datetime | None) -> float | None:
    return None if then is None else max((now - then).total_seconds(), 0.0)


def _breaker(b: BreakerSnapshot, now: dt.datetime) -> str:
    """``closed``; ``open 2m 05s (since ...), next probe in 40s``; ``half-open ...``."""
    if b.state == "closed":
        return "closed"
    held = b.state
    if b.since is not None:
        held += f" {duration(_ago(now, b.since))} (since {_time(b.since)})"
    if b.state != "open":
        return f"{held}, probe run in flight"
    wait = None if b.next_probe_at is None else (b.next_probe_at - now).total_seconds()
    probe = "next probe due" if wait is None or wait <= 0 else f"next probe in {duration(wait)}"
    return f"{held}, {probe}"


def _daemons(daemons: Sequence[DaemonReport], now: dt.datetime) -> list[str]:
    serving = sum(not d.stale for d in daemons)
    stale = len(daemons) - serving
    out = [f"Daemons ({serving} serving" + (f", {stale} stale):" if stale else "):")]
    if not daemons:
        return out + ["  none: no daemon serves this event"]
    rows = [
        [
            f"{d.host}:{d.pid if d.pid is not None else '?'}", d.worker_type, _time(d.started_at),
            f"{duration(_ago(now, d.heartbeat_at))} ago", "STALE" if d.stale else "serving",
            # a stale daemon claims nothing: its breaker is history
            f"{d.breaker.state} when last seen" if d.stale else _breaker(d.breaker, now),
        ]
        for d in daemons
    ]
    out += _table(["daemon", "worker", "started (UTC)", "heartbeat", "state", "circuit breaker"], rows)
    for d, row in zip(daemons, rows):
        b = d.breaker
        if b.state != "closed" and not d.stale:
            failures = "" if b.failures is None else f"{b.failures} infrastructure failures in a row; "
            out.append(f"  {printable(row[0])}: queue held, {failures}last: {_clip(b.cause or '?')}")
        if d.stale:
            out.append(
                f"  {printable(row[0])}: stale, it stopped without saying so "
                f"(no heartbeat since {_time(d.heartbeat_at)} UTC)"
            )
    return out


def format_report(report: EventReport) -> str:
    c = report.counts
    out = [
        f"Event {printable(repr(report.event))} at {_time(report.generated_at)} UTC",
        f"Submissions: {c.summary()} (total {c.total})",
    ]
    if c.by_state:
        out.append(
            "  by state: " + ", ".join(f"{s} {n}" for s, n in sorted(c.by_state.items()))
        )
    out += ["", *_daemons(report.daemons, report.generated_at)]

    out += ["", f"Waiting ({report.n_waiting}):"]
    if report.waiting:
        rows = []
        for w in report.waiting:
            pos = "-" if w.queue_position is None or w.queue_position < 0 else w.queue_position
            note = "" if w.retry_after is None else f"retry after {_time(w.retry_after)}"
            rows.append([pos, w.id, f"{w.team}/{w.name}", duration(w.age_s), note])
        out += _table(["pos", "id", "submission", "age", "note"], rows)
        more = report.n_waiting - len(report.waiting)
        if more > 0:
            out.append(f"  ... and {more} more")
    else:
        out.append("  none")

    out += ["", f"Running ({len(report.running)}):"]
    if report.running:
        rows = []
        for r in report.running:
            where = f"pid {r.pid}" if r.pid is not None else (r.instance_id or "-")
            note = "cancel requested" if r.cancel_requested else ""
            rows.append([
                r.submission_id, f"{r.team}/{r.name}", r.worker_type, r.attempt, r.status,
                duration(r.elapsed_s), where, note,
            ])
        out += _table(
            ["id", "submission", "worker", "attempt", "status", "elapsed", "pid/instance", "note"],
            rows,
        )
    else:
        out.append("  none")

    out += ["", f"Last finished ({len(report.finished)} shown):"]
    if report.finished:
        rows = [
            [
                f.submission_id, f"{f.team}/{f.name}", f.attempt, f.outcome or "-",
                f.failure_class or "-", duration(f.duration_s), _time(f.finished_at),
                _clip(f.message),
            ]
            for f in report.finished
        ]
        out += _table(
            ["id", "submission", "attempt", "outcome", "class", "duration", "finished (UTC)",
             "message"],
            rows,
        )
    else:
        out.append("  none")
    return "\n".join(out)
