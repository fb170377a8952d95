"""JWT minting for the bench (HS256 with claims sub, iat, exp), same secret as the servers."""

from __future__ import annotations

import time

from joserfc import jwt
from joserfc.jwk import OctKey

__all__ = ["mint"]


def mint(secret: str, sub: str, ttl: int = 3600) -> str:
    """A bearer token for ``sub`` valid for ``ttl`` seconds."""
    now = int(time.time())
    key = OctKey.import_key(secret)
    return jwt.encode({"alg": "HS256"}, {"sub": sub, "iat": now, "exp": now + ttl}, key)
