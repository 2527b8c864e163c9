"""A real client: ramp-frontend 0.10.1's own Flask app shows what our daemon just did.

The daemon runs the iris kit for three teams on a fresh database (real
``ramp-test``, ``hunger_policy: exit``); the moment it has stopped, with no
refresh run by hand, ramp-frontend (Flask's test client, logged in as each
user) must show every scored submission's score on the leaderboard, every
failed one on the failed list with its error message, and each participant's
own submissions on their "my submissions" page. (``/event_plots`` needs an
older pandas and bokeh: left out.)
"""

from __future__ import annotations

import html
import re
import warnings
from pathlib import Path

import pytest
from sqlalchemy import select

from ramp_dispatcher.database import admin
from ramp_dispatcher.database import ramp_schema as rs
from ramp_dispatcher.demo import EVENT, TEAM, write_submission

from deployment import GOOD, RAISES, SYNTAX_ERROR, Deployment

#: participant -> {submission name: estimator source}
PARTICIPANTS = {
    "alice": {"a_forest": GOOD, "a_raises": RAISES},
    "bob": {"b_forest": GOOD, "b_syntax": SYNTAX_ERROR},
}
OFFICIAL = "acc"
# ramp-frontend's own SQLAlchemy 1.x idioms
pytestmark = pytest.mark.filterwarnings("ignore:.*legacy:sqlalchemy.exc.LegacyAPIWarning")


def _deployment(tmp_path: Path, url: str) -> Deployment:
    dep = Deployment(tmp_path / "deploy", url, {"forest_one": GOOD})
    with dep.engine.begin() as conn:
        for user, subs in PARTICIPANTS.items():
            admin.add_user(conn, name=user, password=f"{user}-pw", email=f"{user}@example.org")
            admin.sign_up_team(conn, EVENT, user)
            for name, source in subs.items():
                folder = write_submission(tmp_path / "incoming" / name, source)
                admin.add_submission(conn, EVENT, user, name, folder)
    return dep


def _app(url: str):
    from ramp_frontend import create_app
    from ramp_utils.frontend import DEFAULT_CONFIG

    config = dict(DEFAULT_CONFIG)
    config.update(
        SECRET_KEY="test",
        WTF_CSRF_ENABLED=False,
        TESTING=True,
        MAIL_SUPPRESS_SEND=True,
        # ramp-utils builds "<driver>://<user>:<password>@<host>:<port>/<db>",
        # wrong for SQLite; and plain "postgresql" would mean psycopg 3 here
        SQLALCHEMY_DATABASE_URI=url,
        LOGGER={"version": 1, "disable_existing_loggers": False},
    )
    return create_app(config)


def _login(client, user: str, password: str) -> None:
    from ramp_frontend.testing import login

    page = login(client, user, password).get_data(as_text=True)
    assert "Log out" in page or "logout" in page, f"{user} could not log in"


def _rows(page: str, name: str) -> list[dict[str, str]]:
    """The table rows (header name -> cell) that show submission ``name``."""
    found = []
    for table in re.findall(r"<thead>.*?</tbody>", page, re.S):
        header = re.findall(r"<th>(.*?)</th>", table)
        for row in re.findall(r"<tr>\s*(<td>.*?)</tr>", table, re.S):
            cells = re.findall(r"<td>(.*?)</td>", row, re.S)
            if len(cells) == len(header) and any(f">{name}</a>" == c[-len(name) - 5 :] or c == name for c in cells):
                found.append(dict(zip(header, cells)))
    return found


def test_ramp_frontend_shows_what_the_daemon_did(empty_db_url: str, tmp_path: Path) -> None:
    dep = _deployment(tmp_path, empty_db_url)
    dep.run_until_done()
    # nothing else runs between the daemon's stop and the pages being read

    s, ss, est = rs.submissions, rs.submission_scores, rs.event_score_types
    with dep.engine.connect() as conn:
        subs = conn.execute(
            select(s.c.id, s.c.name, s.c.state, s.c.error_msg, s.c.hash_).where(s.c.name != "starting_kit")
        ).all()
        precision, score = {}, {}
        for r in conn.execute(
            select(ss.c.submission_id, ss.c.valid_score_cv_bag, est.c.name, est.c.precision)
            .join(est, est.c.id == ss.c.event_score_type_id)
        ):
            score[(r.submission_id, r.name)] = r.valid_score_cv_bag
            precision[r.name] = r.precision
    by_name = {r.name: r for r in subs}
    scored = [r for r in subs if r.state == "scored"]
    failed = [r for r in subs if "error" in r.state]
    assert {r.name for r in scored} == {"forest_one", "a_forest", "b_forest"}
    assert {r.name for r in failed} == {"a_raises", "b_syntax"}

    db_url = dep.engine.url.render_as_string(hide_password=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app = _app(db_url)
    owners = {name: user for user, names in PARTICIPANTS.items() for name in names}

    # the admin sees the whole leaderboard, and the failed and new lists
    with app.test_client() as client:
        _login(client, TEAM, "demo")
        page = client.get(f"/events/{EVENT}/leaderboard").get_data(as_text=True)
        for r in scored:
            rows = _rows(page, r.name)
            assert len(rows) == 1, f"{r.name} not on the leaderboard"
            for name in ("acc", "nll"):
                shown = float(rows[0][name])
                assert shown == pytest.approx(round(score[(r.id, name)], precision[name])), name
            assert rows[0]["team"] == owners.get(r.name, TEAM)
        for r in failed:
            rows = _rows(page, r.name)
            assert len(rows) == 1, f"{r.name} not on the failed list"
            assert f">{r.state}</a>" in rows[0]["error"]
            error_page = client.get(f"/{r.hash_}/error.txt").get_data(as_text=True)
            assert r.error_msg and html.escape(r.error_msg.splitlines()[0], quote=False) in error_page
        for state in ("new", "sent_to_training", "training"):  # nothing left waiting
            assert f"<td>{state}</td>" not in page

    # each participant sees their own submissions, and only theirs
    for user, names in PARTICIPANTS.items():
        with app.test_client() as client:
            _login(client, user, f"{user}-pw")
            page = client.get(f"/events/{EVENT}/my_submissions").get_data(as_text=True)
            for name in names:
                rows = _rows(page, name)
                assert len(rows) == 1, f"{user}'s {name} not on their page"
                sub = by_name[name]
                if sub.state == "scored":
                    shown = float(rows[0][OFFICIAL])
                    assert shown == pytest.approx(
                        round(score[(sub.id, OFFICIAL)], precision[OFFICIAL])
                    )
                else:
                    assert f">{sub.state}</a>" in rows[0]["error"]
            others = [n for u, ns in PARTICIPANTS.items() if u != user for n in ns]
            for name in others + ["forest_one"]:
                assert not _rows(page, name), f"{name} on {user}'s page"
