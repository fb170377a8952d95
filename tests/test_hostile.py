"""Hostile input gets a clean 4xx, never a 500, a stack trace or an echoed credential.

Some requests cannot be sent through httpx (raw bytes in the request line, bad percent-escapes
it would re-encode), so they go over a plain socket.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import SECRET, LiveServer, create_task


async def raw_request(server: LiveServer, head: bytes) -> tuple[int, bytes]:
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def get(target: bytes, token: str, *extra: bytes) -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: t"]
    if token:
        lines.append(b"Authorization: Bearer " + token.encode())
    return b"\r\n".join([*lines, *extra, b"", b""])


@pytest.mark.parametrize(
    "path, status",
    [
        (b"/api/v1/sse/tasks/%FF%FE/progress", 400),  # percent-encoded bytes that are not UTF-8
        (b"/api/v1/sse/tasks/%ED%A0%80/progress", 400),  # an encoded UTF-16 surrogate
        (b"/api/v1/sse/tasks/a%00b/progress", 400),  # control characters
        (b"/api/v1/sse/tasks/a%1Bb/progress", 400),
        (b"/api/v1/sse/tasks/" + b"x" * 5000 + b"/progress", 400),  # huge
        (b"/api/v1/sse/tasks/a%0D%0Ab/progress", 404),  # the router refuses line breaks itself
        (b"/api/v1/sse/tasks?ids=%FF", 400),
        (b"/api/v1/sse/tasks?ids=a&ids=b", 400),  # repeated parameter
        (b"/api/v1/sse/tasks?ids=", 400),
        (b"/api/v1/sse/tasks?ids=" + b",".join(b"t%d" % i for i in range(101)), 400),
        (b"/api/v1/sse/tasks/t1/progress?ticket=%FF", 400),
        (b"/api/v1/sse/tasks/t1/progress?access_token=a&access_token=b", 400),
        (b"/api/v1/sse/tasks/t1/progress?ticket=a&ticket=b", 400),
    ],
)
async def test_bad_urls_are_clean_4xx(server: LiveServer, path: bytes, status: int) -> None:
    # Credentials in the query only count without a header, so leave it off for those.
    token = "" if b"access_token=" in path or b"ticket=" in path else server.token()
    code, body = await raw_request(server, get(path, token))
    assert code == status, body
    assert json.loads(body)["error"]


async def test_raw_non_utf8_bytes_in_the_request_line_are_400(server: LiveServer) -> None:
    code, _ = await raw_request(server, get(b"/api/v1/sse/tasks/\xff\xfe/progress", "x"))
    assert code == 400  # h11 refuses the request line before the app sees it


async def test_oversized_request_head_is_431(server: LiveServer) -> None:
    """Hypercorn's h11 keeps at most h11_max_incomplete_size (16 KiB) of an unfinished request
    head; past it the answer is 431 with an empty body and the connection closes. (A head that
    arrives whole in one read may be a little larger and still parse; then our own limits,
    like the 8 KB token, apply.)"""
    code, body = await raw_request(
        server, get(b"/api/v1/sse/tasks/t1/progress", "x", b"X-Big: " + b"a" * 100_000)
    )
    assert code == 431 and body == b""


@pytest.mark.parametrize(
    "last_event_id",
    ["9" * 5000, "²", "-1", "1e9", "9" * 30 + ".1", "²." + "1", "." * 3000],
    ids=[
        "5000-digits",
        "superscript",
        "negative",
        "float",
        "30-digits",
        "superscript-pair",
        "dots",
    ],
)
async def test_hostile_last_event_id_is_ignored_not_a_500(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection, last_event_id: str
) -> None:
    """Regression: "²".isdigit() is True and int() refuses it; 5000 digits pass isdigit() and
    exceed int()'s 4300-digit limit. Both were 500s on the multi-task stream."""
    await create_task(sql, "a", state="success")
    await create_task(sql, "b", state="success")
    auth = {"Authorization": f"Bearer {server.token()}"}
    multi = server.url + "/api/v1/sse/tasks"
    for url, params in ((multi, {"ids": "a,b"}), (server.stream_url("a"), {})):
        header = {**auth, "Last-Event-ID": last_event_id.encode("utf-8")}
        r = await client.get(url, params=params, headers=header)  # type: ignore[arg-type]
        assert r.status_code in (200, 204), r.text
        r = await client.get(url, params={**params, "lastEventId": last_event_id}, headers=auth)
        assert r.status_code in (200, 204), r.text


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer a b c",
        "Bearer " + "x" * 9000,
        "bearer \x7f",
    ],
)
async def test_hostile_authorization_headers_are_401(
    server: LiveServer, client: httpx.AsyncClient, authorization: str
) -> None:
    r = await client.get(server.stream_url("t1"), headers={"Authorization": authorization})
    assert r.status_code == 401 and r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")


