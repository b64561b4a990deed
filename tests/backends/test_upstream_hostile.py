"""A hostile client body or a hostile upstream never hurts the node: every failure is one of
Quorum's own exceptions with a clean message, every wait ends, and no message carries the
upstream's URL or credentials.

The upstream here is a raw HTTP/1.1 server on 127.0.0.1 port 0 (a trio socket server in the
test's nursery) that answers with crafted bytes; time-dependent tests run on trio's MockClock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio

from quorum.backends.base import Generation
from quorum.backends.upstream import EXCERPT_CHARS, UpstreamBackend
from quorum.errors import BackendBroken, BackendSaturated, BackendUnavailable, InvalidRequest
from quorum.wire import parse_chat_request

Script = Callable[[trio.SocketStream], Awaitable[None]]

STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
ROLE = (
    b'data: {"id":"u1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'
    b"\n\n"
)


@dataclass
class RawUpstream:
    """What the server saw: one request head (and body) per connection."""

    port: int = 0
    requests: list[bytes] = field(default_factory=list)

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials}127.0.0.1:{self.port}/v1"


async def raw_upstream(nursery: trio.Nursery, script: Script) -> RawUpstream:
    """Serve ``script`` (it writes the whole answer) to every request."""
    upstream = RawUpstream()

    async def handle(stream: trio.SocketStream) -> None:
        try:
            upstream.requests.append(await _read_request(stream))
            await script(stream)
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    upstream.port = listeners[0].socket.getsockname()[1]
    return upstream


async def _read_request(stream: trio.SocketStream) -> bytes:
    data = b""
    for _ in range(1000):
        if b"\r\n\r\n" in data:
            break
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    for _ in range(1000):
        if len(body) >= length:
            break
        body += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + body


def stream_of(*events: bytes, done: bool = True) -> Script:
    """A 200 event stream of ``events`` (then ``[DONE]`` if ``done``), then close."""

    async def script(stream: trio.SocketStream) -> None:
        await stream.send_all(
            STREAM_HEAD + b"".join(events) + (b"data: [DONE]\n\n" if done else b"")
        )

    return script


async def _forever() -> None:
    await trio.sleep_forever()


def generation(**fields: Any) -> Generation:
    body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], **fields}
    return Generation(parse_chat_request(body), "rid00001", 1, False)


async def read_all(backend: UpstreamBackend, gen: Generation | None = None) -> list[bytes]:
    """Open ``gen`` (a plain chat request by default) and read every event."""
    out: list[bytes] = []
    try:
        async with backend.open(gen or generation()) as events:
            async for event in events:
                out.append(event)
    finally:
        await backend.aclose()
    return out


# --- a hostile client body -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "what"),
    [
        # the request parser (quorum.wire) refuses these two first, in its own words
        ({"top_k": float("nan")}, "top_k", "top_k"),
        ({"logit_bias": {"50256": float("-inf")}}, "logit_bias", "logit_bias"),
        ({"messages": [{"role": "user", "content": "a\ud800"}]}, "messages[0].content", "lone"),
        ({"metadata": {"\udfff": "x"}}, "metadata.\\udfff", "lone UTF-16 surrogate"),
    ],
)
async def test_a_body_json_cannot_carry_is_a_400_naming_the_field_and_nothing_is_sent(
    nursery: trio.Nursery, fields: dict[str, Any], param: str, what: str
) -> None:
    upstream = await raw_upstream(nursery, stream_of(ROLE))
    backend = UpstreamBackend("llama", url=upstream.url())
    with pytest.raises(InvalidRequest) as info:
        await read_all(backend, generation(**fields))
    assert info.value.status == 400 and (info.value.param or "").startswith(param)
    assert what in info.value.message and param in info.value.message
    info.value.message.encode()  # the message itself is sendable
    assert upstream.requests == [] and backend.load().busy == 0


# --- a hostile upstream: events -----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"5", "JSON a number, not an object"),
        (b"[]", "JSON an array, not an object"),
        (b'"chunk"', "JSON a string, not an object"),
        (b"null", "JSON null, not an object"),
        (b"NaN", "not JSON"),
        pytest.param(b"[" * 100_000, "not JSON", id="nested-100000-deep"),
        (b"{not json", "not JSON"),
        (b'{"choices": 5}', "'choices' is not an array"),
        (b'{"choices": [5]}', "'choices[0]' is not an object"),
        (b'{"choices": [{"delta": []}]}', "'choices[0].delta' is not an object"),
        (b'{"choices": [{"delta": {"content": 5}}]}', "'choices[0].delta.content' is not"),
        (b'{"choices": [{"finish_reason": ["stop"]}]}', "finish_reason' is not a string"),
        (b'{"choices": [{"delta": {"tool_calls": {}}}]}', "tool_calls' is not an array"),
        (b'{"choices": [{"delta": {"tool_calls": [{"index": "0"}]}}]}', "index' is not an"),
        (
            b'{"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": 1}}]}}]}',
            "function.name' is not a string",
        ),
        (b'{"usage": 7, "choices": []}', "'usage' is not an object"),
        (b'{"choices": [{"delta": {"content": "\\ud800"}}]}', "not valid Unicode"),
        (b'{"choices": [{"delta": {"content": "x"}}], "x": 1e999}', "number out of range"),
    ],
)
async def test_an_event_that_is_not_a_well_formed_chunk_breaks_the_stream_cleanly(
    nursery: trio.Nursery, data: bytes, problem: str
) -> None:
    upstream = await raw_upstream(nursery, stream_of(ROLE, b"data: " + data + b"\n\n"))
    backend = UpstreamBackend("llama", url=upstream.url())
    out: list[bytes] = []
    with pytest.raises(BackendBroken) as info:
        async with backend.open(generation()) as events:
            async for event in events:
                out.append(event)
    await backend.aclose()
    assert len(out) == 1  # the role chunk, relayed before the bad event
    assert problem in info.value.message
    assert "model 'llama'" in info.value.message and "127.0.0.1" not in info.value.message


async def test_an_upstream_error_event_breaks_the_stream_with_a_short_clean_excerpt(
    nursery: trio.Nursery,
) -> None:
    message = "out of memory \x1b[31m\u202e" + "x" * 1000
    event = b"data: " + json.dumps({"error": {"message": message}}).encode() + b"\n\n"
    upstream = await raw_upstream(nursery, stream_of(ROLE, event))
    with pytest.raises(BackendBroken) as info:
        await read_all(UpstreamBackend("llama", url=upstream.url()))
    text = info.value.message
    assert "sent an error event: out of memory [31m xxx" in text
    assert "\x1b" not in text and "\u202e" not in text
    assert len(text) < EXCERPT_CHARS + 100


async def test_a_stream_without_done_is_broken(nursery: trio.Nursery) -> None:
    upstream = await raw_upstream(nursery, stream_of(ROLE, done=False))
    with pytest.raises(BackendBroken, match="ended the stream without"):
        await read_all(UpstreamBackend("llama", url=upstream.url()))


# --- deadlines -----------------------------------------------------------------------------


async def test_no_answer_within_the_read_timeout_is_unavailable_504(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    upstream = await raw_upstream(nursery, lambda stream: _forever())
    backend = UpstreamBackend("llama", url=upstream.url(), read_timeout_s=30)
    start = trio.current_time()
    with pytest.raises(BackendUnavailable, match="did not answer within 30 s") as info:
        with trio.fail_after(3600):  # virtual seconds: fails instead of hanging without a deadline
            await read_all(backend)
    assert info.value.status == 504
    assert 30 <= trio.current_time() - start < 31
    assert backend.load().busy == 0


async def test_silence_mid_stream_is_broken_after_the_read_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def stall(stream: trio.SocketStream) -> None:
        await stream.send_all(STREAM_HEAD + ROLE)
        await trio.sleep_forever()

    upstream = await raw_upstream(nursery, stall)
    backend = UpstreamBackend("llama", url=upstream.url())  # read_timeout_s: 60 by default
    start = trio.current_time()
    with pytest.raises(BackendBroken, match="sent nothing for 60 s"):
        with trio.fail_after(3600):
            await read_all(backend)
    assert 60 <= trio.current_time() - start < 61


async def test_an_error_answer_trickled_forever_is_read_within_the_read_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def trickle(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 500 Oops\r\nconnection: close\r\n\r\n")
        while True:
            await stream.send_all(b" ")
            await trio.sleep(5)

    upstream = await raw_upstream(nursery, trickle)
    start = trio.current_time()
    with pytest.raises(BackendUnavailable, match="answered 500"):
        with trio.fail_after(3600):
            await read_all(UpstreamBackend("llama", url=upstream.url(), read_timeout_s=20))
    assert trio.current_time() - start < 21


@pytest.mark.parametrize("value", [0, -1, True, "5", float("inf"), float("nan")])
def test_read_timeout_must_be_a_positive_number(value: Any) -> None:
    table = {"url": "http://127.0.0.1:8000/v1", "read_timeout_s": value}
    with pytest.raises(ValueError, match="read_timeout_s"):
        UpstreamBackend.from_config("llama", table)


def test_read_timeout_defaults_to_a_minute_and_is_configurable() -> None:
    url = "http://127.0.0.1:8000/v1"
    assert UpstreamBackend.from_config("m", {"url": url})._client.timeout.read == 60.0
    configured = UpstreamBackend.from_config("m", {"url": url, "read_timeout_s": 5})
    assert configured._client.timeout.read == 5.0


# --- what clients and logs are told --------------------------------------------------------


async def test_an_error_status_names_the_model_not_the_url_with_a_short_clean_excerpt(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    message = "bad\x00 thing \x1b[2J at http://user:hunter2@127.0.0.1/ " + "y" * 5000
    body = json.dumps({"error": {"message": message}}).encode()

    async def fail(stream: trio.SocketStream) -> None:
        head = f"HTTP/1.1 500 Oops\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        await stream.send_all(head + body)

    upstream = await raw_upstream(nursery, fail)
    url = upstream.url("user:hunter2@")
    caplog.set_level(logging.INFO)
    with pytest.raises(BackendUnavailable) as info:
        await read_all(UpstreamBackend("llama", url=url))
    text = info.value.message
    assert text.startswith("The upstream server for model 'llama' answered 500: bad thing [2J at ")
    assert len(text) < EXCERPT_CHARS + 80
    assert "\x00" not in text and "\x1b" not in text
    assert f"127.0.0.1:{upstream.port}" not in text
    assert "hunter2" not in text and "hunter2" not in caplog.text
    assert f"http://127.0.0.1:{upstream.port}/v1" in caplog.text  # the operator sees where
    assert b"authorization: basic " in upstream.requests[0].lower()  # still sent, as auth


@pytest.mark.parametrize(
    ("status", "exception"), [(429, BackendSaturated), (503, BackendUnavailable)]
)
async def test_an_error_status_without_an_openai_error_says_just_the_status(
    nursery: trio.Nursery, status: int, exception: type[Exception]
) -> None:
    page = b"<html>" + b"<p>internal details</p>" * 1000 + b"</html>"

    async def fail(stream: trio.SocketStream) -> None:
        head = f"HTTP/1.1 {status} No\r\ncontent-length: {len(page)}\r\n\r\n".encode()
        await stream.send_all(head + page)

    upstream = await raw_upstream(nursery, fail)
    with pytest.raises(exception) as info:
        await read_all(UpstreamBackend("llama", url=upstream.url("u:p4ss@")))
    assert info.value.message == f"The upstream server for model 'llama' answered {status}."


async def test_an_unreachable_upstream_is_named_by_its_model_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.socket.socket() as sock:  # a port that nothing listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    caplog.set_level(logging.INFO)
    backend = UpstreamBackend("llama", url=f"http://admin:s3cr3t@127.0.0.1:{port}/v1")
    with pytest.raises(BackendUnavailable) as info:
        await read_all(backend)
    assert info.value.message == (
        "The upstream server for model 'llama' could not be reached (ConnectError)."
    )
    assert "s3cr3t" not in caplog.text and f"http://127.0.0.1:{port}/v1" in caplog.text
