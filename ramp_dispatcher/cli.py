"""``ramp-dispatcher``: the command line. Parsing only; each command calls one module."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from .config import ServerConfig, load_server_config, server_config_for_url
from .errors import UserError

log = logging.getLogger("ramp_dispatcher")


def _setup_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    if verbosity < -1:
        level = logging.ERROR
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Third-party chatter stays out of an admin's journal unless asked for.
    for noisy in ("alembic", "botocore", "paramiko"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    for handler in logging.getLogger().handlers:
        handler.addFilter(_without_dask_tracebacks)


def _without_dask_tracebacks(record: logging.LogRecord) -> bool:
    """distributed logs a lost scheduler connection with the tracebacks of its
    closed comms and cancelled tasks: its line is kept, the traceback (noise in
    an operator's journal) is not; the dask worker's own line says what the
    outage means."""
    if record.name.startswith("distributed.") and record.exc_info:
        record.exc_info = None
        record.exc_text = None
    return True


def _server(args: argparse.Namespace) -> ServerConfig:
    if getattr(args, "url", None):
        return server_config_for_url(args.url)
    if getattr(args, "config", None):
        return load_server_config(args.config)
    raise UserError("give the server config with --config FILE (or a database --url)")


def _engine(args: argparse.Namespace):
    from .database.engine import make_engine

    return make_engine(_server(args).database_url)


# --------------------------------------------------------------------------- db


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from .database import migrate

    engine = _engine(args)
    for line in migrate.upgrade(engine, args.revision):
        print(line)
    return 0


def cmd_db_downgrade(args: argparse.Namespace) -> int:
    from .database import migrate

    engine = _engine(args)
    for line in migrate.downgrade(engine, args.revision):
        print(line)
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    from .database import migrate

    print(migrate.current(_engine(args)) or "none (not managed by ramp-dispatcher)")
    return 0


# --------------------------------------------------------------------------- admin


def cmd_deploy_event(args: argparse.Namespace) -> int:
    from .config import load_event_config
    from .database import admin

    server = _server(args)
    event = load_event_config(args.event_config, server)
    engine = _engine(args)
    with engine.begin() as conn:
        admin.deploy_event(conn, event.ramp, force=args.force)
    print(f"event {event.ramp.event_name!r} of problem {event.ramp.problem_name!r} deployed")
    return 0


def cmd_add_problem(args: argparse.Namespace) -> int:
    from .database import admin

    with _engine(args).begin() as conn:
        admin.add_problem(conn, args.problem, Path(args.kit_dir), Path(args.data_dir))
    print(f"problem {args.problem!r} added")
    return 0


def cmd_add_event(args: argparse.Namespace) -> int:
    from .database import admin

    with _engine(args).begin() as conn:
        admin.add_event(
            conn,
            problem_name=args.problem,
            event_name=args.event,
            event_title=args.title or args.event,
            sandbox_name=args.sandbox,
            submissions_dir=Path(args.submissions_dir),
            is_public=args.public,
        )
    print(f"event {args.event!r} added")
    return 0


def cmd_add_user(args: argparse.Namespace) -> int:
    from .database import admin

    with _engine(args).begin() as conn:
        admin.add_user(
            conn,
            name=args.name,
            password=args.password,
            email=args.email or f"{args.name}@localhost",
            access_level=args.access_level,
        )
    print(f"user {args.name!r} (and individual team) added")
    return 0


def cmd_sign_up_team(args: argparse.Namespace) -> int:
    from .database import admin

    with _engine(args).begin() as conn:
        admin.sign_up_team(conn, args.event, args.team)
    print(f"team {args.team!r} signed up to {args.event!r}")
    return 0


def cmd_add_submission(args: argparse.Namespace) -> int:
    from .database import admin

    with _engine(args).begin() as conn:
        submission_id = admin.add_submission(
            conn,
            event_name=args.event,
            team_name=args.team,
            submission_name=args.name,
            source_dir=Path(args.path),
        )
    print(f"submission {args.name!r} added as submission_{submission_id:09d}")
    return 0


# --------------------------------------------------------------------------- run, demo


def cmd_run(args: argparse.Namespace) -> int:
    from .config import load_event_config
    from .service import run_daemon

    server = _server(args)
    event = load_event_config(args.event_config, server)
    return run_daemon(server, event)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.dir), n_workers=args.n_workers)


# --------------------------------------------------------------------------- operations


def _engine_at_head(args: argparse.Namespace):
    """The operations read and write our runs table: the schema must be current."""
    from .database.revision import require_head

    engine = _engine(args)
    require_head(engine, args.config)
    return engine


def cmd_status(args: argparse.Namespace) -> int:
    from .status import status_text

    if args.limit < 0:
        raise UserError("--limit must be 0 or more")
    engine = _engine_at_head(args)
    print(status_text(engine, args.event, args.event_config, args.json, args.limit))
    return 0


def _submission_action(args: argparse.Namespace, action: str) -> int:
    from .database import control

    with _engine_at_head(args).begin() as conn:
        ref = control.find_submission(conn, args.submission, args.event)
        do = control.retry_submission if action == "retry" else control.cancel_submission
        print(do(conn, ref))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    return _submission_action(args, "retry")


def cmd_cancel(args: argparse.Namespace) -> int:
    return _submission_action(args, "cancel")


# --------------------------------------------------------------------------- parser


def _add_db_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="ramp-board server config.yml (section sqlalchemy)")
    g.add_argument("--url", help="database URL instead of --config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ramp-dispatcher",
        description="Run RAMP submissions from a ramp-board database and write back results.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging")
    # -v/-q are accepted after the command too (`ramp-dispatcher run ... -v`).
    verbosity = argparse.ArgumentParser(add_help=False)
    verbosity.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging")
    verbosity.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS, help="less logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str, **kw):
        p = sub.add_parser(name, help=help, description=help, parents=[verbosity], **kw)
        p.set_defaults(func=func)
        return p

    p = add("run", cmd_run, "run the dispatcher daemon for one event")
    _add_db_args(p)
    p.add_argument("--event-config", required=True, help="the event's config.yml")

    p = add("demo", cmd_demo, "build an SQLite iris deployment in DIR and run it to completion")
    p.add_argument("dir", nargs="?", default="demo-deployment", help="folder (default: %(default)s)")
    p.add_argument("--n-workers", type=int, default=2, help="parallel runs (default: %(default)s)")

    p = add("status", cmd_status, "show an event's waiting, running and finished submissions")
    _add_db_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--event", help="event name (default: the database's only event)")
    g.add_argument("--event-config", help="take the event name from this event config.yml")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--limit", type=int, default=20, help="rows per list (default: %(default)s)"
    )

    ref_help = (
        "submission id (42), on-disk name (submission_000000042), "
        "or TEAM/NAME or NAME with --event"
    )
    for name, func, help in (
        ("retry", cmd_retry, "requeue a failed submission (a new attempt; history kept)"),
        ("cancel", cmd_cancel, "cancel a waiting submission, or stop a running one"),
    ):
        p = add(name, func, help)
        p.add_argument("submission", help=ref_help)
        _add_db_args(p)
        p.add_argument("--event", help="the submission's event (needed for TEAM/NAME or NAME)")

    db = sub.add_parser("db", help="database schema: upgrade, downgrade, current")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    for name, func, default, help in (
        ("upgrade", cmd_db_upgrade, "head", "create or adopt the schema, apply our migrations"),
        ("downgrade", cmd_db_downgrade, "baseline", "remove what ramp-dispatcher added"),
    ):
        p = db_sub.add_parser(name, help=help, description=help, parents=[verbosity])
        p.set_defaults(func=func)
        _add_db_args(p)
        p.add_argument("revision", nargs="?", default=default, help="(default: %(default)s)")
    p = db_sub.add_parser("current", help="print the schema revision", parents=[verbosity])
    p.set_defaults(func=cmd_db_current)
    _add_db_args(p)

    admin = sub.add_parser("admin", help="set up problems, events, teams, submissions")
    a_sub = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")

    def add_admin(name: str, func: Callable[[argparse.Namespace], int], help: str):
        p = a_sub.add_parser(name, help=help, description=help, parents=[verbosity])
        p.set_defaults(func=func)
        _add_db_args(p)
        return p

    p = add_admin("deploy-event", cmd_deploy_event, "add the problem and event of an event config")
    p.add_argument("--event-config", required=True, help="the event's config.yml")
    p.add_argument("--force", action="store_true", help="replace an existing event of that name")
    p = add_admin("add-problem", cmd_add_problem, "add a problem from a ramp kit")
    p.add_argument("--problem", required=True)
    p.add_argument("--kit-dir", required=True)
    p.add_argument("--data-dir", required=True)
    p = add_admin("add-event", cmd_add_event, "add an event (cv folds, score types from the kit)")
    p.add_argument("--problem", required=True)
    p.add_argument("--event", required=True)
    p.add_argument("--title")
    p.add_argument("--sandbox", default="starting_kit")
    p.add_argument("--submissions-dir", required=True)
    p.add_argument("--public", action="store_true")
    p = add_admin("add-user", cmd_add_user, "add a user and its individual team")
    p.add_argument("--name", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--email")
    p.add_argument("--access-level", default="user", choices=("admin", "user"))
    p = add_admin("sign-up-team", cmd_sign_up_team, "sign a team up to an event (approved)")
    p.add_argument("--event", required=True)
    p.add_argument("--team", required=True)
    p = add_admin("add-submission", cmd_add_submission, "add a submission from a folder")
    p.add_argument("--event", required=True)
    p.add_argument("--team", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--path", required=True, help="folder holding the submission's files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose - args.quiet)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"ramp-dispatcher: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