async def test_no_response_echoes_a_token(server: LiveServer, client: httpx.AsyncClient) -> None:
    token = server.token()
    bad = token[:-4] + "AAAA"
    for params in ({"access_token": bad}, {"ticket": bad}):
        r = await client.get(server.stream_url("t1"), params=params)
        assert r.status_code == 401 and bad not in r.text and token not in r.text


# -- hostile request headers -----------------------------------------------------------------

# Values that broke a parser once, or that sit on a parser's edge: an empty tag, a byte that is
# not ASCII, digits past int()'s 4300-digit limit, a superscript digit ("²".isdigit() is True).
HOSTILE_VALUES: tuple[bytes, ...] = (
    b"",
    b'""',
    b"\xff",
    b'"\xff"',
    b"\xb2",  # "²" once decoded as Latin-1, as HTTP header bytes are
    b'W/"\xb9\xb2"',
    b"9" * 4400,
    b'"' + b"9" * 4400 + b'"',
    b'W/"' + b"9" * 4400 + b'"',
    '"²"'.encode(),
    "²".encode(),
    b"*",
    b"W/",
    b'W/""',
    b'"1", ""',
    b",,,,",
    b"null",
    b"-1",
    b"1e999",
    b"\t",
    b"=" * 3000,
    b"a=" + b"b" * 3000,
    b"bytes=0-0,-1,1-",
    b"Bearer " + "é".encode() * 100,
    b"application/json; charset=\xff",
    b"application/json; charset=" + b"x" * 3000,
    b"http://[::1",
    b"http://\xc3\xa9.example",
)


