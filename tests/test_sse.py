"""The SSE parser and encoder, with no I/O, and the relay's fast split that stands in for the
parser on whole one-line events."""

from __future__ import annotations

import random
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from quorum.routing.relay import remote_events, whole_events
from quorum.sse import DONE, SSEParser, SSEProtocolError, encode

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "quorum-hypothesis")

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


# --- the relay's fast split (quorum.routing.relay.whole_events) ---------------------------------

_PIECES = [b"data: ", b"data:", b"data: {}", b"x", b"\xc3\xa9", b"\xff", b"\n", b"\n\n", b"\r"]
_PIECES += [b"\r\n", b": comment", b"event: e", b"id: 1", b" ", b"[DONE]"]


@settings(max_examples=2000, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=24))
def test_the_fast_split_finds_exactly_the_parsers_events(pieces: list[bytes]) -> None:
    raw = b"".join(pieces)
    fields = whole_events(raw)
    if fields is None:
        return
    parser = SSEParser()
    events = parser.feed(raw)
    assert parser.pending == 0
    assert [(f + b"\n\n", f[6:].decode("utf-8", "replace")) for f in fields] == [
        (e.raw, e.data) for e in events
    ]


def test_the_fast_split_takes_quorums_own_events_and_leaves_the_rest_to_the_parser() -> None:
    ours = b'data: {"a":1}\n\n' + DONE
    assert whole_events(ours) == [b'data: {"a":1}', b"data: [DONE]"]
    for other in (
        b'data: {"a":1}\n',  # cut before its blank line
        b'data: {"a":1}\r\n\r\n',  # CRLF
        b"data: one\ndata: two\n\n",  # two data lines
        b": keep-alive\n\n",  # a comment
        b"event: x\ndata: 1\n\n",  # another field
        b"data: 1\n\n\n",  # a stray LF after it
        b"",
    ):
        assert whole_events(other) is None, other


@pytest.mark.parametrize("seed", range(10))
async def test_remote_events_give_the_parsers_events_for_any_cut_of_the_bytes(seed: int) -> None:
    rng = random.Random(seed)
    stream = (b'data: {"a":1}\n\n' * 3 + STREAM + b"data: \xff\xfe\n\n" + DONE) * 2
    cuts = sorted(rng.sample(range(1, len(stream)), 12))
    # whole events in some pieces (the fast path), cut ones in others (the parser)
    cuts += [i + len(b'data: {"a":1}\n\n') for i in (0, 15, 30)]
    cuts = sorted(set(cuts))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]

    class Peer:
        async def body(self) -> AsyncGenerator[bytes]:
            for chunk in chunks:
                yield chunk

    got = [event async for batch in remote_events(Peer()) for event in batch]
    assert got == [(e.raw, e.data) for e in SSEParser().feed(stream)]
