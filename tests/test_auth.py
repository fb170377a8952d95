"""The token verifier on its own: every algorithm, every rejection, and a JWKS served over real
HTTP from 127.0.0.1 (rotation, rate limit, outage)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import threading
import time
import warnings
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, Key, OctKey, OKPKey, RSAKey

from server.auth import AuthError, TokenVerifier, load_public_key
from server.jwks import JWKSCache

# -- keys and tokens -------------------------------------------------------------------------

_KEY_SPECS: dict[str, tuple[str, Any]] = {
    "RS256": ("RSA", 2048),
    "PS256": ("RSA", 2048),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "EdDSA": ("OKP", "Ed25519"),
}


@cache
def private_key(alg: str, n: int = 0) -> Key:
    """Key number ``n`` for ``alg`` (generated once per test session: RSA is slow)."""
    kty, size = _KEY_SPECS[alg]
    cls: Any = {"RSA": RSAKey, "EC": ECKey, "OKP": OKPKey}[kty]
    return cls.generate_key(size, parameters={"kid": f"{alg}-{n}"})  # type: ignore[no-any-return]


def public_jwk(key: Key) -> dict[str, Any]:
    return key.as_dict(private=False)  # type: ignore[no-any-return]


def write_pem(key: Key, path: Path) -> Path:
    path.write_bytes(key.as_pem(private=False))
    return path


def sign(key: Key, alg: str, claims: dict[str, Any], **header: Any) -> str:
    hdr = {"alg": alg, **header}
    with warnings.catch_warnings():
        # joserfc warns on every EdDSA use (RFC 9864 prefers "Ed25519"); IdPs still sign EdDSA.
        warnings.simplefilter("ignore", SecurityWarning)
        return jwt.encode(hdr, claims, key, algorithms=[alg])


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 300, **extra}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    parts = [json.dumps(header).encode(), json.dumps(payload).encode(), signature]
    return ".".join(b64(p) for p in parts)


def forge_hs256(secret: bytes, payload: dict[str, Any]) -> str:
    """An HS256 token signed with any bytes as the secret, built with the standard library.

    Attack tokens are forged here rather than with joserfc: a JOSE library is right to refuse
    to sign with unsafe key material (joserfc 1.7.7 refuses a PEM public key as an oct key),
    and a test must not depend on that refusal to build its attack.
    """
    header = {"alg": "HS256", "typ": "JWT"}
    signing_input = ".".join(b64(json.dumps(part).encode()) for part in (header, payload))
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


async def rejected(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthError) as info:
        await verifier.verify(token)
    assert info.value.status == 401
    assert info.value.challenge == 'Bearer error="invalid_token"'
    assert not token or token not in info.value.message
    return info.value.message


SECRET = secrets.token_urlsafe(48)

# -- each algorithm, good key and bad key ----------------------------------------------------


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hmac_algorithms_good_and_bad_secret(alg: str) -> None:
    verifier = TokenVerifier(SECRET, algorithms=[alg])
    good = sign(OctKey.import_key(SECRET.encode()), alg, claims())
    principal = await verifier.verify(good)
    assert principal.user_id == "alice"
    bad = sign(OctKey.import_key(secrets.token_bytes(48)), alg, claims())
    assert await rejected(verifier, bad) == "Invalid token signature"


@pytest.mark.parametrize("alg", list(_KEY_SPECS))
async def test_asymmetric_algorithms_good_and_bad_key(alg: str, tmp_path: Path) -> None:
    pem = write_pem(private_key(alg), tmp_path / "key.pem")
    verifier = TokenVerifier(public_keys=[load_public_key(pem)], algorithms=[alg])
    principal = await verifier.verify(sign(private_key(alg), alg, claims(scope="read write")))
    assert principal.user_id == "alice" and principal.scopes == {"read", "write"}
    # Same algorithm, same curve, another key pair.
    assert await rejected(verifier, sign(private_key(alg, 1), alg, claims())) == (
        "Invalid token signature"
    )


async def test_algorithm_not_pinned_is_rejected_even_with_the_right_key(tmp_path: Path) -> None:
    pem = write_pem(private_key("RS256"), tmp_path / "key.pem")
    verifier = TokenVerifier(public_keys=[load_public_key(pem)], algorithms=["RS256"])
    token = sign(private_key("RS256"), "PS256", claims())
    assert await rejected(verifier, token) == "Token algorithm not accepted"


async def test_es256_token_cannot_use_a_p384_key(tmp_path: Path) -> None:
    pem = write_pem(private_key("ES384"), tmp_path / "key.pem")
    verifier = TokenVerifier(public_keys=[load_public_key(pem)], algorithms=["ES256", "ES384"])
    assert await rejected(verifier, sign(private_key("ES256"), "ES256", claims())) == (
        "No key to verify this token"
    )


def test_certificate_pem_is_accepted(tmp_path: Path) -> None:
    """Auth0 offers its signing key as an X.509 certificate."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    raw = private_key("RS256").private_key
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(raw.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(raw, hashes.SHA256())
    )
    path = tmp_path / "cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    assert isinstance(load_public_key(path), RSAKey)