async def send_raw(
    server: LiveServer, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
) -> tuple[int, bytes]:
    """One request on its own connection (closed after the answer); the status and the body."""
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    names = {name.lower() for name, _ in headers}
    lines = [method + b" " + target + b" HTTP/1.1", b"Connection: close"]
    if b"host" not in names:
        lines.append(b"Host: " + f"{host}:{port}".encode())
    body = b"{}" if method in (b"POST", b"PATCH") else b""
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    lines += [name + b": " + value for name, value in headers]
    try:
        writer.write(b"\r\n".join([*lines, b"", b""]) + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def _legal(raw: bytes) -> bytes:
    # Bytes h11 accepts in a field value (tab, visible ASCII, obs-text) and no edge whitespace:
    # anything else h11 refuses with a 400 before the app sees it, which tests only h11.
    return bytes(c for c in raw if c == 9 or 0x20 <= c <= 0x7E or c >= 0x80).strip(b" \t")


HEADER_VALUE = st.one_of(
    st.binary(max_size=80).map(_legal),
    st.text(max_size=40).map(lambda t: _legal(t.encode("utf-8"))),
    st.lists(st.sampled_from(HOSTILE_VALUES), min_size=1, max_size=3).map(b", ".join),
    st.integers().map(lambda i: b'W/"%d"' % i),
)


def generated_values(count: int) -> list[bytes]:
    """``count`` header values drawn by hypothesis (derandomized), after the known hostile ones.

    The requests go to a server in this test's event loop, which a synchronous ``@given`` test
    cannot await, so the values are drawn first and sent afterwards (no shrinking; a failure
    names the value).
    """
    drawn: list[bytes] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(HEADER_VALUE)
    def draw(value: bytes) -> None:
        drawn.append(value)

    draw()
    return [*HOSTILE_VALUES, *drawn]


COOKIE = "ts_token"


def _token(server: LiveServer, **kwargs: Any) -> bytes:
    return b"Bearer " + server.token(**kwargs).encode()


def _cookie(server: LiveServer) -> bytes:
    return f"{COOKIE}={server.token()}".encode()


def _is_json_error(body: bytes) -> bool:
    try:
        return "error" in json.loads(body)
    except (ValueError, TypeError):
        return False


# (method, target, credential header, header names fuzzed there). A credential header that is
# itself fuzzed is replaced by the fuzzed value.
FUZZ_TARGETS: list[tuple[bytes, bytes, str, tuple[bytes, ...]]] = [
    (b"GET", b"/api/v1/tasks/run?wait=0.05", "bearer", (b"If-None-Match",)),
    (b"GET", b"/api/v1/tasks/missing?wait=0.05", "bearer", (b"If-None-Match",)),
    (b"GET", b"/api/v1/tasks/done", "bearer", (b"If-None-Match", b"Accept", b"X-Forwarded-For")),
    (b"GET", b"/api/v1/sse/tasks/done/progress", "bearer", (b"Last-Event-ID", b"Accept")),
    (b"GET", b"/api/v1/sse/tasks?ids=done,done2", "bearer", (b"Last-Event-ID",)),
    (b"GET", b"/api/v1/tasks/done", "none", (b"Authorization", b"Cookie")),
    (b"POST", b"/api/v1/sse/tickets", "none", (b"Authorization",)),
    (b"POST", b"/api/v1/sse/tickets", "bearer", (b"Content-Type",)),
    (b"POST", b"/api/v1/tasks", "bearer", (b"Content-Type", b"Origin", b"Sec-Fetch-Site")),
    (b"PATCH", b"/api/v1/tasks/run", "writer", (b"Content-Type",)),
    (
        b"POST",
        b"/api/v1/tasks/run/cancel",
        "cookie",
        (b"Cookie", b"Origin", b"Sec-Fetch-Site", b"Content-Type", b"Host"),
    ),
    (
        b"OPTIONS",
        b"/api/v1/tasks",
        "none",
        (b"Origin", b"Access-Control-Request-Method", b"Access-Control-Request-Headers"),
    ),
    (
        b"GET",
        b"/static/taskstream.js",
        "none",
        (b"If-None-Match", b"If-Modified-Since", b"Range", b"If-Range", b"Accept-Encoding"),
    ),
    (b"GET", b"/metrics", "none", (b"Authorization",)),
]


@pytest.mark.parametrize(
    "settings_overrides",
    [{"jwt_cookie": COOKIE, "cors_origins": ("http://app.example.test",)}],
)
async def test_hostile_header_values_never_get_a_500(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    """Every header the server (or its framework) parses, with hostile and generated values:
    a clean 4xx (JSON with "error" when the app answers) or an answer that ignores the header,
    never a 5xx."""
    await create_task(sql, "run", state="running")
    await create_task(sql, "done", state="success")
    await create_task(sql, "done2", state="success")
    values = generated_values(30)
    credentials = {
        "none": [],
        "bearer": [(b"Authorization", _token(server))],
        "writer": [(b"Authorization", _token(server, scopes=["tasks:write"]))],
        "cookie": [
            (b"Cookie", _cookie(server)),
            (b"Origin", server.url.encode()),
            (b"Content-Type", b"application/json"),
        ],
    }
    failures: list[str] = []
    for method, target, credential, names in FUZZ_TARGETS:
        for name in names:
            for value in values:
                base = [(n, v) for n, v in credentials[credential] if n.lower() != name.lower()]
                status, body = await send_raw(server, method, target, [*base, (name, value)])
                problem = None
                if status >= 500:
                    problem = "5xx"
                elif b"Traceback" in body or SECRET.encode() in body:
                    problem = "leak"
                elif status >= 400 and body and not _is_json_error(body):
                    problem = "not a JSON error"
                if problem:
                    failures.append(
                        f"{problem}: {status} {method!r} {target!r} {name!r}: {value!r:.80}"
                    )
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("task_id", ["t1", "missing"])
@pytest.mark.parametrize(
    "if_none_match",
    [b'""', b"\xb2", b"9" * 4400, b'"' + b"9" * 4400 + b'"', '"²"'.encode(), b"W/", b'W/""'],
    ids=[
        "empty-tag",
        "latin1-superscript",
        "4400-digits",
        "4400-digits-quoted",
        "superscript",
        "W/",
        "W/e",
    ],
)
async def test_hostile_if_none_match_with_wait_is_422_not_500(
    server: LiveServer, sql: asyncpg.Connection, task_id: str, if_none_match: bytes
) -> None:
    """Regression: ``""`` parsed to a None tag (AttributeError); byte 0xB2 ("²" in Latin-1)
    and 4400 digits passed isdigit() and made int() raise ValueError: 500 on a long poll,
    whether the task existed or not. None of them names a
    version, so the long poll has none to wait from."""
    await create_task(sql, "t1", state="running")
    target = f"/api/v1/tasks/{task_id}?wait=0.1".encode()
    auth = (b"Authorization", _token(server))
    status, body = await send_raw(server, b"GET", target, [auth, (b"If-None-Match", if_none_match)])
    assert status == 422, body
    assert json.loads(body)["detail"][0]["field"] == "after_version"
    # Without wait the header only decides 304 or not: no tag matches, so the usual answer.
    status, body = await send_raw(
        server, b"GET", target.partition(b"?")[0], [auth, (b"If-None-Match", if_none_match)]
    )
    assert status == (200 if task_id == "t1" else 404), body


async def test_if_none_match_with_a_version_among_hostile_tags_long_polls(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="running")
    version = await sql.fetchval("SELECT version FROM taskstream.tasks WHERE id = 't1'")
    header = b'"", "' + b"9" * 4400 + b'", W/"%d"' % version
    auth = (b"Authorization", _token(server))
    status, _ = await send_raw(
        server, b"GET", b"/api/v1/tasks/t1?wait=0.1", [auth, (b"If-None-Match", header)]
    )
    assert status == 304


@pytest.mark.parametrize(
    "settings_overrides", [{"jwt_cookie": COOKIE, "cors_origins": ("http://app.example.test",)}]
)
async def test_repeated_headers_are_not_a_500(server: LiveServer, sql: asyncpg.Connection) -> None:
    """Two of a header the server reads: the framework keeps the first or joins them; either
    way a clean answer."""
    await create_task(sql, "run", state="running")
    bearer = _token(server)
    cases: list[tuple[bytes, bytes, list[tuple[bytes, bytes]]]] = [
        (b"GET", b"/api/v1/tasks/run", [(b"Authorization", bearer), (b"Authorization", b"x")]),
        (
            b"GET",
            b"/api/v1/tasks/run?wait=0.05",
            [(b"Authorization", bearer), (b"If-None-Match", b'""'), (b"If-None-Match", b"\xb2")],
        ),
        (
            b"GET",
            b"/api/v1/sse/tasks/run/progress",
            [(b"Authorization", b"Bearer x"), (b"Last-Event-ID", b"1"), (b"Last-Event-ID", b"2")],
        ),
        (b"GET", b"/api/v1/tasks/run", [(b"Cookie", _cookie(server)), (b"Cookie", b"=;=")]),
        (
            b"POST",
            b"/api/v1/tasks",
            [
                (b"Authorization", bearer),
                (b"Content-Type", b"application/json"),
                (b"Content-Type", b"text/plain"),
            ],
        ),
        (b"GET", b"/healthz", [(b"Host", b"a"), (b"Host", b"b")]),
    ]
    for method, target, headers in cases:
        status, body = await send_raw(server, method, target, headers)
        assert status < 500, (target, headers, body)
        assert not body or status < 400 or _is_json_error(body), body
