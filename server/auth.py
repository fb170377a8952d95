"""Bearer-token authentication: JWTs verified with joserfc.

Keys come from a shared secret (HS256/384/512), a PEM public key or certificate, and/or an
identity provider's JWKS URL (RS256, PS256, ES256, ES384, EdDSA and the other RSA/EC sizes).
Which key may check a token depends on the token's ``alg`` family alone: an HMAC algorithm only
ever uses the shared secret, an RSA one only RSA keys, and so on. That is what makes HS/RS key
confusion (an RSA public key used as an HMAC secret) impossible, whatever the pinned list says.

Failures follow RFC 6750: a request without a token is told ``WWW-Authenticate: Bearer``; a bad
token ``Bearer error="invalid_token"``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    InvalidKeyCurveError,
    InvalidKeyTypeError,
    JoseError,
    MissingClaimError,
    UnsupportedAlgorithmError,
)
from joserfc.jwk import ECKey, Key, OctKey, OKPKey
from joserfc.jws import JWSRegistry

from server.config import ConfigError, Settings
from server.jwks import JWKSCache
from server.keyfiles import load_public_key

__all__ = [
    "ASYMMETRIC_DEFAULT",
    "MAX_TOKEN_BYTES",
    "SUPPORTED_ALGORITHMS",
    "AuthError",
    "Principal",
    "TokenVerifier",
    "extract_token",
    "issue_token",
    "load_public_key",
    "verifier_from_settings",
]

logger = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 8192
# RFC 7518 3.2: an HMAC key must be at least as long as the hash output.
MIN_SECRET_BYTES = 32

# alg -> (key type, allowed curves). "none" is deliberately absent and can never be pinned.
_ALG_KEYS: dict[str, tuple[str, frozenset[str]]] = {
    **{f"HS{n}": ("oct", frozenset()) for n in (256, 384, 512)},
    **{f"{p}{n}": ("RSA", frozenset()) for p in ("RS", "PS") for n in (256, 384, 512)},
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
SUPPORTED_ALGORITHMS: tuple[str, ...] = tuple(_ALG_KEYS)
# Accepted when a public key or JWKS is configured and TASKSTREAM_JWT_ALGORITHMS is not set.
ASYMMETRIC_DEFAULT: tuple[str, ...] = ("RS256", "PS256", "ES256", "ES384", "EdDSA")
# Trying every key of a big JWKS for a token without ``kid`` would be a CPU amplifier.
_MAX_KEYS_TRIED = 5


class AuthError(Exception):
    """The request is not authenticated (401) or not allowed this resource (403).

    ``challenge`` is the WWW-Authenticate value.
    """

    def __init__(
        self,
        message: str,
        *,
        token_sent: bool,
        status: int = 401,
        challenge: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        if challenge is None:
            challenge = 'Bearer error="invalid_token"' if token_sent else "Bearer"
        self.challenge = challenge


@dataclass(frozen=True, slots=True)
class Principal:
    """Who the caller is, from a verified token."""

    user_id: str
    expires_at: float
    scopes: frozenset[str] = frozenset()


class _Registry(JWSRegistry):
    """joserfc's registry, minus its per-call SecurityWarning for EdDSA (RFC 9864 prefers the
    fully-specified "Ed25519"). The operator pins algorithms explicitly, and a warning per
    request would only fill logs (and fail a test run that turns warnings into errors)."""

    def get_alg(self, name: str) -> Any:
        if name not in _ALG_KEYS or not self.allowed or name not in self.allowed:
            raise UnsupportedAlgorithmError(f"Algorithm of '{name}' is not allowed")
        return self.algorithms[name]


def _secret_key(secret: str) -> OctKey:
    raw = secret.encode("utf-8")
    if len(raw) < MIN_SECRET_BYTES:
        raise ValueError(
            f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes (RFC 7518 3.2); "
            "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return OctKey.import_key(raw)


class DuplicateKeyError(ValueError):
    """A JSON object in a token names the same member twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys, another parser may keep the first: a token
    # that means different things to different readers is refused (RFC 7515 4, RFC 7519 4).
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise DuplicateKeyError("duplicate member name")
    return obj