def test_weak_or_bad_keys_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenVerifier("short-secret")
    # joserfc warns when it generates a weak key, so build one with cryptography directly.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "weak.pem"
    path.write_bytes(
        weak.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(ValueError, match="2048"):
        load_public_key(path)
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ValueError, match="not a PEM"):
        load_public_key(tmp_path / "junk.pem")
    with pytest.raises(ValueError, match="'none' is never accepted"):
        TokenVerifier(SECRET, algorithms=["HS256", "none"])
    with pytest.raises(ValueError, match="TASKSTREAM_JWT_SECRET"):
        TokenVerifier(public_keys=[private_key("RS256")], algorithms=["HS256"])


# -- rejections, each one shown --------------------------------------------------------------


@pytest.fixture
def rs_verifier(tmp_path: Path) -> TokenVerifier:
    pem = write_pem(private_key("RS256"), tmp_path / "key.pem")
    return TokenVerifier(
        public_keys=[load_public_key(pem)],
        issuer="https://idp.test/",
        audience=["taskstream"],
        leeway=5,
    )


def rs_token(**extra: Any) -> str:
    return sign(
        private_key("RS256"),
        "RS256",
        claims(**{"iss": "https://idp.test/", "aud": "taskstream", **extra}),
    )


async def test_well_formed_token_passes(rs_verifier: TokenVerifier) -> None:
    assert (await rs_verifier.verify(rs_token())).user_id == "alice"
    # aud may be a list; one match is enough.
    assert (await rs_verifier.verify(rs_token(aud=["other", "taskstream"]))).user_id == "alice"


async def test_alg_none_is_rejected(rs_verifier: TokenVerifier) -> None:
    for alg in ("none", "None", "NONE"):
        token = unsigned(
            {"alg": alg, "typ": "JWT"}, claims(iss="https://idp.test/", aud="taskstream")
        )
        assert await rejected(rs_verifier, token) == "Token algorithm not accepted"


async def test_alg_none_is_rejected_even_by_an_hmac_verifier() -> None:
    token = unsigned({"alg": "none"}, claims())
    assert await rejected(TokenVerifier(SECRET), token) == "Token algorithm not accepted"


async def test_hs_rs_confusion_public_key_as_hmac_secret_is_rejected(tmp_path: Path) -> None:
    """The classic attack: sign HS256 with the server's RSA public key (PEM bytes) as the secret."""
    pem = write_pem(private_key("RS256"), tmp_path / "key.pem").read_bytes()
    forged = forge_hs256(pem, claims())
    # The forger itself is sound: with the real secret its token is accepted.
    hs_only = TokenVerifier(SECRET, algorithms=["HS256"])
    assert (await hs_only.verify(forge_hs256(SECRET.encode(), claims()))).user_id == "alice"
    public = load_public_key(tmp_path / "key.pem")
    # Public key only: HS256 is not even accepted.
    assert await rejected(TokenVerifier(public_keys=[public]), forged) == (
        "Token algorithm not accepted"
    )
    # Both families pinned and a secret configured: HS256 is checked with the secret alone,
    # never with RSA key material, so the forgery still fails.
    both = TokenVerifier(SECRET, public_keys=[public], algorithms=["RS256", "HS256"])
    assert await rejected(both, forged) == "Invalid token signature"
    assert (await both.verify(sign(private_key("RS256"), "RS256", claims()))).user_id == "alice"


async def test_expired_token_is_rejected(rs_verifier: TokenVerifier) -> None:
    assert await rejected(rs_verifier, rs_token(exp=int(time.time()) - 60)) == "Token expired"


