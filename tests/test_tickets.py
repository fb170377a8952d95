"""Stream tickets, query-token and cookie settings, token expiry mid-stream, an IdP end to end."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

import asyncpg
import httpx
import pytest

from tests import conftest
from tests.conftest import SECRET, LiveServer, create_task, run_server
from tests.sse_client import open_stream
from tests.test_auth import JWKSServer, claims, private_key, sign
from tests.test_cli import _clean_env, start_serve

TICKETS = "/api/v1/sse/tickets"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def buy(server: LiveServer, client: httpx.AsyncClient, body: Any, **kw: Any) -> str:
    r = await client.post(server.url + TICKETS, json=body, headers=bearer(server.token(**kw)))
    assert r.status_code == 200, r.text
    data = r.json()
    assert set(data) == {"ticket", "expires_in"} and data["expires_in"] == 60
    assert r.headers["cache-control"] == "no-store"
    ticket: str = data["ticket"]
    return ticket


async def test_ticket_opens_a_stream_once(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    ticket = await buy(server, client, {"task_id": "t1"})
    async with open_stream(client, server.stream_url("t1"), params={"ticket": ticket}) as s:
        assert s.response.status_code == 200
        assert (await s.next()).json()["task_id"] == "t1"
    # The reconnect EventSource would make with the same URL:
    r = await client.get(server.stream_url("t1"), params={"ticket": ticket})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert r.json() == {"error": "Invalid, used or expired ticket"}


async def test_only_a_hash_of_the_ticket_is_stored(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    ticket = await buy(server, client, {"task_ids": ["t1", "t2"]})
    row = await sql.fetchrow("SELECT * FROM taskstream.stream_tickets")
    assert row is not None
    assert row["ticket_hash"] == hashlib.sha256(ticket.encode()).digest()
    assert ticket not in json.dumps({k: str(v) for k, v in dict(row).items()})
    assert row["user_id"] == "alice" and row["task_ids"] == ["t1", "t2"]


async def test_ticket_for_other_tasks_is_403_and_spent(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    await create_task(sql, "t2")
    ticket = await buy(server, client, {"task_id": "t1"})
    r = await client.get(server.stream_url("t2"), params={"ticket": ticket})
    assert r.status_code == 403
    assert r.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
    assert r.json() == {"error": "Ticket does not cover this stream"}
    # Spent on the wrong door: a leaked ticket cannot be tried against task after task.
    r = await client.get(server.stream_url("t1"), params={"ticket": ticket})
    assert r.status_code == 401


async def test_ticket_scopes_the_multi_task_stream(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    for tid in ("a", "b", "c"):
        await create_task(sql, tid, state="success")
    url = server.url + "/api/v1/sse/tasks"
    ticket = await buy(server, client, {"task_ids": ["a", "b"]})
    r = await client.get(url, params={"ids": "b", "ticket": ticket})  # a subset is fine
    assert r.status_code == 200 and b'"task_id":"b"' in r.content
    ticket = await buy(server, client, {"task_ids": ["a", "b"]})
    r = await client.get(url, params={"ids": "a,b,c", "ticket": ticket})
    assert r.status_code == 403
    # The owner-wide stream (no ids) is not about listed tasks, so no ticket fits it.
    ticket = await buy(server, client, {"task_ids": ["a"]})
    assert (await client.get(url, params={"ticket": ticket})).status_code == 403


@pytest.mark.parametrize("settings_overrides", [{"ticket_ttl": 1}])
async def test_ticket_expires(server: LiveServer, client: httpx.AsyncClient) -> None:
    r = await client.post(
        server.url + TICKETS, json={"task_id": "t1"}, headers=bearer(server.token())
    )
    assert r.json()["expires_in"] == 1
    await asyncio.sleep(1.2)
    r2 = await client.get(server.stream_url("t1"), params={"ticket": r.json()["ticket"]})
    assert r2.status_code == 401


async def test_concurrent_redemptions_have_one_winner(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="success")
    ticket = await buy(server, client, {"task_id": "t1"})
    results = await asyncio.gather(
        *(client.get(server.stream_url("t1"), params={"ticket": ticket}) for _ in range(8))
    )
    assert sorted(r.status_code for r in results) == [200] + [401] * 7


@pytest.mark.parametrize("settings_overrides", [{"jwt_leeway": 0}])
async def test_ticket_stream_ends_when_the_buying_token_expires(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """The ticket outlives nothing: the stream still ends at the token's own exp."""
    await create_task(sql, "t1")
    ticket = await buy(server, client, {"task_id": "t1"}, ttl=2)
    async with open_stream(client, server.stream_url("t1"), params={"ticket": ticket}) as s:
        assert (await s.next()).event == "progress"
        ev = await s.next(timeout=5)
        assert ev.event == "error" and ev.json() == {"error": "Token expired"}
        await s.wait_closed()


