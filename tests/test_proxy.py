"""Behind a reverse proxy: X-Forwarded-For counts only if TASKSTREAM_TRUSTED_PROXY_HOPS says so."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import httpx
import pytest
from hypercorn.middleware import ProxyFixMiddleware

from server.logs import forwarded_client
from tests.conftest import SECRET
from tests.test_cli import _clean_env, start_serve

CHAIN = "198.51.100.9, 203.0.113.7"  # what the client claimed, then what the proxy saw


def _access_clients(output: str, path: str) -> list[Any]:
    clients = []
    for line in output.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == "access" and record.get("path") == path:
                clients.append(record["client"])
    return clients


@pytest.mark.parametrize(
    ("hops", "expected"),
    [(None, "127.0.0.1"), ("0", "127.0.0.1"), ("1", "203.0.113.7"), ("2", "198.51.100.9")],
)
async def test_access_log_shows_the_forwarded_client_only_when_configured(
    database_url: str, hops: str | None, expected: str
) -> None:
    extra = {} if hops is None else {"TASKSTREAM_TRUSTED_PROXY_HOPS": hops}
    env = _clean_env(DATABASE_URL=database_url, TASKSTREAM_JWT_SECRET=SECRET, **extra)
    serve = await start_serve(env)
    try:
        await serve.wait_ready()
        async with httpx.AsyncClient() as client:
            r = await client.get(f"{serve.url}/healthz", headers={"X-Forwarded-For": CHAIN})
            assert r.status_code == 200
            r = await client.get(f"{serve.url}/readyz")  # no header: the socket's address
            assert r.status_code == 200
    finally:
        await serve.stop()
    output = "".join(serve.output)
    assert _access_clients(output, "/healthz") == [expected], output
    assert _access_clients(output, "/readyz") == ["127.0.0.1"], output


async def test_a_negative_hop_count_is_a_configuration_error(database_url: str) -> None:
    env = _clean_env(
        DATABASE_URL=database_url,
        TASKSTREAM_JWT_SECRET=SECRET,
        TASKSTREAM_TRUSTED_PROXY_HOPS="-1",
    )
    r = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "TASKSTREAM_TRUSTED_PROXY_HOPS" in r.stderr, r


@pytest.mark.parametrize(
    "values",
    [
        [],
        [b"203.0.113.7"],
        [b"198.51.100.9, 203.0.113.7"],
        [b"10.0.0.1", b"198.51.100.9 , 203.0.113.7"],
    ],
)
@pytest.mark.parametrize("hops", [0, 1, 2, 3])
async def test_the_access_log_rule_is_the_middleware_rule(values: list[bytes], hops: int) -> None:
    """The access log and the app (Hypercorn's ProxyFixMiddleware) name the same client."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["client"] = scope["client"]

    headers = [(b"x-forwarded-for", v) for v in values] + [(b"host", b"example")]
    scope = {"type": "http", "headers": headers, "client": ("127.0.0.1", 5000)}
    await ProxyFixMiddleware(app, mode="legacy", trusted_hops=hops)(scope, None, None)
    ours = forwarded_client(headers, hops)
    if ours is None:
        assert seen["client"] == ("127.0.0.1", 5000)
    else:
        assert seen["client"] == (ours, 0)
