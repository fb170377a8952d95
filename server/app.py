"""The Quart application and the per-process runtime it serves from.

Each server process (each Hypercorn worker) builds one :class:`~server.runtime.Runtime` at
start-up: a connection pool for queries, and the stream registry
(:class:`~server.stream.registry.Registry`) fed by the process's one LISTEN connection
(:class:`~server.stream.listener.PgListener`), or with ``TASKSTREAM_NATS_URL`` by the NATS bus
(:class:`~server.stream.bus.NatsBus`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from server import db, hypercorn_internals, metrics, openapi, tickets
from server.api import CANCEL_ALLOW, is_cancel_url
from server.api import blueprint as api_blueprint
from server.auth import AuthError, verifier_from_settings
from server.config import ConfigError, Settings
from server.cors import apply_cors
from server.csrf import CrossSiteRequestRefused
from server.descriptors import SAMPLE_INTERVAL, WATCH
from server.embedded import load_or_create_secret
from server.http import json_error, unavailable
from server.hypercorn_internals import ProxyFixMiddleware
from server.inputguard import Utf8GuardMiddleware
from server.ops import blueprint as ops_blueprint
from server.ops import flush_tally, sample_queue_usage
from server.runtime import Runtime
from server.schemas import Health
from server.sendtimeout import SendTimeoutMiddleware
from server.stream.bus import NatsBus
from server.stream.listener import ChangeSource, PgListener
from server.stream.registry import Registry
from server.stream.routes import blueprint as streams_blueprint
from server.tickets_api import blueprint as tickets_blueprint
from server.web import blueprint as web_blueprint

__all__ = ["Runtime", "create_app", "resolve_secret"]

logger = logging.getLogger(__name__)


def resolve_secret(settings: Settings, *, embedded: bool) -> str | None:
    """The JWT signing secret: configured, or (embedded mode only) generated once and kept.

    None when there is no secret but a public key or JWKS URL verifies tokens instead.
    """
    if settings.jwt_secret:
        return settings.jwt_secret
    if embedded:
        return load_or_create_secret(settings.data_dir)
    if settings.jwt_public_key or settings.jwks_url:
        return None
    raise ConfigError(
        "TASKSTREAM_JWT_SECRET is not set. With DATABASE_URL, set it, TASKSTREAM_JWT_PUBLIC_KEY or "
        "TASKSTREAM_JWKS_URL; taskstream never falls back to a built-in key."
    )


def create_app(settings: Settings | None = None) -> Quart:
    """Build the app. With no DATABASE_URL, the CLI starts the embedded PostgreSQL first and
    passes its URL down; a bare ``create_app()`` under another ASGI server needs DATABASE_URL.
    """
    settings = settings or Settings.from_env()
    if settings.database_url is None:
        raise ConfigError("DATABASE_URL is not set (use `taskstream serve` for embedded mode)")
    runtime = Runtime(
        settings=settings,
        dsn=settings.database_url,
        verifier=verifier_from_settings(settings, resolve_secret(settings, embedded=False)),
    )

    # No app-level static folder: it would serve ./static of whatever directory the server was
    # started in, and shadow the web blueprint's /static/ (the packaged server/static).
    app = Quart("taskstream", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    app.extensions["taskstream"] = runtime
    # App-wide, so routes that other modules register later get the same CORS answers.
    apply_cors(app, settings.cors_origins)

    app.register_blueprint(streams_blueprint)
    app.register_blueprint(ops_blueprint)
    app.register_blueprint(api_blueprint)
    app.register_blueprint(web_blueprint)
    if settings.demo:
        from server.demo import blueprint as demo_blueprint

        app.register_blueprint(demo_blueprint)
    app.register_blueprint(tickets_blueprint)
    send_timeout = SendTimeoutMiddleware(
        app.asgi_app, settings.send_timeout, on_timeout=runtime.count_send_timeout
    )
    app.asgi_app = send_timeout  # type: ignore[method-assign]
    app.asgi_app = Utf8GuardMiddleware(app.asgi_app)  # type: ignore[method-assign]
    if settings.trusted_proxy_hops:
        # Only when the operator says how many proxies stand in front: without one, any client
        # could claim any address in X-Forwarded-For. The access log applies the same rule
        # (server.logs.forwarded_client), since Hypercorn logs its own copy of the scope.
        app.asgi_app = ProxyFixMiddleware(  # type: ignore[method-assign]
            app.asgi_app, mode="legacy", trusted_hops=settings.trusted_proxy_hops
        )

    @app.before_serving
    async def _start() -> None:
        await runtime.verifier.start()  # prefetch the JWKS, if any
        # Once per process: whether the server internals the streams use are as expected.
        hypercorn_internals.check()
        runtime.pool = await db.create_pool(runtime.dsn)
        await runtime.writes.start()
        source: ChangeSource
        if settings.nats_urls:
            # Bus mode: one relay in the fleet listens; this process subscribes to what it serves.
            source = NatsBus(
                runtime.dsn,
                settings.nats_urls,
                prefix=settings.nats_subject_prefix,
                check_interval=settings.listener_check_interval,
                fallback_poll=settings.fallback_poll,
            )
        else:
            source = PgListener(
                runtime.dsn,
                check_interval=settings.listener_check_interval,
                fallback_poll=settings.fallback_poll,
            )
        runtime.broker = Registry(
            source,
            runtime.pool,
            max_streams=settings.max_streams,
            max_streams_per_user=settings.max_streams_per_user,
        )
        try:
            await runtime.broker.start()
        except BaseException:
            await runtime.writes.stop()
            await runtime.pool.close()
            await runtime.verifier.aclose()
            raise
        runtime.background = [
            asyncio.create_task(
                sample_queue_usage(runtime.pool, settings.metrics_sample_interval),
                name="taskstream-queue-sampler",
            ),
            asyncio.create_task(flush_tally(1.0), name="taskstream-metrics-flush"),
            asyncio.create_task(
                tickets.run_sweeper(runtime.pool, settings.ticket_sweep_interval),
                name="taskstream-ticket-sweeper",
            ),
        ]
        logger.info("taskstream ready (pid %d)", os.getpid())
        # This process's file descriptors against its limit, for /metrics, /readyz and the log.
        runtime.background.append(
            asyncio.create_task(WATCH.run(SAMPLE_INTERVAL), name="taskstream-fd-sampler")
        )

    @app.after_serving
    async def _stop() -> None:
        for task in runtime.background:
            task.cancel()
        for task in runtime.background:
            try:
                await task
            except asyncio.CancelledError:
                pass
        runtime.background = []
        metrics.TALLY.flush()
        await send_timeout.close()
        # Every queued write is committed (and answered) before the pool closes.
        await runtime.writes.stop()
        await runtime.broker.stop()
        await runtime.pool.close()
        await runtime.verifier.aclose()

    @app.get("/healthz")
    @openapi.summarize("Liveness check.", "Answers while the process serves.")
    @openapi.responds(200, "Alive.", Health)
    @openapi.security()
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    # After every route exists: the OpenAPI document is generated from the URL map.
    openapi.install(app)

    @app.errorhandler(AuthError)
    async def _auth_error(exc: AuthError) -> Response:
        if request.path.startswith("/api/v1/sse/"):
            metrics.STREAM_ERRORS.labels("auth").inc()
        return json_error(exc.status, exc.message, WWW_Authenticate=exc.challenge)

    @app.errorhandler(CrossSiteRequestRefused)
    async def _cross_site(exc: CrossSiteRequestRefused) -> Response:
        return json_error(exc.status, exc.error, exc.detail)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        if isinstance(exc, MethodNotAllowed):
            # RFC 9110 15.5.6: a 405 must say which methods the resource does allow.
            allowed = (
                CANCEL_ALLOW if is_cancel_url() else ", ".join(sorted(exc.valid_methods or ()))
            )
            return json_error(405, exc.name, Allow=allowed)
        return json_error(exc.code or 500, exc.name)

    async def _database_error(_exc: Exception) -> Response:
        # The one handler of a database that does not answer (or refuses a query): routes let
        # these through instead of catching them one by one.
        return unavailable()

    for error_class in db.DATABASE_ERRORS:
        app.register_error_handler(error_class, _database_error)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        logger.exception("unhandled error")
        return json_error(500, "Internal server error")

    return app
