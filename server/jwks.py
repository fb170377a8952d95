"""A JSON Web Key Set fetched from an identity provider, cached, refreshed sparingly.

The set is fetched once at start-up and again when a token names a ``kid`` the cache does not
hold (the IdP rotated its keys), or when the cache is older than ``max_age``. Fetches are
single-flight and at most one per ``min_interval`` (30 s), whether they succeed or not, so a
flood of tokens with invented ``kid`` values costs the IdP one request per interval. A failed
fetch keeps the keys already cached: an IdP outage does not log anyone out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import warnings
from typing import Any

import httpx
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import ECKey, JWKRegistry, Key, OKPKey, RSAKey

__all__ = ["JWKSCache", "JWKSError", "import_signing_jwk"]

logger = logging.getLogger(__name__)

# A real JWKS holds a handful of keys (a few kB); anything far bigger is not one.
MAX_JWKS_BYTES = 512 * 1024
MAX_KEYS = 100


class JWKSError(RuntimeError):
    """The JWKS document could not be fetched or is not a JWKS."""


def import_signing_jwk(data: Any) -> Key | None:
    """Import one JWK for signature verification, or None if it must not be used for that.

    Symmetric (``oct``) keys are refused: a JWKS is public, so an HMAC key in it would let anyone
    sign tokens. Keys marked ``use: enc`` and keys joserfc calls weak (RSA below 2048 bits) are
    refused too.
    """
    if not isinstance(data, dict) or data.get("kty") not in ("RSA", "EC", "OKP"):
        return None
    if data.get("use", "sig") != "sig":
        return None
    public = {k: v for k, v in data.items() if k not in ("d", "p", "q", "dp", "dq", "qi")}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", SecurityWarning)
            key = JWKRegistry.import_key(public)
    except (JoseError, SecurityWarning, ValueError, TypeError, KeyError):
        return None
    if not isinstance(key, RSAKey | ECKey | OKPKey):
        return None
    return key


class JWKSCache:
    """The keys of one JWKS URL. Call :meth:`start` in the event loop, :meth:`aclose` at exit."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 3.0,
        min_interval: float = 30.0,
        max_age: float = 3600.0,
    ) -> None:
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"the JWKS URL must be http(s), got {url!r}")
        self.url = url
        self.timeout = timeout
        self.min_interval = min_interval
        self.max_age = max_age
        self._keys: dict[str, Key] = {}
        self._unnamed: list[Key] = []
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()
        self._client: httpx.AsyncClient | None = None
        self.fetches = 0

    async def start(self) -> None:
        """Fetch the keys once. A failure is logged, not raised: cached-or-not, the server runs,
        and the next unknown ``kid`` after ``min_interval`` tries again."""
        self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        await self.refresh()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def keys(self) -> list[Key]:
        return [*self._keys.values(), *self._unnamed]

    def _may_fetch(self) -> bool:
        last = self._attempted_at
        return last is None or time.monotonic() - last >= self.min_interval

    def _stale(self) -> bool:
        return self._fetched_at is None or time.monotonic() - self._fetched_at >= self.max_age

    async def refresh(self) -> bool:
        """Fetch now (single-flight, rate-limited). True if the cache was replaced."""
        async with self._lock:
            if not self._may_fetch():
                return False
            self._attempted_at = time.monotonic()
            self.fetches += 1
            try:
                keys = await self._fetch()
            except JWKSError as exc:
                logger.warning("JWKS fetch from %s failed, keeping cached keys: %s", self.url, exc)
                return False
            self._keys = {k.kid: k for k in keys if k.kid}
            self._unnamed = [k for k in keys if not k.kid]
            self._fetched_at = time.monotonic()
            logger.info("JWKS from %s: %d signing key(s)", self.url, len(keys))
            return True

    async def _fetch(self) -> list[Key]:
        if self._client is None:
            raise JWKSError("not started")
        try:
            async with self._client.stream("GET", self.url) as response:
                if response.status_code != 200:
                    raise JWKSError(f"HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise JWKSError(f"document larger than {MAX_JWKS_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise JWKSError(f"{type(exc).__name__}: {exc}") from None
        try:
            doc = json.loads(bytes(body))
        except (ValueError, RecursionError):
            raise JWKSError("not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise JWKSError('not a JWKS (no "keys" list)')
        keys = [k for k in map(import_signing_jwk, doc["keys"][:MAX_KEYS]) if k is not None]
        if not keys:
            raise JWKSError("no usable signing keys")
        return keys

    async def candidates(self, kid: str | None) -> list[Key]:
        """Keys that may have signed a token with this ``kid`` (all keys if it names none)."""
        if self._stale() and self._may_fetch():
            await self.refresh()
        if kid is None:
            return self.keys
        key = self._keys.get(kid)
        if key is None and self._may_fetch():
            await self.refresh()
            key = self._keys.get(kid)
        return [key] if key is not None else []
