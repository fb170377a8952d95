"""JWT minting for the bench (HS256 with claims sub, iat, exp), same secret as the servers."""

from __future__ import annotations

import time

from joserfc import jwt
from joserfc.jwk import OctKey

__all__ = ["mint"]


def mint(secret: str, sub: str, ttl: int = 3600, scope: str | None = None) -> str:
    """A bearer token for ``sub`` valid for ``ttl`` seconds (with ``scope``, e.g. a worker's
    ``tasks:write``)."""
    now = int(time.time())
    key = OctKey.import_key(secret)
    claims: dict[str, object] = {"sub": sub, "iat": now, "exp": now + ttl}
    if scope is not None:
        claims["scope"] = scope
    return jwt.encode({"alg": "HS256"}, claims, key)
