"""The SSE parser and encoder, with no I/O."""

from __future__ import annotations

import random

import pytest

from quorum.sse import DONE, SSEParser, SSEProtocolError, encode

STREAM = (
    b'data: {"a":1}\n\n'
    b": keep-alive comment\n\n"
    b"event: message\r\nid: 7\r\ndata: line one\r\ndata: line two\r\n\r\n"
    b"data:no-space\rdata: cr only\r\r"
    b"retry: 100\nunknown: x\ndata: last\n\n" + DONE
)
EXPECTED = ['{"a":1}', "line one\nline two", "no-space\ncr only", "last", "[DONE]"]


def test_parses_lf_crlf_and_cr_line_endings_comments_and_multiline_data() -> None:
    events = SSEParser().feed(STREAM)
    assert [e.data for e in events] == EXPECTED
    assert events[1].event == "message" and events[1].id == "7"
    assert events[-1].is_done


@pytest.mark.parametrize("seed", range(20))
def test_any_split_of_the_bytes_gives_the_same_events(seed: int) -> None:
    rng = random.Random(seed)
    parser = SSEParser()
    events = []
    i = 0
    while i < len(STREAM):
        step = rng.randint(1, 9)
        events.extend(parser.feed(STREAM[i : i + step]))
        i += step
    assert [e.data for e in events] == EXPECTED
    assert parser.pending == 0


def test_raw_bytes_of_events_are_exactly_what_was_received() -> None:
    data = b'data: {"x": "y"}\n\ndata: two\r\n\r\n'
    events = SSEParser().feed(data)
    assert b"".join(e.raw for e in events) == data


def test_a_stream_cut_mid_event_leaves_bytes_pending() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"partial"') == []
    assert parser.pending == len(b'data: {"partial"')


def test_an_event_without_data_is_not_dispatched() -> None:
    assert SSEParser().feed(b"event: ping\n\n: comment\n\n") == []


def test_an_oversized_event_is_a_protocol_error() -> None:
    parser = SSEParser(max_event_bytes=64)
    with pytest.raises(SSEProtocolError):
        parser.feed(b"data: " + b"x" * 100)


def test_encode_round_trips_single_and_multi_line_data() -> None:
    for payload in ("{}", "a\nb", "a\r\nb\rc", ""):
        events = SSEParser().feed(encode(payload))
        expected = payload.replace("\r\n", "\n").replace("\r", "\n")
        if payload:
            assert [e.data for e in events] == [expected]
    assert encode(b"[DONE]") == DONE
