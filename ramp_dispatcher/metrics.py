"""An optional Prometheus endpoint: queue, runs, outcomes, durations, loop health.

Stdlib only: the text exposition format (version 0.0.4) is simple enough to
write by hand, and prometheus_client would be one more dependency for five
series. Every series carries an ``event`` label, since one host runs one
daemon per event and a scrape config usually lists them all.

Updates take a lock and touch a few numbers, so the dispatcher can call them
from its loop; :meth:`Metrics.render` copies under the same lock.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable

from .errors import UserError

log = logging.getLogger(__name__)

__all__ = ["CONTENT_TYPE", "DURATION_BUCKETS", "OUTCOMES", "Metrics", "outcome_label"]

PREFIX = "ramp_dispatcher_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: how a collected run ended: "scored", a failure class, or an admin's cancel
OUTCOMES = (
    "scored", "participant", "timeout", "memory", "infrastructure", "configuration", "cancelled"
)
#: run duration histogram buckets, seconds (upper bounds; +Inf is implied)
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 7200.0)


def outcome_label(failure_class: str | None) -> str:
    """The outcome label of a collected run from its ``failure_class`` (None: scored)."""
    return "scored" if failure_class is None else failure_class


class Metrics:
    def __init__(self, event: str, buckets: Iterable[float] = DURATION_BUCKETS):
        self.event = event
        self.buckets = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        self._lock = threading.Lock()
        self._queue_depth = 0
        self._running = 0
        # every label present from the start, so rate() sees a 0 -> 1 step
        self._outcomes = {label: 0 for label in OUTCOMES}
        self._bucket_counts = [0] * (len(self.buckets) + 1)  # last one: +Inf
        self._duration_sum = 0.0
        self._duration_count = 0
        self._last_loop: float | None = None
        self._breaker_open = False
        self._started = time.time()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- updates

    def set_queue_depth(self, n: int) -> None:
        with self._lock:
            self._queue_depth = int(n)

    def set_running(self, n: int) -> None:
        with self._lock:
            self._running = int(n)

    def outcome(self, label: str) -> None:
        if label not in self._outcomes:
            raise ValueError(f"unknown outcome {label!r}: one of {', '.join(OUTCOMES)}")
        with self._lock:
            self._outcomes[label] += 1

    def observe_duration(self, seconds: float) -> None:
        seconds = max(float(seconds), 0.0)
        # non-cumulative counts here; render() accumulates them
        index = next((i for i, b in enumerate(self.buckets) if seconds <= b), len(self.buckets))
        with self._lock:
            self._bucket_counts[index] += 1
            self._duration_sum += seconds
            self._duration_count += 1

    def set_breaker_open(self, is_open: bool) -> None:
        with self._lock:
            self._breaker_open = bool(is_open)

    def loop_ok(self, at: float | None = None) -> None:
        """A loop cycle completed with the database reachable."""
        with self._lock:
            self._last_loop = time.time() if at is None else at

    # ---------------------------------------------------------------- output

    def render(self) -> str:
        with self._lock:
            queue, running = self._queue_depth, self._running
            outcomes = dict(self._outcomes)
            counts = list(self._bucket_counts)
            total, n = self._duration_sum, self._duration_count
            last_loop = self._last_loop
            breaker_open = self._breaker_open
        ev = {"event": self.event}
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> str:
            full = PREFIX + name
            out.append(f"# HELP {full} {_escape_help(help_)}")
            out.append(f"# TYPE {full} {kind}")
            return full

        name = family("queue_depth", "gauge", "Submissions waiting to be run.")
        out.append(_sample(name, ev, queue))
        name = family("running_runs", "gauge", "Runs in progress.")
        out.append(_sample(name, ev, running))
        name = family(
            "run_outcomes_total", "counter",
            "Collected runs by outcome: scored, a failure class, or cancelled.",
        )
        for label, value in outcomes.items():
            out.append(_sample(name, {**ev, "outcome": label}, value))
        name = family("run_duration_seconds", "histogram", "Wall-clock duration of runs.")
        cumulative = 0
        for bound, count in zip((*self.buckets, math.inf), counts):
            cumulative += count
            out.append(_sample(name + "_bucket", {**ev, "le": _number(bound)}, cumulative))
        out.append(_sample(name + "_sum", ev, total))
        out.append(_sample(name + "_count", ev, n))
        name = family(
            "last_successful_loop_timestamp_seconds", "gauge",
            "Unix time of the last loop cycle that reached the database (0: none yet).",
        )
        out.append(_sample(name, ev, 0 if last_loop is None else last_loop))
        name = family(
            "circuit_breaker_open", "gauge",
            "1 while the queue is held because runs keep failing for the platform's reasons.",
        )
        out.append(_sample(name, ev, 1 if breaker_open else 0))
        name = family("start_time_seconds", "gauge", "Unix time the daemon started.")
        out.append(_sample(name, ev, self._started))
        return "\n".join(out) + "\n"

    # ---------------------------------------------------------------- HTTP

    @property
    def serving(self) -> bool:
        """Whether anyone can read the figures (the queue depth costs a query)."""
        return self._server is not None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Answer ``GET /metrics`` on ``host:port`` from a daemon thread; return
        the port (useful with port 0). Loopback by default: the numbers are not
        secret, but an admin should choose to expose them."""
        if self._server is not None:
            raise RuntimeError("metrics server already running")
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = metrics.render().encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                # one line per scrape would flood the journal
                log.debug("metrics: %s %s", self.address_string(), format % args)

        try:
            server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:  # port taken, address not local: the admin must fix it
            raise UserError(
                f"metrics: cannot listen on {host}:{port}: {exc.strerror or exc} "
                "(each event's service needs its own metrics_port)"
            ) from None
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5},
            name="metrics-http", daemon=True,
        )
        self._thread.start()
        actual = server.server_address[1]
        log.info("metrics served on http://%s:%d/metrics", host, actual)
        return actual

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {_number(value)}"


def _number(value: float) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        if math.isnan(value):
            return "NaN"
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    return str(int(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")
