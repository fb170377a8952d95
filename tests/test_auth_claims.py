"""Claims a token must not get away with, forged with the standard library (no JOSE library
that might refuse to build them): a user id with control characters, duplicate member names."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import asyncpg
import httpx
import pytest

from tests.conftest import SECRET, LiveServer, create_task


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def forge(header_json: str, payload_json: str, secret: str = SECRET) -> str:
    """An HS256 JWS over the given JSON texts, exactly as written (duplicates and all)."""
    signing_input = f"{_b64(header_json.encode())}.{_b64(payload_json.encode())}"
    mac = hmac.new(secret.encode(), signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def claims(sub: str = "alice") -> str:
    return json.dumps({"sub": sub, "exp": int(time.time()) + 600})


async def _get(server: LiveServer, client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.get(
        f"{server.url}/api/v1/tasks/t1", headers={"Authorization": f"Bearer {token}"}
    )


async def test_forged_token_helper_makes_valid_tokens(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """The control: a well-formed forged token is accepted, so the refusals below are real."""
    await create_task(sql, "t1")
    r = await _get(server, client, forge('{"alg":"HS256","typ":"JWT"}', claims()))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "sub", ["alice\nadmin", "alice\r\n", "\x00", "a\x1bb", "a\x7f", "a\x85b", "\t"]
)
async def test_sub_with_control_characters_is_an_invalid_token(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection, sub: str
) -> None:
    await create_task(sql, "t1")
    r = await _get(server, client, forge('{"alg":"HS256"}', claims(sub)))
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "Token has no usable 'sub' claim"
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'


@pytest.mark.parametrize(
    "header, payload",
    [
        # The later "sub" would win with json.loads: a token that reads as alice to one parser
        # and as mallory to another.
        ('{"alg":"HS256"}', '{"sub":"mallory","exp":%d,"sub":"alice"}'),
        ('{"alg":"HS256"}', '{"sub":"alice","exp":1,"exp":%d}'),
        ('{"alg":"HS256","alg":"HS256"}', '{"sub":"alice","exp":%d}'),
        ('{"alg":"none","alg":"HS256"}', '{"sub":"alice","exp":%d}'),
        ('{"alg":"HS256"}', '{"sub":"alice","exp":%d,"x":{"a":1,"a":2}}'),
    ],
    ids=["sub-twice", "exp-twice", "alg-twice", "alg-none-then-hs256", "nested-twice"],
)
async def test_duplicate_member_names_are_an_invalid_token(
    server: LiveServer,
    client: httpx.AsyncClient,
    sql: asyncpg.Connection,
    header: str,
    payload: str,
) -> None:
    await create_task(sql, "t1")
    token = forge(header, payload % (int(time.time()) + 600))
    r = await _get(server, client, token)
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "Token names a header or claim twice"
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
