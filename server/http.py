"""Small HTTP helpers shared by every route: JSON errors and request authentication."""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

from quart import Response, current_app, jsonify, request

from server import tickets
from server.auth import AuthError, Principal, extract_token
from server.csrf import check_cookie_request

__all__ = ["authenticate", "json_error", "runtime"]


def json_error(status: int, error: str, detail: Any = None, **headers: str) -> Response:
    """The one error shape of the API: ``{"error": ..., "detail"?: ...}``."""
    body: dict[str, Any] = {"error": error}
    if detail is not None:
        body["detail"] = detail
    response = jsonify(body)
    response.status_code = status
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def runtime() -> Any:
    """The per-process :class:`server.app.Runtime` (pool, broker, verifier, settings)."""
    return current_app.extensions["taskstream"]


def _single_arg(name: str) -> str | None:
    values = request.args.getlist(name)
    if len(values) > 1:
        # Two credentials in one URL: which one a proxy or cache keyed on is anyone's guess.
        raise AuthError(
            f"give {name} once",
            token_sent=True,
            status=400,
            challenge='Bearer error="invalid_request"',
        )
    return values[0] if values else None


async def authenticate(
    task_ids: Collection[str] | None = None, *, header_only: bool = False
) -> Principal:
    """Verify the caller or raise :class:`AuthError` (turned into a 401/403 by the app).

    Credentials, first found wins: ``Authorization: Bearer``; then (unless ``header_only``)
    ``?ticket=``, which only opens the tasks it was issued for (``task_ids``; None means the
    route is not about specific tasks, so no ticket fits); then ``?access_token=`` (unless
    ``TASKSTREAM_ALLOW_QUERY_TOKEN`` is off); then the ``TASKSTREAM_JWT_COOKIE`` cookie.
    """
    rt = runtime()
    settings = rt.settings
    authorization = request.headers.get("Authorization")
    if authorization or header_only:
        token = extract_token(authorization, None)
    else:
        ticket = _single_arg("ticket")
        if ticket is not None:
            return await _redeem(rt, ticket, task_ids)
        token = _single_arg("access_token")
        if token is not None and not settings.allow_query_token:
            raise AuthError(
                "Tokens in the query string are disabled; use ?ticket= (POST /api/v1/sse/tickets)",
                token_sent=True,
                challenge='Bearer error="invalid_request"',
            )
        if token is None and settings.jwt_cookie:
            token = request.cookies.get(settings.jwt_cookie) or None
            if token is not None:
                # The one ambient credential: a browser sends it whoever's page asks.
                check_cookie_request(settings.cors_origins)
    if token is None:
        raise AuthError("Missing bearer token", token_sent=False)
    principal: Principal = await rt.verifier.verify(token)
    return principal


async def _redeem(rt: Any, ticket: str, task_ids: Collection[str] | None) -> Principal:
    redeemed = await tickets.redeem(rt.pool, ticket)
    if redeemed is None:
        raise AuthError("Invalid, used or expired ticket", token_sent=True)
    if redeemed.principal.expires_at + rt.verifier.leeway < time.time():
        raise AuthError("Token expired", token_sent=True)
    if task_ids is None or not set(task_ids) <= redeemed.task_ids:
        # The caller proved who they are; the ticket just does not cover this stream. RFC 6750
        # calls that insufficient_scope, a 403. The ticket is spent either way, so a leaked one
        # cannot be tried against other tasks.
        raise AuthError(
            "Ticket does not cover this stream",
            token_sent=True,
            status=403,
            challenge='Bearer error="insufficient_scope"',
        )
    return redeemed.principal
