"""Text helpers that turn a ramp-test log into a submission's error message.

What ramp-test (ramp-workflow 0.7.0) prints matters here:

* its titles and score tables are coloured with ANSI escape sequences
  (``\\x1b[38;5;178m\\x1b[1m...\\x1b[0m``), which must not reach the web page;
* when the participant's code fails it prints the traceback to *stdout* with
  ``print()`` of each ``traceback.format_exception`` chunk, so every frame is
  followed by a blank line, then exits with status 1;
* Python's own tracebacks (e.g. an error in problem.py) go to stderr, without
  those blank lines.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "LOG_TAIL_BYTES",
    "MAX_ERROR_CHARS",
    "bound",
    "error_message",
    "extract_traceback",
    "read_log_tail",
    "strip_ansi",
]

MAX_ERROR_CHARS: int = 10_000

#: how much of a log's end the daemon reads to find the traceback: a
#: traceback longer than this is cut anyway (MAX_ERROR_CHARS)
LOG_TAIL_BYTES: int = 256 * 1024

# How many lines to keep when a log holds no traceback.
TAIL_LINES = 20

# An unterminated OSC/DCS stops at the line's end, so a stray ESC ] cannot
# swallow the rest of the log.
_ANSI_RE = re.compile(
    r"""
      \x1b\[ [0-?]* [ -/]* [@-~]                 # CSI: colours, cursor moves
    | \x1b\] [^\x07\x1b\n]* (?: \x07 | \x1b\\ )?    # OSC: titles, hyperlinks
    | \x1b [PX^_] [^\x1b\n]* (?: \x1b\\ )?         # DCS, SOS, PM, APC strings
    | \x1b [ -/]* [0-~]                          # other escapes (charset, ESC 7)
    | \x9b [0-?]* [ -/]* [@-~]                   # 8-bit CSI
    | \x1b                                       # a lone ESC left over
    """,
    re.VERBOSE,
)
# Other C0/C1 controls (bell, backspace...) render as garbage in a web page;
# tab and newline are kept, \r is handled separately.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

_TRACEBACK_HEADER_RE = re.compile(
    r"^(?:Traceback|  \+ Exception Group Traceback) \(most recent call last\):\s*$"
)


def strip_ansi(text: str) -> str:
    """Remove terminal escape sequences, control characters and stray ``\\r``.

    A ``\\r`` inside a line (progress bars) is resolved as a terminal would
    show it: only the text after the last non-empty ``\\r`` segment is kept.
    """
    text = _ANSI_RE.sub("", text)
    text = text.replace("\r\n", "\n")
    if "\r" in text:
        lines = []
        for line in text.split("\n"):
            segments = [seg for seg in line.split("\r") if seg]
            lines.append(segments[-1] if segments else "")
        text = "\n".join(lines)
    return _CONTROL_RE.sub("", text)


def read_log_tail(path: Path, max_bytes: int = LOG_TAIL_BYTES) -> str:
    """The last ``max_bytes`` of a log, decoded leniently.

    A log can be as large as a participant makes it: never read it whole.
    When the file is longer, the first (partial) line of the chunk is dropped.
    Raises OSError when the file cannot be read.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        start = max(size - max_bytes, 0)
        f.seek(start)
        data = f.read(max_bytes)
    if start > 0:
        newline = data.find(b"\n")
        if 0 <= newline < len(data) - 1:
            data = data[newline + 1 :]
    return data.decode("utf-8", "replace")


def extract_traceback(log: str) -> str:
    """The last Python traceback in a ramp-test log, header to exception line.

    Without a traceback (killed by a signal, a timeout...), the last
    ``TAIL_LINES`` non-empty lines instead, which is where the reason is.
    """
    lines = [line.rstrip() for line in strip_ansi(log).split("\n")]
    start = None
    for i in range(len(lines) - 1, -1, -1):
        if _TRACEBACK_HEADER_RE.match(lines[i]):
            start = i
            break
    if start is None:
        return "\n".join([line for line in lines if line.strip()][-TAIL_LINES:])

    kept = [lines[start]]
    i = start + 1
    # Frames are indented; blank lines between them are rampwf's print()
    # artefacts and are dropped, which gives the same text as error.txt.
    while i < len(lines) and (not lines[i] or lines[i][0].isspace()):
        if lines[i].strip():
            kept.append(lines[i])
        i += 1
    # The exception line, then its continuation (a multi-line message) up to
    # the next blank line.
    while i < len(lines) and lines[i].strip():
        kept.append(lines[i])
        i += 1
    return "\n".join(kept)


def bound(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, keeping head and end.

    The end of a traceback (the exception) matters most, so it gets two
    thirds of the room; a marker line says how much was cut. Cuts fall on
    line boundaries when one is near.
    """
    if limit <= 0:
        return ""
    if len(text) <= limit:
        return text
    # Size the marker for the largest possible count, so the result fits.
    marker_room = len(_cut_marker(len(text)))
    room = limit - marker_room
    if room < 2:  # too small for head + marker + end: the end alone
        return text[-limit:]
    head_len = room // 3
    tail_len = room - head_len
    head = text[:head_len]
    tail = text[len(text) - tail_len :]
    # Snap to whole lines when that loses less than half of each part.
    newline = head.rfind("\n")
    if newline >= head_len // 2:
        head = head[:newline]
    newline = tail.find("\n")
    if 0 <= newline <= tail_len // 2:
        tail = tail[newline + 1 :]
    cut = len(text) - len(head) - len(tail)
    return head + _cut_marker(cut) + tail


def _cut_marker(n_cut: int) -> str:
    return f"\n... [{n_cut} characters cut] ...\n"


def error_message(reason: str, detail: str | None) -> str:
    """The text for ``submissions.error_msg``: reason, blank line, detail.

    The detail (a traceback, a log tail) is stripped of escape sequences and
    bounded so that the whole message fits in ``MAX_ERROR_CHARS``.
    """
    reason = strip_ansi(reason).strip()
    cleaned = strip_ansi(detail).strip("\n").rstrip() if detail else ""
    if not cleaned.strip():
        return bound(reason)
    if len(reason) + 2 >= MAX_ERROR_CHARS:  # absurd reason: no room for detail
        return bound(reason)
    return reason + "\n\n" + bound(cleaned, MAX_ERROR_CHARS - len(reason) - 2)


def first_line(exc: BaseException) -> str:
    """An exception in one log line: its message's first line, or its type."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
