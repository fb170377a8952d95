"""``POST /api/v1/sse/tickets``: trade a bearer token for a one-connection stream ticket.

Only the Authorization header is accepted here: a ticket must be bought with a credential that
never sat in a URL, and a cookie-authenticated POST would be open to cross-site request forgery.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field
from quart import Blueprint, Response, jsonify, request
from quart_schema import document_request

from server import tickets
from server.http import authenticate, json_error, runtime
from server.openapi import responds, security, summarize
from server.ratelimit import retry_after
from server.streams import MAX_TASKS_PER_STREAM, validate_task_id

__all__ = ["blueprint"]

blueprint = Blueprint("tickets", __name__)


def _task_ids(body: Any) -> list[str] | str:
    """The requested task ids, or why the body cannot name them."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if ("task_id" in body) == ("task_ids" in body):
        return 'give exactly one of "task_id" or "task_ids"'
    raw = [body["task_id"]] if "task_id" in body else body["task_ids"]
    if not isinstance(raw, list) or not raw:
        return '"task_ids" must be a non-empty list of strings'
    if len(raw) > MAX_TASKS_PER_STREAM:
        return f"at most {MAX_TASKS_PER_STREAM} task ids per ticket"
    ids: list[str] = []
    for tid in raw:
        if not isinstance(tid, str):
            return "task ids must be strings"
        problem = validate_task_id(tid)
        if problem is not None:
            return problem
        if tid not in ids:
            ids.append(tid)
    return ids


class TicketRequest(BaseModel):
    """Give exactly one of the two."""

    task_id: str | None = Field(default=None, min_length=1, max_length=200)
    task_ids: list[str] | None = Field(default=None, min_length=1, max_length=MAX_TASKS_PER_STREAM)


class TicketResponse(BaseModel):
    ticket: str = Field(description="Opaque; pass as `?ticket=` on a stream URL, once.")
    expires_in: int = Field(description="Seconds left to use it (TASKSTREAM_TICKET_TTL).")


@blueprint.post("/api/v1/sse/tickets")
@summarize(
    "Buy a single-use stream ticket for an EventSource URL.",
    "Send the bearer token in the Authorization header; get a ticket that opens one stream of "
    "the listed tasks once, within `expires_in` seconds, on any server process. Use it as "
    "`?ticket=` instead of putting the token in the URL; buy a new one before reconnecting.",
)
@responds(200, "The ticket.", TicketResponse, headers={"Cache-Control": "no-store"})
@responds(400, "The body is not a JSON object naming 1 to 100 valid task ids.")
@responds(401, "Missing or bad bearer token (only the Authorization header counts here).")
@responds(413, "The body is over 64 KiB.")
@responds(
    429,
    "Too many tickets for this user (TASKSTREAM_TICKET_RATE).",
    headers={"Retry-After": "Seconds until the next ticket"},
)
@responds(503, "The database is unreachable; see Retry-After.")
@security({"bearerAuth": []})
@document_request(TicketRequest)
async def create_ticket() -> Response:
    principal = await authenticate(header_only=True)
    rt = runtime()
    wait = rt.ticket_limiter.take(principal.user_id)
    if wait > 0:
        return json_error(
            429,
            "Too many tickets",
            f"at most {rt.settings.ticket_rate} a minute per user (TASKSTREAM_TICKET_RATE)",
            Retry_After=retry_after(wait),
        )
    raw = await request.get_data()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        # ValueError covers bad JSON, bad UTF-8 and integers past Python's 4300-digit limit.
        return json_error(400, "Invalid JSON body")
    ids = _task_ids(body)
    if isinstance(ids, str):
        return json_error(400, "Invalid ticket request", ids)
    ttl: int = rt.settings.ticket_ttl
    ticket = await tickets.issue(rt.pool, principal, ids, ttl=ttl)
    response = jsonify({"ticket": ticket, "expires_in": ttl})
    # A ticket is a credential: no cache may keep it.
    response.headers["Cache-Control"] = "no-store"
    return response
