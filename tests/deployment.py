"""Build a real deployment (kit, configs, database) for a test, on either backend."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy.engine import make_url

from ramp_dispatcher.config import EventConfig, load_event_config, load_server_config
from ramp_dispatcher.database import queries
from ramp_dispatcher.database.engine import make_engine
from ramp_dispatcher.demo import EVENT, SUBMISSIONS, build_deployment, slow_estimator
from ramp_dispatcher.dispatcher import Dispatcher

GOOD = SUBMISSIONS["random_forest"]
RAISES = SUBMISSIONS["raises_in_fit"]
SYNTAX_ERROR = SUBMISSIONS["syntax_error"]


#: a slow but correct submission: fit sleeps the given seconds
sleeper = slow_estimator


def sqlalchemy_section(url: str) -> str:
    """The server config's ``sqlalchemy`` section (ramp-board format) for a URL."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return f"drivername: sqlite\n  database: {u.database}"
    return (
        f"drivername: postgresql\n  username: {u.username}\n  host: {u.host}\n"
        f"  port: {u.port or 5432}\n  database: {u.database}"
    )


class Deployment:
    def __init__(self, root: Path, url: str, submissions: dict[str, str], **kw):
        self.root = root
        self.server_path, self.event_path = build_deployment(
            root, sqlalchemy_section=sqlalchemy_section(url), submissions=submissions, **kw
        )
        self.server = load_server_config(self.server_path)
        self.engine = make_engine(self.server.database_url)

    def set_worker(self, **keys: object) -> None:
        """Add keys to the event config's worker section (e.g. sandbox="none" for a
        test whose submission reports to the test through a host file)."""
        lines = "".join(f"\n  {k}: {v}" for k, v in keys.items())
        text = self.event_path.read_text()
        self.event_path.write_text(text.replace("  worker_type: conda", "  worker_type: conda" + lines, 1))

    def event_config(self) -> EventConfig:
        return load_event_config(self.event_path, self.server)

    def dispatcher(self) -> Dispatcher:
        return Dispatcher.for_event(self.engine, self.event_config())

    def run_until_done(self, timeout: float = 180.0) -> Dispatcher:
        """Run a dispatcher in this process until hunger_policy exit stops it."""
        d = self.dispatcher()
        d.start()
        try:
            if not d.stopped.wait(timeout):
                raise AssertionError(f"dispatcher did not finish within {timeout} s")
        finally:
            d.stop()
        return d

    def summaries(self) -> dict[str, queries.SubmissionSummary]:
        with self.engine.connect() as conn:
            info = queries.load_event(conn, EVENT)
            return {s.name: s for s in queries.submission_summaries(conn, info)}

    def submission_dir(self, submission_id: int) -> Path:
        return self.event_config().ramp.submissions_dir / f"submission_{submission_id:09d}"


def run_in_thread(d: Dispatcher) -> threading.Thread:
    d.start()
    t = threading.Thread(target=d.stopped.wait, daemon=True)
    t.start()
    return t