def _b64json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    raw = base64.urlsafe_b64decode(padded.encode("ascii"))
    return json.loads(raw, object_pairs_hook=_unique_keys)


def _peek_header(token: str) -> dict[str, Any]:
    """The unverified JOSE header: only used to choose the key, never trusted beyond that.

    Both the header and the payload must be JSON without duplicate member names.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("Malformed token", token_sent=True)
    try:
        header = _b64json(parts[0])
        _b64json(parts[1])
    except DuplicateKeyError:
        raise AuthError("Token names a header or claim twice", token_sent=True) from None
    except (ValueError, UnicodeError, binascii.Error, RecursionError):
        raise AuthError("Malformed token", token_sent=True) from None
    if not isinstance(header, dict) or not isinstance(header.get("alg"), str):
        raise AuthError("Malformed token", token_sent=True)
    return header


def _curve(key: Key) -> str | None:
    return key.curve_name if isinstance(key, ECKey | OKPKey) else None


class TokenVerifier:
    """Verifies JWTs against the configured keys and claim rules.

    ``await verify(token)`` may fetch the JWKS (an unknown ``kid``), so it is async. Call
    :meth:`start` once in the serving event loop (prefetches the JWKS) and :meth:`aclose` at exit.
    """

    def __init__(
        self,
        secret: str | None = None,
        *,
        public_keys: Sequence[Key] = (),
        jwks: JWKSCache | None = None,
        algorithms: Sequence[str] | None = None,
        issuer: str | None = None,
        audience: Sequence[str] = (),
        leeway: int = 30,
        user_claim: str = "sub",
    ) -> None:
        if not secret and not public_keys and jwks is None:
            raise ValueError("a JWT secret, public key or JWKS URL is required")
        if leeway < 0:
            raise ValueError("the leeway must not be negative")
        self._secret = _secret_key(secret) if secret else None
        self._public_keys = list(public_keys)
        self.jwks = jwks
        if algorithms is None:
            algorithms = (("HS256",) if secret else ()) + (
                ASYMMETRIC_DEFAULT if public_keys or jwks is not None else ()
            )
        unknown = [a for a in algorithms if a not in _ALG_KEYS]
        if unknown:
            raise ValueError(
                f"unsupported JWT algorithm(s) {', '.join(unknown)}; "
                f"choose from {', '.join(SUPPORTED_ALGORITHMS)} ('none' is never accepted)"
            )
        if not algorithms:
            raise ValueError("at least one JWT algorithm must be accepted")
        self.algorithms = tuple(algorithms)
        if any(a.startswith("HS") for a in self.algorithms) and self._secret is None:
            raise ValueError("an HS* algorithm is pinned but TASKSTREAM_JWT_SECRET is not set")
        self.issuer = issuer
        self.audience = tuple(audience)
        self.leeway = leeway
        self.user_claim = user_claim
        self._registry = _Registry(algorithms=list(self.algorithms))

    async def start(self) -> None:
        if self.jwks is not None:
            await self.jwks.start()

    async def aclose(self) -> None:
        if self.jwks is not None:
            await self.jwks.aclose()

    async def _candidates(self, alg: str, kid: str | None) -> list[Key]:
        kty, curves = _ALG_KEYS[alg]
        if kty == "oct":
            return [self._secret] if self._secret is not None else []
        keys: list[Key] = []
        if self.jwks is not None:
            keys.extend(await self.jwks.candidates(kid))
        keys.extend(self._public_keys)
        fitting = [
            k
            for k in keys
            if k.key_type == kty
            and (not curves or _curve(k) in curves)
            and k.get("alg") in (None, alg)
        ]
        return fitting[:_MAX_KEYS_TRIED]

    async def verify(self, token: str) -> Principal:
        """The caller behind ``token``, or :class:`AuthError` saying why not."""
        if len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES:
            raise AuthError("Token too large", token_sent=True)
        header = _peek_header(token)
        alg = header["alg"]
        if alg not in self.algorithms:
            raise AuthError("Token algorithm not accepted", token_sent=True)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("Malformed token", token_sent=True)
        keys = await self._candidates(alg, kid)
        if not keys:
            raise AuthError("No key to verify this token", token_sent=True)
        decoded = None
        last: JoseError | None = None
        for key in keys:
            try:
                decoded = jwt.decode(token, key, algorithms=[alg], registry=self._registry)
                break
            except JoseError as exc:
                last = exc
            except (ValueError, TypeError, UnicodeError, RecursionError):
                raise AuthError("Malformed token", token_sent=True) from None
        if decoded is None:
            assert last is not None
            raise AuthError(_describe(last), token_sent=True)
        return self._check_claims(decoded.claims)

    def _check_claims(self, claims: Any) -> Principal:
        if not isinstance(claims, dict):
            raise AuthError("Malformed token", token_sent=True)
        options: dict[str, Any] = {"exp": {"essential": True}}
        if self.issuer is not None:
            options["iss"] = {"essential": True, "value": self.issuer}
        if self.audience:
            options["aud"] = {"essential": True, "values": list(self.audience)}
        try:
            jwt.JWTClaimsRegistry(leeway=self.leeway, **options).validate(claims)
        except JoseError as exc:
            raise AuthError(_describe(exc), token_sent=True) from None
        except (ValueError, TypeError):
            raise AuthError("Malformed token", token_sent=True) from None
        # joserfc accepts any number; NaN, infinity or a 400-digit integer would make a token
        # that never expires (or an OverflowError later).
        try:
            exp = float(claims["exp"])
        except (OverflowError, TypeError, ValueError):
            exp = math.nan
        if isinstance(claims["exp"], bool) or not math.isfinite(exp):
            raise AuthError("Token expiry is not a valid time", token_sent=True)
        user = claims.get(self.user_claim)
        if (
            not isinstance(user, str)
            or not user
            or len(user) > 200
            # A user id ends up in logs, metrics labels and owner_id: no line breaks, escapes.
            or any(unicodedata.category(c) == "Cc" for c in user)
        ):
            raise AuthError(f"Token has no usable '{self.user_claim}' claim", token_sent=True)
        return Principal(user_id=user, expires_at=exp, scopes=_scopes(claims))


def verifier_from_settings(settings: Settings, secret: str | None) -> TokenVerifier:
    """The verifier the settings describe; :class:`ConfigError` says what to fix."""
    try:
        public_keys = [load_public_key(settings.jwt_public_key)] if settings.jwt_public_key else []
        jwks = JWKSCache(settings.jwks_url) if settings.jwks_url else None
        return TokenVerifier(
            secret,
            public_keys=public_keys,
            jwks=jwks,
            algorithms=settings.jwt_algorithms,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            leeway=settings.jwt_leeway,
            user_claim=settings.jwt_user_claim,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    # OAuth 2 puts a space-separated "scope"; Okta and Entra ID a list in "scp".
    scope = claims.get("scope")
    if isinstance(scope, str):
        return frozenset(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list):
        return frozenset(s for s in scp if isinstance(s, str))
    return frozenset()


def _describe(exc: JoseError) -> str:
    if isinstance(exc, ExpiredTokenError):
        return "Token expired"
    if isinstance(exc, MissingClaimError):
        return "Token is missing a required claim"
    if isinstance(exc, InvalidClaimError):
        return {
            "nbf": "Token not yet valid",
            "iat": "Token issued in the future",
            "iss": "Token issuer not accepted",
            "aud": "Token audience not accepted",
        }.get(exc.claim, "Invalid token")
    if isinstance(exc, BadSignatureError | InvalidKeyTypeError | InvalidKeyCurveError):
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
    return jwt.encode({"alg": "HS256"}, claims, _secret_key(secret))
