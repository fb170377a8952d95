"""Bearer-token authentication: JWTs verified with joserfc.

The token is taken from ``Authorization: Bearer`` or, because the browser's EventSource cannot set
headers, from the ``access_token`` query parameter. Failures follow RFC 6750: a request without a
token is told ``WWW-Authenticate: Bearer``; a bad token ``Bearer error="invalid_token"``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

__all__ = ["AuthError", "Principal", "TokenVerifier", "extract_token", "issue_token"]

MAX_TOKEN_BYTES = 8192


class AuthError(Exception):
    """The request is not authenticated; ``challenge`` is the WWW-Authenticate value."""

    def __init__(self, message: str, *, token_sent: bool) -> None:
        super().__init__(message)
        self.message = message
        self.challenge = 'Bearer error="invalid_token"' if token_sent else "Bearer"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who the caller is, from a verified token."""

    user_id: str
    expires_at: float
    scopes: frozenset[str] = frozenset()


def _import_key(secret: str) -> OctKey:
    return OctKey.import_key(secret.encode("utf-8"))


class TokenVerifier:
    """Verifies HS256 tokens signed with one shared secret."""

    def __init__(
        self, secret: str, *, algorithms: Sequence[str] = ("HS256",), leeway: int = 30
    ) -> None:
        if not secret:
            raise ValueError("a JWT secret is required")
        self._key = _import_key(secret)
        self._algorithms = list(algorithms)
        self.leeway = leeway

    def verify(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("Token too large", token_sent=True)
        try:
            decoded = jwt.decode(token, self._key, algorithms=self._algorithms)
            registry = jwt.JWTClaimsRegistry(leeway=self.leeway, exp={"essential": True})
            registry.validate(decoded.claims)
        except JoseError as exc:
            raise AuthError(_describe(exc), token_sent=True) from None
        except (ValueError, TypeError):
            raise AuthError("Malformed token", token_sent=True) from None
        claims = decoded.claims
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("Token has no subject", token_sent=True)
        scope = claims.get("scope", "")
        scopes = frozenset(scope.split()) if isinstance(scope, str) else frozenset()
        return Principal(user_id=sub, expires_at=float(claims["exp"]), scopes=scopes)


def _describe(exc: JoseError) -> str:
    name = type(exc).__name__
    if name == "ExpiredTokenError":
        return "Token expired"
    if name == "InvalidClaimError" and "nbf" in str(exc):
        return "Token not yet valid"
    if name == "MissingClaimError":
        return "Token is missing a required claim"
    if name == "BadSignatureError":
        return "Invalid token signature"
    return "Invalid token"


def extract_token(authorization: str | None, query_token: str | None) -> str | None:
    """The raw token from the header (preferred) or the query string, or None if neither."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthError("Authorization header must be 'Bearer <token>'", token_sent=True)
        return value.strip()
    if query_token:
        return query_token
    return None


def issue_token(secret: str, subject: str, *, ttl: int = 3600, scopes: Sequence[str] = ()) -> str:
    """Sign an HS256 token for ``subject`` (used by ``taskstream token`` and tests)."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": subject, "iat": now, "exp": now + ttl}
    if scopes:
        claims["scope"] = " ".join(scopes)
    return jwt.encode({"alg": "HS256"}, claims, _import_key(secret))
