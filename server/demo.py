"""Demo mode (``taskstream serve --demo``): a token for a fixed user and a simulated worker.

For a local try-out of the demo page only. ``GET /demo/token`` hands a valid token for the user
``demo`` to anyone who asks, so these routes exist only when demo mode is on; never enable it on a
server that others can reach.

The simulated worker is an ordinary writer: it updates ``taskstream.tasks`` with plain SQL through
the pool, and the triggers and broker do the rest, exactly as for a real worker. Each demo task
follows a plan derived from its id and its age (``queued`` → ``downloading`` → ``transcribing`` →
``success``, about one in six ``failed``), so the plan is the same in every server process: with
``--workers N`` the N simulators write identical values, and the version trigger turns the
repeats into no-ops.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import asyncpg
from quart import Blueprint, Response, jsonify
from quart_schema.extension import hide

from server import db
from server.auth import issue_token
from server.events import TERMINAL_STATES, TaskState
from server.http import authenticate, json_error, runtime

__all__ = [
    "DEMO_TASK_PREFIX",
    "DEMO_USER",
    "Step",
    "blueprint",
    "plan_step",
    "run_simulator",
    "simulate_once",
]

logger = logging.getLogger(__name__)

blueprint = Blueprint("demo", __name__)

DEMO_USER = "demo"
DEMO_TASK_PREFIX = "demo_"
DEMO_TOKEN_TTL = 3600
# A local demo, but a stuck button or a script should not fill the table.
MAX_ACTIVE_DEMO_TASKS = 50
TICK_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class Step:
    """Where a demo task should be at a given age."""

    state: str
    progress: float
    estimated_time: int | None
    error: str | None = None


def plan_step(task_id: str, age: float) -> Step:
    """The state of demo task ``task_id`` ``age`` (simulated) seconds after it was created.

    Pure and deterministic: the durations and the fate (success, or failure part-way through
    transcribing) come from a hash of the id.
    """
    if age < 0:
        raise ValueError("age must not be negative")
    h = hashlib.sha256(task_id.encode("utf-8")).digest()
    queued_for = 1.0 + (h[0] % 20) / 10  # 1 to 3 s
    download_for = 3.0 + h[1] % 4  # 3 to 6 s
    transcribe_for = 8.0 + h[2] % 8  # 8 to 15 s
    fails = h[3] % 6 == 0
    fail_at = 0.3 + (h[4] % 50) / 100  # fraction of transcribing done when it fails
    total = queued_for + download_for + transcribe_for
    eta = max(0, math.ceil(total - age))
    if age < queued_for:
        return Step("queued", 0.0, eta)
    t = age - queued_for
    if t < download_for:
        return Step("downloading", round(30.0 * t / download_for, 1), eta)
    t -= download_for
    done = t / transcribe_for
    if fails and done >= fail_at:
        progress = round(30.0 + 70.0 * fail_at, 1)
        # An offset into the (imaginary) recording, written as a duration: "00:41:07" read
        # like the time of day the crash happened.
        offset = 60 + int.from_bytes(h[5:7], "big") % 3540  # 1 to 60 minutes
        return Step(
            "failed",
            progress,
            None,
            f"simulated failure: the decoder crashed {offset // 60} min {offset % 60} s "
            "into the recording",
        )
    if done < 1.0:
        return Step("transcribing", round(30.0 + 70.0 * done, 1), eta)
    return Step("success", 100.0, 0)


async def simulate_once(pool: asyncpg.Pool, *, speed: float = 1.0) -> int:
    """Move every active demo task to where its plan says it is now; return how many changed."""
    rows = await pool.fetch(
        """
        SELECT id, state, progress, estimated_time, error,
               extract(epoch FROM clock_timestamp() - created_at)::float8 AS age
          FROM taskstream.tasks
         WHERE starts_with(id, $1) AND NOT (state = ANY($2::text[]))
        """,
        DEMO_TASK_PREFIX,
        list(TERMINAL_STATES),
    )
    changed = 0
    for row in rows:
        step = plan_step(row["id"], max(0.0, row["age"]) * speed)
        current = (row["state"], row["progress"], row["estimated_time"], row["error"])
        if current == (step.state, step.progress, step.estimated_time, step.error):
            continue
        # The state guard keeps a cancel (or any terminal write) that raced this tick.
        status = await pool.execute(
            """
            UPDATE taskstream.tasks
               SET state = $2, progress = $3, estimated_time = $4, error = $5
             WHERE id = $1 AND NOT (state = ANY($6::text[]))
            """,
            row["id"],
            step.state,
            step.progress,
            step.estimated_time,
            step.error,
            list(TERMINAL_STATES),
        )
        changed += status == "UPDATE 1"
    return changed


async def run_simulator(pool: asyncpg.Pool, *, speed: float = 1.0) -> None:
    """Advance demo tasks every half second until cancelled."""
    logger.warning(
        "demo mode: simulated worker running and /demo/token hands out tokens for user %r; "
        "for local use only, never in production",
        DEMO_USER,
    )
    while True:
        try:
            await simulate_once(pool, speed=speed)
        except (*db.CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            logger.warning("demo worker: database error, retrying: %s", exc)
        await asyncio.sleep(TICK_SECONDS)


@blueprint.while_app_serving
async def _simulator() -> AsyncGenerator[None, None]:
    rt = runtime()
    task = asyncio.create_task(run_simulator(rt.pool, speed=rt.settings.demo_speed))
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        # Our own cancel above; a cancel of this generator itself would have hit `yield` instead.
        pass


@blueprint.get("/demo/token")
@hide  # demo mode is a local try-out, not part of the API
async def demo_token() -> Response:
    """A token for the fixed demo user (demo mode only)."""
    secret = runtime().settings.jwt_secret
    if not secret:  # create_app refuses to start without one; this only narrows the type
        return json_error(500, "No JWT secret configured")
    token = issue_token(secret, DEMO_USER, ttl=DEMO_TOKEN_TTL)
    response = jsonify({"token": token, "user_id": DEMO_USER, "expires_in": DEMO_TOKEN_TTL})
    response.headers["Cache-Control"] = "no-store"
    return response


@blueprint.post("/demo/tasks")
@hide  # demo mode is a local try-out, not part of the API
async def create_demo_task() -> Response:
    """Create a demo task owned by the caller; the simulated worker advances it."""
    principal = await authenticate()
    pool = runtime().pool
    active = await pool.fetchval(
        """
        SELECT count(*) FROM taskstream.tasks
         WHERE owner_id = $1 AND starts_with(id, $2) AND NOT (state = ANY($3::text[]))
        """,
        principal.user_id,
        DEMO_TASK_PREFIX,
        list(TERMINAL_STATES),
    )
    if active >= MAX_ACTIVE_DEMO_TASKS:
        return json_error(
            429, "Too many running demo tasks", f"at most {MAX_ACTIVE_DEMO_TASKS}", Retry_After="5"
        )
    row = await pool.fetchrow(
        f"""
        INSERT INTO taskstream.tasks (id, owner_id, state, progress)
        VALUES ($1, $2, 'queued', 0)
        RETURNING {db.TASK_COLUMNS}
        """,
        DEMO_TASK_PREFIX + secrets.token_hex(6),
        principal.user_id,
    )
    task = TaskState.from_row(dict(row))
    body: dict[str, Any] = {
        **task.progress_data(),
        "error": task.error,
        "created_at": task.created_at,
    }
    response = jsonify(body)
    response.status_code = 201
    return response
