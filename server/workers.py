"""The server processes of ``taskstream serve``: Hypercorn's configuration, the bound sockets,
one worker (in this process) or several (spawned, sharing the sockets), and the metrics
directory several workers share. :mod:`server.cli` decides when; this module does it.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import multiprocessing
import os
import signal
import tempfile
from multiprocessing.synchronize import Event as MPEvent
from typing import Any

from server import startsignal
from server.config import Settings

__all__ = [
    "CannotListen",
    "bind",
    "hypercorn_config",
    "metrics_multiprocess_dir",
    "run_worker",
    "run_workers",
    "setup_logging",
]

logger = logging.getLogger("server.cli")


class CannotListen(RuntimeError):
    """The server could not bind its address (the port is in use, or the host is wrong)."""


def setup_logging(level: str) -> None:
    from server.logs import setup_logging as setup

    setup(level)


def metrics_multiprocess_dir(workers: int) -> str | None:
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


def bind(config: Any, host: str, port: int) -> Any:
    """Bind the listening sockets, or say in one line why not."""
    try:
        return config.create_sockets()
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        if exc.errno == errno.EADDRINUSE:
            reason += " (is another server running there? stop it, or choose another --port)"
        raise CannotListen(f"cannot listen on {host}:{port}: {reason}") from None


def hypercorn_config(args: argparse.Namespace, settings: Settings) -> Any:
    from server.hypercorn_internals import Config

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


def run_worker(config: Any, sockets: Any, shutdown_event: MPEvent | None = None) -> None:
    """Run one server process until a signal (single process) or the master's shutdown event."""
    settings = Settings.from_env()
    setup_logging(settings.log_level)
    import uvloop

    from server import gctuning, hypercorn_internals
    from server.app import create_app

    app = create_app(settings)
    gctuning.apply(settings.gc_thresholds)
    hypercorn_internals.install_peerclose()

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
            # One that came before, while start-up's handler had it, may have been swallowed
            # (see server/startsignal.py): it still stops the server, once the app is up.
            if startsignal.requested():
                stop.set()
        await hypercorn_internals.serve(
            app, config, sockets=sockets, shutdown_trigger=wait_for_stop
        )

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve())


def run_workers(config: Any, sockets: Any) -> None:
    ctx = multiprocessing.get_context("spawn")
    shutdown_event = ctx.Event()

    def stop(*_: Any) -> None:
        shutdown_event.set()

    # Taken over before any worker starts, so a SIGTERM while they start reaches them too.
    signal.signal(signal.SIGTERM, stop)
    if startsignal.requested():
        # Start-up's handler saw one whose raise was swallowed: start no worker.
        return
    # Workers ignore SIGINT (a terminal's Ctrl-C reaches the whole group); the master decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    processes = [
        ctx.Process(
            target=run_worker,
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
