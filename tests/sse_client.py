"""A real SSE client for tests: httpx streaming plus httpx-sse's parser, read in the background.

Events land in a queue so a test can wait for the next one with a time bound, or prove that
nothing arrives within a short window.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import EventSource, ServerSentEvent


@dataclass
class Stream:
    response: httpx.Response
    events: asyncio.Queue[ServerSentEvent | None] = field(default_factory=asyncio.Queue)
    retries: list[int] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def next(self, timeout: float = 2.0) -> ServerSentEvent:
        item = await asyncio.wait_for(self.events.get(), timeout)
        if item is None:
            raise EOFError("stream closed")
        return item

    async def expect_nothing(self, within: float = 0.3) -> None:
        try:
            item = await asyncio.wait_for(self.events.get(), within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected event: {item!r}")

    async def wait_closed(self, timeout: float = 2.0) -> None:
        await asyncio.wait_for(self.closed.wait(), timeout)

    def drain(self) -> list[ServerSentEvent]:
        out = []
        while not self.events.empty():
            item = self.events.get_nowait()
            if item is not None:
                out.append(item)
        return out


async def _pump(stream: Stream) -> None:
    try:
        async for sse in EventSource(stream.response).aiter_sse():
            if sse.retry is not None:
                stream.retries.append(sse.retry)
            # Per the SSE spec a block with no data is not dispatched (httpx-sse yields it).
            if sse.data == "" and sse.event == "message":
                continue
            await stream.events.put(sse)
    except (httpx.HTTPError, asyncio.CancelledError):
        pass
    finally:
        stream.closed.set()
        await stream.events.put(None)


@contextlib.asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, url: str, *, token: str | None = None, **kwargs: Any
) -> AsyncIterator[Stream]:
    headers = dict(kwargs.pop("headers", {}) or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with client.stream("GET", url, headers=headers, **kwargs) as response:
        stream = Stream(response)
        if response.status_code != 200:
            await response.aread()
            stream.closed.set()
            yield stream
            return
        pump = asyncio.create_task(_pump(stream))
        try:
            yield stream
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
