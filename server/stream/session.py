"""One open SSE stream, from its first write to its close: what it remembers between events
(:class:`StreamSession`), the loop that writes them (:func:`run`), and the direct write of a
single-task stream's progress straight to its socket (:func:`direct_write`).

:mod:`server.stream.routes` decides whether a stream opens and what it starts with, then hands
the session to :func:`run` as the response body.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server import metrics
from server.auth import Principal
from server.hypercorn_internals import Connection, frame_chunk, progress_chunk
from server.runtime import Runtime
from server.stream import encoder
from server.stream.encoder import END_OF_STREAM_ID
from server.stream.observe import CloseReason, Ending, observe_push
from server.stream.registry import Lease
from server.tasks import TaskState

__all__ = ["StreamSession", "direct_heartbeat", "direct_write", "run", "single_event"]


@dataclass(slots=True)
class StreamSession:
    """What one open stream needs to remember between events."""

    rt: Runtime
    lease: Lease
    principal: Principal
    # Tasks still open on this stream; the stream ends when this empties (unless owner-wide).
    open_ids: set[str]
    multi: bool = False
    owner_wide: bool = False
    # Order of ``ids`` for the multi-task resume id (a positional list of versions).
    order: list[str] = field(default_factory=list)
    # Leading events (snapshots) computed by the view before the response started.
    preamble: list[bytes] = field(default_factory=list)
    # Kinds of the events made by finish() and not yet counted as sent (counted after the write).
    kinds: list[str] = field(default_factory=list)
    # The connection behind this request, for the direct write (see direct_write).
    connection: Connection | None = None
    # Why the stream ended, set where it ends (read by observed()).
    ending: Ending = field(default_factory=Ending)
    # A group stream: the group's id, and its tasks by sequence number (for the resume id).
    group_id: str | None = None
    seqs: dict[int, str] = field(default_factory=dict)
    # Loop-clock times: the next heartbeat (moved by run() and by direct_heartbeat), and the
    # first of the stream's timeout and its token's expiry, which end it.
    next_beat: float = 0.0
    end_at: float = 0.0

    def resume_id(self) -> str | None:
        if not self.multi or self.owner_wide:
            return None
        sub = self.lease.sub
        assert sub is not None
        if self.group_id is not None:
            # One version per sequence number of the group, from 1 (0: not seen, or no task).
            last = max(self.seqs, default=0)
            seqs = self.seqs
            return ".".join(
                str(sub.sent_version(seqs[n])) if n in seqs else "0" for n in range(1, last + 1)
            )
        return ".".join(str(sub.sent_version(tid)) for tid in self.order)

    def progress(self, state: TaskState) -> bytes:
        if not self.multi:
            return encoder.progress_event(state)
        return encoder.multi_progress_event(state, self.resume_id())

    def finish(self, state: TaskState) -> list[bytes]:
        """Events for a state; marks the task closed when it is terminal or gone."""
        if state.deleted:
            self.open_ids.discard(state.id)
            self.kinds.append("error")
            self.ending.reason = CloseReason.NOT_FOUND
            if self.multi:
                return [encoder.not_found_event(state.id, event_id=self.resume_id())]
            return [encoder.not_found_event(event_id=END_OF_STREAM_ID)]
        if self.group_id is not None:
            if state.group_seq is not None:
                self.seqs[state.group_seq] = state.id
            if not state.terminal:
                self.open_ids.add(state.id)  # a task that joined the group after the stream opened
        out = [self.progress(state)]
        self.kinds.append("progress")
        if state.terminal:
            self.open_ids.discard(state.id)
            out.append(encoder.complete_event(state, with_task_id=self.multi))
            self.kinds.append("complete")
            self.ending.reason = CloseReason.COMPLETE
        return out

    def count_sent(self, extra: str | None = None) -> None:
        """Count what was just written: the events finish() made, and one ``extra`` kind."""
        tally = metrics.TALLY
        for kind in self.kinds:
            tally.count_sent(kind)
        self.kinds.clear()
        if extra is not None:
            tally.count_sent(extra)

    @property
    def done(self) -> bool:
        if self.group_id is not None:
            # Closed (no task joins any more), every task terminal, nothing left to write.
            sub = self.lease.sub
            assert sub is not None
            return sub.group_closed and not self.open_ids and not sub.pending
        return not self.open_ids and not self.owner_wide

    def wants(self, state: TaskState) -> bool:
        """Whether a state taken from the mailbox goes out on this stream."""
        if state.id in self.open_ids or self.owner_wide:
            return True
        # A group stream also takes tasks new to it, but not the deletion of a finished one.
        return self.group_id is not None and not state.deleted


async def single_event(chunk: bytes, kind: str) -> AsyncIterator[bytes]:
    yield chunk
    metrics.TALLY.count_sent(kind)


def direct_write(
    stream: StreamSession, transport: asyncio.WriteTransport
) -> Callable[[TaskState], bool]:
    """Write a stream's ``progress`` events to its socket from the registry's dispatch.

    The ordinary path wakes the stream's task, which hands the event to Quart, Hypercorn and h11
    before it reaches the socket. With one update watched by thousands of streams that path was
    most of the CPU per watcher beyond the ``send()`` system call itself (bench fan-out profile).
    Here the event is framed as an HTTP/1.1 chunk and written on the spot: for a single-task
    stream the chunk is made once per state, whatever the number of watchers; a multi-task (or
    group) stream's event carries its own resume id, so it is made per stream, exactly as the
    mailbox path would make it.

    The mailbox calls this only while the stream is parked in ``wait()`` with nothing pending, so
    nothing the stream still has to write can be overtaken. It declines (returns False, and the
    mailbox path takes over with its conflation and the send timeout) for terminal states and
    deletions, which end the stream or one of its tasks, and whenever the socket has not drained
    what it was given: a slow client never gets more than the kernel accepts. It never sees
    another owner's state: :meth:`Subscription.offer` turns a task given to someone else into
    its deletion first.
    """
    sub = stream.lease.sub
    assert sub is not None
    open_ids = stream.open_ids
    owner_wide = stream.owner_wide
    multi = stream.multi
    tally = metrics.TALLY
    progress_event = encoder.progress_event

    def write(state: TaskState) -> bool:
        if state.terminal or state.deleted or not (owner_wide or state.id in open_ids):
            return False
        if transport.is_closing() or transport.get_write_buffer_size():
            return False
        if multi:
            # Marked first: the event's resume id lists the versions handed over, this one too.
            sub.mark_sent(state)
            transport.write(frame_chunk(stream.progress(state)))
        else:
            transport.write(state.memo_chunk or progress_chunk(state, progress_event(state)))
            sub.mark_sent(state)
        tally.count_sent("progress")
        tally.direct_writes += 1
        observe_push((state,))
        return True

    return write


def direct_heartbeat(
    stream: StreamSession, transport: asyncio.WriteTransport, interval: float
) -> Callable[[float], float | None]:
    """Write a parked stream's heartbeat to its socket from the loop's shared timer.

    The ordinary path wakes the stream's task only to hand 13 bytes to Quart, Hypercorn and h11;
    with tens of thousands of idle streams that was most of the server's idle CPU. Called by
    :class:`~server.stream.mailbox.Deadlines` only while the stream is parked with nothing
    pending, with the same rules as :func:`direct_write`: the same framed bytes as the ordinary
    path, and a decline (None) whenever the deadline is not a heartbeat's or the socket has not
    drained, so the stream's task takes it with its send timeout.
    """
    chunk = frame_chunk(encoder.HEARTBEAT)
    tally = metrics.TALLY

    def beat(now: float) -> float | None:
        if now < stream.next_beat or now >= stream.end_at:
            return None
        if transport.is_closing() or transport.get_write_buffer_size():
            return None
        transport.write(chunk)
        tally.count_sent("heartbeat")
        tally.direct_heartbeats += 1
        stream.next_beat = now + interval
        return min(stream.next_beat, stream.end_at)

    return beat


async def run(stream: StreamSession) -> AsyncIterator[bytes]:
    # Runs after the view returned, outside the request context: everything comes in `stream`.
    # The lease was kept for this body: entering it again makes its end the release.
    async with stream.lease as sub:
        rt = stream.rt
        settings = rt.settings
        ending = stream.ending
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + settings.stream_timeout
        # The token's own end, mapped onto the loop clock (leeway as accepted at verification).
        token_deadline = now + (stream.principal.expires_at + rt.verifier.leeway - time.time())
        stream.end_at = min(deadline, token_deadline)
        # Streams opened together (a reconnect storm) would otherwise beat in lockstep.
        stream.next_beat = now + settings.heartbeat * random.uniform(0.5, 1.0)
        # Everything ready at once goes out as one write: each write costs a trip through
        # Quart, Hypercorn and h11, which dominates fan-out to thousands of streams.
        yield b"".join([encoder.retry_field(settings.retry_ms), *stream.preamble])
        stream.count_sent("retry")
        # The response has started: from now on, progress may go straight to the socket.
        if stream.connection is not None:
            transport = stream.connection.chunked_transport()
            if transport is not None:
                sub.attach_direct(
                    direct_write(stream, transport),
                    direct_heartbeat(stream, transport, settings.heartbeat),
                )
        while not stream.done:
            if sub.pending:
                chunks: list[bytes] = []
                pushed: list[TaskState] = []
                for state in sub.take():
                    if stream.wants(state):
                        chunks.extend(stream.finish(state))
                        pushed.append(state)
                if chunks:
                    yield b"".join(chunks) if len(chunks) > 1 else chunks[0]
                    stream.count_sent()
                    observe_push(pushed)  # after the write: commit -> socket
                continue
            if sub.closing is not None:
                yield encoder.retry_field(settings.retry_ms)
                stream.count_sent("retry")
                ending.reason = CloseReason.SHUTDOWN
                return
            now = loop.time()
            if now >= token_deadline:
                yield encoder.token_expired_event()
                stream.count_sent("error")
                ending.reason = CloseReason.TOKEN_EXPIRED
                return
            if now >= deadline:
                yield encoder.timeout_event()
                stream.count_sent("timeout")
                ending.reason = CloseReason.TIMEOUT
                return
            if now >= stream.next_beat:
                yield encoder.HEARTBEAT
                stream.count_sent("heartbeat")
                stream.next_beat = now + settings.heartbeat
                continue
            # No await since the check of sub.pending above, so no offer can be missed.
            await sub.wait(min(stream.end_at, stream.next_beat))
        if stream.group_id is not None:
            yield encoder.group_complete_event(
                stream.group_id, len(stream.seqs), event_id=stream.resume_id()
            )
            stream.count_sent("complete")
            ending.reason = CloseReason.COMPLETE
