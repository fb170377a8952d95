"""Small HTTP helpers shared by every route: JSON errors and request authentication."""

from __future__ import annotations

from typing import Any

from quart import Response, current_app, jsonify, request

from server.auth import AuthError, Principal, extract_token

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


def authenticate() -> Principal:
    """Verify the caller's token or raise :class:`AuthError` (turned into a 401 by the app)."""
    token = extract_token(request.headers.get("Authorization"), request.args.get("access_token"))
    if token is None:
        raise AuthError("Missing bearer token", token_sent=False)
    principal: Principal = runtime().verifier.verify(token)
    return principal