async def test_leeway_accepts_a_just_expired_token(rs_verifier: TokenVerifier) -> None:
    assert rs_verifier.leeway == 5
    assert (await rs_verifier.verify(rs_token(exp=int(time.time()) - 2))).user_id == "alice"


async def test_not_yet_valid_token_is_rejected(rs_verifier: TokenVerifier) -> None:
    token = rs_token(nbf=int(time.time()) + 120)
    assert await rejected(rs_verifier, token) == "Token not yet valid"


async def test_token_issued_in_the_future_is_rejected(rs_verifier: TokenVerifier) -> None:
    # joserfc 1.6.0 raised a bare InvalidTokenError here (and for nbf), hence joserfc>=1.6.1.
    token = rs_token(iat=int(time.time()) + 120)
    assert await rejected(rs_verifier, token) == "Token issued in the future"


async def test_wrong_issuer_is_rejected(rs_verifier: TokenVerifier) -> None:
    token = rs_token(iss="https://evil.test/")
    assert await rejected(rs_verifier, token) == "Token issuer not accepted"


async def test_missing_issuer_is_rejected(rs_verifier: TokenVerifier) -> None:
    token = sign(private_key("RS256"), "RS256", claims(aud="taskstream"))
    assert await rejected(rs_verifier, token) == "Token is missing a required claim"


async def test_wrong_audience_is_rejected(rs_verifier: TokenVerifier) -> None:
    assert await rejected(rs_verifier, rs_token(aud="billing")) == "Token audience not accepted"
    assert await rejected(rs_verifier, rs_token(aud=["billing"])) == "Token audience not accepted"


async def test_missing_exp_is_rejected(rs_verifier: TokenVerifier) -> None:
    c = claims(iss="https://idp.test/", aud="taskstream")
    del c["exp"]
    token = sign(private_key("RS256"), "RS256", c)
    assert await rejected(rs_verifier, token) == "Token is missing a required claim"


@pytest.mark.parametrize("exp", [float("inf"), float("nan"), 10**400, True, "tomorrow"])
async def test_exp_that_never_expires_is_rejected(rs_verifier: TokenVerifier, exp: Any) -> None:
    assert await rejected(rs_verifier, rs_token(exp=exp)) in {
        "Token expiry is not a valid time",
        "Invalid token",
        "Token expired",
    }


async def test_oversized_token_is_rejected(rs_verifier: TokenVerifier) -> None:
    token = rs_token(padding="x" * 9000)
    assert len(token) > 8192
    assert await rejected(rs_verifier, token) == "Token too large"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a.b",
        "a.b.c.d",
        "!!!.@@@.###",
        b64(b"[" * 3000) + ".e30.",
        b64(b'{"alg": 1}') + ".e30.",
        b64(b'{"alg": "RS256", "kid": 7}') + ".e30.",
        b64(b'{"alg": "RS256"}') + "." + b64(b"[" * 5000) + ".AAAA",
        "\udcff.\x00.\u202e",
    ],
)
async def test_garbage_is_rejected_not_raised(rs_verifier: TokenVerifier, token: str) -> None:
    assert await rejected(rs_verifier, token) in {
        "Malformed token",
        "Invalid token",
        "Invalid token signature",
    }


async def test_user_claim_is_configurable(rs_verifier: TokenVerifier, tmp_path: Path) -> None:
    pem = write_pem(private_key("RS256"), tmp_path / "key.pem")
    verifier = TokenVerifier(public_keys=[load_public_key(pem)], user_claim="email")
    token = sign(private_key("RS256"), "RS256", claims(email="alice@example.test"))
    assert (await verifier.verify(token)).user_id == "alice@example.test"
    no_email = sign(private_key("RS256"), "RS256", claims())
    assert await rejected(verifier, no_email) == "Token has no usable 'email' claim"


# -- JWKS over real HTTP ---------------------------------------------------------------------


