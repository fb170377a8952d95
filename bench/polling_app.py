"""Baseline for comparison only: the design document's original "check the database every second".

Same endpoint, auth and events as taskstream, but each open stream runs its own loop
that reads its task row once per second and sends an event when the version moved.
Run it with Hypercorn::

    DATABASE_URL=... TASKSTREAM_JWT_SECRET=... \
        hypercorn bench.polling_app:app --worker-class uvloop --bind 127.0.0.1:8001
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey
from quart import Quart, Response, make_response, request

__all__ = ["app"]

POLL_INTERVAL = 1.0
TERMINAL = frozenset({"success", "failed", "cancelled"})
SELECT = (
    "SELECT owner_id, state, progress, estimated_time, error, version, updated_at "
    "FROM taskstream.tasks WHERE id = $1"
)

app = Quart(__name__)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


@app.before_serving
async def _startup() -> None:
    app.config["POOL"] = await asyncpg.create_pool(
        os.environ["DATABASE_URL"],
        min_size=1,
        max_size=int(os.environ.get("POLLING_POOL_SIZE", "10")),
    )
    app.config["KEY"] = OctKey.import_key(os.environ["TASKSTREAM_JWT_SECRET"])


@app.after_serving
async def _shutdown() -> None:
    await app.config["POOL"].close()


def _user() -> str | None:
    auth = request.headers.get("Authorization", "")
    token = auth[7:] if auth[:7].lower() == "bearer " else request.args.get("access_token")
    if not token:
        return None
    try:
        tok = jwt.decode(token, app.config["KEY"], algorithms=["HS256"])
        jwt.JWTClaimsRegistry(exp={"essential": True}).validate(tok.claims)
    except (JoseError, ValueError):
        return None
    sub = tok.claims.get("sub")
    return sub if isinstance(sub, str) else None


def _event(name: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    head = f"event: {name}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return (head + "data: " + json.dumps(data, separators=(",", ":")) + "\n\n").encode()


def _progress(task_id: str, row: asyncpg.Record) -> bytes:
    data = {
        "task_id": task_id,
        "state": row["state"],
        "progress": float(row["progress"]),
        "estimated_time": row["estimated_time"],
        "updated_at": row["updated_at"].isoformat(),
        "version": row["version"],
    }
    return _event("progress", data, row["version"])


def _complete(row: asyncpg.Record) -> bytes:
    data: dict[str, Any] = {"state": row["state"]}
    if row["state"] == "failed":
        data["error"] = (row["error"] or "")[:4096]
    return _event("complete", data)


@app.get("/api/v1/sse/tasks/<task_id>/progress")
async def progress(task_id: str) -> Response | tuple[dict[str, str], int, dict[str, str]]:
    user = _user()
    if user is None:
        return {"error": "invalid or missing token"}, 401, {"WWW-Authenticate": "Bearer"}
    pool = app.config["POOL"]
    timeout = _env_float("TASKSTREAM_STREAM_TIMEOUT", 600.0)
    heartbeat = _env_float("TASKSTREAM_HEARTBEAT", 15.0)

    async def stream() -> AsyncIterator[bytes]:
        not_found = _event("error", {"error": "Task not found"})
        row = await pool.fetchrow(SELECT, task_id)
        if row is None or row["owner_id"] != user:
            yield not_found
            return
        yield _progress(task_id, row)
        if row["state"] in TERMINAL:
            yield _complete(row)
            return
        last = row["version"]
        start = time.monotonic()
        next_beat = start + heartbeat
        while time.monotonic() - start < timeout:
            await asyncio.sleep(POLL_INTERVAL)
            row = await pool.fetchrow(SELECT, task_id)
            if row is None:
                yield not_found
                return
            if row["version"] != last:
                last = row["version"]
                yield _progress(task_id, row)
                if row["state"] in TERMINAL:
                    yield _complete(row)
                    return
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + heartbeat
                yield b": heartbeat\n\n"
        yield _event("timeout", {"message": "Stream timeout"})

    response = await make_response(
        stream(),
        {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )
    assert isinstance(response, Response)
    response.timeout = None
    return response
