"""The SSE encoder on exact bytes: no value can start a new field or event."""

from __future__ import annotations

import pytest

from server.stream import encoder as sse


def test_data_only() -> None:
    assert sse.encode("hello") == b"data: hello\n\n"


def test_all_fields_in_order() -> None:
    assert sse.encode('{"a":1}', event="progress", id=7, retry=1500) == (
        b'event: progress\nid: 7\nretry: 1500\ndata: {"a":1}\n\n'
    )


@pytest.mark.parametrize("payload", ["a\nb", "a\rb", "a\r\nb"])
def test_multiline_data_becomes_several_data_lines(payload: str) -> None:
    assert sse.encode(payload) == b"data: a\ndata: b\n\n"


def test_newline_in_data_cannot_inject_an_event() -> None:
    out = sse.encode("x\n\nevent: complete\ndata: {}")
    assert out == b"data: x\ndata: \ndata: event: complete\ndata: data: {}\n\n"
    # Only the final blank line terminates the event.
    assert out.count(b"\n\n") == 1


def test_event_and_id_are_single_line() -> None:
    out = sse.encode("d", event="progress\ndata: evil", id="1\r\n2\x003")
    assert out == b"event: progressdata: evil\nid: 123\ndata: d\n\n"


def test_empty_data_is_one_empty_data_line() -> None:
    assert sse.encode("") == b"data: \n\n"


def test_no_fields_is_nothing() -> None:
    assert sse.encode() == b""


def test_retry_alone() -> None:
    assert sse.retry(3000) == b"retry: 3000\n\n"


def test_negative_retry_is_rejected() -> None:
    with pytest.raises(ValueError):
        sse.encode(retry=-1)


def test_comment_heartbeat() -> None:
    assert sse.comment("heartbeat") == b": heartbeat\n\n"
    assert sse.comment() == b":\n\n"


def test_multiline_comment_stays_comment() -> None:
    assert sse.comment("a\nevent: x") == b": a\n: event: x\n\n"


def test_unicode_is_utf8() -> None:
    assert sse.encode("转写中", event="progress") == "event: progress\ndata: 转写中\n\n".encode()
