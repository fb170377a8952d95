"""Property tests of the SSE encoder against a parser that follows the WHATWG spec.

Whatever text goes into ``data``, ``event`` or ``id``, the bytes on the wire parse back into
exactly one event with those values (line breaks in ``data`` normalised to LF, and CR/LF/NUL
dropped from the single-line fields): no value can start a field or another event.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from server.stream import encoder as sse


@dataclass
class Parsed:
    event: str
    data: str
    id: str | None
    retry: int | None


def parse(stream: bytes) -> tuple[list[Parsed], list[str]]:
    """The "interpret an event stream" algorithm of the HTML spec (9.2.6), for one stream.

    Returns the dispatched events and the comments seen.
    """
    text = stream.decode("utf-8")
    text = text.removeprefix("\ufeff")
    lines: list[str] = []
    buf = ""
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\r":
            lines.append(buf)
            buf = ""
            if i + 1 < len(text) and text[i + 1] == "\n":
                i += 1
        elif c == "\n":
            lines.append(buf)
            buf = ""
        else:
            buf += c
        i += 1
    # A trailing line without its end-of-line is discarded by the spec (stream ended mid-line).
    events: list[Parsed] = []
    comments: list[str] = []
    data, event_type, last_id, retry = "", "", None, None
    data_seen = False
    for line in lines:
        if line == "":
            if data_seen:
                events.append(
                    Parsed(event_type or "message", data.removesuffix("\n"), last_id, retry)
                )
            data, event_type, data_seen = "", "", False
            continue
        if line.startswith(":"):
            comments.append(line[1:])
            continue
        field, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if field == "event":
            event_type = value
        elif field == "data":
            data += value + "\n"
            data_seen = True
        elif field == "id":
            if "\0" not in value:
                last_id = value
        elif field == "retry":
            if value.isascii() and value.isdigit():
                retry = int(value)
    return events, comments


def one_line(value: str) -> str:
    return value.replace("\r", "").replace("\n", "").replace("\0", "")


# Text of every kind, with line breaks and field-looking fragments mixed in generously.
_FRAGMENTS = ["\r", "\n", "\r\n", "\0", ":", " ", "\ufeff", "\u2028", "\x85", "event: x", "data:"]
nasty = st.lists(
    st.one_of(st.text(st.characters(codec="utf-8"), max_size=8), st.sampled_from(_FRAGMENTS)),
    max_size=12,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(data=nasty, event=st.none() | nasty, id=st.none() | nasty)
def test_encode_round_trips_as_exactly_one_event(
    data: str, event: str | None, id: str | None
) -> None:
    events, comments = parse(sse.encode(data, event=event, id=id))
    assert comments == []
    assert len(events) == 1
    (ev,) = events
    expected_data = data.replace("\r\n", "\n").replace("\r", "\n")
    assert ev.data == expected_data
    if event is not None and one_line(event):
        assert ev.event == one_line(event)
    else:
        assert ev.event == "message"
    assert ev.id == (one_line(id) if id is not None else None)


@settings(max_examples=100, deadline=None)
@given(chunks=st.lists(st.tuples(nasty, st.none() | nasty), min_size=1, max_size=5))
def test_concatenated_events_stay_separate(chunks: list[tuple[str, str | None]]) -> None:
    stream = b"".join(sse.encode(d, event=e) for d, e in chunks)
    events, _ = parse(stream)
    assert [ev.data for ev in events] == [
        d.replace("\r\n", "\n").replace("\r", "\n") for d, _ in chunks
    ]


@settings(max_examples=200, deadline=None)
@given(text=nasty)
def test_comments_never_dispatch_anything(text: str) -> None:
    events, comments = parse(sse.comment(text) + sse.retry(1000))
    assert events == []
    assert len(comments) == max(1, len(text.replace("\r\n", "\n").replace("\r", "\n").split("\n")))


@settings(max_examples=100, deadline=None)
@given(ms=st.integers(min_value=0, max_value=10**12))
def test_retry_alone_sets_the_delay_without_an_event(ms: int) -> None:
    events, _ = parse(sse.retry(ms) + sse.encode("x"))
    assert events == [Parsed("message", "x", None, ms)]
