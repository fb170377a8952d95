"""The ``taskstream`` command: serve, migrate, token, and the terminal client (watch, create,
update; see :mod:`server.client.terminal`).

``serve`` owns process lifetime: it starts the embedded PostgreSQL once (when DATABASE_URL is
unset), applies migrations, checks that NOTIFY reaches a LISTEN connection, binds the sockets, then
runs one or more Hypercorn workers. Each worker builds its own pool and LISTEN connection.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from multiprocessing.synchronize import Event as MPEvent
from typing import TYPE_CHECKING, Any

from server import __version__
from server.config import ConfigError, Settings

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


class CannotListen(RuntimeError):
    """The server could not bind its address (the port is in use, or the host is wrong)."""


def _setup_logging(level: str) -> None:
    from server.logs import setup_logging

    setup_logging(level)


def _metrics_multiprocess_dir(workers: int) -> str | None:
    """With several workers, give prometheus-client a shared directory (see server/metrics.py).

    Returns the directory this command created, to remove at exit; None when there is nothing
    to clean up (one worker, or a directory the operator chose with PROMETHEUS_MULTIPROC_DIR).
    Set before anything imports prometheus_client: it picks its storage at import time.
    """
    if workers <= 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    path = tempfile.mkdtemp(prefix="taskstream-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    logger.info("metrics of %d workers merged through %s", workers, path)
    return path


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
    from server.broker import Broker

    await db.migrate(url)  # logs each migration it applies
    broker = Broker(url)
    await broker.start()  # includes the NOTIFY round-trip self-check
    await broker.stop()


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


def _bind(config: Any, host: str, port: int) -> Any:
    """Bind the listening sockets, or say in one line why not."""
    try:
        return config.create_sockets()
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        if exc.errno == errno.EADDRINUSE:
            reason += " (is another server running there? stop it, or choose another --port)"
        raise CannotListen(f"cannot listen on {host}:{port}: {reason}") from None


def _hypercorn_config(args: argparse.Namespace, settings: Settings) -> Any:
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"{args.host}:{args.port}"]
    config.worker_class = "uvloop"
    config.workers = args.workers
    # Streams get SHUTDOWN_GRACE to say goodbye; Hypercorn waits a little longer than that.
    config.graceful_timeout = settings.shutdown_grace + 1.0
    config.keep_alive_timeout = 75
    # Hypercorn's default backlog (100) overflows in a reconnect storm and costs clients 1-3 s
    # SYN retries; the kernel caps it at net.core.somaxconn anyway.
    config.backlog = 4096
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # A structured access log built from the path only: never the query string or headers.
    from server.logs import AccessLogger

    config.logger_class = AccessLogger
    if args.certfile:
        config.certfile = args.certfile
        config.keyfile = args.keyfile
        config.alpn_protocols = ["h2", "http/1.1"]
    return config


def _worker(config: Any, sockets: Any, shutdown_event: MPEvent | None = None) -> None:
    """Run one server process until a signal (single process) or the master's shutdown event."""
    settings = Settings.from_env()
    _setup_logging(settings.log_level)
    import uvloop
    from hypercorn.asyncio.run import worker_serve
    from hypercorn.utils import wrap_app

    from server import gctuning, peerclose
    from server.app import create_app

    app = create_app(settings)
    gctuning.apply(settings.gc_thresholds)
    peerclose.install()

    stop = asyncio.Event()

    async def wait_for_stop() -> None:
        if shutdown_event is not None:

            async def poll() -> None:
                # A multiprocessing Event cannot be awaited; a blocking wait in a thread would
                # keep the interpreter from exiting, so poll it cheaply.
                while not shutdown_event.is_set():  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
                stop.set()

            poller = asyncio.create_task(poll())
        await stop.wait()
        if shutdown_event is not None:
            poller.cancel()
        # Stop taking streams and tell open ones to reconnect elsewhere, then let Hypercorn
        # wait for them to close.
        await app.extensions["taskstream"].drain()

    async def serve() -> None:
        if shutdown_event is None:
            # Before the app starts, not in the shutdown trigger: a SIGTERM that arrives while
            # the app starts up (or right after "taskstream ready") must stop it cleanly too.
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
        await worker_serve(wrapped, config, sockets=sockets, shutdown_trigger=wait_for_stop)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve())


def _serve(args: argparse.Namespace) -> int:
    if args.demo:
        # Workers are spawned processes: they learn about demo mode from the environment.
        os.environ["TASKSTREAM_DEMO"] = "1"
    settings = Settings.from_env()
    _setup_logging(settings.log_level)
    _check_settings(settings)
    config = _hypercorn_config(args, settings)
    # Bind before the database: a port in use fails fast, before anything else is started.
    sockets = _bind(config, args.host, args.port)
    all_sockets = sockets.secure_sockets + sockets.insecure_sockets
    embedded = None
    metrics_dir = _metrics_multiprocess_dir(args.workers)
    # Until the worker's event loop takes the signals over, SIGTERM unwinds through the
    # `finally` below instead of killing the process with the embedded PostgreSQL running.
    signal.signal(signal.SIGTERM, _stopped_during_startup)
    try:
        settings, embedded = _resolve_environment(settings)
        assert settings.database_url is not None
        asyncio.run(_prepare_database(settings.database_url))
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
            _worker(config, sockets)
        else:
            _run_workers(config, sockets)
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


class StoppedDuringStartup(Exception):
    """SIGTERM arrived before the server was ready to drain: nothing to drain, stop cleanly."""


def _stopped_during_startup(_signum: int, _frame: Any) -> None:
    raise StoppedDuringStartup


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _run_workers(config: Any, sockets: Any) -> None:
    ctx = multiprocessing.get_context("spawn")
    shutdown_event = ctx.Event()

    def stop(*_: Any) -> None:
        shutdown_event.set()

    # Taken over before any worker starts, so a SIGTERM while they start reaches them too.
    signal.signal(signal.SIGTERM, stop)
    # Workers ignore SIGINT (a terminal's Ctrl-C reaches the whole group); the master decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    processes = [
        ctx.Process(
            target=_worker,
            kwargs={"config": config, "sockets": sockets, "shutdown_event": shutdown_event},
        )
        for _ in range(config.workers)
    ]
    for p in processes:
        p.start()
    signal.signal(signal.SIGINT, stop)
    from multiprocessing.connection import wait

    pending = list(processes)
    while pending:
        done = wait([p.sentinel for p in pending])
        pending = [p for p in pending if p.sentinel not in done]
        if pending and not shutdown_event.is_set():
            # One worker died on its own: bring the others down rather than serve half a pool.
            logger.error("a worker exited unexpectedly; stopping the others")
            shutdown_event.set()
    for p in processes:
        p.join()


def _migrate(_args: argparse.Namespace) -> int:
    from server import db

    settings = Settings.from_env()
    _setup_logging(settings.log_level)
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

    migrate = sub.add_parser(
        "migrate",
        help="apply pending migrations and exit",
        description="Apply pending migrations (sql/*.sql) to DATABASE_URL, or to the embedded "
        "PostgreSQL when it is unset, and exit.",
    )
    migrate.set_defaults(func=_migrate)

    token = sub.add_parser(
        "token",
        help="print a signed JWT for SUB",
        description="Print an HS256 JWT for the user SUB, signed with TASKSTREAM_JWT_SECRET (or, "
        "with no DATABASE_URL, the secret generated in the data directory).",
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
    token.set_defaults(func=_token)

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
        from server.broker import ListenerSelfCheckFailed
        from server.db import CONNECTION_ERRORS, CONNECTION_REFUSED_ERRORS

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
