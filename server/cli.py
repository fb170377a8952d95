"""The ``taskstream`` command: serve, migrate, token, attach/detach/sources (see
:mod:`server.sources`), and the terminal client (watch, create, update; see
:mod:`server.client.terminal`).

``serve`` owns process lifetime: it starts the embedded PostgreSQL once (when DATABASE_URL is
unset), applies migrations, checks that NOTIFY reaches a LISTEN connection, binds the sockets, then
runs one or more Hypercorn workers. Each worker builds its own pool and LISTEN connection.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from server import __version__, startsignal
from server.config import ConfigError, Settings
from server.startsignal import StoppedDuringStartup
from server.workers import (
    CannotListen,
    bind,
    hypercorn_config,
    metrics_multiprocess_dir,
    run_worker,
    run_workers,
    setup_logging,
)

if TYPE_CHECKING:
    from server.client.local import LocalTasks

__all__ = ["main"]

logger = logging.getLogger("server.cli")

# What `taskstream --help` says: for the person running the command, not for a developer.
DESCRIPTION = """\
Stream the progress of long-running tasks from PostgreSQL to browsers over Server-Sent Events.

Start with `taskstream serve` (with no DATABASE_URL it runs an embedded PostgreSQL), mint a
token with `taskstream token USER`, and follow a task with `taskstream watch TASK_ID`.
Settings are environment variables (TASKSTREAM_*, DATABASE_URL): see docs/operations.md.
"""


def _resolve_environment(settings: Settings) -> tuple[Settings, Any]:
    """Start the embedded PostgreSQL if needed and export what the workers must inherit."""
    from server.app import resolve_secret
    from server.embedded import EmbeddedPostgres

    embedded = None
    url = settings.database_url
    if url is None:
        embedded = EmbeddedPostgres(settings.data_dir)
        url = embedded.start()
    secret = resolve_secret(settings, embedded=embedded is not None)
    # Workers are spawned processes: they read the same settings from the environment.
    os.environ["DATABASE_URL"] = url
    if secret is not None:
        os.environ["TASKSTREAM_JWT_SECRET"] = secret
    return Settings.from_env(), embedded


async def _prepare_database(url: str) -> None:
    from server import db
    from server.stream.listener import PgListener

    async def ignore_resync(*_args: object, **_kwargs: object) -> None:
        return None

    await db.migrate(url)  # logs each migration it applies
    listener = PgListener(url)
    await listener.start(lambda _state: None, ignore_resync)  # the NOTIFY round-trip self-check
    await listener.stop()


def _check_settings(settings: Settings) -> None:
    """Reject what the server cannot run with before anything starts: the JWT secret (or keys)
    are checked here, not by the first worker after migrations ran and the URL was printed."""
    from server.app import resolve_secret
    from server.auth import verifier_from_settings
    from server.embedded import require_embedded

    if settings.database_url is None:
        require_embedded()
    verifier_from_settings(
        settings, resolve_secret(settings, embedded=settings.database_url is None)
    )


def _serve(args: argparse.Namespace) -> int:
    if args.demo:
        # Workers are spawned processes: they learn about demo mode from the environment.
        os.environ["TASKSTREAM_DEMO"] = "1"
    settings = Settings.from_env()
    setup_logging(settings.log_level)
    _check_settings(settings)
    _raise_descriptor_limit()
    config = hypercorn_config(args, settings)
    # Bind before the database: a port in use fails fast, before anything else is started.
    sockets = bind(config, args.host, args.port)
    all_sockets = sockets.secure_sockets + sockets.insecure_sockets
    embedded = None
    metrics_dir = metrics_multiprocess_dir(args.workers)
    # Until the worker's event loop takes the signals over, SIGTERM unwinds through the
    # `finally` below instead of killing the process with the embedded PostgreSQL running.
    startsignal.install()
    try:
        settings, embedded = _resolve_environment(settings)
        assert settings.database_url is not None
        startsignal.checkpoint()
        asyncio.run(_prepare_database(settings.database_url))
        startsignal.checkpoint()
        if settings.nats_urls:
            from server.stream.bus import check_reachable

            asyncio.run(check_reachable(settings.nats_urls))
            startsignal.checkpoint()
        host, port = all_sockets[0].getsockname()[:2]
        scheme = "https" if args.certfile else "http"
        print(f"taskstream listening on {scheme}://{host}:{port}", flush=True)
        if settings.demo:
            print(
                f"demo mode: open {scheme}://{host}:{port}/ (local use only: anyone who can "
                "reach this port gets a token for the demo user)",
                flush=True,
            )
            if not _is_loopback(args.host):
                logger.warning(
                    "demo mode on a non-loopback address (%s): never in production", args.host
                )
        if args.workers <= 1:
            run_worker(config, sockets)
        else:
            run_workers(config, sockets)
    finally:
        # We are stopping already: a second Ctrl-C or SIGTERM must not cut the clean-up short
        # and leave the embedded PostgreSQL running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for sock in all_sockets:
            sock.close()
        if embedded is not None:
            embedded.stop()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    logger.info("taskstream stopped")
    return 0


def _raise_descriptor_limit() -> None:
    """One descriptor per stream: take all the process may have, and say what it is."""
    from server.descriptors import raise_soft_limit

    before, after = raise_soft_limit()
    logger.info(
        "file descriptor limit (RLIMIT_NOFILE soft): %d (was %d)",
        after,
        before,
        extra={"event": "nofile_limit", "max_fds": after, "max_fds_before": before},
    )


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _migrate(_args: argparse.Namespace) -> int:
    from server import db

    settings = Settings.from_env()
    setup_logging(settings.log_level)
    settings, embedded = _resolve_environment(settings)
    assert settings.database_url is not None
    try:
        applied = asyncio.run(db.migrate(settings.database_url))
    finally:
        if embedded is not None:
            embedded.stop()
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


def _token(args: argparse.Namespace) -> int:
    from server.app import resolve_secret
    from server.auth import issue_token

    settings = Settings.from_env()
    secret = resolve_secret(settings, embedded=settings.database_url is None)
    if secret is None:
        raise ConfigError("`taskstream token` signs with TASKSTREAM_JWT_SECRET, which is not set")
    try:
        token = issue_token(secret, args.sub, ttl=args.ttl, scopes=args.scope or ())
    except ValueError as exc:
        # A secret too short to sign with; the message names the rule, never the secret.
        raise ConfigError(f"TASKSTREAM_JWT_SECRET: {exc}") from None
    print(token)
    return 0


def _sources(args: argparse.Namespace) -> int:
    """``attach``, ``detach`` and ``sources``: the logic is in :mod:`server.sources`."""
    from server.sources import MappingError, SourceError, run_command

    url = Settings.from_env().database_url
    if url is None:
        raise ConfigError(
            f"`taskstream {args.command}` needs DATABASE_URL (the database to attach)"
        )
    try:
        print(asyncio.run(run_command(url, args.command, vars(args))))
    except (MappingError, SourceError) as exc:
        print(f"taskstream {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _states(raw: str) -> list[str]:
    return [s.strip() for s in raw.split(",") if s.strip()]


def _scale(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number is needed, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {raw}")
    return value


def _add_source_commands(sub: Any) -> None:
    attach = _command(
        sub,
        _sources,
        "attach",
        "stream an existing table's rows as tasks",
        "Register TABLE as task source NAME: its rows become tasks 'NAME:<id>' without moving data "
        "or changing the table's writers. Each mapping is a column or an SQL expression over the "
        "row (alias t). Creates a view and a trigger function in schema taskstream and one "
        "trigger on TABLE; `taskstream detach NAME` removes them. See docs/attach.md.",
    )
    attach.add_argument("name", metavar="NAME", help="source name, also the task id prefix")
    attach.add_argument("--table", required=True, help="the table, as schema.table")
    attach.add_argument("--id", required=True, metavar="EXPR", help="the row's id")
    attach.add_argument("--state", required=True, metavar="EXPR", help="the row's state")
    attach.add_argument(
        "--owner",
        metavar="EXPR",
        help="the owning user id; without it, the backend grants tasks with "
        "SELECT taskstream.grant_task(task_id, user_id)",
    )
    attach.add_argument("--progress", metavar="EXPR", help="progress (default: 0)")
    attach.add_argument(
        "--progress-scale",
        type=_scale,
        default=100.0,
        metavar="N",
        help="the progress value meaning done: 1 or 100 (default: %(default)g); clamped",
    )
    attach.add_argument("--eta", metavar="EXPR", help="seconds left")
    attach.add_argument("--error", metavar="EXPR", help="error text")
    attach.add_argument(
        "--terminal",
        type=_states,
        required=True,
        metavar="S1,S2",
        help="states after which the row does not change (they end streams)",
    )
    attach.add_argument(
        "--success",
        type=_states,
        default=[],
        metavar="S1,S2",
        help="the terminal states that mean success (shown as 'success'; the others as 'failed')",
    )
    detach = _command(
        sub,
        _sources,
        "detach",
        "remove an attached source",
        "Remove every object `taskstream attach` created for NAME, and its versions and grants. "
        "The table and its rows are left as they are.",
    )
    detach.add_argument("name", metavar="NAME")
    _command(
        sub,
        _sources,
        "sources",
        "list attached sources",
        "List attached sources and what each maps.",
    )


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number is needed, got {raw!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port number is needed, got {raw!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 to 65535 (0: any free port), got {value}")
    return value


def _command(
    sub: Any, func: Callable[[argparse.Namespace], int], name: str, summary: str, description: str
) -> argparse.ArgumentParser:
    """Add the subcommand ``name`` that runs ``func``."""
    command: argparse.ArgumentParser = sub.add_parser(name, help=summary, description=description)
    command.set_defaults(func=func)
    return command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskstream",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"taskstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve the SSE API (applies migrations first)",
        description=(
            "Apply pending migrations, check that NOTIFY reaches a LISTEN connection, then serve "
            "the SSE API and the task API. With no DATABASE_URL, an embedded PostgreSQL is "
            "started (and stopped at exit). Stop with Ctrl-C or SIGTERM."
        ),
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s; 0.0.0.0 for every interface)",
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=8000,
        help="port to listen on (default: %(default)s; 0 picks a free one)",
    )
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="server processes sharing the port, each with its own LISTEN connection "
        "(default: %(default)s)",
    )
    serve.add_argument("--certfile", help="TLS certificate (enables HTTP/2 over TLS)")
    serve.add_argument("--keyfile", help="TLS private key")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="local try-out: demo page with a token endpoint for user 'demo' and a simulated "
        "worker (never in production)",
    )
    serve.set_defaults(func=_serve)

    _command(
        sub,
        _migrate,
        "migrate",
        "apply pending migrations and exit",
        "Apply pending migrations (sql/*.sql) to DATABASE_URL, or to the embedded PostgreSQL when "
        "it is unset, and exit.",
    )
    token = _command(
        sub,
        _token,
        "token",
        "print a signed JWT for SUB",
        "Print an HS256 JWT for the user SUB, signed with TASKSTREAM_JWT_SECRET (or, with no "
        "DATABASE_URL, the secret generated in the data directory).",
    )
    token.add_argument("sub", metavar="SUB", help="the user (the token's sub claim)")
    token.add_argument(
        "--ttl",
        type=_positive_int,
        default=3600,
        metavar="SECONDS",
        help="lifetime in seconds, at least 1 (default: %(default)s)",
    )
    token.add_argument(
        "--scope",
        action="append",
        help="add a scope, e.g. tasks:write for workers (repeatable; default: none)",
    )

    _add_source_commands(sub)

    from server.client.terminal import add_commands

    add_commands(sub, _local_tasks)
    return parser


def _local_tasks() -> LocalTasks:
    # Imported when create/update run: the API's models pull in Quart, which no other
    # client command needs.
    from server.localtasks import ServerTasks

    return ServerTasks()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "certfile", None) and not getattr(args, "keyfile", None):
        print("taskstream: --certfile needs --keyfile", file=sys.stderr)
        return 2
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"taskstream: configuration error: {exc}", file=sys.stderr)
        return 2
    except CannotListen as exc:
        print(f"taskstream: {exc}", file=sys.stderr)
        return 1
    except StoppedDuringStartup:
        logger.info("taskstream stopped during start-up")
        return 0
    except Exception as exc:
        from server.db import CONNECTION_ERRORS, CONNECTION_REFUSED_ERRORS
        from server.stream.bus import BusUnavailable
        from server.stream.listener import ListenerSelfCheckFailed

        if isinstance(exc, BusUnavailable):
            print(f"taskstream: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, ListenerSelfCheckFailed):
            print(f"taskstream: refusing to start: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, CONNECTION_REFUSED_ERRORS):
            # PostgreSQL's own words ('database "x" does not exist', 'role "y" does not exist',
            # 'password authentication failed for user "y"'): they never carry the password.
            print(
                f"taskstream: PostgreSQL refused the connection: {exc} (check DATABASE_URL)",
                file=sys.stderr,
            )
            return 1
        if isinstance(exc, CONNECTION_ERRORS):
            print(
                f"taskstream: cannot reach PostgreSQL: {type(exc).__name__}: {exc}", file=sys.stderr
            )
            return 1
        raise
    return result