class JWKSServer:
    """A JWKS endpoint on 127.0.0.1 whose document a test can change, or take down."""

    def __init__(self, keys: list[Key]) -> None:
        self.doc: dict[str, Any] = {"keys": [public_jwk(k) for k in keys]}
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                outer.requests += 1
                body = json.dumps(outer.doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.up = True

    def serve(self, keys: list[Key]) -> None:
        self.doc = {"keys": [public_jwk(k) for k in keys]}

    def stop(self) -> None:
        """Take the server down for good: connections are refused from now on."""
        if self.up:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(5)
            self.up = False


@pytest.fixture
def jwks_server() -> Iterator[JWKSServer]:
    server = JWKSServer([private_key("RS256"), private_key("ES256")])
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def jwks_verifier(url: str, **cache_kwargs: Any) -> Any:
    verifier = TokenVerifier(jwks=JWKSCache(url, timeout=1.0, **cache_kwargs))
    await verifier.start()
    try:
        yield verifier
    finally:
        await verifier.aclose()


async def test_jwks_keys_verify_tokens_by_kid(jwks_server: JWKSServer) -> None:
    async with jwks_verifier(jwks_server.url) as verifier:
        for alg in ("RS256", "ES256"):
            token = sign(private_key(alg), alg, claims(), kid=f"{alg}-0")
            assert (await verifier.verify(token)).user_id == "alice"
        assert jwks_server.requests == 1


async def test_jwks_key_rotation_is_picked_up_via_new_kid(jwks_server: JWKSServer) -> None:
    async with jwks_verifier(jwks_server.url, min_interval=0.2) as verifier:
        new_key = private_key("ES256", 2)
        token = sign(new_key, "ES256", claims(), kid="ES256-2")
        # Too soon after the start-up fetch: the rate limit holds, the unknown kid fails.
        assert await rejected(verifier, token) == "No key to verify this token"
        assert jwks_server.requests == 1
        jwks_server.serve([private_key("RS256"), new_key])  # the IdP rotates
        await asyncio.sleep(0.25)
        assert (await verifier.verify(token)).user_id == "alice"
        assert jwks_server.requests == 2
        # The rotated-out key is gone once the new set is loaded.
        old = sign(private_key("ES256"), "ES256", claims(), kid="ES256-0")
        assert await rejected(verifier, old) == "No key to verify this token"


async def test_unknown_kids_fetch_at_most_once_per_interval(jwks_server: JWKSServer) -> None:
    async with jwks_verifier(jwks_server.url) as verifier:  # default: 30 s
        for i in range(20):
            token = sign(private_key("RS256"), "RS256", claims(), kid=f"invented-{i}")
            await rejected(verifier, token)
        assert jwks_server.requests == 1


async def test_jwks_outage_keeps_cached_keys_working(
    jwks_server: JWKSServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with jwks_verifier(jwks_server.url, min_interval=0.0) as verifier:
        jwks_server.stop()
        token = sign(private_key("RS256"), "RS256", claims(), kid="RS256-0")
        assert (await verifier.verify(token)).user_id == "alice"
        # An unknown kid tries the (dead) server, fails cleanly, and the cache survives.
        unknown = sign(private_key("RS256", 3), "RS256", claims(), kid="RS256-3")
        started = time.monotonic()
        assert await rejected(verifier, unknown) == "No key to verify this token"
        assert time.monotonic() - started < 2
        assert "keeping cached keys" in caplog.text
        assert (await verifier.verify(token)).user_id == "alice"


async def test_jwks_down_at_start_is_not_fatal_and_recovers(jwks_server: JWKSServer) -> None:
    url = jwks_server.url
    jwks_server.stop()
    async with jwks_verifier(url, min_interval=0.0) as verifier:
        token = sign(private_key("RS256"), "RS256", claims(), kid="RS256-0")
        assert await rejected(verifier, token) == "No key to verify this token"


async def test_jwks_never_yields_hmac_or_encryption_keys() -> None:
    oct_key = OctKey.import_key(SECRET.encode(), parameters={"kid": "hmac"})
    enc = public_jwk(private_key("RS256", 4)) | {"use": "enc", "kid": "enc"}
    server = JWKSServer([])
    server.doc = {"keys": [oct_key.as_dict(), enc, {"kty": "EC", "crv": "nope"}, "junk"]}
    try:
        async with jwks_verifier(server.url) as verifier:
            assert verifier.jwks is not None and verifier.jwks.keys == []
            forged = sign(oct_key, "HS256", claims(), kid="hmac")
            assert await rejected(verifier, forged) == "Token algorithm not accepted"
            enc_token = sign(private_key("RS256", 4), "RS256", claims(), kid="enc")
            assert await rejected(verifier, enc_token) == "No key to verify this token"
    finally:
        server.stop()