@pytest.mark.parametrize(
    "body, detail",
    [
        ("[]", "the body must be a JSON object"),
        ('"t1"', "the body must be a JSON object"),
        ("null", "the body must be a JSON object"),
        ("12", "the body must be a JSON object"),
        ("{}", 'give exactly one of "task_id" or "task_ids"'),
        ('{"task_id": "a", "task_ids": ["a"]}', 'give exactly one of "task_id" or "task_ids"'),
        ('{"task_id": 1e999}', "task ids must be strings"),
        ('{"task_id": ' + "9" * 5000 + "}", None),
        ('{"task_ids": "a"}', '"task_ids" must be a non-empty list of strings'),
        ('{"task_ids": []}', '"task_ids" must be a non-empty list of strings'),
        ('{"task_ids": [1]}', "task ids must be strings"),
        ('{"task_id": "a\\u0000b"}', "task id must not contain control characters"),
        ('{"task_id": "' + "x" * 201 + '"}', "task id must be 1 to 200 characters"),
        ('{"task_ids": [' + ",".join(f'"t{i}"' for i in range(101)) + "]}", None),
        ("[" * 20000 + "]" * 20000, None),
        ("{not json", None),
        (b"\xff\xfe{}", None),
    ],
)
async def test_bad_ticket_requests_are_clean_400(
    server: LiveServer, client: httpx.AsyncClient, body: str | bytes, detail: str | None
) -> None:
    r = await client.post(
        server.url + TICKETS,
        content=body,
        headers={**bearer(server.token()), "Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]
    if detail is not None:
        assert r.json()["detail"] == detail


async def test_ticket_endpoint_takes_only_the_authorization_header(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    url = server.url + TICKETS
    assert (await client.post(url, json={"task_id": "t1"})).status_code == 401
    r = await client.post(url, json={"task_id": "t1"}, params={"access_token": server.token()})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = await client.post(url, json={"task_id": "t1"}, headers=bearer("nope"))
    assert r.status_code == 401
    big = await client.post(
        url, content=b"{" + b" " * 70_000 + b"}", headers=bearer(server.token())
    )
    assert big.status_code == 413 and big.json()["error"]


async def test_repeated_credentials_in_the_query_are_400(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    for name in ("ticket", "access_token"):
        r = await client.get(server.stream_url("t1"), params=[(name, "a"), (name, "b")])
        assert r.status_code == 400 and r.json()["error"] == f"give {name} once"


@pytest.mark.parametrize("settings_overrides", [{"allow_query_token": False}])
async def test_query_tokens_can_be_turned_off(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="success")
    token = server.token()
    r = await client.get(server.stream_url("t1"), params={"access_token": token})
    assert r.status_code == 401 and "ticket" in r.json()["error"]
    assert token not in r.text
    ticket = await buy(server, client, {"task_id": "t1"})
    assert (await client.get(server.stream_url("t1"), params={"ticket": ticket})).status_code == 200


@pytest.mark.parametrize("settings_overrides", [{"jwt_cookie": "ts_token"}])
async def test_token_from_a_cookie_when_configured(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="success")
    async with httpx.AsyncClient(cookies={"ts_token": server.token()}) as c:
        assert (await c.get(server.stream_url("t1"))).status_code == 200
    async with httpx.AsyncClient(cookies={"other": server.token()}) as c:
        assert (await c.get(server.stream_url("t1"))).status_code == 401


async def test_cookie_is_ignored_unless_configured(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    async with httpx.AsyncClient(cookies={"ts_token": server.token()}) as c:
        assert (await c.get(server.stream_url("t1"))).status_code == 401


# -- token expiry in the middle of a stream --------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"jwt_leeway": 0}])
async def test_token_expiring_mid_stream_sends_error_and_closes(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    token = server.token(ttl=2)
    exp = time.time() + 2
    async with open_stream(client, server.stream_url("t1"), token=token) as s:
        assert (await s.next()).event == "progress"
        await sql.execute("UPDATE taskstream.tasks SET progress = 5 WHERE id = 't1'")
        assert (await s.next()).json()["progress"] == 5  # still live before exp
        ev = await s.next(timeout=5)
        assert ev.event == "error" and ev.json() == {"error": "Token expired"}
        # exp is whole seconds: the event comes at exp (rounded down), not before, not late.
        assert exp - 1.05 <= time.time() <= exp + 1.0
        await s.wait_closed()


# -- an identity provider end to end ---------------------------------------------------------


async def test_jwks_idp_end_to_end(
    database_url: str, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """ES256 tokens from a JWKS IdP with issuer and audience: what an Auth0/Keycloak setup does."""
    idp = JWKSServer([private_key("ES256")])
    settings = conftest.make_settings(
        database_url,
        jwt_secret=None,
        jwks_url=idp.url,
        jwt_issuer="https://idp.test/",
        jwt_audience=("taskstream",),
    )
    try:
        async with run_server(settings) as live:
            await create_task(sql, "t1", state="success")
            good = claims(iss="https://idp.test/", aud="taskstream")
            token = sign(private_key("ES256"), "ES256", good, kid="ES256-0")
            r = await client.get(live.stream_url("t1"), headers=bearer(token))
            assert r.status_code == 200 and b"event: complete" in r.content
            bad = sign(
                private_key("ES256"),
                "ES256",
                claims(iss="https://idp.test/", aud="billing"),
                kid="ES256-0",
            )
            r = await client.get(live.stream_url("t1"), headers=bearer(bad))
            assert r.status_code == 401 and r.json() == {"error": "Token audience not accepted"}
            # The core HS256 secret is not configured, so HS256 tokens are not accepted at all.
            r = await client.get(live.stream_url("t1"), headers=bearer(live.token()))
            assert r.status_code == 401
            # A ticket bought with an IdP token works like any other.
            r = await client.post(live.url + TICKETS, json={"task_id": "t1"}, headers=bearer(token))
            r = await client.get(live.stream_url("t1"), params={"ticket": r.json()["ticket"]})
            assert r.status_code == 200
            assert idp.requests == 1
    finally:
        idp.stop()


# -- two server processes, one database ------------------------------------------------------


async def test_ticket_bought_on_one_process_works_on_another_once(database_url: str) -> None:
    env = _clean_env(DATABASE_URL=database_url, TASKSTREAM_JWT_SECRET=SECRET)
    a, b = await start_serve(env), await start_serve(env)
    try:
        await asyncio.gather(a.wait_ready(), b.wait_ready())
        assert a.url != b.url
        conn = await asyncpg.connect(database_url)
        try:
            await create_task(conn, "t1", state="success")
        finally:
            await conn.close()
        from server.auth import issue_token

        token = issue_token(SECRET, "alice", ttl=60)
        async with httpx.AsyncClient(timeout=10) as c:
            r = await c.post(a.url + TICKETS, json={"task_id": "t1"}, headers=bearer(token))
            ticket = r.json()["ticket"]
            path = "/api/v1/sse/tasks/t1/progress"
            r = await c.get(b.url + path, params={"ticket": ticket})
            assert r.status_code == 200 and b"event: complete" in r.content
            for proc in (a, b):
                assert (await c.get(proc.url + path, params={"ticket": ticket})).status_code == 401
    finally:
        codes = await asyncio.gather(a.stop(), b.stop())
    assert codes == [0, 0]
    assert "Traceback" not in "".join(a.output + b.output)
