"""Operations endpoints: ``/readyz`` and ``/metrics``, and the periodic NOTIFY-queue sample.

``/metrics`` is open unless ``TASKSTREAM_METRICS_TOKEN`` is set; then it wants
``Authorization: Bearer <that token>`` (what Prometheus's ``authorization`` scrape option sends).

``/healthz`` (in :mod:`server.app`) says the process is alive; ``/readyz`` says it can do its job:
a load balancer or Kubernetes should send streams only to an instance whose database answers and
whose LISTEN connection (in bus mode: its NATS connection) is up, because a stream opened
elsewhere would get its snapshot and then nothing until the listener is back. It also says when
the process is close to its file-descriptor limit (:mod:`server.descriptors`), where new
connections are about to be refused.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

import asyncpg
from quart import Blueprint, Response, request

from server import db, metrics
from server.descriptors import WATCH as descriptors
from server.http import json_error, runtime
from server.openapi import responds, security, summarize
from server.schemas import Readiness
from server.stream.bus import NatsBus

__all__ = ["blueprint", "flush_tally", "sample_queue_usage"]

logger = logging.getLogger(__name__)

blueprint = Blueprint("ops", __name__)

READY_DB_TIMEOUT = 2.0


@blueprint.get("/readyz")
@summarize(
    "Readiness check.",
    "200 when the database answers and the LISTEN connection is up, so this instance "
    "can serve streams; 503 otherwise (or while shutting down).",
)
@responds(200, "Ready.", Readiness)
@responds(503, "Not ready; `reasons` says why.", Readiness, headers={"Retry-After": "2"})
@security()
async def readyz() -> Response:
    rt = runtime()
    reasons: list[str] = []
    if rt.draining:
        reasons.append("shutting down")
    if not rt.broker.connected.is_set():
        if isinstance(rt.broker.source, NatsBus):
            reasons.append("NATS connection is down")
        else:
            reasons.append("LISTEN connection is down")
    if descriptors.sample():
        reasons.append("file descriptors near the limit")
    try:
        await asyncio.wait_for(rt.pool.fetchval("SELECT 1"), READY_DB_TIMEOUT)
    except db.DATABASE_ERRORS:
        reasons.append("database does not answer")
    if reasons:
        body = {"status": "unavailable", "reasons": reasons}
        response = Response(_json(body), status=503, content_type="application/json")
        response.headers["Retry-After"] = "2"
        return response
    return Response(_json({"status": "ready"}), status=200, content_type="application/json")


def _json(body: object) -> str:
    return json.dumps(body)


@blueprint.get("/metrics")
@summarize("Prometheus metrics.", "This process's metrics in the Prometheus text format.")
@responds(200, "The metrics.", text=("text/plain", "Prometheus text exposition format 0.0.4."))
@responds(401, "`TASKSTREAM_METRICS_TOKEN` is set and the request lacks it as a bearer.")
@security()
async def prometheus_metrics() -> Response:
    expected = runtime().settings.metrics_token
    if expected is not None and not _bearer_matches(request.headers.get("Authorization"), expected):
        # Not an AuthError: that handler counts stream errors and speaks of JWTs.
        return json_error(401, "Metrics token required", WWW_Authenticate='Bearer realm="metrics"')
    return Response(metrics.render(), status=200, content_type=metrics.CONTENT_TYPE_LATEST)


def _bearer_matches(authorization: str | None, expected: str) -> bool:
    """Whether ``authorization`` is ``Bearer <expected>``, compared in constant time."""
    scheme, _, value = (authorization or "").partition(" ")
    # compare_digest needs ASCII str (or bytes); a header may hold any Latin-1 text.
    given = value.strip().encode("latin-1", "replace")
    return scheme.lower() == "bearer" and hmac.compare_digest(given, expected.encode("ascii"))


async def sample_queue_usage(pool: asyncpg.Pool, interval: float) -> None:
    """Every ``interval`` seconds, read ``pg_notification_queue_usage()`` into its gauge.

    A queue that fills up means some LISTEN session is not reading (often one stuck in a long
    transaction); at 100 % every NOTIFY, and so every task update, fails at commit.
    """
    while True:
        try:
            usage = await asyncio.wait_for(
                pool.fetchval("SELECT pg_notification_queue_usage()"), interval
            )
            metrics.NOTIFY_QUEUE_USAGE.set(float(usage))
        except db.DATABASE_ERRORS as exc:
            logger.debug("notification queue sample failed: %s", type(exc).__name__)
        await asyncio.sleep(interval)


async def flush_tally(interval: float) -> None:
    """Move the data path's plain counters into prometheus-client (see :class:`metrics.Tally`)."""
    while True:
        await asyncio.sleep(interval)
        metrics.TALLY.flush()
